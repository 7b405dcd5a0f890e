"""Evaluate generated cells against real ones: metrics, positive and negative controls, plots and a report.

Design (written into every report):

* The real cells (the held-out cells, when the model's training cells are given) are split in two
  halves, stratified by label. Half A is the *reference*; every section compares one set with it:
  "generated" (the generated cells), "real_vs_real" (the other half B: a positive control, what a
  perfect generator would reach at this sample size), "train_vs_heldout" (training cells, with
  ``train``: the positive control of a held-out protocol), and two negative controls, "memorizer"
  (training cells resampled) and "collapsed" (each label's mean profile plus noise); see controls.py.
* The compared sets are subsampled (stratified by label) to the size of B, so all figures can be read
  side by side.
* Gene-level metrics (scc, pcc, wasserstein) use every shared gene. Cell-level metrics (mmd, ilisi,
  kNN and random-forest classifiers) use a PCA of the highly variable genes fitted on the two compared
  sets pooled (a PCA fitted on the reference alone puts the reference in-sample and the compared cells
  out-of-sample, which the classifiers detect even between two real halves: random-forest AUC 0.70 on
  Baron). CellTypist is trained on A's highly variable genes; markers are searched among A's top
  variable genes; DE fidelity compares scanpy's log-fold changes on A with those on the compared set.
* Per-label figures cover the labels with at least ``min_cells`` cells in A, B and the generated
  set; the others are listed as skipped with their counts.
* With training cells: novelty (nearest-training-cell distances, novelty.py) and usefulness
  (classifiers trained on generated cells, rare-type augmentation, usefulness.py).

The code is split by concern: inputs (load and check the files), preparation (split, compared
sets, shared models), comparison (metrics per section), de_fidelity, novelty, usefulness, plots,
report. This module runs them in order and writes the outputs; it re-exports the notebooks' API.
"""
import json
import platform
from importlib import metadata
from pathlib import Path

from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.core.errors import UsageError

from .comparison import compare, run_comparisons  # noqa: F401  (public API)
from .inputs import EvaluationData, json_ready, load_evaluation_data  # noqa: F401
from .settings import (METRIC_INFO, METRICS, RESULT_FORMAT, SECTION_TITLES, EvaluationSettings,  # noqa: F401
                       Progress, log_to_stderr)
from .features import FeatureSpace, rank_variable_genes  # noqa: F401
from .plots import (plot_de_per_label, plot_de_scatter, plot_mean_scatter, plot_per_label, plot_umap,  # noqa: F401
                    save_figure, umap_embedding)
from .preparation import Prepared, prepare, split_real, stratified_subsample  # noqa: F401
from .report import marker_summary, marker_table, metrics_table, per_label_table, render_report  # noqa: F401

PLOT_FILES = {"umap": "umap.png", "mean_scatter": "mean_scatter.png", "per_label": "per_label_metrics.png",
              "de_scatter": "de_lfc_scatter.png", "de_per_label": "de_per_label.png"}
OUTPUT_FILES = ("metrics.json", "report.md", *PLOT_FILES.values())


def warn_to_stderr(message):
    log_to_stderr(f"warning: {message}")


def check_out_dir(out_dir):
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} exists and is not a directory")
    return out_dir


def clear_previous_outputs(out_dir):
    """Once every input has been checked: remove the previous run's outputs, metrics.json first (its
    presence means a finished run), so a killed run never leaves old files beside new ones."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)


def check_enough_generated(data, settings):
    if data.generated.shape[0] < settings.min_cells:
        raise UsageError(f"the generated file has {data.generated.shape[0]} cells; at least --min_cells "
                         f"{settings.min_cells} are needed for any figure")


def few_cells_warnings(results, settings):
    """Warnings for figures not reported because a side has fewer than ``min_cells`` cells."""
    found = []
    for label, counts in results["labels"]["skipped"].items():
        found.append(f"label {str(label)!r}: no per-label figure (cells in reference/control/generated "
                     f"{counts['reference']}/{counts['control']}/{counts['generated']}, minimum {settings.min_cells})")
    return found


def write_plots(data, prepared, results, settings, out_dir, progress):
    plots = {}
    progress.stage("UMAP of real and generated cells")
    coordinates, sources, labels = umap_embedding(data, settings)
    progress.stage("writing plots")
    figures = {"umap": plot_umap(coordinates, sources, labels, data.label_key),
               "mean_scatter": plot_mean_scatter(prepared, results)}
    if prepared.labels:
        figures["per_label"] = plot_per_label(results)
        figures["de_scatter"] = plot_de_scatter(prepared, results) if prepared.fold_changes else None
        figures["de_per_label"] = plot_de_per_label(results) if prepared.fold_changes else None
    for key, figure in figures.items():
        if figure is not None:
            plots[key] = save_figure(figure, out_dir / PLOT_FILES[key])
    return plots


def evaluate(real_path, generated_path, label_key, out_dir, layer="", input_is_log=False, filters=None,
             settings=None, log=log_to_stderr, train_path=None, generated_layer="", generated_input_is_log=True,
             condition_keys=(), allow_count_like_log=False, warn=warn_to_stderr):
    """Evaluate ``generated_path`` against ``real_path`` (and ``train_path``, the model's training cells);
    write metrics.json, report.md and plots into ``out_dir``. Every input is read and checked before
    anything in ``out_dir`` is touched; metrics.json is written last (temp file + rename), so its
    presence means the run finished."""
    settings = settings or EvaluationSettings()
    log = log or (lambda message: None)
    warn = warn or (lambda message: None)
    out_dir = check_out_dir(out_dir)

    progress = Progress(log)
    progress.stage("loading real and generated cells")
    data = load_evaluation_data(real_path, generated_path, label_key, layer=layer, input_is_log=input_is_log,
                                filters=filters, max_cells=settings.max_cells, seed=settings.seed,
                                generated_layer=generated_layer, generated_input_is_log=generated_input_is_log,
                                train_path=train_path, condition_keys=tuple(condition_keys),
                                allow_count_like_log=allow_count_like_log, warn=warn)
    check_enough_generated(data, settings)
    results, prepared = run_comparisons(data, settings, progress=progress)
    for message in prepared.notes:
        warn(message)
    for message in few_cells_warnings(results, settings):
        warn(message)
        results["warnings"].append(message)

    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_outputs(out_dir)
    results["plots"] = write_plots(data, prepared, results, settings, out_dir, progress) if settings.plots else {}
    results["versions"] = package_versions()
    results["timings_seconds"] = progress.finish()
    write_atomic(out_dir / "report.md", render_report(results))
    write_atomic(out_dir / "metrics.json", json.dumps(json_ready(results), indent=2) + "\n")
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


def write_atomic(path, text):
    with atomic_output(path) as temporary:
        Path(temporary).write_text(text)
