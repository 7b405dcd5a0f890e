"""The gap analysis' measurements, on plain arrays: two-sample separability (kNN / random-forest AUC,
overall and per label, from :mod:`exp_script.metrics`), latent moments, and the observation model's
per-cell and per-gene statistics. Nothing here reads files."""
import numpy as np
from scipy import stats

from . import metrics as m
from .features import FeatureSpace, stratified_subsample

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def balanced_rows(reference_labels, compared_labels, rng):
    """Row indices of both sides cut to the smaller side's size, each keeping its label proportions."""
    size = min(len(reference_labels), len(compared_labels))
    return (stratified_subsample(reference_labels, size, rng), stratified_subsample(compared_labels, size, rng))


def two_sample(reference, reference_labels, compared, compared_labels, seed=0, folds=5, knn_neighbors=5,
               rf_trees=100, use_rf=True):
    """Real-vs-compared separability on the given features, as the evaluation scores it: a balanced sample,
    out-of-fold P(compared) stratified by side and label, AUC overall and within each label (0.5 means
    indistinguishable). Returns {"overall": {...}, "per_label": {label: {...}}}."""
    reference_labels, compared_labels = np.asarray(reference_labels), np.asarray(compared_labels)
    rng = np.random.default_rng([seed, 6])
    reference_rows, compared_rows = balanced_rows(reference_labels, compared_labels, rng)
    features = np.vstack([np.asarray(reference)[reference_rows], np.asarray(compared)[compared_rows]])
    is_compared = np.r_[np.zeros(len(reference_rows), bool), np.ones(len(compared_rows), bool)]
    labels = np.concatenate([reference_labels[reference_rows], compared_labels[compared_rows]])
    classifiers = {"knn": m.knn_classifier(knn_neighbors)}
    if use_rf:
        classifiers["rf"] = m.random_forest_classifier(rf_trees, seed=seed, n_jobs=1)
    overall = {"n_reference": int(len(reference_rows)), "n_compared": int(len(compared_rows))}
    per_label = {str(label): {"n_reference": int((reference_labels[reference_rows] == label).sum()),
                              "n_compared": int((compared_labels[compared_rows] == label).sum())}
                 for label in sorted(set(labels.tolist()))}
    for name, classifier in classifiers.items():
        probabilities = m.out_of_fold_probabilities(features, is_compared, classifier, folds, seed, groups=labels)
        overall[f"{name}_auc"] = m.two_sample_scores(probabilities, is_compared)["auc"]
        for label, target in per_label.items():
            rows = labels == label
            target[f"{name}_auc"] = m.two_sample_scores(probabilities[rows], is_compared[rows])["auc"]
    return {"overall": overall, "per_label": per_label}


def expression_two_sample(reference_x, reference_labels, compared_x, compared_labels, genes, n_hvg=2000, n_pcs=50,
                          seed=0, use_rf=True):
    """:func:`two_sample` on log-normalized expression, in the evaluation's feature space (top variable
    genes of the two sets pooled, z-scored, PCA)."""
    space = FeatureSpace(np.vstack([reference_x, compared_x]), genes, n_hvg, n_pcs, seed)
    return two_sample(space.embed(reference_x), reference_labels, space.embed(compared_x), compared_labels,
                      seed=seed, use_rf=use_rf)


def quantiles(values, levels=QUANTILES):
    """{"q05": ..., "q50": ...} of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    return {f"q{int(round(level * 100)):02d}": float(np.quantile(values, level)) for level in levels}


def latent_moments(reference, compared):
    """Per-dimension comparison of two latent samples, in units of the reference's spread.

    ``mean_shift``: mean over dimensions of |mean difference| / reference sd; ``log2_var_ratio_median`` and
    ``..._q05``/``..._q95``: log2(compared variance / reference variance) across dimensions (0 = same
    spread, negative = compared too narrow); ``narrow_dims``: share of dimensions with less than half the
    reference variance; ``norm``: quantiles of the compared latents' Euclidean norms.
    """
    reference = np.asarray(reference, dtype=np.float64)
    compared = np.asarray(compared, dtype=np.float64)
    sd = reference.std(axis=0)
    sd[sd == 0] = 1.0
    ratio = np.log2(np.maximum(compared.var(axis=0), 1e-12) / (sd ** 2))
    return {"mean_shift": float(np.mean(np.abs(compared.mean(axis=0) - reference.mean(axis=0)) / sd)),
            "log2_var_ratio_median": float(np.median(ratio)),
            "log2_var_ratio_q05": float(np.quantile(ratio, 0.05)),
            "log2_var_ratio_q95": float(np.quantile(ratio, 0.95)),
            "narrow_dims": float(np.mean(ratio < -1.0)),
            "norm": quantiles(np.linalg.norm(compared, axis=1))}


def gene_statistics(counts):
    """Per gene: share of cells with zero counts, and the squared coefficient of variation of the
    size-normalized counts (each cell scaled to the median library size), NaN where the mean is 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1)
    scale = np.median(totals[totals > 0]) / np.maximum(totals, 1.0) if (totals > 0).any() else np.ones_like(totals)
    normalized = counts * scale[:, None]
    mean = normalized.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cv2 = np.where(mean > 0, normalized.var(axis=0) / mean ** 2, np.nan)
    return {"zero_fraction": (counts == 0).mean(axis=0), "cv2": cv2, "mean": mean}


def observation_comparison(reference_counts, compared_counts, min_mean=0.1):
    """How the compared counts' per-cell and per-gene statistics match the reference's.

    Library sizes (quantiles of both sides), the per-cell zero fraction, and per gene: zero fraction
    (Pearson correlation, mean |difference|, mean difference) and dispersion (CV^2 of size-normalized
    counts; Spearman correlation and the median log2 ratio compared/reference over genes whose
    reference mean is at least ``min_mean`` counts per cell and expressed on both sides).
    """
    reference_counts = np.asarray(reference_counts, dtype=np.float64)
    compared_counts = np.asarray(compared_counts, dtype=np.float64)
    reference, compared = gene_statistics(reference_counts), gene_statistics(compared_counts)
    zero_gap = compared["zero_fraction"] - reference["zero_fraction"]
    shared = (reference["mean"] >= min_mean) & np.isfinite(reference["cv2"]) & np.isfinite(compared["cv2"])
    shared &= (reference["cv2"] > 0) & (compared["cv2"] > 0)
    result = {"library_size_reference": quantiles(reference_counts.sum(axis=1)),
              "library_size_compared": quantiles(compared_counts.sum(axis=1)),
              "cell_zero_fraction_reference": float((reference_counts == 0).mean()),
              "cell_zero_fraction_compared": float((compared_counts == 0).mean()),
              "gene_zero_fraction_pearson": _pearson(reference["zero_fraction"], compared["zero_fraction"]),
              "gene_zero_fraction_mean_abs_diff": float(np.mean(np.abs(zero_gap))),
              "gene_zero_fraction_mean_diff": float(np.mean(zero_gap)),
              "dispersion_genes": int(shared.sum())}
    if shared.sum() >= 3:
        log_ratio = np.log2(compared["cv2"][shared] / reference["cv2"][shared])
        result["dispersion_spearman"] = float(stats.spearmanr(reference["cv2"][shared],
                                                              compared["cv2"][shared]).statistic)
        result["dispersion_log2_ratio_median"] = float(np.median(log_ratio))
    else:
        result["dispersion_spearman"] = result["dispersion_log2_ratio_median"] = float("nan")
    return result


def _pearson(first, second):
    if np.ptp(first) == 0 or np.ptp(second) == 0:
        return float("nan")
    return float(stats.pearsonr(first, second).statistic)
