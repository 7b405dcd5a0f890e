"""Reading the evaluation's inputs: real, generated and (optionally) training cells, all log-normalized.

Every file goes through the project loader (``guided_diffusion.data.load_dataset``), so the real, the
generated and the training file get the same checks (file, labels, duplicate genes, finite and
non-negative values, integers for counts) and both may be raw counts or log-normalized values
(``layer``/``input_is_log`` per file). On top of the loader this module checks what only a
comparison of two files can get wrong: too few shared genes, labels that differ only in case,
counts declared log-normalized, generated values far above the log-normalized range.
"""
import os
import warnings
from dataclasses import dataclass, field

import h5py
import numpy as np
import pandas as pd

from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import format_values, load_dataset, read_h5ad

GENERATED_MAX_VALUE = 20.0  # log1p of normalize_total(1e4) cannot exceed ~9.2; far above means counts
MIN_SHARED_GENES = 50  # fewer shared genes (unless the real file has fewer genes in all) is refused
SHARED_GENES_WARNING_FRACTION = 0.5  # sharing less than this share of either file's genes is a warning


@dataclass
class InputFile:
    """How to read one file: its path, matrix (``layer``) and whether it holds log-normalized values."""

    path: str
    layer: str = ""
    input_is_log: bool = False
    role: str = "real"  # real | generated | train, used in messages


@dataclass
class EvaluationData:
    """Real and generated cells on their shared genes, both log-normalized, with label strings.

    ``train`` (optional) holds the cells the model was trained on, on the same genes; ``train_counts``
    and ``train_totals`` their raw counts and library sizes when the training file holds counts.
    """

    label_key: str
    genes: list
    real: np.ndarray
    real_labels: np.ndarray
    generated: np.ndarray
    generated_labels: np.ndarray
    inputs: dict = field(default_factory=dict)
    train: np.ndarray = None
    train_labels: np.ndarray = None
    train_counts: np.ndarray = None
    train_totals: np.ndarray = None
    conditions: dict = field(default_factory=dict)  # side -> {condition key -> labels}
    warnings: list = field(default_factory=list)


def json_ready(value, depth=0):
    """Any value as JSON: dicts and short lists recursively, big arrays summarized, numpy scalars as
    Python numbers, NaN and infinities as null (JSON has no NaN), anything else as its string."""
    if depth > 8:
        return str(value)
    if isinstance(value, dict):
        return {str(key): json_ready(item, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item, depth + 1) for item in value]
    if isinstance(value, (np.ndarray, pd.Series, pd.Index)):
        array = np.asarray(value)
        if array.size > 100:  # e.g. per-cell arrays in a file's uns: summarized, not copied
            return f"<array shape={array.shape} dtype={array.dtype}>"
        return [json_ready(item, depth + 1) for item in array.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _describe_negative(source):
    """What a refused file holds when the loader found negative values: how many and the minimum."""
    adata = read_h5ad(source.path)
    matrix = adata.raw.X if source.layer == "raw" else adata.layers[source.layer] if source.layer else adata.X
    values = matrix.data if hasattr(matrix, "data") and not isinstance(matrix, np.ndarray) else np.asarray(matrix)
    negative = np.asarray(values) < 0
    return (f"{source.path} ({source.role}) has {int(negative.sum())} negative values (minimum "
            f"{float(np.min(values)):.3g}): it looks z-scored or centered; the evaluation needs raw counts or "
            f"log1p(normalize_total) values (negative values are not clipped)")


def read_cells(source, label_keys, filters=None, allow_count_like_log=False):
    """Load one file with the project loader (which also refuses counts declared log-normalized, unless
    ``allow_count_like_log``); errors name the file and its role."""
    try:
        dataset = load_dataset(str(source.path), label_keys=list(label_keys), layer=source.layer,
                               input_is_log=source.input_is_log, filters=filters,
                               allow_count_like_log=allow_count_like_log)
    except UsageError as error:
        if "negative values" in str(error):
            raise UsageError(_describe_negative(source)) from error
        if str(source.path) in str(error):
            raise
        message = str(error)
        if source.role == "generated":
            message = message.replace("--input_is_log", "--generated_input_is_log")
        raise UsageError(f"{source.role} file {source.path}: {message}") from error
    return dataset


def read_uns(path):
    """The file's ``uns`` as JSON-ready provenance (empty if it cannot be read)."""
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as file, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            uns = read_elem(file["uns"]) if "uns" in file else {}
    except Exception:  # provenance is informative only
        return {}
    return json_ready(dict(uns)) if uns else {}


def _label_array(dataset, key):
    column = dataset.label_keys.index(key)
    return np.array(dataset.label_strings(key, dataset.label_codes[:, column]))


def _rows(dataset, rng, max_cells):
    rows = np.arange(dataset.n_cells)
    if max_cells and dataset.n_cells > max_cells:
        rows = np.sort(rng.choice(dataset.n_cells, max_cells, replace=False))
    return rows


def _shared_columns(real_genes, generated_genes, real_source, generated_source, warn):
    position = {gene: j for j, gene in enumerate(generated_genes)}
    shared = [(i, position[gene]) for i, gene in enumerate(real_genes) if gene in position]
    minimum = min(MIN_SHARED_GENES, len(real_genes))
    if len(shared) < minimum:
        raise UsageError(f"the real and generated files share {len(shared)} gene names; at least {minimum} are "
                         f"needed (real {real_source.path}: {len(real_genes)} genes, e.g. "
                         f"{', '.join(real_genes[:3])}; generated {generated_source.path}: {len(generated_genes)}, "
                         f"e.g. {', '.join(generated_genes[:3])})")
    for name, genes in (("real", real_genes), ("generated", generated_genes)):
        if len(shared) < SHARED_GENES_WARNING_FRACTION * len(genes):
            warn(f"only {len(shared)} of the {len(genes)} genes of the {name} file are shared with the other "
                 f"file; gene-level figures cover the shared genes only")
    return tuple(np.array(columns, dtype=int) for columns in zip(*shared))


def _check_label_case(real_labels, generated_labels, label_key):
    real_vocabulary = {str(label) for label in real_labels}
    by_case = {}
    for label in real_vocabulary:
        by_case.setdefault(label.casefold(), label)
    for label in sorted({str(label) for label in generated_labels} - real_vocabulary):
        if label.casefold() in by_case:
            raise UsageError(f"generated label {label!r} differs from the real label {by_case[label.casefold()]!r} "
                             f"only in case ({label_key}); make the spellings agree")


def _check_label_overlap(real_labels, generated_labels, label_key, warn):
    """Refuse generated labels none of which is a real label (e.g. codes for names, a prefix); warn when
    fewer than half of the generated cells carry a label the real data has (figures then compare mostly
    cells of no known label)."""
    real_vocabulary = {str(label) for label in real_labels}
    generated = pd.Series([str(label) for label in generated_labels])
    known = generated.isin(real_vocabulary)
    if not known.any():
        raise UsageError(f"none of the generated labels ({label_key}: {format_values(sorted(set(generated)))}) is a "
                         f"label of the real data ({format_values(sorted(real_vocabulary))}); the generated cells "
                         f"must carry the real data's label names (not codes, prefixes or another key)")
    unknown = int((~known).sum())
    if unknown > len(generated) / 2:
        counts = generated[~known].value_counts()
        listed = ", ".join(f"{label!r}: {count}" for label, count in counts.head(5).items())
        more = f", … ({len(counts)} labels)" if len(counts) > 5 else ""
        warn(f"{unknown} of the {len(generated)} generated cells carry a {label_key} label the real data lacks "
             f"({listed}{more}); only {len(generated) - unknown} can be matched to real cells of their label, "
             f"so per-label figures leave most cells out; check the label names")


def _check_generated_range(values, source):
    if source.input_is_log and values.size and values.max() > GENERATED_MAX_VALUE:
        raise UsageError(f"{source.path} has values up to {values.max():.0f}, too large for log-normalized "
                         f"expression; the generated file must hold log1p(normalize_total) values (or give "
                         f"--generated_layer counts --generated_input_is_log False for its counts)")


def load_evaluation_data(real_path, generated_path, label_key, layer="", input_is_log=False,
                         filters=None, max_cells=20000, seed=0, generated_layer="", generated_input_is_log=True,
                         train_path=None, condition_keys=(), allow_count_like_log=False, warn=None):
    """Read every file and keep the genes real and generated share (in the real file's order)."""
    found_warnings = []

    def record(message):
        found_warnings.append(message)
        if warn is not None:
            warn(message)

    keys = [label_key, *condition_keys]
    real_source = InputFile(str(real_path), layer, input_is_log, "real")
    generated_source = InputFile(str(generated_path), generated_layer, generated_input_is_log, "generated")
    real_set = read_cells(real_source, keys, filters, allow_count_like_log)
    generated_set = read_cells(generated_source, keys, None, allow_count_like_log)
    train_set = None
    if train_path:
        train_source = InputFile(str(train_path), layer, input_is_log, "train")
        train_set = read_cells(train_source, keys, filters, allow_count_like_log)

    real_columns, generated_columns = _shared_columns(real_set.genes, generated_set.genes, real_source,
                                                      generated_source, record)
    genes = [real_set.genes[i] for i in real_columns]
    rng = np.random.default_rng([seed, 1])
    real_rows = _rows(real_set, rng, max_cells)
    real = real_set.rows(real_rows)[:, real_columns]
    generated_rows = _rows(generated_set, rng, max_cells)
    generated = np.ascontiguousarray(generated_set.rows(generated_rows)[:, generated_columns])
    _check_generated_range(generated, generated_source)
    real_labels = _label_array(real_set, label_key)[real_rows]
    generated_labels = _label_array(generated_set, label_key)[generated_rows]
    _check_label_case(real_labels, generated_labels, label_key)
    _check_label_overlap(_label_array(real_set, label_key), _label_array(generated_set, label_key), label_key, record)

    data = EvaluationData(label_key, genes, real, real_labels, generated, generated_labels,
                          warnings=found_warnings)
    data.conditions = {"real": {key: _label_array(real_set, key)[real_rows] for key in condition_keys},
                       "generated": {key: _label_array(generated_set, key)[generated_rows] for key in condition_keys}}
    if train_set is not None:
        _attach_train(data, train_set, rng, max_cells, condition_keys, record)
    data.inputs = {
        "real": {"path": str(real_path), "cells": int(real_set.n_cells), "cells_used": int(real.shape[0]),
                 "genes": len(real_set.genes), "layer": layer or "X", "input_is_log": bool(input_is_log),
                 "filters": list(filters or [])},
        "generated": {"path": str(generated_path), "cells": int(len(generated_labels)),
                      "genes": len(generated_set.genes), "layer": generated_layer or "X",
                      "input_is_log": bool(generated_input_is_log), "provenance": read_uns(str(generated_path))},
        "shared_genes": len(genes),
        "genes_only_in_real": len(real_set.genes) - len(genes),
        "genes_only_in_generated": len(generated_set.genes) - len(genes),
        "condition_keys": list(condition_keys),
    }
    if train_set is not None:
        data.inputs["train"] = {"path": str(train_path), "cells": int(train_set.n_cells),
                                "cells_used": int(data.train.shape[0]), "layer": layer or "X",
                                "input_is_log": bool(input_is_log)}
    for dataset in (real_set, generated_set, train_set):
        if dataset is not None:
            dataset.close()
    return data


def _attach_train(data, train_set, rng, max_cells, condition_keys, warn):
    """The training cells on the evaluation's genes (log-normalized, and raw counts when stored)."""
    position = {gene: j for j, gene in enumerate(train_set.genes)}
    missing = [gene for gene in data.genes if gene not in position]
    if missing:
        raise UsageError(f"the training file lacks {len(missing)} of the evaluated genes (first: "
                         f"{', '.join(missing[:3])}); give the file the model was trained on")
    columns = np.array([position[gene] for gene in data.genes], dtype=int)
    rows = _rows(train_set, rng, max_cells)
    data.train = np.ascontiguousarray(train_set.rows(rows)[:, columns])
    data.train_labels = _label_array(train_set, data.label_key)[rows]
    data.conditions["train"] = {key: _label_array(train_set, key)[rows] for key in condition_keys}
    totals = train_set.library_sizes()
    if totals is not None:
        data.train_counts = np.ascontiguousarray(train_set.raw_rows(rows)[:, columns])
        data.train_totals = np.asarray(totals, dtype=np.float64)[rows]
    unseen = sorted(set(data.real_labels) - set(data.train_labels))
    if unseen:
        warn(f"held-out labels absent from the training file: {', '.join(unseen)}")


@dataclass
class CellSet:
    """Log-normalized expression, counts (None for decoded means) and labels of one set of cells."""

    x: np.ndarray
    counts: object
    labels: np.ndarray


def read_set(path, label_key, role):
    """Cells of ``path``: raw counts from layers['counts'] (the sampler's format) or X; decoded means
    (an X without counts that is not whole numbers) are read as log-normalized."""
    if not os.path.isfile(path):
        raise UsageError(f"{role} file {path} does not exist")
    with h5py.File(path, "r") as file:
        has_counts = "layers" in file and "counts" in file["layers"]
        mean_observation = "cfdiffusion" in file.get("uns", {}) and not has_counts
    dataset = load_dataset(path, label_keys=[label_key], layer="counts" if has_counts else "",
                           input_is_log=mean_observation)
    try:
        rows = np.arange(dataset.n_cells)
        counts = None if mean_observation else dataset.raw_rows(rows)
        x = dataset.rows(rows)
        labels = np.array(dataset.label_strings(label_key, dataset.label_codes[:, 0]))
        genes = list(dataset.genes)
    finally:
        dataset.close()
    return CellSet(x=x, counts=counts, labels=labels), genes
