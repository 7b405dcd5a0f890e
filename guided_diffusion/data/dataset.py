"""One dataset type over a row source, and the one pipeline that loads it.

:class:`CellDataset` holds the per-cell vectors (label codes, totals, size factors) and the record a
checkpoint needs (genes in order, normalization, label vocabularies); its rows come from a row source:

* :class:`InMemoryRows`: the sparse matrix read once, rows taken from it;
* :class:`StreamedRows` (``--backed True``, or ``auto`` for large files): the file stays open and rows
  are read from disk in blocks of ``--block_rows`` consecutive cells, the last ``BLOCK_CACHE_SIZE``
  blocks kept. Memory does not grow with the number of cells beyond small per-cell vectors.

Either way rows are densified and normalized one batch at a time, never the whole matrix, and the
values are validated (and per-cell totals computed) in one pass over the source's blocks.
"""
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass

import anndata
import numpy as np
import scipy.sparse as sp

from guided_diffusion.core import memory
from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import files
from guided_diffusion.data.fingerprint import MatrixDigest, data_fingerprint
from guided_diffusion.data.labels import check_shape_and_genes, encode_labels, parse_filters, resolve_label_keys
from guided_diffusion.data.normalize import TARGET_SUM, log_normalize, size_factors
from guided_diffusion.data.values import ValueScan

DEFAULT_BLOCK_ROWS = 4096
BLOCK_CACHE_SIZE = 2
IN_MEMORY_SCAN_ROWS = 65536


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


def dense_readable(values):
    """A dense matrix as an array scipy.sparse can hold: float16 (which it cannot) becomes float32."""
    values = np.asarray(values)
    return values.astype(np.float32) if values.dtype == np.float16 else values


class InMemoryRows:
    """Rows of a CSR matrix held in memory."""

    is_backed = False
    block_rows = None

    def __init__(self, matrix):
        self.matrix = matrix.tocsr() if sp.issparse(matrix) else sp.csr_matrix(dense_readable(matrix))

    @property
    def shape(self):
        return self.matrix.shape

    def take(self, rows):
        return InMemoryRows(self.matrix[rows])

    def blocks(self):
        for start in range(0, self.shape[0], IN_MEMORY_SCAN_ROWS):
            yield start, self.matrix[start:start + IN_MEMORY_SCAN_ROWS]

    def raw_rows(self, index):
        order = np.argsort(index, kind="stable")
        block = self.matrix[index[order]].toarray().astype(np.float32, copy=False)
        dense = np.empty_like(block)
        dense[order] = block
        return dense

    def close(self):
        """Nothing to release."""


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
            chunk = chunk.tocsr() if sp.issparse(chunk) else sp.csr_matrix(dense_readable(chunk))
            if end - position != stop - first:
                chunk = chunk[file_rows[position:end] - first]
            pieces.append(chunk)
            position = end
        if not pieces:
            dtype = np.float32 if self.matrix.dtype == np.float16 else self.matrix.dtype
            return sp.csr_matrix((0, self.matrix.shape[1]), dtype=dtype)
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")


class StreamedRows:
    """Rows of a matrix that stays in the open .h5ad ``file``, read in blocks of ``block_rows`` cells.

    Cell ``i`` is row ``file_rows[i]`` of the file (all rows, or those kept by ``--filter``). Block
    ``b`` holds cells ``[b * block_rows, (b + 1) * block_rows)``; the last ``BLOCK_CACHE_SIZE``
    blocks read are kept (raw values, CSR), so a batch drawn block by block costs at most one read.
    """

    is_backed = True

    def __init__(self, file, matrix, block_rows, file_rows=None):
        self.file = file
        self.matrix = matrix
        self.block_rows = int(block_rows)
        self.file_rows = np.arange(matrix.shape[0]) if file_rows is None else np.asarray(file_rows, dtype=np.int64)
        self._reader = RowWindowReader(matrix, self.block_rows)
        self._cache = OrderedDict()
        # memory stays bounded while the file is open: the allocator policy's streaming mode
        memory.hold_memory_bound(self)

    @property
    def shape(self):
        return len(self.file_rows), self.matrix.shape[1]

    @property
    def n_blocks(self):
        return -(-self.shape[0] // self.block_rows)

    def take(self, rows):
        """The cells ``rows`` (increasing, e.g. those a filter keeps), reading from the same open file."""
        if np.any(np.diff(rows) <= 0):
            raise ValueError("StreamedRows.take needs increasing rows, so that reads stay sequential")
        return StreamedRows(self.file, self.matrix, self.block_rows, self.file_rows[rows])

    def read_block(self, number):
        """Raw stored values of block ``number`` as CSR (read from disk, not cached)."""
        start = number * self.block_rows
        return self._reader.read(self.file_rows[start:start + self.block_rows])

    def blocks(self):
        for number in range(self.n_blocks):
            yield number * self.block_rows, self.read_block(number)

    def _cached_block(self, number):
        if number in self._cache:
            self._cache.move_to_end(number)
            return self._cache[number]
        block = self.read_block(number)
        self._cache[number] = block
        while len(self._cache) > BLOCK_CACHE_SIZE:
            self._cache.popitem(last=False)
        return block

    def raw_rows(self, index):
        dense = np.empty((len(index), self.shape[1]), dtype=np.float32)
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
        memory.release_memory_bound(self)
        if self.file is not None:
            self.file.close()
            self.file = None


class CellDataset:
    """Cells x genes expression from a row source, with integer label codes per label key.

    Construction scans the source once: every value is validated (:class:`ValueScan`), for raw
    counts the per-cell totals become size factors, and the blocks are hashed into ``fingerprint``
    (genes, cell names and values: what a checkpoint records to recognize its training data).
    """

    def __init__(self, source, genes, label_keys, label_codes, vocabularies, normalization, obs=None,
                 allow_count_like_log=False):
        self.source = source
        self.genes = list(genes)
        self.label_keys = list(label_keys)
        self.label_codes = label_codes
        self.vocabularies = vocabularies
        self.normalization = normalization
        self._obs = obs
        scan = ValueScan(self.n_cells, normalization.input_is_log, where=self._where)
        digest = MatrixDigest()
        for start, block in source.blocks():
            scan.add(start, block)
            digest.add(block)
        scan.finish(allow_count_like_log)
        self.fingerprint = data_fingerprint(self.genes, self.obs_names, digest, normalization.layer)
        if normalization.input_is_log:
            self.size_factors, self.totals = None, None
        else:
            self.totals = scan.totals.astype(np.float32)
            self.size_factors = size_factors(scan.totals, normalization.target_sum)

    def _where(self, cell, gene):
        names = self.obs_names
        return f"cell {names[cell] if names is not None else cell!r}, gene {self.genes[gene]!r}"

    @property
    def is_backed(self):
        return self.source.is_backed

    @property
    def block_rows(self):
        """Cells per disk read of a streamed dataset (None in memory)."""
        return self.source.block_rows

    @property
    def n_cells(self):
        return self.source.shape[0]

    @property
    def n_genes(self):
        return self.source.shape[1]

    @property
    def obs_names(self):
        """Cell names (read from the file when asked for, while a streamed dataset is open)."""
        return None if self._obs is None else list(self._obs.names())

    @property
    def num_classes(self):
        return [len(self.vocabularies[key]) for key in self.label_keys]

    def _log_normalize(self, dense, index):
        if self.size_factors is not None:
            log_normalize(dense, factors=self.size_factors[index], out=dense)
        return dense

    def raw_rows(self, index):
        """Dense float32 stored values (raw counts, or the log-normalized input) of the given rows."""
        return self.source.raw_rows(np.asarray(index, dtype=np.int64))

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
        """Release the file (streamed datasets); nothing to do in memory."""
        self.source.close()


def _open(path, layer, backed, block_rows):
    """(obs, row source over every cell, genes) for ``path``, in memory or streamed."""
    if files.use_backed(path, layer, backed):
        file, obs, matrix, genes = files.open_backed(path, layer)
        return obs, StreamedRows(file, matrix, block_rows), genes
    obs, matrix, genes = files.read_in_memory(path, layer)
    return obs, InMemoryRows(matrix), genes


def _open_anndata(adata, layer):
    """(obs, row source over every cell, genes) of an in-memory AnnData: its matrix is read in place, as
    :func:`files.read_in_memory` reads a file's (nothing is written)."""
    if not layer:
        matrix, genes = adata.X, adata.var_names
    elif layer == "raw":
        if adata.raw is None:
            raise UsageError("layer 'raw' was given but the AnnData has no .raw")
        matrix, genes = adata.raw.X, adata.raw.var_names
    elif layer not in adata.layers:
        raise UsageError(f"layer {layer!r} not in the AnnData; available layers: "
                         f"{', '.join(adata.layers.keys()) or '(none)'}")
    else:
        matrix, genes = adata.layers[layer], adata.var_names
    if matrix is None:
        raise UsageError("the AnnData has no X matrix")
    return files.FrameObs(adata.obs), InMemoryRows(matrix), list(map(str, genes))


def load_dataset(path, label_keys=None, layer="", input_is_log=False, filters=None, require_labels=True,
                 backed=False, block_rows=DEFAULT_BLOCK_ROWS, allow_count_like_log=False):
    """Read ``path`` into a :class:`CellDataset`, in memory or streamed from disk.

    ``path`` may also be an AnnData: an in-memory one is read in place through the same pipeline (its
    matrix streamed batch by batch as a file's is once read; nothing is written), a backed one from its file.

    ``label_keys``: obs columns used as conditions, in order; None means the default ``cell_type1``
    when present. An empty list loads no labels. ``backed``: True, False or "auto" (stream files
    whose matrix exceeds ``files.BACKED_AUTO_BYTES``). ``allow_count_like_log``: accept whole-number
    values with count-sized totals as log-normalized input.
    """
    if isinstance(path, anndata.AnnData) and path.isbacked:
        path = os.fspath(path.filename)
    if isinstance(path, anndata.AnnData):
        (obs, source, genes), name = _open_anndata(path, layer), "the AnnData"
    else:
        (obs, source, genes), name = _open(path, layer, backed, block_rows), path
    try:
        label_keys = resolve_label_keys(label_keys, obs.columns, require_labels)
        check_shape_and_genes(name, source.shape, genes)
        keep = parse_filters(filters, obs)
        if not keep.any():
            raise UsageError(f"--filter {' '.join(filters)} keeps no cells")
        if not keep.all():
            rows = np.flatnonzero(keep)
            source, obs = source.take(rows), obs.take(rows)
        vocabularies, codes = encode_labels(obs, label_keys)
        normalization = Normalization(input_is_log=bool(input_is_log), layer=layer or "")
        return CellDataset(source, genes, label_keys, codes, vocabularies, normalization, obs=obs,
                           allow_count_like_log=allow_count_like_log)
    except BaseException:
        source.close()
        raise
