"""The .h5ad file: checked before it is opened, then read whole (in memory) or opened for streaming.

Both ways give the same three things — an obs table (:class:`FrameObs` or :class:`ObsColumns`),
the selected matrix and its gene names — so the one load pipeline in :mod:`.dataset` does not care
which it got.

Matrices stored as float16 (dense, or sparse, which scipy cannot hold and anndata cannot read) are
read as float32, in memory (:func:`read_h5ad`) and streamed (:class:`Float16SparseRows`) alike.
"""
import os

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.experimental import read_dispatched
from anndata.io import read_elem, sparse_dataset

from guided_diffusion.core.errors import UsageError, one_line

# --backed auto streams the matrix when it would take more than this in memory: the stored CSR arrays
# (data + indices + indptr), e.g. 2.7e8 non-zeros of float32 counts with int32 indices
BACKED_AUTO_BYTES = 2 * 1024 ** 3


def check_h5ad_path(path):
    """One clear error for a missing, unreadable, non-HDF5 or non-AnnData file."""
    if not os.path.exists(path):
        raise UsageError(f"data file not found: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory; --data_dir takes the path of an .h5ad file")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}; check the file's permissions") from error
    if not h5py.is_hdf5(path):
        raise UsageError(f"{path} is not an .h5ad file (not HDF5); save it with anndata's write_h5ad")
    try:
        with h5py.File(path, "r") as file:
            groups = set(file.keys())
    except OSError as error:
        raise UsageError(f"cannot open {path}: the file is truncated or corrupt ({one_line(error)}); "
                         f"re-create or re-copy it") from error
    if not {"obs", "var"} <= groups:
        raise UsageError(f"{path} is an HDF5 file but not an .h5ad (no obs/var groups); "
                         f"save it with anndata's write_h5ad")


def _is_float16(element):
    """Whether an h5ad matrix element (a dense dataset, or a sparse group's ``data``) holds float16 values."""
    if isinstance(element, h5py.Group):
        element = element.get("data")
    return isinstance(element, h5py.Dataset) and element.dtype == np.float16


def has_float16_matrix(path):
    """Whether X, raw/X or a layer of the file is stored as float16."""
    with h5py.File(path, "r") as file:
        matrices = [file[name] for name in ("X", "raw/X") if name in file]
        if isinstance(file.get("layers"), h5py.Group):
            matrices += list(file["layers"].values())
        return any(_is_float16(element) for element in matrices)


def _as_float32(func, elem_name, elem, iospec):
    """A :func:`read_dispatched` callback (anndata passes these keywords): float16 arrays and sparse
    matrices are read as float32."""
    if iospec.encoding_type in ("csr_matrix", "csc_matrix") and _is_float16(elem):
        kind = sp.csr_matrix if iospec.encoding_type == "csr_matrix" else sp.csc_matrix
        return kind((elem["data"][...].astype(np.float32), elem["indices"][...], elem["indptr"][...]),
                    shape=tuple(int(n) for n in elem.attrs["shape"]))
    if iospec.encoding_type == "array" and _is_float16(elem):
        return elem[...].astype(np.float32)
    return func(elem)


def read_h5ad(path):
    """Read an .h5ad file, turning a missing or malformed file into a one-line UsageError; float16
    matrices are read as float32."""
    check_h5ad_path(path)
    try:
        if has_float16_matrix(path):
            with h5py.File(path, "r") as file:
                return read_dispatched(file, _as_float32)
        return anndata.read_h5ad(path)
    except Exception as error:  # anndata raises many types for malformed files
        raise UsageError(f"cannot read {path} as AnnData ({type(error).__name__}: {one_line(error)}); "
                         f"the file may be truncated or corrupt: re-create it") from error


def matrix_location(layer):
    """Where the matrix of ``--layer`` lives in the h5ad file, and where its gene table lives."""
    if not layer:
        return "X", "var"
    if layer == "raw":
        return "raw/X", "raw/var"
    return f"layers/{layer}", "var"


def stored_matrix_nbytes(path, layer=""):
    """Bytes the selected matrix takes once loaded (its stored arrays, uncompressed); 0 if absent."""
    check_h5ad_path(path)
    location, _ = matrix_location(layer)
    with h5py.File(path, "r") as file:
        if location not in file:
            return 0
        element = file[location]
        arrays = element.values() if isinstance(element, h5py.Group) else [element]
        return int(sum(a.size * a.dtype.itemsize for a in arrays if isinstance(a, h5py.Dataset)))


def use_backed(path, layer, backed):
    """Resolve ``--backed auto|True|False`` for this file."""
    if backed == "auto":
        return stored_matrix_nbytes(path, layer) > BACKED_AUTO_BYTES
    return bool(backed)


def _missing_layer(layer, available):
    if layer == "raw":
        return UsageError("--layer raw was given but the file has no adata.raw")
    return UsageError(f"layer {layer!r} not in the file; available layers: {', '.join(available) or '(none)'}")


class FrameObs:
    """An in-memory obs DataFrame behind the same small interface as :class:`ObsColumns`."""

    def __init__(self, frame):
        self.frame = frame
        self.columns = [str(name) for name in frame.columns]

    def __len__(self):
        return len(self.frame)

    def __getitem__(self, key):
        return self.frame[key]

    def take(self, rows):
        return FrameObs(self.frame.iloc[rows])

    def names(self):
        return pd.Index(self.frame.index).astype(str)


class ObsColumns:
    """The obs table of an open .h5ad file, read one column at a time and only when asked for.

    Atlases carry many obs columns; the backed loader reads just the label and filter columns (and
    the cell names on demand). ``rows`` restricts every column to those cells (e.g. after --filter).
    """

    def __init__(self, group, rows=None):
        if not isinstance(group, h5py.Group) or "_index" not in group.attrs:
            raise UsageError("obs is stored in a pre-0.7 anndata layout; re-save the file with a current anndata "
                             "or pass --backed False")
        self.group = group
        self.rows = rows
        self.columns = [str(name) for name in np.atleast_1d(group.attrs.get("column-order", [])) if str(name)]

    def _read(self, key):
        values = read_elem(self.group[key])
        return values if self.rows is None else values[self.rows]

    def __len__(self):
        if self.rows is not None:
            return len(self.rows)
        return self.group[self.group.attrs["_index"]].shape[0]

    def __getitem__(self, key):
        return pd.Series(self._read(key))

    def take(self, rows):
        return ObsColumns(self.group, rows)

    def names(self):
        return pd.Index(self._read(self.group.attrs["_index"])).astype(str)


def read_in_memory(path, layer):
    """The whole file in memory: (obs, matrix as stored, gene names)."""
    adata = read_h5ad(path)
    if not layer:
        matrix, genes = adata.X, adata.var_names
    elif layer == "raw":
        if adata.raw is None:
            raise _missing_layer(layer, [])
        matrix, genes = adata.raw.X, adata.raw.var_names
    elif layer not in adata.layers:
        raise _missing_layer(layer, list(adata.layers.keys()))
    else:
        matrix, genes = adata.layers[layer], adata.var_names
    return FrameObs(adata.obs), matrix, list(map(str, genes))


class Float16SparseRows:
    """A CSR matrix stored with float16 values (which scipy cannot hold), read as float32 row slices."""

    dtype = np.dtype(np.float32)

    def __init__(self, group):
        self.group = group
        self.shape = tuple(int(n) for n in group.attrs["shape"])

    def __getitem__(self, rows):
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("Float16SparseRows reads contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        stop = max(start, stop)
        indptr = self.group["indptr"][start:stop + 1].astype(np.int64)
        first, last = int(indptr[0]), int(indptr[-1])
        data = self.group["data"][first:last].astype(np.float32)
        return sp.csr_matrix((data, self.group["indices"][first:last], indptr - first),
                             shape=(stop - start, self.shape[1]))


def _open_backed_matrix(file, path, layer):
    """The selected matrix as a lazily read object (anndata backed CSR or h5py dataset) and its genes."""
    location, var_location = matrix_location(layer)
    if location not in file:
        if layer:
            raise _missing_layer(layer, list(file["layers"].keys()) if "layers" in file else [])
        raise UsageError(f"{path} has no X matrix")
    element = file[location]
    if isinstance(element, h5py.Group):
        encoding = element.attrs.get("encoding-type", "")
        if encoding == "csc_matrix":
            raise UsageError(f"{path}: {location} is stored column-wise (CSC), which cannot be read in row blocks; "
                             f"rewrite it as CSR (adata.X = adata.X.tocsr()) or pass --backed False")
        matrix = Float16SparseRows(element) if _is_float16(element) else sparse_dataset(element)
    elif element.ndim == 2:
        matrix = element
    else:
        raise UsageError(f"{path}: {location} is not a cells x genes matrix")
    genes = list(map(str, read_elem(file[var_location]).index))
    return matrix, genes


def open_backed(path, layer):
    """The file opened for streaming: (open h5py file, obs columns, lazily read matrix, gene names).

    The caller owns the file and closes it; it is closed here if opening fails.
    """
    check_h5ad_path(path)
    file = h5py.File(path, "r")
    try:
        obs = ObsColumns(file["obs"])
        matrix, genes = _open_backed_matrix(file, path, layer)
    except UsageError:
        file.close()
        raise
    except Exception as error:  # anndata raises many types for malformed files
        file.close()
        raise UsageError(f"cannot read {path} as AnnData: {type(error).__name__}: {error}") from error
    if matrix.shape[0] != len(obs):
        file.close()
        raise UsageError(f"{path}: the matrix has {matrix.shape[0]} rows but obs has {len(obs)} cells")
    return file, obs, matrix, genes
