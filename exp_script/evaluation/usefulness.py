"""Usefulness of generated cells for a downstream task: cell-type classification of held-out real cells.

The classifier is the logistic regression of label_classifier.py on the evaluation's features: the first
principal components of the training cells' most variable genes (z-scored, clipped at 10; the same
:class:`~exp_script.evaluation.features.FeatureSpace` as the cell-level metrics, fitted on the real
training cells only), standardized, scored on held-out real cells.

* **Train on synthetic, test on real (TSTR)**: trained on the generated cells only, beside the same
  classifier trained on the real training cells (the ceiling) and on the two negative controls.
* **Rare-type augmentation**: for each label with fewer than ``rare_max_cells`` training cells, the
  generated cells of that label are added to the real training set; per-label recall and F1 and macro-F1
  on the held-out cells, with and without the added cells. Each seed draws a bootstrap of the training
  cells (stratified by label) and of the added cells; figures are mean and standard deviation over seeds.
"""
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, recall_score
from sklearn.preprocessing import StandardScaler

from .label_classifier import fit_quietly, logistic_regression


@dataclass
class UsefulnessSettings:
    seed: int = 0
    n_hvg: int = 2000
    n_pcs: int = 50
    rare_max_cells: int = 30  # "few": a label with fewer training cells than this is rare
    seeds: int = 5


def fit_classifier(features, labels, seed):
    """The label classifier's logistic regression on the standardized features; returns its predict."""
    return fit_quietly(logistic_regression(StandardScaler(), seed=seed, max_iter=1000), features, labels).predict


def scores(predicted, truth, labels):
    per_label = {}
    recalls = recall_score(truth, predicted, labels=labels, average=None, zero_division=0)
    f1s = f1_score(truth, predicted, labels=labels, average=None, zero_division=0)
    for label, recall, f1 in zip(labels, recalls, f1s):
        per_label[label] = {"recall": float(recall), "f1": float(f1)}
    return {"accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)),
            "per_label": per_label}


def train_on_synthetic(features, heldout_labels, sources, seed):
    """{source: accuracy and macro-F1 on held-out cells} for a classifier trained on each source."""
    heldout_x = features["heldout"]
    labels = sorted(set(heldout_labels))
    results = {}
    for name, (x, y) in sources.items():
        if len(set(y)) < 2:
            results[name] = {"accuracy": float("nan"), "macro_f1": float("nan"), "cells": int(len(y))}
            continue
        predicted = fit_classifier(x, y, seed)(heldout_x)
        figures = scores(predicted, heldout_labels, labels)
        results[name] = {"accuracy": figures["accuracy"], "macro_f1": figures["macro_f1"], "cells": int(len(y))}
    return results


def _bootstrap(labels, rng):
    return np.concatenate([rng.choice(np.flatnonzero(labels == label), (labels == label).sum(), replace=True)
                           for label in np.unique(labels)])


def augmentation(train_x, train_labels, heldout_x, heldout_labels, additions, settings):
    """Per rare label and macro-F1, without and with each source's added cells, mean ± sd over seeds."""
    names, counts = np.unique(train_labels, return_counts=True)
    rare = [str(name) for name, count in zip(names, counts) if count < settings.rare_max_cells]
    evaluated = sorted(set(heldout_labels))
    result = {"rare_labels": {label: int(counts[list(names).index(label)]) for label in rare},
              "rare_max_cells": settings.rare_max_cells, "seeds": settings.seeds, "variants": {}}
    if not rare:
        return result
    runs = {"real only": []}
    for seed in range(settings.seeds):
        rng = np.random.default_rng([settings.seed, 13, seed])
        rows = _bootstrap(train_labels, rng)
        base_x, base_y = train_x[rows], train_labels[rows]
        runs["real only"].append(scores(fit_classifier(base_x, base_y, seed)(heldout_x), heldout_labels, evaluated))
        for source, (x, y) in additions.items():
            keep = np.flatnonzero(np.isin(y, rare))
            if not len(keep):
                continue
            added = rng.choice(keep, len(keep), replace=True)
            predicted = fit_classifier(np.vstack([base_x, x[added]]), np.concatenate([base_y, y[added]]),
                                       seed)(heldout_x)
            runs.setdefault(f"real + {source}", []).append(scores(predicted, heldout_labels, evaluated))
    for variant, figures in runs.items():
        result["variants"][variant] = _summarize(figures, rare)
    return result


def _mean_sd(values):
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def _summarize(figures, rare):
    summary = {"macro_f1": _mean_sd([item["macro_f1"] for item in figures]),
               "accuracy": _mean_sd([item["accuracy"] for item in figures]), "per_label": {}}
    for label in rare:
        if label in figures[0]["per_label"]:
            summary["per_label"][label] = {name: _mean_sd([item["per_label"][label][name] for item in figures])
                                           for name in ("recall", "f1")}
    return summary


def usefulness(train_x, train_labels, heldout_x, heldout_labels, sources, genes, settings, feature_space):
    """Both checks; ``sources`` maps a name (generated, memorizer, collapsed) to (expression, labels)."""
    space = feature_space(train_x, genes, settings.n_hvg, settings.n_pcs, settings.seed)
    features = {"heldout": space.embed(heldout_x)}
    embedded = {name: (space.embed(x), np.asarray(y)) for name, (x, y) in sources.items() if len(y)}
    train_features = space.embed(train_x)
    tstr_sources = {"real training cells": (train_features, train_labels), **embedded}
    return {
        "train_on_synthetic": train_on_synthetic(features, heldout_labels, tstr_sources, settings.seed),
        "augmentation": augmentation(train_features, train_labels, features["heldout"], heldout_labels, embedded,
                                     settings),
        "heldout_cells": int(len(heldout_labels)),
        "features": {"variable_genes": int(len(space.genes)), "pca_components": int(space.pca.n_components_)},
    }
