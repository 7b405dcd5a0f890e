"""A fingerprint of the cells a run trains on: genes in order, cell names in order, and the stored values.

Computed during the loader's one pass over the row blocks (:class:`MatrixDigest` takes each CSR block as
it is read), it is the same in memory and streamed with any ``--block_rows``: the row lengths, column
indices and values are hashed as three separate streams, so block boundaries do not matter. Only
stored non-zero values count (an explicit zero is no value), as float32 (what the model reads).

Both trainers record it in their checkpoints and refuse to resume on data whose fingerprint differs
(:func:`fingerprint_differences` names what differs), unless told to continue on new data.
"""
import hashlib

import numpy as np

FINGERPRINT_VERSION = 1


def _names_digest(names):
    return hashlib.sha256("\0".join(map(str, names)).encode("utf-8", "surrogatepass")).hexdigest()


class MatrixDigest:
    """sha256 of a cells x genes matrix fed as consecutive CSR row blocks (any block sizes)."""

    def __init__(self):
        self._lengths, self._indices, self._values = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()

    def add(self, block):
        if not block.has_canonical_format:  # unsorted or duplicate entries: the matrix they stand for
            block = block.copy()
            block.sum_duplicates()
        if block.data.size and not np.all(block.data):
            block = block.copy()
            block.eliminate_zeros()
        self._lengths.update(np.diff(block.indptr).astype("<i8").tobytes())
        self._indices.update(block.indices.astype("<i4", copy=False).tobytes())
        self._values.update(block.data.astype("<f4", copy=False).tobytes())

    def hexdigest(self):
        return hashlib.sha256(b"".join(h.digest() for h in (self._lengths, self._indices, self._values))).hexdigest()


def data_fingerprint(genes, cell_names, matrix_digest, layer=""):
    """The record of a dataset: counts, digests of the genes and cell names (in order and as sets) and of the
    matrix (rows in order). ``cell_names`` may be None (cells without names: only the matrix identifies them)."""
    cells = None if cell_names is None else list(map(str, cell_names))
    return {
        "version": FINGERPRINT_VERSION,
        "n_cells": None if cells is None else len(cells),
        "n_genes": len(genes),
        "genes": _names_digest(genes),
        "gene_set": _names_digest(sorted(map(str, genes))),
        "cells": None if cells is None else _names_digest(cells),
        "cell_set": None if cells is None else _names_digest(sorted(cells)),
        "matrix": matrix_digest.hexdigest(),
        "layer": layer or "X",
    }


def fingerprint_differences(recorded, current):
    """What differs between two fingerprints, as short phrases (empty when they match):
    ``other genes``, ``the same genes in another order``, ``other cells``, ``the same cells in another
    order``, ``other values``."""
    if recorded.get("version") != current.get("version"):
        return [] if recorded.get("matrix") == current.get("matrix") else ["a fingerprint of another version"]
    found = []
    if recorded["genes"] != current["genes"]:
        found.append("the same genes in another order" if recorded["gene_set"] == current["gene_set"]
                     else f"other genes ({recorded['n_genes']} recorded, {current['n_genes']} now)")
    if recorded["cells"] != current["cells"]:
        if recorded["cell_set"] is not None and recorded["cell_set"] == current["cell_set"]:
            found.append("the same cells in another order")
        else:
            found.append(f"other cells ({recorded['n_cells']} recorded, {current['n_cells']} now)")
    if not found and recorded["matrix"] != current["matrix"]:
        found.append("other values (the same genes and cells)")
    if recorded.get("layer", "X") != current.get("layer", "X"):
        found.append(f"another matrix ({recorded.get('layer', 'X')} recorded, {current.get('layer', 'X')} now)")
    return found


def describe_change(recorded, current, step, data_dir):
    """The entry a checkpoint records when a run continues on new data (``--resume_on_new_data True``)."""
    return {"step": int(step), "data_dir": str(data_dir),
            "differences": "; ".join(fingerprint_differences(recorded, current)) if recorded else "not checked "
            "(the checkpoint records no fingerprint)",
            "previous": recorded, "current": current}
