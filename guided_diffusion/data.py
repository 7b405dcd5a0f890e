"""One loader for every dataset: any .h5ad, label columns and layer given as flags.

The expression matrix stays sparse; rows are densified and normalized one batch at a time
(``CellDataset.rows``), so the whole matrix is never turned into a dense array. The dataset records
everything a checkpoint must carry to reproduce the input space: gene names in order, the
normalization, and the label vocabularies in a stable sorted order.

Two ways to hold the matrix:

* in memory (:class:`CellDataset`, the default for files whose matrix takes up to
  ``BACKED_AUTO_BYTES``): the sparse matrix is read once and rows are taken from it;
* backed (:class:`BackedCellDataset`, ``--backed True`` or larger files): the file stays open and
  rows are read from disk in blocks of ``--block_rows`` consecutive cells. Values are validated and
  per-cell totals (size factors) computed in one streaming pass; training visits the blocks in a
  random order and shuffles the cells inside each block (:class:`BlockShuffledSampler`), so reads
  stay sequential while epochs stay random. Memory does not grow with the number of cells beyond
  small per-cell vectors (labels, size factors, the CSR row pointer).
"""
import ctypes
import ctypes.util
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem, sparse_dataset

from .cli import UsageError, one_line, positive_int, str2bool

DEFAULT_LABEL_KEY = "cell_type1"
TARGET_SUM = 1e4
# --backed auto streams the matrix when it would take more than this in memory: the stored CSR arrays
# (data + indices + indptr), e.g. 2.7e8 non-zeros of float32 counts with int32 indices
BACKED_AUTO_BYTES = 2 * 1024 ** 3
DEFAULT_BLOCK_ROWS = 4096
BLOCK_CACHE_SIZE = 2
# glibc raises its mmap threshold to the size of the largest freed buffer, after which the ~10 MB
# batch and block buffers come from the heap and fragment it: resident memory then creeps up with the
# number of batches read. A fixed threshold keeps buffers above it mmapped, returned to the OS when freed.
MMAP_THRESHOLD_BYTES = 1 << 20
GLIBC_M_MMAP_THRESHOLD = -3


@dataclass
class Normalization:
    """How raw values become the model's input: normalize_total(target_sum) then log1p.

    ``input_is_log`` means the stored values are already log-normalized and are used as they are.
    """

    input_is_log: bool = False
    target_sum: float = TARGET_SUM
    layer: str = ""

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, values):
        return cls(**values)


def backed_mode(value):
    """``auto`` or a boolean, for ``--backed``."""
    if str(value).strip().lower() == "auto":
        return "auto"
    return str2bool(value)


def add_data_args(parser, labels=True):
    """The loader's flags, shared by every script that reads an h5ad."""
    group = parser.add_argument_group("data")
    group.add_argument("--data_dir", required=True, help="path to the .h5ad file")
    if labels:
        group.add_argument("--label_key", action="append", default=None,
                           help=f"obs column with the labels; repeat for several conditions "
                                f"(default: {DEFAULT_LABEL_KEY})")
    group.add_argument("--layer", default="",
                       help="read this layer instead of X ('raw' reads adata.raw)")
    group.add_argument("--input_is_log", type=str2bool, default=False,
                       help="True if the values are already log-normalized (default: raw counts)")
    group.add_argument("--filter", action="append", default=[], metavar="KEY=V1[,V2]",
                       help="keep only cells whose obs[KEY] is one of the values; repeatable")
    group.add_argument("--backed", type=backed_mode, default="auto", metavar="{auto,True,False}",
                       help=f"stream the matrix from disk in row blocks instead of loading it (auto: when the "
                            f"stored matrix exceeds {BACKED_AUTO_BYTES / 1024 ** 3:g} GiB)")
    group.add_argument("--block_rows", type=positive_int, default=DEFAULT_BLOCK_ROWS,
                       help="backed mode: consecutive cells per disk read; training shuffles the order of the "
                            "blocks and the cells inside each block")
    return group


def dataset_from_args(args, labels=True):
    return load_dataset(args.data_dir, label_keys=args.label_key if labels else [],
                        layer=args.layer, input_is_log=args.input_is_log, filters=args.filter,
                        backed=args.backed, block_rows=args.block_rows)


def _check_h5ad_path(path):
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


def read_h5ad(path):
    """Read an .h5ad file, turning a missing or malformed file into a one-line UsageError."""
    _check_h5ad_path(path)
    try:
        return anndata.read_h5ad(path)
    except Exception as error:  # anndata raises many types for malformed files
        raise UsageError(f"cannot read {path} as AnnData ({type(error).__name__}: {one_line(error)}); "
                         f"the file may be truncated or corrupt: re-create it") from error


def _select_matrix(adata, layer):
    if not layer:
        return adata.X, list(map(str, adata.var_names))
    if layer == "raw":
        if adata.raw is None:
            raise UsageError("--layer raw was given but the file has no adata.raw")
        return adata.raw.X, list(map(str, adata.raw.var_names))
    if layer not in adata.layers:
        raise UsageError(f"layer {layer!r} not in the file; available layers: "
                         f"{', '.join(adata.layers.keys()) or '(none)'}")
    return adata.layers[layer], list(map(str, adata.var_names))


def _parse_filters(filters, obs):
    keep = np.ones(len(obs), dtype=bool)
    for item in filters or []:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--filter takes KEY=VALUE[,VALUE], got {item!r}")
        if key not in obs.columns:
            raise UsageError(f"--filter key {key!r} is not an obs column; available: {', '.join(obs.columns)}")
        keep &= obs[key].astype(str).isin(values.split(",")).to_numpy()
    return keep


def _check_values(values, input_is_log):
    """One block of stored values: finite, non-negative and (for counts) integers."""
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise UsageError("the expression matrix contains NaN or infinite values; clean the file first")
    if values.min() < 0:
        raise UsageError("the expression matrix contains negative values; the loader expects raw counts "
                         "or log-normalized values (scaled/centered data cannot be used)")
    if not input_is_log and not np.all(values == np.round(values)):
        raise UsageError("the expression matrix has non-integer values but raw counts are expected; "
                         "if it is already log-normalized, pass --input_is_log True")


def validate_values(matrix, input_is_log, chunk_rows=65536):
    """Check values are finite, non-negative and (for counts) integers; one clear error otherwise."""
    for start in range(0, matrix.shape[0], chunk_rows):
        block = matrix[start:start + chunk_rows]
        _check_values(block.data if sp.issparse(block) else np.asarray(block).ravel(), input_is_log)


def _size_factors(totals, target_sum):
    totals = np.asarray(totals, dtype=np.float64).ravel().copy()
    totals[totals == 0] = 1.0
    return (target_sum / totals).astype(np.float32)


class CellDataset:
    """Cells x genes expression (sparse, as stored) with integer label codes per label key."""

    is_backed = False

    def __init__(self, matrix, genes, label_keys, label_codes, vocabularies, normalization, obs_names=None):
        self.matrix = matrix
        self.genes = list(genes)
        self.label_keys = list(label_keys)
        self.label_codes = label_codes
        self.vocabularies = vocabularies
        self.normalization = normalization
        self.obs_names = obs_names
        if normalization.input_is_log:
            self.size_factors, self.totals = None, None
        else:
            self.totals = np.asarray(matrix.sum(axis=1), dtype=np.float32).ravel()
            self.size_factors = _size_factors(self.totals, normalization.target_sum)

    @property
    def n_cells(self):
        return self.matrix.shape[0]

    @property
    def n_genes(self):
        return self.matrix.shape[1]

    @property
    def num_classes(self):
        return [len(self.vocabularies[key]) for key in self.label_keys]

    def _log_normalize(self, dense, index):
        if self.size_factors is not None:
            dense *= self.size_factors[index][:, None]
            np.log1p(dense, out=dense)
        return dense

    def raw_rows(self, index):
        """Dense float32 stored values (raw counts, or the log-normalized input) of the given rows."""
        index = np.asarray(index)
        order = np.argsort(index, kind="stable")
        block = self.matrix[index[order]]
        block = block.toarray() if sp.issparse(block) else np.asarray(block)
        block = block.astype(np.float32, copy=False)
        dense = np.empty_like(block)
        dense[order] = block
        return dense

    def rows(self, index):
        """Dense float32 model input (log-normalized) for the given row indices."""
        return self._log_normalize(self.raw_rows(index), index)

    def rows_and_counts(self, index):
        """(model input, raw counts, per-cell total counts) of the given rows; needs raw-count input.
        Cells without counts get a total of 1 (their likelihood is that of all zeros)."""
        if self.size_factors is None:
            raise UsageError("a count likelihood needs raw counts, but the input is log-normalized "
                             "(--input_is_log True); use --loss_ae mse")
        counts = self.raw_rows(index)
        totals = (self.normalization.target_sum / self.size_factors[np.asarray(index)]).astype(np.float32)
        return self._log_normalize(counts.copy(), index), counts, totals

    def library_sizes(self):
        """Total counts of every cell (None for log-normalized input)."""
        return self.totals

    def label_strings(self, key, codes):
        vocabulary = self.vocabularies[key]
        return [vocabulary[code] for code in codes]

    def close(self):
        """Release the file (backed datasets); nothing to do in memory."""


_mmap_threshold_fixed = False


def fix_mmap_threshold():
    """Pin glibc's mmap threshold at ``MMAP_THRESHOLD_BYTES`` (once per process; no-op without glibc)."""
    global _mmap_threshold_fixed
    if _mmap_threshold_fixed:
        return
    _mmap_threshold_fixed = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


class RowWindowReader:
    """Reads sorted file rows of a backed matrix as CSR, never more than ``window`` consecutive rows at once.

    ``matrix`` is an anndata backed sparse dataset (CSR) or a 2-D h5py dataset; each read is one
    contiguous row slice, from which the wanted rows are picked.
    """

    def __init__(self, matrix, window):
        self.matrix = matrix
        self.window = int(window)

    def read(self, file_rows):
        file_rows = np.asarray(file_rows, dtype=np.int64)
        pieces, position = [], 0
        while position < len(file_rows):
            first = int(file_rows[position])
            end = int(np.searchsorted(file_rows, first + self.window, side="left"))
            stop = int(file_rows[end - 1]) + 1
            chunk = self.matrix[first:stop]
            chunk = chunk.tocsr() if sp.issparse(chunk) else sp.csr_matrix(np.asarray(chunk))
            if end - position != stop - first:
                chunk = chunk[file_rows[position:end] - first]
            pieces.append(chunk)
            position = end
        if not pieces:
            return sp.csr_matrix((0, self.matrix.shape[1]), dtype=self.matrix.dtype)
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")


class BackedCellDataset(CellDataset):
    """A :class:`CellDataset` whose matrix stays in the .h5ad file, read in blocks of ``block_rows`` cells.

    Cell ``i`` of the dataset is row ``file_rows[i]`` of the file (all rows, or those kept by
    ``--filter``). Block ``b`` holds cells ``[b * block_rows, (b + 1) * block_rows)``; the last
    ``BLOCK_CACHE_SIZE`` blocks read are kept (raw values, CSR), so a batch drawn by
    :class:`BlockShuffledSampler` costs at most a block read and usually none.
    """

    is_backed = True

    def __init__(self, file, matrix, file_rows, genes, label_keys, label_codes, vocabularies, normalization,
                 obs=None, block_rows=DEFAULT_BLOCK_ROWS):
        self.file = file
        self.matrix = matrix
        self.file_rows = np.asarray(file_rows, dtype=np.int64)
        self.genes = list(genes)
        self.label_keys = list(label_keys)
        self.label_codes = label_codes
        self.vocabularies = vocabularies
        self.normalization = normalization
        self._obs = obs
        self.block_rows = int(block_rows)
        self._reader = RowWindowReader(matrix, self.block_rows)
        self._cache = OrderedDict()
        fix_mmap_threshold()
        self.size_factors = self._scan()

    @property
    def n_cells(self):
        return len(self.file_rows)

    @property
    def n_genes(self):
        return self.matrix.shape[1]

    @property
    def obs_names(self):
        """Cell names, read from the file when asked for (while the dataset is open)."""
        return None if self._obs is None else self._obs.names()

    @property
    def n_blocks(self):
        return -(-self.n_cells // self.block_rows)

    def read_block(self, number):
        """Raw stored values of block ``number`` as CSR (read from disk, not cached)."""
        start = number * self.block_rows
        return self._reader.read(self.file_rows[start:start + self.block_rows])

    def _cached_block(self, number):
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        block = self.read_block(number)
        self._cache[number] = block
        while len(self._cache) > BLOCK_CACHE_SIZE:
            self._cache.popitem(last=False)
        return block

    def _scan(self):
        """One pass over the file: validate every value and, for counts, compute per-cell size factors."""
        input_is_log = self.normalization.input_is_log
        totals = None if input_is_log else np.empty(self.n_cells, dtype=np.float64)
        for number in range(self.n_blocks):
            block = self.read_block(number)
            _check_values(block.data, input_is_log)
            if totals is not None:
                start = number * self.block_rows
                totals[start:start + block.shape[0]] = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        self.totals = None if totals is None else totals.astype(np.float32)
        return None if totals is None else _size_factors(totals, self.normalization.target_sum)

    def raw_rows(self, index):
        """Dense float32 stored values of the given cells, read block by block."""
        index = np.asarray(index, dtype=np.int64)
        dense = np.empty((len(index), self.n_genes), dtype=np.float32)
        block_of = index // self.block_rows
        order = np.argsort(block_of, kind="stable")
        boundaries = np.flatnonzero(np.diff(block_of[order])) + 1
        for positions in np.split(order, boundaries):
            if len(positions) == 0:
                continue
            number = int(block_of[positions[0]])
            local = index[positions] - number * self.block_rows
            dense[positions] = self._cached_block(number)[local].toarray()
        return dense

    def close(self):
        self._cache.clear()
        if self.file is not None:
            self.file.close()
            self.file = None


def _resolve_label_keys(label_keys, columns, require_labels):
    if label_keys is None:
        if DEFAULT_LABEL_KEY in columns:
            label_keys = [DEFAULT_LABEL_KEY]
        elif require_labels:
            raise UsageError(f"no --label_key given and obs has no {DEFAULT_LABEL_KEY!r} column; "
                             f"choose one of: {', '.join(columns) or '(no obs columns)'}")
        else:
            label_keys = []
    for key in label_keys:
        if key not in columns:
            raise UsageError(f"label key {key!r} not in obs; available columns: "
                             f"{', '.join(columns) or '(none)'}")
    if len(set(label_keys)) != len(label_keys):
        raise UsageError(f"--label_key given twice: {label_keys}")
    return list(label_keys)


def _check_shape_and_genes(path, shape, genes):
    if shape[0] == 0:
        raise UsageError(f"{path} has zero cells")
    if shape[1] == 0:
        raise UsageError(f"{path} has zero genes")
    if len(set(genes)) != len(genes):
        raise UsageError(f"{path} has duplicate gene names; make them unique (adata.var_names_make_unique())")


def _encode_labels(obs, label_keys):
    vocabularies, codes = {}, np.zeros((len(obs), len(label_keys)), dtype=np.int64)
    for column, key in enumerate(label_keys):
        values = obs[key]
        missing = values.isna().to_numpy()
        if missing.any():
            raise UsageError(f"label key {key!r} is missing for {int(missing.sum())} cells; "
                             f"drop them or fill the column")
        strings = values.astype(str).to_numpy()
        vocabulary = sorted(set(strings))
        vocabularies[key] = vocabulary
        lookup = {name: code for code, name in enumerate(vocabulary)}
        codes[:, column] = [lookup[name] for name in strings]
    return vocabularies, codes


def _matrix_location(layer):
    """Where the matrix of ``--layer`` lives in the h5ad file, and where its gene table lives."""
    if not layer:
        return "X", "var"
    if layer == "raw":
        return "raw/X", "raw/var"
    return f"layers/{layer}", "var"


def stored_matrix_nbytes(path, layer=""):
    """Bytes the selected matrix takes once loaded (its stored arrays, uncompressed); 0 if absent."""
    _check_h5ad_path(path)
    location, _ = _matrix_location(layer)
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


def load_dataset(path, label_keys=None, layer="", input_is_log=False, filters=None, require_labels=True,
                 backed=False, block_rows=DEFAULT_BLOCK_ROWS):
    """Read ``path`` into a :class:`CellDataset` (or, backed, a :class:`BackedCellDataset`).

    ``label_keys``: obs columns used as conditions, in order; None means the default
    ``cell_type1`` when present. An empty list loads no labels. ``backed``: True, False or "auto"
    (stream files whose matrix exceeds ``BACKED_AUTO_BYTES``).
    """
    if use_backed(path, layer, backed):
        return _load_backed(path, label_keys, layer, input_is_log, filters, require_labels, block_rows)
    adata = read_h5ad(path)
    label_keys = _resolve_label_keys(label_keys, adata.obs.columns, require_labels)
    matrix, genes = _select_matrix(adata, layer)
    _check_shape_and_genes(path, matrix.shape, genes)
    keep = _parse_filters(filters, adata.obs)
    if not keep.any():
        raise UsageError(f"--filter {' '.join(filters)} keeps no cells")
    obs = adata.obs[keep]
    if not keep.all():
        matrix = matrix[np.flatnonzero(keep)]
    matrix = sp.csr_matrix(matrix) if not sp.issparse(matrix) else matrix.tocsr()
    validate_values(matrix, input_is_log)
    vocabularies, codes = _encode_labels(obs, label_keys)
    normalization = Normalization(input_is_log=bool(input_is_log), layer=layer or "")
    return CellDataset(matrix, genes, label_keys, codes, vocabularies, normalization,
                       obs_names=list(map(str, obs.index)))


def _open_backed_matrix(file, path, layer):
    """The selected matrix as a lazily read object (anndata backed CSR or h5py dataset) and its genes."""
    location, var_location = _matrix_location(layer)
    if location not in file:
        if layer == "raw":
            raise UsageError("--layer raw was given but the file has no adata.raw")
        if layer:
            available = ", ".join(file["layers"].keys()) if "layers" in file else ""
            raise UsageError(f"layer {layer!r} not in the file; available layers: {available or '(none)'}")
        raise UsageError(f"{path} has no X matrix")
    element = file[location]
    if isinstance(element, h5py.Group):
        encoding = element.attrs.get("encoding-type", "")
        if encoding == "csc_matrix":
            raise UsageError(f"{path}: {location} is stored column-wise (CSC), which cannot be read in row blocks; "
                             f"rewrite it as CSR (adata.X = adata.X.tocsr()) or pass --backed False")
        matrix = sparse_dataset(element)
    elif element.ndim == 2:
        matrix = element
    else:
        raise UsageError(f"{path}: {location} is not a cells x genes matrix")
    genes = list(map(str, read_elem(file[var_location]).index))
    return matrix, genes


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


def _load_backed(path, label_keys, layer, input_is_log, filters, require_labels, block_rows):
    """Open ``path`` for streaming: labels and per-cell vectors in memory, the matrix on disk."""
    _check_h5ad_path(path)
    file = h5py.File(path, "r")
    try:
        try:
            obs = ObsColumns(file["obs"])
            matrix, genes = _open_backed_matrix(file, path, layer)
        except UsageError:
            raise
        except Exception as error:  # anndata raises many types for malformed files
            raise UsageError(f"cannot read {path} as AnnData: {type(error).__name__}: {error}") from error
        label_keys = _resolve_label_keys(label_keys, obs.columns, require_labels)
        _check_shape_and_genes(path, matrix.shape, genes)
        if matrix.shape[0] != len(obs):
            raise UsageError(f"{path}: the matrix has {matrix.shape[0]} rows but obs has {len(obs)} cells")
        keep = _parse_filters(filters, obs)
        if not keep.any():
            raise UsageError(f"--filter {' '.join(filters)} keeps no cells")
        file_rows = np.flatnonzero(keep)
        obs = obs.take(file_rows) if len(file_rows) < len(obs) else obs
        vocabularies, codes = _encode_labels(obs, label_keys)
        normalization = Normalization(input_is_log=bool(input_is_log), layer=layer or "")
        return BackedCellDataset(file, matrix, file_rows, genes, label_keys, codes, vocabularies,
                                 normalization, obs=obs, block_rows=block_rows)
    except BaseException:
        file.close()
        raise


def check_num_classes(num_classes, dataset):
    """``--num_classes`` (one number per label key) must agree with the data's vocabularies."""
    if num_classes is None:
        return
    found = dataset.num_classes
    if list(num_classes) != found:
        detail = ", ".join(f"{key}: {n}" for key, n in zip(dataset.label_keys, found))
        raise UsageError(f"--num_classes {' '.join(map(str, num_classes))} contradicts the data ({detail}); "
                         f"omit it or fix the value")


def check_genes(expected, found, what="the autoencoder checkpoint"):
    """Data genes must equal the checkpoint's genes, in order; say how many differ and which first."""
    if list(expected) == list(found):
        return
    expected_set, found_set = set(expected), set(found)
    missing = [g for g in expected if g not in found_set]
    extra = [g for g in found if g not in expected_set]
    if not missing and not extra:
        raise UsageError(f"the data has the genes of {what} but in a different order; reorder with adata[:, genes]")
    parts = [f"the data has {len(found)} genes, {what} {len(expected)}"]
    if missing:
        parts.append(f"{len(missing)} missing from the data (first: {', '.join(missing[:5])})")
    if extra:
        parts.append(f"{len(extra)} not in {what} (first: {', '.join(extra[:5])})")
    parts.append("use data and checkpoints with the same genes (subset with adata[:, genes] or retrain)")
    raise UsageError("; ".join(parts))


class BatchSampler:
    """Endless shuffled batches over a set of indices, resumable exactly from ``state_dict``.

    Each epoch's permutation derives from (seed, epoch) alone, so the position (epoch, offset)
    is the whole state.
    """

    def __init__(self, indices, batch_size, seed):
        self.indices = np.asarray(indices)
        if len(self.indices) == 0:
            raise UsageError("no cells to train on")
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._permutation = self._permute(0)

    def _permute(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        return self.indices[rng.permutation(len(self.indices))]

    def next_batch(self):
        parts, needed = [], self.batch_size
        while needed > 0:
            if self.offset >= len(self._permutation):
                self.epoch += 1
                self.offset = 0
                self._permutation = self._permute(self.epoch)
            take = self._permutation[self.offset:self.offset + needed]
            parts.append(take)
            self.offset += len(take)
            needed -= len(take)
        return np.concatenate(parts)

    def state_dict(self):
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def _check_order_kind(self, state):
        if state.get("block_rows") is not None:
            raise UsageError(f"the checkpoint was trained with --backed True (block-shuffled order, --block_rows "
                             f"{state['block_rows']}); resume with the same --backed and --block_rows")

    def load_state_dict(self, state):
        self._check_order_kind(state)
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.offset = int(state["offset"])
        self._permutation = self._permute(self.epoch)


class BlockShuffledSampler(BatchSampler):
    """:class:`BatchSampler` whose epochs keep cells of one block of ``block_rows`` together.

    An epoch visits the blocks (cells ``[b * block_rows, (b + 1) * block_rows)`` that hold training
    indices) in a random order and the indices within each block in a random order, both drawn from
    (seed, epoch) alone, so reads stay sequential and the state is still (epoch, offset).
    """

    def __init__(self, indices, batch_size, seed, block_rows):
        self.block_rows = int(block_rows)
        super().__init__(np.sort(np.asarray(indices)), batch_size, seed)

    def _permute(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        _, block_number = np.unique(self.indices // self.block_rows, return_inverse=True)
        block_position = rng.permutation(int(block_number.max()) + 1)
        within = rng.random(len(self.indices))
        return self.indices[np.lexsort((within, block_position[block_number]))]

    def state_dict(self):
        return dict(super().state_dict(), block_rows=self.block_rows)

    def _check_order_kind(self, state):
        if state.get("block_rows") != self.block_rows:
            trained = (f"--backed True --block_rows {state['block_rows']}" if state.get("block_rows") is not None
                       else "the in-memory loader (--backed False)")
            raise UsageError(f"the checkpoint was trained with {trained}, this run streams with --block_rows "
                             f"{self.block_rows}; resume with the same --backed and --block_rows")


def make_batch_sampler(dataset, indices, batch_size, seed):
    """Block-shuffled batches for a backed dataset, fully shuffled ones in memory."""
    if dataset.is_backed:
        return BlockShuffledSampler(indices, batch_size, seed, dataset.block_rows)
    return BatchSampler(indices, batch_size, seed)


def split_train_validation(n_cells, val_fraction, seed):
    """Deterministic held-out split; at least one training cell and, if asked, one validation cell."""
    rng = np.random.default_rng([seed, 12345])
    order = rng.permutation(n_cells)
    n_val = int(round(n_cells * val_fraction))
    if val_fraction > 0:
        n_val = min(max(n_val, 1), n_cells - 1)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
