"""Evaluate generated cells against real ones: metrics, a positive control, plots and a report.

Design (written into every report):

* The real cells are split in two halves, stratified by label. Half A is the *reference*.
  "generated" compares A with the generated cells; "real_vs_real" (the positive control) compares
  A with the other half B, i.e. what a perfect generator would reach at this sample size.
* The generated cells are subsampled (stratified by label) to the size of B when there are more
  of them, so both comparisons have the same sample sizes and their figures can be read side by
  side.
* Gene-level metrics (scc, pcc, wasserstein) use every shared gene. Cell-level metrics (mmd,
  ilisi, kNN and random-forest classifiers) use a PCA of the highly variable genes fitted on the
  two compared sets pooled. A PCA fitted on the reference alone would put the reference in-sample
  and the compared cells out-of-sample: the reference then has extra variance along the trailing
  components, which the classifiers detect even between two halves of the real data (random-forest
  AUC 0.70 on Baron). Pooling keeps both sides symmetric, for the generated cells and the control
  alike. CellTypist is trained on A's highly variable genes; marker genes are searched among A's
  top variable genes.
* Per-label figures cover the labels with at least ``min_cells`` cells in A, B and the generated
  set; the others are listed as skipped with their counts.
"""
import json
import platform
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from guided_diffusion.atomic import atomic_output
from guided_diffusion.cli import UsageError
from guided_diffusion.data import load_dataset, read_h5ad

from . import metrics as m

RESULT_FORMAT = "cfdiffusion-evaluation/1"
SECTIONS = ("generated", "real_vs_real")
SECTION_TITLES = {"generated": "generated", "real_vs_real": "real vs real (positive control)"}

# name: (what is better, description)
METRIC_INFO = {
    "scc": ("higher", "Spearman correlation of per-gene mean expression"),
    "pcc": ("higher", "Pearson correlation of per-gene mean expression"),
    "wasserstein": ("lower", "per-gene 1-D Wasserstein distance, averaged over genes"),
    "wasserstein_means": ("lower", "1-D Wasserstein distance between the per-gene mean vectors (as in the paper)"),
    "mmd": ("lower", "unbiased RBF-kernel MMD^2 on a PCA of both sets pooled, averaged over 5 bandwidths"),
    "ilisi": ("higher", "scaled iLISI of real vs compared on a kNN graph (1 = perfectly mixed)"),
    "knn_auc": ("closer to 0.5", "ROC AUC of a 5-NN real-vs-compared classifier on held-out cells"),
    "knn_accuracy": ("closer to 0.5", "balanced accuracy of the 5-NN real-vs-compared classifier"),
    "rf_auc": ("closer to 0.5", "ROC AUC of a random-forest real-vs-compared classifier on held-out cells"),
    "celltypist_accuracy": ("higher", "fraction of compared cells that CellTypist (trained on the "
                                      "reference) assigns to their intended label"),
    "marker_jaccard": ("higher", "Jaccard overlap of the top marker genes (Wilcoxon) per label"),
}
METRICS = tuple(METRIC_INFO)
GENE_METRICS = ("scc", "pcc", "wasserstein", "wasserstein_means")
CLASSIFIER_METRICS = ("knn_auc", "knn_accuracy", "rf_auc")
CELL_METRICS = ("mmd", "ilisi") + CLASSIFIER_METRICS  # computed on a PCA of the pooled cells
PER_LABEL_PLOT_METRICS = ("scc", "ilisi", "knn_auc", "rf_auc", "celltypist_accuracy", "marker_jaccard")
GENERATED_MAX_VALUE = 20.0  # log1p of normalize_total(1e4) cannot exceed ~9.2; far above means counts


@dataclass
class EvaluationSettings:
    seed: int = 0
    min_cells: int = 10
    n_hvg: int = 2000
    n_pcs: int = 50
    marker_genes: int = 5000
    marker_top_n: int = 50
    knn_neighbors: int = 5
    lisi_neighbors: int = 90
    rf_trees: int = 100
    folds: int = 5
    max_cells: int = 20000
    mmd_max_cells: int = 2000
    umap_max_cells: int = 5000
    plots: bool = True
    metrics: tuple = METRICS

    def __post_init__(self):
        unknown = [name for name in self.metrics if name not in METRIC_INFO]
        if unknown:
            raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        self.metrics = tuple(self.metrics)


@dataclass
class EvaluationData:
    """Real and generated cells on their shared genes, both log-normalized, with label strings."""

    label_key: str
    genes: list
    real: np.ndarray
    real_labels: np.ndarray
    generated: np.ndarray
    generated_labels: np.ndarray
    inputs: dict = field(default_factory=dict)


class Progress:
    """One line per stage on the log, with the time since the start; records stage durations."""

    def __init__(self, log):
        self.log = log or (lambda message: None)
        self.start = time.perf_counter()
        self.timings = {}
        self._stage = None
        self._stage_start = None

    def stage(self, name):
        self._close()
        self._stage, self._stage_start = name, time.perf_counter()
        self.log(f"[evaluate {time.perf_counter() - self.start:6.1f}s] {name}")

    def _close(self):
        if self._stage is not None:
            self.timings[self._stage] = round(time.perf_counter() - self._stage_start, 2)
            self._stage = None

    def finish(self):
        self._close()
        self.timings["total"] = round(time.perf_counter() - self.start, 2)
        return self.timings


def log_to_stderr(message):
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# loading

def read_generated(path, label_key):
    """The sampler's h5ad: dense (or sparse) log-normalized X, labels in ``obs[label_key]``."""
    adata = read_h5ad(str(path))
    if adata.n_obs == 0:
        raise UsageError(f"{path} has zero cells")
    if label_key not in adata.obs.columns:
        raise UsageError(f"label key {label_key!r} not in the generated file's obs; available columns: "
                         f"{', '.join(map(str, adata.obs.columns)) or '(none)'}")
    labels = adata.obs[label_key]
    if labels.isna().any():
        raise UsageError(f"label key {label_key!r} is missing for {int(labels.isna().sum())} generated cells")
    genes = list(map(str, adata.var_names))
    if len(set(genes)) != len(genes):
        raise UsageError(f"{path} has duplicate gene names; make them unique (adata.var_names_make_unique())")
    values = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    values = values.astype(np.float32, copy=False)
    if not np.all(np.isfinite(values)):
        raise UsageError(f"{path} contains NaN or infinite values")
    if values.size and values.max() > GENERATED_MAX_VALUE:
        raise UsageError(f"{path} has values up to {values.max():.0f}, too large for log-normalized expression; "
                         f"the generated file must hold log1p(normalize_total) values, not counts")
    negative = int((values < 0).sum())
    if negative:
        np.maximum(values, 0.0, out=values)
    provenance = _json_safe(dict(adata.uns)) if len(adata.uns) else {}
    return values, genes, labels.astype(str).to_numpy(), negative, provenance


def load_evaluation_data(real_path, generated_path, label_key, layer="", input_is_log=False,
                         filters=None, max_cells=20000, seed=0, allow_count_like_log=False):
    """Read both files and keep the genes they share (in the real file's order)."""
    dataset = load_dataset(str(real_path), label_keys=[label_key], layer=layer,
                           input_is_log=input_is_log, filters=filters, allow_count_like_log=allow_count_like_log)
    generated, generated_genes, generated_labels, negative, provenance = read_generated(generated_path, label_key)

    position = {gene: j for j, gene in enumerate(generated_genes)}
    shared = [(i, position[gene]) for i, gene in enumerate(dataset.genes) if gene in position]
    if not shared:
        raise UsageError(f"the real and generated files share no gene names (real: {len(dataset.genes)} genes, "
                         f"e.g. {', '.join(dataset.genes[:3])}; generated: {len(generated_genes)}, "
                         f"e.g. {', '.join(generated_genes[:3])})")
    real_columns, generated_columns = (np.array(columns) for columns in zip(*shared))

    rng = np.random.default_rng([seed, 1])
    real_rows = np.arange(dataset.n_cells)
    if max_cells and dataset.n_cells > max_cells:
        real_rows = np.sort(rng.choice(dataset.n_cells, max_cells, replace=False))
    real = dataset.rows(real_rows)[:, real_columns]
    real_labels = np.array(dataset.label_strings(label_key, dataset.label_codes[real_rows, 0]))
    if max_cells and generated.shape[0] > max_cells:
        generated_rows = np.sort(rng.choice(generated.shape[0], max_cells, replace=False))
        generated, generated_labels = generated[generated_rows], generated_labels[generated_rows]
    generated = np.ascontiguousarray(generated[:, generated_columns])

    genes = [dataset.genes[i] for i in real_columns]
    inputs = {
        "real": {"path": str(real_path), "cells": int(dataset.n_cells), "cells_used": int(real.shape[0]),
                 "genes": len(dataset.genes), "layer": layer or "X", "input_is_log": bool(input_is_log),
                 "filters": list(filters or [])},
        "generated": {"path": str(generated_path), "cells": int(len(generated_labels)),
                      "genes": len(generated_genes), "negative_values_clipped_to_zero": negative,
                      "provenance": provenance},
        "shared_genes": len(genes),
        "genes_only_in_real": len(dataset.genes) - len(genes),
        "genes_only_in_generated": len(generated_genes) - len(genes),
    }
    return EvaluationData(label_key, genes, real, real_labels, generated, generated_labels, inputs)


def _json_safe(value, depth=0):
    """Provenance from ``uns`` as JSON: scalars, short lists and nested dicts; big arrays summarized."""
    if depth > 6:
        return str(value)
    if isinstance(value, dict):
        return {str(key): _json_safe(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (np.ndarray, list, tuple, pd.Series, pd.Index)):
        array = np.asarray(value)
        if array.size > 100:
            return f"<array shape={array.shape} dtype={array.dtype}>"
        return [_json_safe(item, depth + 1) for item in array.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------
# shared preparation

def split_real(labels, seed):
    """Two halves of the real cells, stratified by label (odd counts give A the extra cell)."""
    rng = np.random.default_rng([seed, 2])
    reference, control = [], []
    for label in sorted(set(labels)):
        cells = rng.permutation(np.flatnonzero(labels == label))
        half = (len(cells) + 1) // 2
        reference.append(cells[:half])
        control.append(cells[half:])
    return np.sort(np.concatenate(reference)), np.sort(np.concatenate(control))


def stratified_subsample(labels, count, rng):
    """Sorted indices of ``count`` cells (all if there are fewer) keeping the label proportions:
    each label gets its share rounded down, the cells left over go to the largest remainders."""
    labels = np.asarray(labels)
    if len(labels) <= count:
        return np.arange(len(labels))
    names, sizes = np.unique(labels, return_counts=True)
    shares = sizes * (count / len(labels))
    quotas = np.floor(shares).astype(int)
    quotas[np.argsort(-(shares - quotas), kind="stable")[:count - quotas.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == name), quota, replace=False) for name, quota in zip(names, quotas)]
    return np.sort(np.concatenate(chosen))


def rank_variable_genes(expression, genes):
    """Gene indices ordered from most to least variable (scanpy's Seurat-flavour normalized
    dispersion on log-normalized data); genes without a dispersion come last."""
    import scanpy as sc

    values = np.asarray(expression, dtype=np.float32)
    adata = anndata.AnnData(X=values, obs=pd.DataFrame(index=[f"cell{i}" for i in range(values.shape[0])]),
                            var=pd.DataFrame(index=list(genes)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = sc.pp.highly_variable_genes(adata, flavor="seurat", inplace=False)
    dispersion = np.nan_to_num(table["dispersions_norm"].to_numpy(dtype=np.float64), nan=-np.inf)
    means = table["means"].to_numpy(dtype=np.float64)
    return np.lexsort((-means, -dispersion))


class FeatureSpace:
    """Top variable genes of ``expression``, z-scored (clipped at 10), projected on its PCA."""

    def __init__(self, expression, genes, n_hvg, n_pcs, seed):
        gene_order = rank_variable_genes(expression, genes)
        self.genes = np.sort(gene_order[:min(n_hvg, len(gene_order))])
        selected = expression[:, self.genes]
        self.mean = selected.mean(axis=0)
        scale = selected.std(axis=0)
        scale[scale == 0] = 1.0
        self.scale = scale
        n_components = int(max(1, min(n_pcs, selected.shape[0] - 1, selected.shape[1])))
        self.pca = PCA(n_components=n_components, svd_solver="randomized", random_state=seed)
        self.pca.fit(self._standardize(selected))

    def _standardize(self, selected):
        return np.clip((selected - self.mean) / self.scale, -10.0, 10.0)

    def embed(self, expression):
        return self.pca.transform(self._standardize(expression[:, self.genes])).astype(np.float32)


@dataclass
class Prepared:
    """What both comparisons share: the split, the evaluated labels, CellTypist, reference markers."""

    data: EvaluationData
    settings: EvaluationSettings
    reference: np.ndarray
    control: np.ndarray
    generated: np.ndarray
    labels: list
    skipped_labels: dict
    unknown_generated_labels: dict
    gene_order: np.ndarray
    celltypist_model: object = None
    celltypist_columns: np.ndarray = None
    marker_candidates: np.ndarray = None
    reference_markers: dict = None


def prepare(data, settings, progress):
    """Split the real cells, pick the evaluated labels, fit the shared models on the reference half."""
    if data.real.shape[0] < 4:
        raise UsageError(f"the real data has {data.real.shape[0]} cells; at least 4 are needed to split it in two")
    reference, control = split_real(data.real_labels, settings.seed)
    if len(control) < 2:
        raise UsageError("splitting the real cells by label leaves fewer than 2 cells in the control half; "
                         "the real data needs labels with at least 2 cells")
    generated = stratified_subsample(data.generated_labels, len(control), np.random.default_rng([settings.seed, 3]))

    counts = {
        "reference": pd.Series(data.real_labels[reference]).value_counts(),
        "control": pd.Series(data.real_labels[control]).value_counts(),
        "generated": pd.Series(data.generated_labels[generated]).value_counts(),
    }
    labels, skipped = [], {}
    for label in sorted(set(data.real_labels)):
        found = {side: int(count.get(label, 0)) for side, count in counts.items()}
        if min(found.values()) >= settings.min_cells:
            labels.append(label)
        else:
            skipped[label] = found
    real_vocabulary = set(data.real_labels)
    unknown = {str(label): int(count) for label, count in
               pd.Series(data.generated_labels).value_counts().items() if label not in real_vocabulary}

    prepared = Prepared(data, settings, reference, control, generated, labels, skipped, unknown, gene_order=None)
    if not {"celltypist_accuracy", "marker_jaccard"} & set(settings.metrics):
        return prepared
    progress.stage("ranking the variable genes of the reference half")
    reference_x = data.real[reference]
    prepared.gene_order = rank_variable_genes(reference_x, data.genes)
    if "celltypist_accuracy" in settings.metrics:
        progress.stage("training CellTypist on the reference half")
        columns = np.sort(prepared.gene_order[:min(settings.n_hvg, len(data.genes))])
        prepared.celltypist_columns = columns
        prepared.celltypist_model = m.train_celltypist(reference_x[:, columns], data.real_labels[reference],
                                                       [data.genes[j] for j in columns], seed=settings.seed)
    if "marker_jaccard" in settings.metrics:
        progress.stage("finding marker genes of the reference half")
        count = settings.marker_genes or len(data.genes)
        prepared.marker_candidates = np.sort(prepared.gene_order[:min(count, len(data.genes))])
        prepared.reference_markers = _markers(prepared, reference_x, data.real_labels[reference])
    return prepared


def _markers(prepared, expression, labels):
    candidates = prepared.marker_candidates
    return m.marker_genes(expression[:, candidates], labels, [prepared.data.genes[j] for j in candidates],
                          prepared.labels, top_n=prepared.settings.marker_top_n)


# ----------------------------------------------------------------------------------------------
# one comparison: the reference half against a compared set

def compare(prepared, section, progress):
    """All selected metrics, overall and per evaluated label, for ``section``:
    "generated" (reference vs generated cells) or "real_vs_real" (reference vs the other half)."""
    data, settings, wanted = prepared.data, prepared.settings, set(prepared.settings.metrics)
    reference_x, reference_labels, compared_x, compared_labels = compared_sets(prepared, section)

    overall = {}
    per_label = {label: {"n_reference": int((reference_labels == label).sum()),
                         "n_compared": int((compared_labels == label).sum())} for label in prepared.labels}

    def each_label(function):
        for label in prepared.labels:
            function(label, reference_labels == label, compared_labels == label)

    title = SECTION_TITLES[section]
    if wanted & set(CELL_METRICS):
        progress.stage(f"{title}: PCA of the pooled cells")
        features = FeatureSpace(np.vstack([reference_x, compared_x]), data.genes, settings.n_hvg, settings.n_pcs,
                                settings.seed)
        reference_embedding, compared_embedding = features.embed(reference_x), features.embed(compared_x)

    if wanted & set(GENE_METRICS):
        progress.stage(f"{title}: gene-level statistics")
        overall.update(_gene_metrics(reference_x, compared_x, wanted))
        each_label(lambda label, ref, cmp: per_label[label].update(
            _gene_metrics(reference_x[ref], compared_x[cmp], wanted)))

    if "mmd" in wanted:
        progress.stage(f"{title}: MMD")
        rng = np.random.default_rng([settings.seed, 5])
        gammas = m.rbf_gammas(reference_embedding, rng)
        overall["mmd"] = m.mmd_rbf(_at_most(reference_embedding, settings.mmd_max_cells, rng),
                                   _at_most(compared_embedding, settings.mmd_max_cells, rng), gammas)
        each_label(lambda label, ref, cmp: per_label[label].update(
            mmd=m.mmd_rbf(reference_embedding[ref], compared_embedding[cmp], gammas)))

    if "ilisi" in wanted:
        progress.stage(f"{title}: iLISI")
        embedding = np.vstack([reference_embedding, compared_embedding])
        sources = np.r_[np.zeros(len(reference_labels), int), np.ones(len(compared_labels), int)]
        lisi, overall["ilisi"] = m.lisi_per_cell(embedding, sources, settings.lisi_neighbors)
        combined_labels = np.concatenate([reference_labels, compared_labels])
        each_label(lambda label, ref, cmp: per_label[label].update(
            ilisi=m.scaled_ilisi(lisi[combined_labels == label])))

    if wanted & set(CLASSIFIER_METRICS):
        progress.stage(f"{title}: real-vs-compared classifiers")
        _classifier_metrics(prepared, reference_embedding, reference_labels, compared_embedding,
                            compared_labels, wanted, overall, per_label)

    if "celltypist_accuracy" in wanted:
        progress.stage(f"{title}: CellTypist")
        columns = prepared.celltypist_columns
        predicted = m.predict_celltypist(prepared.celltypist_model, compared_x[:, columns],
                                         [data.genes[j] for j in columns])
        known = np.isin(compared_labels, prepared.celltypist_model.cell_types)
        overall["celltypist_accuracy"] = m.label_accuracy(predicted[known], compared_labels[known])
        each_label(lambda label, ref, cmp: per_label[label].update(
            celltypist_accuracy=m.label_accuracy(predicted[cmp], compared_labels[cmp])))

    markers = None
    if "marker_jaccard" in wanted:
        progress.stage(f"{title}: marker genes")
        markers = _markers(prepared, compared_x, compared_labels)
        scores = {label: m.jaccard(prepared.reference_markers[label], markers[label]) for label in markers}
        overall["marker_jaccard"] = float(np.mean(list(scores.values()))) if scores else float("nan")
        for label, score in scores.items():
            per_label[label]["marker_jaccard"] = score

    ordered = {name: overall[name] for name in METRICS if name in overall}
    result = {"overall": ordered, "per_label": per_label, "n_reference": int(len(reference_labels)),
              "n_compared": int(len(compared_labels))}
    if wanted & set(CELL_METRICS):
        result["feature_space"] = {"variable_genes": int(len(features.genes)),
                                   "pca_components": int(features.pca.n_components_)}
    if markers is not None:
        result["markers"] = markers
    return result


def compared_sets(prepared, section):
    """(reference expression, reference labels, compared expression, compared labels) of a section."""
    data = prepared.data
    reference = (data.real[prepared.reference], data.real_labels[prepared.reference])
    if section == "generated":
        return (*reference, data.generated[prepared.generated], data.generated_labels[prepared.generated])
    if section == "real_vs_real":
        return (*reference, data.real[prepared.control], data.real_labels[prepared.control])
    raise ValueError(f"unknown section {section!r}")


def _gene_metrics(reference_x, compared_x, wanted):
    values = {}
    if {"scc", "pcc"} & wanted:
        values.update({k: v for k, v in m.gene_mean_correlations(reference_x, compared_x).items() if k in wanted})
    if "wasserstein" in wanted:
        values["wasserstein"] = m.mean_wasserstein(reference_x, compared_x)
    if "wasserstein_means" in wanted:
        values["wasserstein_means"] = m.wasserstein_of_means(reference_x, compared_x)
    return values


def _at_most(rows, count, rng):
    if rows.shape[0] <= count:
        return rows
    return rows[np.sort(rng.choice(rows.shape[0], count, replace=False))]


def _classifier_metrics(prepared, reference_embedding, reference_labels, compared_embedding, compared_labels,
                        wanted, overall, per_label):
    """Real-vs-compared classifiers on a balanced sample (the larger side is subsampled), scored on
    out-of-fold predictions; per-label figures score those predictions within one label."""
    settings = prepared.settings
    rng = np.random.default_rng([settings.seed, 6])
    size = min(len(reference_labels), len(compared_labels))
    reference_rows = np.sort(rng.choice(len(reference_labels), size, replace=False))
    compared_rows = np.sort(rng.choice(len(compared_labels), size, replace=False))
    features = np.vstack([reference_embedding[reference_rows], compared_embedding[compared_rows]])
    is_compared = np.r_[np.zeros(size, bool), np.ones(size, bool)]
    labels = np.concatenate([reference_labels[reference_rows], compared_labels[compared_rows]])

    classifiers = {}
    if {"knn_auc", "knn_accuracy"} & wanted:
        classifiers["knn"] = m.knn_classifier(settings.knn_neighbors)
    if "rf_auc" in wanted:
        classifiers["rf"] = m.random_forest_classifier(settings.rf_trees, seed=settings.seed)
    for name, classifier in classifiers.items():
        probabilities = m.out_of_fold_probabilities(features, is_compared, classifier, settings.folds, settings.seed,
                                                    groups=labels)
        groups = [(overall, np.ones(len(labels), bool))]
        groups += [(per_label[label], labels == label) for label in prepared.labels]
        for target, rows in groups:
            scores = m.two_sample_scores(probabilities[rows], is_compared[rows])
            if f"{name}_auc" in wanted:
                target[f"{name}_auc"] = scores["auc"]
            if f"{name}_accuracy" in wanted:
                target[f"{name}_accuracy"] = scores["accuracy"]


# ----------------------------------------------------------------------------------------------
# the whole evaluation

def run_comparisons(data, settings=None, log=log_to_stderr, progress=None):
    """Both comparisons (generated and the positive control) as one JSON-ready dict, plus the
    prepared state for plots."""
    settings = settings or EvaluationSettings()
    progress = progress or Progress(log)
    prepared = prepare(data, settings, progress)
    results = {
        "format": RESULT_FORMAT,
        "label_key": data.label_key,
        "inputs": data.inputs,
        "split": {
            "reference_cells": int(len(prepared.reference)),
            "control_cells": int(len(prepared.control)),
            "generated_cells_used": int(len(prepared.generated)),
            "generated_cells_total": int(data.generated.shape[0]),
        },
        "settings": _json_safe(asdict(settings)),
        "metric_info": {name: {"better": better, "description": text}
                        for name, (better, text) in METRIC_INFO.items() if name in settings.metrics},
        "labels": {"evaluated": prepared.labels, "min_cells": settings.min_cells,
                   "skipped": prepared.skipped_labels, "unknown_generated": prepared.unknown_generated_labels},
    }
    for section in SECTIONS:
        results[section] = compare(prepared, section, progress)
    if prepared.reference_markers is not None:
        results["reference_markers"] = prepared.reference_markers
    return results, prepared


def evaluate(real_path, generated_path, label_key, out_dir, layer="", input_is_log=False, filters=None,
             settings=None, log=log_to_stderr, allow_count_like_log=False):
    """Evaluate ``generated_path`` against ``real_path``; write metrics.json, report.md and plots
    into ``out_dir``. metrics.json is written last (temp file + rename), so its presence means the
    run finished."""
    settings = settings or EvaluationSettings()
    log = log or (lambda message: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")

    progress = Progress(log)
    progress.stage("loading real and generated cells")
    data = load_evaluation_data(real_path, generated_path, label_key, layer=layer, input_is_log=input_is_log,
                                filters=filters, max_cells=settings.max_cells, seed=settings.seed,
                                allow_count_like_log=allow_count_like_log)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.json", "report.md"):
        (out_dir / stale).unlink(missing_ok=True)
    results, prepared = run_comparisons(data, settings, progress=progress)

    plots = {}
    if settings.plots:
        progress.stage("UMAP of real and generated cells")
        coordinates, sources, labels = umap_embedding(data, settings)
        progress.stage("writing plots")
        plots["umap"] = save_figure(plot_umap(coordinates, sources, labels, data.label_key), out_dir / "umap.png")
        plots["mean_scatter"] = save_figure(plot_mean_scatter(prepared, results), out_dir / "mean_scatter.png")
        if prepared.labels:
            plots["per_label"] = save_figure(plot_per_label(results), out_dir / "per_label_metrics.png")
    results["plots"] = plots
    results["versions"] = package_versions()
    results["timings_seconds"] = progress.finish()
    write_atomic(out_dir / "report.md", render_report(results))
    write_atomic(out_dir / "metrics.json", json.dumps(_json_ready(results), indent=2) + "\n")
    log(f"[evaluate {results['timings_seconds']['total']:6.1f}s] wrote {out_dir / 'metrics.json'}")
    return results


def package_versions():
    versions = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "scikit-learn", "scanpy", "anndata", "umap-learn", "scib-metrics",
                    "jax", "celltypist"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _json_ready(value):
    """NaN and infinities become null (JSON has no NaN); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_atomic(path, text):
    with atomic_output(path) as temporary:
        Path(temporary).write_text(text)


# ----------------------------------------------------------------------------------------------
# tables for notebooks and the report

def metrics_table(results):
    """Overall figures: one row per metric, generated beside the positive control."""
    rows = []
    for name in METRICS:
        if name not in results["generated"]["overall"]:
            continue
        rows.append({"metric": name,
                     "generated": results["generated"]["overall"][name],
                     "real_vs_real": results["real_vs_real"]["overall"][name],
                     "better": METRIC_INFO[name][0]})
    return pd.DataFrame(rows).set_index("metric") if rows else pd.DataFrame()


def per_label_table(results, section="generated"):
    """Per-label figures of one section: one row per evaluated label."""
    table = pd.DataFrame.from_dict(results[section]["per_label"], orient="index")
    table.index.name = results["label_key"]
    return table


def marker_summary(results, section="generated", shown=10):
    """Per evaluated label: marker overlap with the reference half and the genes on each side."""
    rows = {}
    for label, reference in results.get("reference_markers", {}).items():
        compared = results[section]["markers"][label]
        shared = [gene for gene in reference if gene in set(compared)]
        rows[label] = {
            "marker_jaccard": results[section]["per_label"][label].get("marker_jaccard"),
            "shared": len(shared),
            "top_shared": ", ".join(shared[:shown]),
            "only_reference": ", ".join([gene for gene in reference if gene not in set(compared)][:shown]),
            "only_compared": ", ".join([gene for gene in compared if gene not in set(reference)][:shown]),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = results["label_key"]
    return table


def marker_table(results, label, section="generated"):
    """Top markers of one label in the reference half and in the compared set, side by side."""
    reference = results["reference_markers"][label]
    compared = results[section]["markers"][label]
    shared = set(reference) & set(compared)
    return pd.DataFrame({"reference": reference, "compared": compared,
                         "reference_shared": [gene in shared for gene in reference],
                         "compared_shared": [gene in shared for gene in compared]})


# ----------------------------------------------------------------------------------------------
# plots (object-oriented matplotlib: no pyplot, no global backend; PNG through Agg)

def umap_embedding(data, settings, n_neighbors=15):
    """2-D UMAP of all real and generated cells (at most ``umap_max_cells`` of each) on the PCA of
    both pooled; the kNN graph is computed exactly with scikit-learn and handed to UMAP."""
    import umap

    rng = np.random.default_rng([settings.seed, 7])
    real_rows = _subset(data.real.shape[0], settings.umap_max_cells, rng)
    generated_rows = _subset(data.generated.shape[0], settings.umap_max_cells, rng)
    pooled = np.vstack([data.real[real_rows], data.generated[generated_rows]])
    embedding = FeatureSpace(pooled, data.genes, settings.n_hvg, settings.n_pcs, settings.seed).embed(pooled)
    sources = np.array(["real"] * len(real_rows) + ["generated"] * len(generated_rows))
    labels = np.concatenate([data.real_labels[real_rows], data.generated_labels[generated_rows]])
    k = int(min(n_neighbors, embedding.shape[0] - 1))
    if k < 2:
        return np.zeros((embedding.shape[0], 2), np.float32), sources, labels
    distances, indices = NearestNeighbors(n_neighbors=k).fit(embedding).kneighbors(embedding)
    reducer = umap.UMAP(n_neighbors=k, random_state=settings.seed, precomputed_knn=(indices, distances, None),
                        n_epochs=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coordinates = reducer.fit_transform(embedding)
    return coordinates, sources, labels


def _subset(n, count, rng):
    if n <= count:
        return np.arange(n)
    return np.sort(rng.choice(n, count, replace=False))


def _label_colors(labels):
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    return {label: palette[i % len(palette)] for i, label in enumerate(sorted(set(labels)))}


def plot_umap(coordinates, sources, labels, label_key):
    figure = Figure(figsize=(13, 5.5), layout="constrained")
    by_source, by_label = figure.subplots(1, 2)
    order = np.random.default_rng(0).permutation(len(sources))  # interleave so neither source hides the other
    source_colors = {"real": "#1f77b4", "generated": "#d62728"}
    for source, color in source_colors.items():
        rows = order[sources[order] == source]
        by_source.scatter(coordinates[rows, 0], coordinates[rows, 1], s=3, c=[color], label=source, alpha=0.6,
                          linewidths=0)
    by_source.set_title("UMAP by source")
    by_source.legend(markerscale=4, loc="best")
    colors = _label_colors(labels)
    for label, color in colors.items():
        rows = order[labels[order] == label]
        by_label.scatter(coordinates[rows, 0], coordinates[rows, 1], s=3, c=[color], label=label, alpha=0.6,
                         linewidths=0)
    by_label.set_title(f"UMAP by {label_key}")
    by_label.legend(markerscale=4, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    for axis in (by_source, by_label):
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_xlabel("UMAP 1")
        axis.set_ylabel("UMAP 2")
    return figure


def plot_mean_scatter(prepared, results):
    """Per-gene mean expression, reference half vs compared set, for both sections."""
    data = prepared.data
    reference_means = data.real[prepared.reference].mean(axis=0)
    compared = {"generated": data.generated[prepared.generated].mean(axis=0),
                "real_vs_real": data.real[prepared.control].mean(axis=0)}
    figure = Figure(figsize=(11, 5), layout="constrained")
    axes = figure.subplots(1, 2, sharex=True, sharey=True)
    top = float(max(reference_means.max(), *(means.max() for means in compared.values()))) * 1.05 or 1.0
    for axis, (section, means) in zip(axes, compared.items()):
        axis.scatter(reference_means, means, s=3, alpha=0.4, linewidths=0)
        axis.plot([0, top], [0, top], color="grey", linewidth=0.8)
        overall = results[section]["overall"]
        figures = ", ".join(f"{name} {overall[name]:.3f}" for name in ("scc", "pcc") if name in overall)
        axis.set_title(f"{SECTION_TITLES[section]}\n{figures}")
        axis.set_xlabel("mean log expression, real reference half")
        axis.set_ylabel("mean log expression, " + ("generated" if section == "generated" else "other real half"))
    return figure


def plot_per_label(results):
    names = [name for name in PER_LABEL_PLOT_METRICS if name in results["generated"]["overall"]]
    labels = results["labels"]["evaluated"]
    columns = max(1, min(3, len(names)))
    rows = max(1, -(-len(names) // columns))
    figure = Figure(figsize=(5 * columns, 0.28 * len(labels) * rows + 2.5 * rows), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    positions = np.arange(len(labels))
    for axis, name in zip(axes, names):
        for offset, section, color in ((-0.2, "generated", "#d62728"), (0.2, "real_vs_real", "#1f77b4")):
            values = [results[section]["per_label"][label].get(name, np.nan) for label in labels]
            axis.barh(positions + offset, np.nan_to_num(values, nan=0.0), height=0.4, color=color,
                      label=SECTION_TITLES[section])
        if name.endswith("_auc"):
            axis.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
        axis.set_yticks(positions, labels, fontsize="small")
        axis.invert_yaxis()
        axis.set_title(f"{name} ({METRIC_INFO[name][0]} is better)")
    for axis in axes[len(names):]:
        axis.set_visible(False)
    axes[0].legend(fontsize="small", loc="lower right")
    return figure


def save_figure(figure, path):
    """PNG via a temporary file and a rename; returns the file name (relative to the report)."""
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    return path.name


# ----------------------------------------------------------------------------------------------
# report

def _number(value):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"


def render_report(results):
    inputs, split, labels = results["inputs"], results["split"], results["labels"]
    lines = ["# cfDiffusion evaluation", ""]
    lines += [
        f"- Real: `{inputs['real']['path']}` — {inputs['real']['cells_used']} cells "
        f"(layer {inputs['real']['layer']}, {'log-normalized' if inputs['real']['input_is_log'] else 'raw counts'})",
        f"- Generated: `{inputs['generated']['path']}` — {inputs['generated']['cells']} cells",
        f"- Label key: `{results['label_key']}`; shared genes: {inputs['shared_genes']} "
        f"({inputs['genes_only_in_real']} only in real, {inputs['genes_only_in_generated']} only in generated)",
        f"- Seed: {results['settings']['seed']}",
    ]
    if inputs["generated"]["negative_values_clipped_to_zero"]:
        lines.append(f"- {inputs['generated']['negative_values_clipped_to_zero']} negative generated values "
                     f"were clipped to 0")
    lines += ["", "Both comparisons share one reference: a random half of the real cells, stratified by label "
                  f"({split['reference_cells']} cells). **generated** compares it with "
                  f"{split['generated_cells_used']} generated cells (of {split['generated_cells_total']}, subsampled "
                  f"by label to the size of the other half); "
                  f"**real vs real** (the positive control) compares it with the other half "
                  f"({split['control_cells']} cells) — what a perfect generator would score at this sample size.",
              ""]

    lines += ["## Metrics", "", "| metric | generated | real vs real | better | meaning |", "|---|---|---|---|---|"]
    for name, info in results["metric_info"].items():
        lines.append(f"| {name} | {_number(results['generated']['overall'].get(name))} | "
                     f"{_number(results['real_vs_real']['overall'].get(name))} | {info['better']} | "
                     f"{info['description']} |")

    if set(CLASSIFIER_METRICS) & set(results["metric_info"]):
        lines += ["", "Classifier AUC: 0.5 means real and compared cells cannot be told apart. Well above the "
                      "control, the generated cells are distinguishable; well below 0.5, they sit closer to the "
                      "reference cells than real cells sit to each other, as near-copies of training cells would."]

    names = list(results["metric_info"])
    lines += ["", "## Per label", "",
              f"Generated value, with the positive control in parentheses. Labels with fewer than "
              f"{labels['min_cells']} cells in the reference half, the control half or the generated set are "
              f"skipped.", ""]
    if labels["evaluated"]:
        lines.append("| label | cells (ref/gen) | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 2) + "|")
        for label in labels["evaluated"]:
            generated = results["generated"]["per_label"][label]
            control = results["real_vs_real"]["per_label"][label]
            cells = [f"{_number(generated.get(name))} ({_number(control.get(name))})" for name in names]
            lines.append(f"| {label} | {generated['n_reference']}/{generated['n_compared']} | "
                         + " | ".join(cells) + " |")
    else:
        lines.append("No label has enough cells on every side.")
    if labels["skipped"]:
        lines += ["", "Skipped labels (cells in reference / control / generated): "
                  + "; ".join(f"{label} {c['reference']}/{c['control']}/{c['generated']}"
                              for label, c in labels["skipped"].items())]
    if labels["unknown_generated"]:
        lines += ["", "Generated labels absent from the real data: "
                  + ", ".join(f"{label} ({count})" for label, count in labels["unknown_generated"].items())]

    if results.get("plots"):
        lines += ["", "## Plots", ""]
        captions = {"umap": "UMAP of real and generated cells, by source and by label",
                    "mean_scatter": "Per-gene mean expression: real reference half vs generated, and vs the "
                                    "other real half",
                    "per_label": "Main metrics per label, generated vs positive control"}
        for key, file_name in results["plots"].items():
            lines += [f"![{captions[key]}]({file_name})", "", f"*{captions[key]}*", ""]

    settings = results["settings"]
    lines += ["## Method", "",
              f"- Gene-level metrics (scc, pcc, wasserstein) use all {inputs['shared_genes']} shared genes.",
              f"- Cell-level metrics (mmd, ilisi, classifiers, UMAP) use the first {settings['n_pcs']} "
              f"principal components of the {settings['n_hvg']} most variable genes (z-scored, clipped at 10) "
              f"of the two compared sets pooled, so that neither side is in-sample for the PCA alone.",
              f"- Classifiers: {settings['folds']}-fold out-of-fold predictions on a balanced sample; "
              f"{settings['knn_neighbors']}-NN and a {settings['rf_trees']}-tree random forest. Accuracy is "
              f"balanced accuracy. Per-label figures score the same predictions within one label.",
              f"- iLISI: scib-metrics on a {settings['lisi_neighbors']}-NN graph, scaled to [0, 1]; per label, "
              f"the median per-cell LISI of that label's cells.",
              f"- CellTypist (SGD logistic regression) is trained on the reference half's {settings['n_hvg']} "
              f"most variable genes.",
              f"- Markers: top {settings['marker_top_n']} Wilcoxon genes per label among the "
              f"{settings['marker_genes'] or 'all'} most variable genes, evaluated labels only.",
              f"- MMD: RBF kernels with widths 0.25–4 × the reference's median squared distance; at most "
              f"{settings['mmd_max_cells']} cells per side.",
              ""]
    timings = results.get("timings_seconds", {})
    if "total" in timings:
        lines += [f"Runtime: {timings['total']:.1f} s.", ""]
    return "\n".join(lines)
