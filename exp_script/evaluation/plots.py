"""Plots (object-oriented matplotlib: no pyplot, no global backend; PNG through Agg)."""
import warnings
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.neighbors import NearestNeighbors

from guided_diffusion.core.atomic import atomic_output

from .settings import METRIC_INFO, PER_LABEL_PLOT_METRICS, SECTION_TITLES
from .features import FeatureSpace, subsample_rows

SECTION_COLORS = {"generated": "#d62728", "real_vs_real": "#1f77b4", "train_vs_heldout": "#17becf",
                  "memorizer": "#7f7f7f", "collapsed": "#bcbd22"}
DE_SCATTER_LABELS = 4  # labels shown in the fold-change scatter


def umap_embedding(data, settings, n_neighbors=15):
    """2-D UMAP of all real and generated cells (at most ``umap_max_cells`` of each) on the PCA of
    both pooled; the kNN graph is computed exactly with scikit-learn and handed to UMAP."""
    import umap

    rng = np.random.default_rng([settings.seed, 7])
    real_rows = subsample_rows(data.real.shape[0], settings.umap_max_cells, rng)
    generated_rows = subsample_rows(data.generated.shape[0], settings.umap_max_cells, rng)
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
    reference_means = prepared.sets["reference"].x.mean(axis=0)
    compared = {section: prepared.sets[section].x.mean(axis=0) for section in ("generated", "real_vs_real")}
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
        sections = results.get("sections", ["generated", "real_vs_real"])
        height = 0.8 / len(sections)
        for number, section in enumerate(sections):
            values = [results[section]["per_label"][label].get(name, np.nan) for label in labels]
            axis.barh(positions - 0.4 + height * (number + 0.5), np.nan_to_num(values, nan=0.0), height=height,
                      color=SECTION_COLORS[section], label=SECTION_TITLES[section])
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


def plot_de_scatter(prepared, results, shown=DE_SCATTER_LABELS):
    """Real vs compared one-vs-rest log2 fold changes (union of both sides' top DE genes) for a few
    labels (the largest evaluated), generated and the positive control side by side."""
    sections = [name for name in ("generated", results["positive_control"], "collapsed")
                if name in prepared.fold_changes]
    labels = [label for label in sorted(prepared.labels, key=lambda label: -results["generated"]["per_label"][
        label]["n_reference"]) if all(label in prepared.fold_changes[s] for s in sections)][:shown]
    if not labels or not sections:
        return None
    figure = Figure(figsize=(3.6 * len(sections), 3.2 * len(labels)), layout="constrained")
    axes = np.asarray(figure.subplots(len(labels), len(sections), squeeze=False))
    for row, label in enumerate(labels):
        for column, section in enumerate(sections):
            real, compared = prepared.fold_changes[section][label]
            axis = axes[row, column]
            axis.scatter(real, compared, s=5, alpha=0.5, linewidths=0, c=SECTION_COLORS[section])
            low, high = float(min(real.min(), compared.min())), float(max(real.max(), compared.max()))
            axis.plot([low, high], [low, high], color="grey", linewidth=0.8)
            value = results[section]["per_label"][label].get("de_lfc_pearson")
            axis.set_title(f"{label}: {SECTION_TITLES[section].split(' (')[0]}\nPearson "
                           f"{value if value is None else round(value, 3)}", fontsize="small")
            axis.set_xlabel("real log2 fold change")
            axis.set_ylabel("compared log2 fold change")
    return figure


def plot_de_per_label(results):
    """Per-label LFC Pearson correlation for every section."""
    labels = [label for label in results["labels"]["evaluated"]
              if "de_lfc_pearson" in results["generated"]["per_label"][label]]
    if not labels:
        return None
    sections = results.get("sections", ["generated", "real_vs_real"])
    figure = Figure(figsize=(7, 0.35 * len(labels) * len(sections) / 2 + 2), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(labels))
    height = 0.8 / len(sections)
    for number, section in enumerate(sections):
        values = [results[section]["per_label"][label].get("de_lfc_pearson", np.nan) for label in labels]
        axis.barh(positions - 0.4 + height * (number + 0.5), np.nan_to_num(values, nan=0.0), height=height,
                  color=SECTION_COLORS[section], label=SECTION_TITLES[section])
    axis.set_yticks(positions, labels, fontsize="small")
    axis.invert_yaxis()
    axis.set_xlabel("Pearson correlation of one-vs-rest log2 fold changes (real reference vs compared)")
    axis.legend(fontsize="small", loc="lower right")
    return figure
