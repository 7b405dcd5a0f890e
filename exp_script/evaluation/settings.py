"""What the evaluation computes: the metric catalogue, the compared sections, the settings, progress lines."""
import sys
import time
from dataclasses import dataclass

from guided_diffusion.core.errors import UsageError

RESULT_FORMAT = "cfdiffusion-evaluation/2"

# section: (title, kind). Every section compares one set of cells with the same reference (a random half
# of the held-out real cells). Positive controls show what real cells score; negative controls what a
# generator that copies its training cells or collapses each type onto its mean would score.
SECTION_INFO = {
    "generated": ("generated", "under test"),
    "real_vs_real": ("real vs real (positive control)", "positive control"),
    "train_vs_heldout": ("train vs held-out (positive control)", "positive control"),
    "memorizer": ("memorizer (negative control)", "negative control"),
    "collapsed": ("collapsed (negative control)", "negative control"),
}
SECTION_TITLES = {name: title for name, (title, _) in SECTION_INFO.items()}
NEGATIVE_CONTROLS = ("memorizer", "collapsed")

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
    "de_lfc_pearson": ("higher", "median over labels of the Pearson correlation of one-vs-rest log2 fold "
                                 "changes, real vs compared, over the union of both sides' top-100 DE genes"),
    "de_lfc_spearman": ("higher", "the same with Spearman correlation"),
    "de_top50_precision": ("higher", "median over labels of the share of the compared top-50 up-regulated "
                                     "genes found in the real top 50"),
    "de_sign_agreement": ("higher", "median over labels of the share of union DE genes whose fold change has "
                                    "the same sign"),
    "de_condition_lfc_pearson": ("higher", "median over (label, condition pair) of the Pearson correlation of "
                                           "the within-label condition effect's log2 fold changes"),
    "de_condition_lfc_spearman": ("higher", "the same with Spearman correlation"),
}
METRICS = tuple(METRIC_INFO)
GENE_METRICS = ("scc", "pcc", "wasserstein", "wasserstein_means")
CLASSIFIER_METRICS = ("knn_auc", "knn_accuracy", "rf_auc")
CELL_METRICS = ("mmd", "ilisi") + CLASSIFIER_METRICS  # computed on a PCA of the pooled cells
DE_METRICS = ("de_lfc_pearson", "de_lfc_spearman", "de_top50_precision", "de_sign_agreement")
CONDITION_METRICS = ("de_condition_lfc_pearson", "de_condition_lfc_spearman")  # need --condition_key
PER_LABEL_PLOT_METRICS = ("scc", "ilisi", "knn_auc", "rf_auc", "celltypist_accuracy", "marker_jaccard",
                          "de_lfc_pearson")
# a metric "cannot tell" a negative control from real cells when the control scores within this margin of
# the positive control (or better): absolute on 0-1 scales, relative for distances
BLIND_MARGIN = 0.02
BLIND_RELATIVE = 1.5


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
    controls: bool = True
    de_method: str = "t-test"
    condition_min_cells: int = 10
    rare_max_cells: int = 30
    augmentation_seeds: int = 5

    def __post_init__(self):
        unknown = [name for name in self.metrics if name not in METRIC_INFO]
        if unknown:
            raise UsageError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
        self.metrics = tuple(self.metrics)


def blind_to(name, control_value, positive_value):
    """True if ``control_value`` (a negative control) scores as well as ``positive_value`` on ``name``."""
    if control_value is None or positive_value is None or control_value != control_value \
            or positive_value != positive_value:
        return False
    better = METRIC_INFO[name][0]
    if better == "higher":
        return control_value >= positive_value - BLIND_MARGIN
    if better == "lower":
        return control_value <= BLIND_RELATIVE * max(positive_value, 0.0) + 1e-3
    return abs(control_value - 0.5) <= abs(positive_value - 0.5) + 2 * BLIND_MARGIN


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
