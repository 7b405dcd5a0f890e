"""What every comparison shares: the split of the real cells, the compared sets (generated cells, positive
and negative controls), the evaluated labels, CellTypist and the reference markers."""
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from guided_diffusion.core.errors import UsageError

from . import controls
from . import metrics as m
from .settings import EvaluationSettings
from .inputs import EvaluationData
from .features import rank_variable_genes, split_real, stratified_subsample


@dataclass
class CellSet:
    """One side of a comparison: expression, labels and (with condition keys) condition labels."""

    x: np.ndarray
    labels: np.ndarray
    conditions: dict = field(default_factory=dict)

    def take(self, rows):
        return CellSet(self.x[rows], self.labels[rows], {key: value[rows] for key, value in self.conditions.items()})


@dataclass
class Prepared:
    """What all comparisons share: the split, the compared sets, the evaluated labels, shared models."""

    data: EvaluationData
    settings: EvaluationSettings
    reference: np.ndarray
    control: np.ndarray
    generated: np.ndarray
    labels: list
    skipped_labels: dict
    unknown_generated_labels: dict
    gene_order: np.ndarray
    sets: dict = field(default_factory=dict)  # section -> CellSet; "reference" is the real half A
    celltypist_model: object = None
    celltypist_columns: np.ndarray = None
    marker_candidates: np.ndarray = None
    reference_markers: dict = None
    fold_changes: dict = field(default_factory=dict)  # section -> label -> (real lfc, compared lfc)
    collapsed_kind: str = None  # "counts" or "log": how the collapsed control was drawn
    notes: list = field(default_factory=list)  # figures withheld by preparation, and why (become warnings)


def control_source(data, control_set):
    """Where the negative controls take their cells: the training cells, else the control half."""
    if data.train is not None:
        return CellSet(data.train, data.train_labels, data.conditions.get("train", {})), True
    return control_set, False


def _joint(cell_set):
    """One string per cell combining its label and its conditions (the collapsed generator's groups)."""
    joint = cell_set.labels.astype(object)
    for key in sorted(cell_set.conditions):
        joint = joint + "\x1f" + cell_set.conditions[key].astype(object)
    return joint.astype(str)


def negative_controls(data, source, from_train, wanted_set, seed):
    """(memorizer, collapsed) CellSets with as many cells per label (and condition) as ``wanted_set``."""
    joint_source, wanted = _joint(source), controls.per_label_counts(_joint(wanted_set))
    _, _, rows = controls.memorizer(source.x, joint_source, wanted, np.random.default_rng([seed, 9]))
    memorizer = source.take(rows)
    counts = data.train_counts if from_train else None
    totals = data.train_totals if from_train else None
    x, joint = controls.collapsed(joint_source, wanted, np.random.default_rng([seed, 10]), counts=counts,
                                  totals=totals, log_values=source.x)
    parts = np.array([value.split("\x1f") for value in joint], dtype=object).reshape(len(joint), -1)
    keys = sorted(source.conditions)
    collapsed = CellSet(x, parts[:, 0].astype(str) if len(joint) else np.zeros(0, str),
                        {key: parts[:, i + 1].astype(str) for i, key in enumerate(keys)})
    return memorizer, collapsed, "counts" if counts is not None else "log"


def _choose_labels(data, sets, min_cells):
    counts = {side: pd.Series(sets[name].labels).value_counts()
              for side, name in (("reference", "reference"), ("control", "real_vs_real"), ("generated", "generated"))}
    labels, skipped = [], {}
    for label in sorted(set(data.real_labels)):
        found = {side: int(count.get(label, 0)) for side, count in counts.items()}
        if min(found.values()) >= min_cells:
            labels.append(label)
        else:
            skipped[label] = found
    real_vocabulary = set(data.real_labels)
    unknown = {str(label): int(count) for label, count in
               pd.Series(data.generated_labels).value_counts().items() if label not in real_vocabulary}
    return labels, skipped, unknown


def build_sets(data, settings):
    """Split the real cells and build every compared set (same size as the control half)."""
    if data.real.shape[0] < 4:
        raise UsageError(f"the real data has {data.real.shape[0]} cells; at least 4 are needed to split it in two")
    reference, control = split_real(data.real_labels, settings.seed)
    if len(control) < 2:
        raise UsageError("splitting the real cells by label leaves fewer than 2 cells in the control half; "
                         "the real data needs labels with at least 2 cells")
    generated = stratified_subsample(data.generated_labels, len(control), np.random.default_rng([settings.seed, 3]))
    real = CellSet(data.real, data.real_labels, data.conditions.get("real", {}))
    all_generated = CellSet(data.generated, data.generated_labels, data.conditions.get("generated", {}))
    sets = {"reference": real.take(reference), "generated": all_generated.take(generated),
            "real_vs_real": real.take(control)}
    kind = None
    if data.train is not None:
        train = CellSet(data.train, data.train_labels, data.conditions.get("train", {}))
        sets["train_vs_heldout"] = train.take(stratified_subsample(data.train_labels, len(control),
                                                                   np.random.default_rng([settings.seed, 8])))
    if settings.controls:
        source, from_train = control_source(data, sets["real_vs_real"])
        sets["memorizer"], sets["collapsed"], kind = negative_controls(data, source, from_train, sets["generated"],
                                                                       settings.seed)
    return reference, control, generated, sets, kind


# marker Jaccard needs this many times --marker_top_n candidate genes: a top-50 list of 50 or 80 genes
# overlaps any other by construction (on an 11-gene dataset every label scored 1.000)
MARKER_CANDIDATE_FACTOR = 2


def prepare(data, settings, progress):
    """The compared sets, the evaluated labels, and the shared models fitted on the reference half."""
    reference, control, generated, sets, kind = build_sets(data, settings)
    labels, skipped, unknown = _choose_labels(data, sets, settings.min_cells)
    prepared = Prepared(data, settings, reference, control, generated, labels, skipped, unknown, gene_order=None,
                        sets=sets)
    prepared.collapsed_kind = kind
    if not {"celltypist_accuracy", "marker_jaccard"} & set(settings.metrics):
        return prepared
    progress.stage("ranking the variable genes of the reference half")
    reference_x = sets["reference"].x
    prepared.gene_order = rank_variable_genes(reference_x, data.genes)
    if "celltypist_accuracy" in settings.metrics:
        progress.stage("training CellTypist on the reference half")
        columns = np.sort(prepared.gene_order[:min(settings.n_hvg, len(data.genes))])
        prepared.celltypist_columns = columns
        prepared.celltypist_model = m.train_celltypist(reference_x[:, columns], sets["reference"].labels,
                                                       [data.genes[j] for j in columns], seed=settings.seed)
    if "marker_jaccard" in settings.metrics:
        count = min(settings.marker_genes or len(data.genes), len(data.genes))
        if count < MARKER_CANDIDATE_FACTOR * settings.marker_top_n:
            prepared.notes.append(f"marker_jaccard withheld: {count} candidate genes for the top "
                                  f"{settings.marker_top_n} markers per label (at least "
                                  f"{MARKER_CANDIDATE_FACTOR * settings.marker_top_n} are needed; with fewer the "
                                  f"top sets overlap by construction)")
            return prepared
        progress.stage("finding marker genes of the reference half")
        prepared.marker_candidates = np.sort(prepared.gene_order[:count])
        prepared.reference_markers = markers(prepared, reference_x, sets["reference"].labels)
    return prepared


def markers(prepared, expression, labels):
    candidates = prepared.marker_candidates
    return m.marker_genes(expression[:, candidates], labels, [prepared.data.genes[j] for j in candidates],
                          prepared.labels, top_n=prepared.settings.marker_top_n)


def sections_of(prepared):
    """The compared sections of this run, in report order."""
    return [name for name in ("generated", "real_vs_real", "train_vs_heldout", "memorizer", "collapsed")
            if name in prepared.sets]


def positive_control(prepared):
    return "train_vs_heldout" if "train_vs_heldout" in prepared.sets else "real_vs_real"
