"""Negative controls: two fake generators every metric is shown beside.

* **memorizer**: training cells drawn with replacement, as many per label as the generated set has. A
  perfect copier; a metric that scores it like real held-out cells cannot detect memorization.
* **collapsed**: each label's mean expression profile plus a little noise, as counts drawn the way the
  sampler writes them (a library size per cell, counts for it, then ``log1p(normalize_total)``). A
  generator that learned only the label means; a metric that scores it like real cells cannot detect a
  loss of within-type variation.

Both take their cells from the training set when one is given (``--train``), otherwise from the
control half of the real cells.
"""
import numpy as np

from guided_diffusion.data import TARGET_SUM
from guided_diffusion.data.normalize import log_normalize as _log_normalize

COLLAPSED_NOISE = 0.1  # log-normal spread of each cell's expected counts around its label's mean profile


def per_label_counts(labels):
    names, counts = np.unique(np.asarray(labels), return_counts=True)
    return dict(zip(names.tolist(), counts.tolist()))


def memorizer(source_x, source_labels, wanted, rng):
    """(cells, labels, source rows): for each label, ``wanted[label]`` source cells drawn with
    replacement. Labels the source lacks are left out."""
    rows = []
    for label, count in sorted(wanted.items()):
        candidates = np.flatnonzero(source_labels == label)
        if len(candidates):
            rows.append(rng.choice(candidates, count, replace=True))
    rows = np.concatenate(rows) if rows else np.zeros(0, int)
    return source_x[rows], source_labels[rows], rows


def log_normalize(counts, target_sum=TARGET_SUM):
    """log1p(normalize_total(target_sum)) of dense counts in float64, as the sampler computes it
    (:func:`guided_diffusion.data.normalize.log_normalize`)."""
    return _log_normalize(np.asarray(counts, dtype=np.float64), target_sum)


def collapsed(source_labels, wanted, rng, counts=None, totals=None, log_values=None):
    """(cells, labels): per label, its mean profile with small noise, ``wanted[label]`` cells.

    With ``counts``/``totals`` (raw counts and each cell's library size over all genes) every cell gets
    a library size drawn from its label's cells and Poisson counts around the label's mean expression
    fraction (times log-normal noise of ``COLLAPSED_NOISE``); the counts are then log-normalized over
    the evaluated genes. Without counts the label's mean log profile gets Gaussian noise (clipped at 0).
    """
    cells, labels = [], []
    for label, count in sorted(wanted.items()):
        members = np.flatnonzero(source_labels == label)
        if not len(members):
            continue
        if counts is not None:
            fractions = (counts[members] / np.maximum(totals[members], 1.0)[:, None]).mean(axis=0)
            library = rng.choice(totals[members], count, replace=True)
            noise = np.exp(rng.normal(0.0, COLLAPSED_NOISE, size=(count, fractions.size)))
            drawn = rng.poisson(library[:, None] * fractions[None, :] * noise)
            cells.append(log_normalize(drawn))
        else:
            profile = log_values[members].mean(axis=0)
            noisy = profile[None, :] + rng.normal(0.0, COLLAPSED_NOISE, size=(count, profile.size)) * (profile > 0)
            cells.append(np.maximum(noisy, 0.0).astype(np.float32))
        labels.append(np.full(count, label, dtype=object))
    if not cells:
        width = counts.shape[1] if counts is not None else log_values.shape[1]
        return np.zeros((0, width), np.float32), np.zeros(0, dtype=str)
    return np.vstack(cells), np.concatenate(labels).astype(str)
