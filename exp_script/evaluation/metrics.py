"""One function per evaluation metric, on plain arrays.

Every function takes cells x features arrays (log-normalized expression or an embedding of it; counts
or latents for the gap analysis' measurements at the end) and returns numbers; none of them reads files
or knows about the command line. "Reference" is the real side of a comparison, "compared" the side
under test (generated cells, or the other half of the real cells for the positive control).
"""
import contextlib
import logging
import os
import tempfile
import warnings

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from .features import FeatureSpace, balanced_rows

MMD_BANDWIDTH_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def gene_mean_correlations(reference, compared):
    """Spearman (``scc``) and Pearson (``pcc``) correlation of the per-gene mean expression."""
    reference_means = np.asarray(reference, dtype=np.float64).mean(axis=0)
    compared_means = np.asarray(compared, dtype=np.float64).mean(axis=0)
    if np.ptp(reference_means) == 0 or np.ptp(compared_means) == 0:
        return {"scc": float("nan"), "pcc": float("nan")}
    return {
        "scc": float(stats.spearmanr(reference_means, compared_means).statistic),
        "pcc": float(stats.pearsonr(reference_means, compared_means).statistic),
    }


def wasserstein_per_gene(reference, compared, genes_per_chunk=2048):
    """Exact 1-D Wasserstein-1 distance between the two samples of every gene (column).

    Vectorised form of ``scipy.stats.wasserstein_distance``: W1 is the integral over t in (0, 1]
    of |Q_ref(t) - Q_cmp(t)| where Q are the empirical quantile functions. Both are step
    functions whose steps fall on i/n and j/m, so on every interval between consecutive steps
    (the same intervals for all genes) each side is one order statistic.
    """
    reference = np.asarray(reference, dtype=np.float32)
    compared = np.asarray(compared, dtype=np.float32)
    n, m = reference.shape[0], compared.shape[0]
    if n == 0 or m == 0:
        raise ValueError("both samples need at least one cell")
    # step positions as integers over the common denominator n * m
    steps = np.union1d(np.arange(1, n + 1, dtype=np.int64) * m, np.arange(1, m + 1, dtype=np.int64) * n)
    widths = np.diff(np.concatenate([[0], steps])) / float(n * m)
    reference_rank = (steps + m - 1) // m - 1
    compared_rank = (steps + n - 1) // n - 1
    distances = np.empty(reference.shape[1], dtype=np.float64)
    for start in range(0, reference.shape[1], genes_per_chunk):
        stop = start + genes_per_chunk
        reference_sorted = np.sort(reference[:, start:stop], axis=0)
        compared_sorted = np.sort(compared[:, start:stop], axis=0)
        gaps = np.abs(reference_sorted[reference_rank] - compared_sorted[compared_rank])
        distances[start:stop] = widths @ gaps
    return distances


def mean_wasserstein(reference, compared):
    """Per-gene 1-D Wasserstein distance averaged over genes."""
    return float(wasserstein_per_gene(reference, compared).mean())


def wasserstein_of_means(reference, compared):
    """The paper's figure: 1-D Wasserstein distance between the two per-gene mean vectors."""
    return float(stats.wasserstein_distance(np.asarray(reference).mean(axis=0),
                                            np.asarray(compared).mean(axis=0)))


def rbf_gammas(embedding, rng, multipliers=MMD_BANDWIDTH_MULTIPLIERS, max_cells=1000):
    """RBF kernel widths from the median squared distance among ``embedding`` rows (the median
    heuristic), scaled by each multiplier: gamma = 1 / (multiplier * median)."""
    embedding = np.asarray(embedding, dtype=np.float64)
    if embedding.shape[0] > max_cells:
        embedding = embedding[rng.choice(embedding.shape[0], max_cells, replace=False)]
    squared = _squared_distances(embedding, embedding)
    upper = squared[np.triu_indices_from(squared, k=1)]
    median = float(np.median(upper)) if upper.size else 0.0
    if median <= 0:
        median = 1.0
    return [1.0 / (multiplier * median) for multiplier in multipliers]


def mmd_rbf(reference, compared, gammas):
    """Unbiased squared maximum mean discrepancy with an RBF kernel, averaged over bandwidths.

    About 0 (it can be slightly negative) when both samples come from one distribution.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(compared, dtype=np.float64)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        return float("nan")
    xx, yy, xy = _squared_distances(x, x), _squared_distances(y, y), _squared_distances(x, y)
    values = []
    for gamma in gammas:
        kxx, kyy, kxy = np.exp(-gamma * xx), np.exp(-gamma * yy), np.exp(-gamma * xy)
        within_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        within_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within_x + within_y - 2.0 * kxy.mean())
    return float(np.mean(values))


def _squared_distances(x, y):
    squared = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * (x @ y.T)
    return np.maximum(squared, 0.0)


def lisi_per_cell(embedding, sources, n_neighbors=90):
    """Per-cell LISI of ``sources`` on a kNN graph of ``embedding`` (scib-metrics' implementation).

    Returns the LISI values (1 = only one source around the cell, 2 = two sources evenly mixed)
    and the scaled iLISI of scib-metrics' ``ilisi_knn`` for all cells.
    """
    from scib_metrics import ilisi_knn, lisi_knn
    from scib_metrics.nearest_neighbors import NeighborsResults

    embedding = np.asarray(embedding, dtype=np.float32)
    sources = np.asarray(sources)
    k = int(min(n_neighbors, embedding.shape[0] - 1))
    if k < 3 or len(np.unique(sources)) < 2:
        return np.full(embedding.shape[0], np.nan), float("nan")
    distances, indices = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(embedding)
    graph = NeighborsResults(indices=indices, distances=distances)
    return np.asarray(lisi_knn(graph, sources)), float(ilisi_knn(graph, sources))


def scaled_ilisi(lisi_values, n_sources=2):
    """scib's scaling of the median LISI into [0, 1]: 1 means sources perfectly mixed."""
    lisi_values = np.asarray(lisi_values, dtype=np.float64)
    if lisi_values.size == 0 or np.all(np.isnan(lisi_values)):
        return float("nan")
    return float((np.nanmedian(lisi_values) - 1.0) / (n_sources - 1))


def out_of_fold_probabilities(features, is_compared, classifier, folds=5, seed=0, groups=None):
    """P(compared) for every cell, each predicted by a classifier that did not see it.

    The folds are stratified by side and, if ``groups`` (e.g. cell labels) is given, by side and
    group together: every fold then holds out the same share of real and compared cells of each
    group. Otherwise a small group whose fold happens to hold out more cells of one side leaves
    the other side in the majority around them, which biases the AUC below 0.5 under the null.
    """
    features = np.asarray(features)
    is_compared = np.asarray(is_compared, dtype=bool)
    probabilities = np.full(features.shape[0], np.nan)
    n_splits = int(min(folds, is_compared.sum(), (~is_compared).sum()))
    if n_splits < 2:
        return probabilities
    strata = is_compared.astype(str)
    if groups is not None:
        strata = np.char.add(np.char.add(strata, "|"), np.asarray(groups, dtype=str))
    splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # groups smaller than the number of folds are fine here
        splits = list(splitter.split(features, strata))
    for train, test in splits:
        model = classifier().fit(features[train], is_compared[train])
        column = list(model.classes_).index(True)
        probabilities[test] = model.predict_proba(features[test])[:, column]
    return probabilities


def knn_classifier(n_neighbors=5):
    return lambda: KNeighborsClassifier(n_neighbors=n_neighbors)


def random_forest_classifier(n_trees=100, seed=0, n_jobs=2):
    return lambda: RandomForestClassifier(n_estimators=n_trees, random_state=seed, n_jobs=n_jobs)


def two_sample_scores(probabilities, is_compared):
    """AUC and balanced accuracy of real-vs-compared predictions; 0.5 = indistinguishable."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    is_compared = np.asarray(is_compared, dtype=bool)
    known = ~np.isnan(probabilities)
    probabilities, is_compared = probabilities[known], is_compared[known]
    if is_compared.all() or not is_compared.any():
        return {"auc": float("nan"), "accuracy": float("nan")}
    return {
        "auc": float(roc_auc_score(is_compared, probabilities)),
        "accuracy": float(balanced_accuracy_score(is_compared, probabilities > 0.5)),
    }


def knn_auc(reference, compared, seed):
    """kNN real-vs-compared AUC (out-of-fold, 5 folds stratified by side, 5 neighbours) of two feature
    matrices used whole; 0.5 = indistinguishable."""
    features = np.vstack([reference, compared])
    is_compared = np.r_[np.zeros(len(reference), bool), np.ones(len(compared), bool)]
    probabilities = out_of_fold_probabilities(features, is_compared, knn_classifier(), seed=seed)
    return two_sample_scores(probabilities, is_compared)["auc"]


@contextlib.contextmanager
def _quiet_celltypist():
    """celltypist configures the root logger at import and logs every step at INFO; keep the
    caller's logging as it was and silence celltypist's own messages."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # celltypist creates its model folder (~/.celltypist) at import; the evaluation trains its own
    # models and downloads none, so unless the user chose a folder, point it at a temporary one
    user = getattr(os, "getuid", lambda: "user")()
    os.environ.setdefault("CELLTYPIST_FOLDER", os.path.join(tempfile.gettempdir(), f"cfdiffusion-celltypist-{user}"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import celltypist  # noqa: F401  (imported here for its logging side effect)
    root.handlers[:] = handlers
    root.setLevel(level)
    celltypist_logger = logging.getLogger("celltypist.logger")
    previous = celltypist_logger.level
    celltypist_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        celltypist_logger.setLevel(previous)


def train_celltypist(expression, labels, genes, seed=0):
    """A CellTypist logistic-regression model (SGD training) fitted on log-normalized cells."""
    import anndata

    with _quiet_celltypist():
        import celltypist

        reference = anndata.AnnData(X=np.asarray(expression, dtype=np.float32),
                                    obs=pd.DataFrame({"label": np.asarray(labels, dtype=str)},
                                                     index=_cell_names(len(labels))),
                                    var=pd.DataFrame(index=list(genes)))
        return celltypist.train(reference, labels="label", check_expression=False, use_SGD=True,
                                n_jobs=1, random_state=seed)


def predict_celltypist(model, expression, genes):
    """Best-match CellTypist labels for log-normalized cells (values clipped to the range
    CellTypist accepts for log1p data normalized to 10,000 counts)."""
    import anndata

    with _quiet_celltypist():
        import celltypist

        values = np.clip(np.asarray(expression, dtype=np.float32), 0.0, 9.2)
        query = anndata.AnnData(X=values, obs=pd.DataFrame(index=_cell_names(values.shape[0])),
                                var=pd.DataFrame(index=list(genes)))
        result = celltypist.annotate(query, model=model, majority_voting=False)
        return result.predicted_labels["predicted_labels"].astype(str).to_numpy()


def label_accuracy(predicted, intended):
    """Fraction of cells predicted as their intended label."""
    predicted, intended = np.asarray(predicted), np.asarray(intended)
    if predicted.size == 0:
        return float("nan")
    return float(np.mean(predicted == intended))


def marker_genes(expression, labels, genes, groups, top_n=50):
    """Top ``top_n`` up-regulated genes of each group against the rest of ``groups``
    (Wilcoxon rank-sum, scanpy's ``rank_genes_groups``). Cells of other labels are left out."""
    import anndata
    import scanpy as sc

    labels = np.asarray(labels, dtype=str)
    groups = [str(group) for group in groups]
    if len(groups) < 2:
        return {}
    keep = np.isin(labels, groups)
    adata = anndata.AnnData(X=np.asarray(expression, dtype=np.float32)[keep],
                            obs=pd.DataFrame({"label": pd.Categorical(labels[keep], categories=groups)},
                                             index=_cell_names(int(keep.sum()))),
                            var=pd.DataFrame(index=list(genes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.rank_genes_groups(adata, "label", method="wilcoxon", n_genes=top_n)
    names = adata.uns["rank_genes_groups"]["names"]
    return {group: [str(gene) for gene in names[group]] for group in groups}


def _cell_names(count):
    return [f"cell{i}" for i in range(count)]


def jaccard(first, second):
    """|A ∩ B| / |A ∪ B| of two gene lists; NaN when both are empty."""
    first, second = set(first), set(second)
    union = first | second
    return float(len(first & second) / len(union)) if union else float("nan")


# ---- the gap analysis' measurements: separability overall and per label, latent moments, and the
# observation model's per-cell and per-gene statistics ---------------------------------------------
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
    classifiers = {"knn": knn_classifier(knn_neighbors)}
    if use_rf:
        classifiers["rf"] = random_forest_classifier(rf_trees, seed=seed, n_jobs=1)
    overall = {"n_reference": int(len(reference_rows)), "n_compared": int(len(compared_rows))}
    per_label = {str(label): {"n_reference": int((reference_labels[reference_rows] == label).sum()),
                              "n_compared": int((compared_labels[compared_rows] == label).sum())}
                 for label in sorted(set(labels.tolist()))}
    for name, classifier in classifiers.items():
        probabilities = out_of_fold_probabilities(features, is_compared, classifier, folds, seed, groups=labels)
        overall[f"{name}_auc"] = two_sample_scores(probabilities, is_compared)["auc"]
        for label, target in per_label.items():
            rows = labels == label
            target[f"{name}_auc"] = two_sample_scores(probabilities[rows], is_compared[rows])["auc"]
    return {"overall": overall, "per_label": per_label}


def expression_two_sample(reference_x, reference_labels, compared_x, compared_labels, genes, n_hvg=2000, n_pcs=50,
                          seed=0, use_rf=True):
    """:func:`two_sample` on log-normalized expression, in the evaluation's feature space (top variable
    genes of the two sets pooled, z-scored, PCA).

    The larger side is first cut to the smaller side's size, each keeping its label proportions (as the
    evaluation subsamples every compared set to the reference's size), so that the feature space is fitted on
    equal numbers of both: a feature space fitted mostly on one side finds that side's own directions of
    variance, which makes the AUC depend on the ratio of the two sizes.
    """
    reference_labels, compared_labels = np.asarray(reference_labels), np.asarray(compared_labels)
    reference_rows, compared_rows = balanced_rows(reference_labels, compared_labels, np.random.default_rng([seed, 7]))
    reference_x, reference_labels = np.asarray(reference_x)[reference_rows], reference_labels[reference_rows]
    compared_x, compared_labels = np.asarray(compared_x)[compared_rows], compared_labels[compared_rows]
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
