"""Decoded latents straight into an .h5ad, chunk by chunk (anndata's on-disk layout, written with h5py so
that no N x genes matrix is ever held in memory), under a temporary name renamed when complete.

Used by the sampler and by ``exp_script/reconstruct.py``. HDF5 writes through a
:class:`~guided_diffusion.core.atomic.GuardedStream`, so a full disk is one OSError (no h5py errors at close or
dealloc, no crash at exit) and the temporary is removed. Everything written is computed and stored in
float32, except that with ``decoder_precision`` bf16 the count decoder's output layer multiplies in
bfloat16 (:func:`VAE.count_model.output_layer_logits`); decoded means are always float32.

With count draws, ``X`` (log-normalized) and ``layers['counts']`` have the same sparsity pattern: their
``indices`` and ``indptr`` are stored once, ``X``'s being HDF5 hard links to the counts' (anndata and
h5py read them as ordinary datasets; a quarter less on disk). The file writes run on one background
thread, in chunk order, while the next chunk is decoded and drawn (at most ``WRITE_QUEUE`` chunks wait,
so memory stays bounded by the chunk size, not by cells x genes).
"""
from collections import deque
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import read_elem, write_elem
from tqdm.auto import tqdm

from guided_diffusion.core import seed_streams
from guided_diffusion.core.atomic import GuardedStream, atomic_output
from guided_diffusion.data.normalize import log_normalize

COMPRESSIONS = ("none", "gzip", "lzf")
GZIP_LEVEL = 1
SPARSE_CHUNK = 1 << 16  # elements per HDF5 chunk of a sparse matrix's data / indices
WRITE_QUEUE = 2
SCANPY_LOG1P = {"base": None}  # what sc.pp.log1p stores: natural log


def dataset_options(compression):
    """h5py dataset keywords for ``compression`` (none, gzip or lzf; the byte-shuffle filter with either)."""
    if compression in (None, "none"):
        return {}
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}, not {compression!r}")
    options = {"compression": compression, "shuffle": True}
    if compression == "gzip":
        options["compression_opts"] = GZIP_LEVEL
    return options


class StreamedCsrMatrix:
    """An anndata ``csr_matrix`` element in an open h5py group, written one block of rows at a time.

    With ``pattern_of`` (another StreamedCsrMatrix of the same shape, appended to first with the same
    blocks' sparsity pattern) only ``data`` is stored; ``indices`` and ``indptr`` link to its datasets.
    """

    def __init__(self, parent, name, shape, dtype="float32", compression=None, pattern_of=None):
        # indices and indptr share one integer type: scipy kernels scanpy calls (eliminate_zeros in
        # rank_genes_groups) refuse a matrix read back with mixed index types
        index_dtype = "int32" if int(shape[0]) * int(shape[1]) < 2 ** 31 else "int64"
        group = parent.create_group(name)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        options = dict(maxshape=(None,), chunks=(SPARSE_CHUNK,), **dataset_options(compression))
        self.data = group.create_dataset("data", shape=(0,), dtype=dtype, **options)
        self.pattern_of = pattern_of
        if pattern_of is None:
            self.indices = group.create_dataset("indices", shape=(0,), dtype=index_dtype, **options)
            self.indptr = group.create_dataset("indptr", shape=(shape[0] + 1,), dtype=index_dtype)
            self.indptr[0] = 0
        else:
            group["indices"], group["indptr"] = pattern_of.indices, pattern_of.indptr
        self.rows, self.nnz = 0, 0

    def append(self, block):
        nnz = block.nnz
        self.data.resize((self.nnz + nnz,))
        self.data[self.nnz:] = block.data
        if self.pattern_of is None:
            self.indices.resize((self.nnz + nnz,))
            self.indices[self.nnz:] = block.indices
            self.indptr[self.rows + 1:self.rows + 1 + block.shape[0]] = block.indptr[1:] + self.nnz
        self.rows += block.shape[0]
        self.nnz += nnz


def log_normalize_counts(counts, target_sum):
    """CSR counts -> CSR log1p(counts / cell total x target_sum), as the loader normalizes real cells
    (sharing ``counts``' indices and indptr): :func:`guided_diffusion.data.normalize.log_normalize`."""
    return log_normalize(counts, target_sum)


class NonFiniteOutput(ValueError):
    """The decoder produced NaN or infinite values (raised before the output gets its final name)."""


def _decode_mean(autoencoder, block, labels=None):
    decoded = autoencoder.model.decode(block.float(), labels).float().cpu().numpy()
    if not np.isfinite(decoded).all():
        raise NonFiniteOutput("decoded values")
    return decoded


def _draw_counts(autoencoder, block, totals, generator, precision="fp32", labels=None):
    counts = autoencoder.model.sample_counts(block.float(), totals, generator, precision=precision,
                                             labels=labels).cpu()
    counts = sp.csr_matrix((counts.values().numpy(), counts.col_indices().numpy().astype(np.int32),
                            counts.crow_indices().numpy()), shape=tuple(counts.shape))
    if not (np.isfinite(counts.data).all() and (counts.data >= 0).all()):
        raise NonFiniteOutput("drawn counts (NaN, infinite or negative)")
    return counts


class OrderedWriter:
    """Runs write jobs in submission order on one background thread (``background`` False: inline), at
    most ``WRITE_QUEUE`` waiting; a job's error is raised in the caller by a later submit or finish.
    ``check`` (called after each job) raises the error of a file write that failed during it."""

    def __init__(self, background, check=None):
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="h5ad-writer") if background else None
        self.pending, self.check = deque(), check

    def _checked(self, job, *args):
        job(*args)
        if self.check is not None:  # a failed file write (a full disk) stops the run at this job
            self.check()

    def submit(self, job, *args):
        if self.executor is None:
            return self._checked(job, *args)
        while self.pending and (len(self.pending) >= WRITE_QUEUE or self.pending[0].done()):
            self.pending.popleft().result()  # re-raises a failed write's error
        self.pending.append(self.executor.submit(self._checked, job, *args))

    def finish(self):
        while self.pending:
            self.pending.popleft().result()

    def close(self):
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)


def _write_header(store):
    store.attrs["encoding-type"] = "anndata"
    store.attrs["encoding-version"] = "0.1.0"
    write_elem(store, "layers", {})


def _write_annotations(store, obs, genes, uns):
    write_elem(store, "obs", obs)
    write_elem(store, "var", pd.DataFrame(index=pd.Index(genes, name="gene")))
    write_elem(store, "uns", {**uns, "log1p": SCANPY_LOG1P})
    for empty in ("obsm", "varm", "obsp", "varp"):
        write_elem(store, empty, {})


def write_decoded_h5ad(path, autoencoder, latents, obs, uns, chunk_size=1024, progress=True, library_sizes=None,
                       seed=0, compression=None, background_writes=True, decoder_precision="fp32"):
    """Decode latents chunk by chunk straight into an .h5ad (temp name, renamed when complete).

    Without ``library_sizes``, X is the decoded mean expression (dense). With them (one target total per
    cell), counts are drawn from the autoencoder's negative binomial: X holds their log-normalized values,
    ``layers['counts']`` the counts (both sparse, one shared sparsity pattern), ``obs['library_size']``
    each cell's row total of ``layers['counts']`` and ``obs['target_library_size']`` the total the draw
    was asked for; chunk ``i`` draws from a generator seeded by (seed, i). ``compression`` (none, gzip,
    lzf) applies to the matrices' values and indices. ``background_writes`` overlaps the file writes with
    the next chunk's decoding (the file is the same either way). Counts are drawn by
    :meth:`VAE.VAE_model.VAE.sample_counts`; ``decoder_precision`` ``bf16`` runs the count decoder's output
    layer in bfloat16 (count draws only; the means path refuses it). An autoencoder whose decoder reads labels
    decodes each cell with its values of ``obs``'s columns of those keys.
    Returns the decoded values' (min, max).
    """
    if decoder_precision not in ("fp32", "bf16"):
        raise ValueError(f"decoder_precision must be 'fp32' or 'bf16', not {decoder_precision!r}")
    if decoder_precision == "bf16" and library_sizes is None:
        raise ValueError("decoder_precision bf16 applies to screened count draws only; decoded means are float32")
    labels = autoencoder.decoder_codes(obs)
    obs = obs.copy()
    value_range = [np.inf, -np.inf]
    needed = None if library_sizes is not None else len(latents) * len(autoencoder.genes) * 4 + (1 << 20)
    with atomic_output(path, needed=needed) as temp_path:
        with _guarded_hdf5(temp_path) as (store, check_writes):
            _write_header(store)
            writer = OrderedWriter(background_writes, check=check_writes)
            try:
                if library_sizes is None:
                    _write_means(store, autoencoder, latents, labels, chunk_size, compression, writer, value_range,
                                 progress)
                else:
                    layout = dict(compression=compression, decoder_precision=decoder_precision, labels=labels)
                    obs["library_size"] = _write_counts(store, autoencoder, latents, library_sizes, chunk_size,
                                                        seed, layout, writer, value_range, progress)
                    obs["target_library_size"] = np.asarray(library_sizes, dtype=np.float32)
                writer.finish()
            finally:
                writer.close()
            _write_annotations(store, obs, autoencoder.genes, uns)
    return tuple(value_range)


def write_h5ad(path, adata):
    """``adata.write_h5ad(path)``, atomically and through a guarded stream: a full disk is one
    :class:`~guided_diffusion.core.atomic.DiskFull` error naming ``path``, no h5py errors at close or dealloc."""
    with atomic_output(path) as temp_path:
        with _guarded_hdf5(temp_path) as (store, _):
            write_elem(store, "/", adata)


@contextmanager
def _guarded_hdf5(temp_path):
    """An h5py file written through a :class:`~guided_diffusion.core.atomic.GuardedStream`: a failed write (a full
    disk) raises its own OSError, and HDF5 closes the file cleanly afterwards (its later writes are dropped;
    the caller removes the file), so no error is left for h5py to raise at close, dealloc or exit."""
    stream = GuardedStream(temp_path, raise_errors=False)
    try:
        try:
            with h5py.File(stream, "w") as store:
                yield store, stream.check
            stream.check()
        except Exception:
            if stream.error is not None:
                raise stream.error from None
            raise
    finally:
        stream.close()


def _chunks(n_cells, chunk_size, progress):
    return enumerate(tqdm(range(0, n_cells, chunk_size), desc="decode", unit="chunk", disable=not progress))


def _block_labels(labels, start, chunk_size):
    return None if labels is None else labels[start:start + chunk_size]


def _decoded_means(autoencoder, latents, labels, chunk_size, value_range, progress):
    """(first row, decoded float32 means) of each chunk; ``value_range`` follows their (min, max)."""
    for _, start in _chunks(len(latents), chunk_size, progress):
        block = torch.as_tensor(latents[start:start + chunk_size]).to(autoencoder.device)
        decoded = _decode_mean(autoencoder, block, _block_labels(labels, start, chunk_size))
        value_range[:] = min(value_range[0], float(decoded.min())), max(value_range[1], float(decoded.max()))
        yield start, decoded


def _write_means(store, autoencoder, latents, labels, chunk_size, compression, writer, value_range, progress):
    n_cells, n_genes = len(latents), len(autoencoder.genes)
    matrix = store.create_dataset("X", shape=(n_cells, n_genes), dtype="float32",
                                  chunks=(max(1, min(chunk_size, n_cells, 256)), n_genes),
                                  **dataset_options(compression))
    matrix.attrs["encoding-type"] = "array"
    matrix.attrs["encoding-version"] = "0.2.0"

    def write(start, decoded):
        matrix[start:start + len(decoded)] = decoded

    for start, decoded in _decoded_means(autoencoder, latents, labels, chunk_size, value_range, progress):
        writer.submit(write, start, decoded)


def _drawn_counts(autoencoder, latents, labels, library_sizes, chunk_size, seed, decoder_precision, value_range,
                  progress, row_totals):
    """(counts, log-normalized counts) of each chunk, both CSR with one sparsity pattern; chunk ``i`` draws
    from a generator seeded by (seed, i). ``row_totals`` gets every cell's drawn total, ``value_range`` the
    normalized values' (min, max)."""
    device = autoencoder.device
    for number, start in _chunks(len(latents), chunk_size, progress):
        block = torch.as_tensor(latents[start:start + chunk_size]).to(device)
        generator = seed_streams.torch_generator(seed, seed_streams.COUNT_DRAWS, number, device)
        totals = torch.as_tensor(library_sizes[start:start + chunk_size]).to(device)
        counts = _draw_counts(autoencoder, block, totals, generator, decoder_precision,
                              _block_labels(labels, start, chunk_size))
        row_totals[start:start + counts.shape[0]] = np.asarray(counts.sum(axis=1)).ravel()
        normalized = log_normalize_counts(counts, autoencoder.normalization.target_sum)
        if normalized.nnz:
            value_range[:] = (min(value_range[0], 0.0, float(normalized.data.min())),
                              max(value_range[1], float(normalized.data.max())))
        yield counts, normalized


def _write_counts(store, autoencoder, latents, library_sizes, chunk_size, seed, layout, writer, value_range,
                  progress):
    """Draw, normalize and queue each chunk's counts; returns every cell's drawn total (float32)."""
    n_cells, n_genes = len(latents), len(autoencoder.genes)
    compression = layout["compression"]
    counts_matrix = StreamedCsrMatrix(store["layers"], "counts", (n_cells, n_genes), compression=compression)
    matrix = StreamedCsrMatrix(store, "X", (n_cells, n_genes), compression=compression,
                               pattern_of=counts_matrix)
    row_totals = np.zeros(n_cells, dtype=np.float64)

    def write(counts, normalized):
        counts_matrix.append(counts)
        matrix.append(normalized)

    for counts, normalized in _drawn_counts(autoencoder, latents, layout["labels"], library_sizes, chunk_size, seed,
                                            layout["decoder_precision"], value_range, progress, row_totals):
        writer.submit(write, counts, normalized)
    return row_totals.astype(np.float32)


# ---- the same cells into memory ------------------------------------------------------------------
def _stored_annotations(obs, genes, uns):
    """obs, var and uns exactly as :func:`write_decoded_h5ad` stores them and anndata reads them back: written
    with the same code to an HDF5 file held in memory (no disk), then read."""
    import io

    with h5py.File(io.BytesIO(), "w") as store:
        _write_annotations(store, obs, genes, uns)
        return read_elem(store["obs"]), read_elem(store["var"]), read_elem(store["uns"])


def _stacked_csr(blocks, shape, part):
    """One CSR matrix of ``shape`` from row blocks (``part`` picks each block's matrix), with the index type
    :class:`StreamedCsrMatrix` stores."""
    index_dtype = np.int32 if int(shape[0]) * int(shape[1]) < 2 ** 31 else np.int64
    pieces = [part(block) for block in blocks]
    data = np.concatenate([p.data for p in pieces]) if pieces else np.zeros(0, np.float32)
    indices = np.concatenate([p.indices for p in pieces]).astype(index_dtype) if pieces else np.zeros(0, index_dtype)
    indptr = np.zeros(shape[0] + 1, dtype=index_dtype)
    rows = nnz = 0
    for p in pieces:
        indptr[rows + 1:rows + 1 + p.shape[0]] = p.indptr[1:] + nnz
        rows, nnz = rows + p.shape[0], nnz + p.nnz
    return sp.csr_matrix((data.astype(np.float32, copy=False), indices, indptr), shape=shape)


def decode_to_anndata(autoencoder, latents, obs, uns, chunk_size=1024, progress=True, library_sizes=None, seed=0,
                      decoder_precision="fp32"):
    """The AnnData :func:`write_decoded_h5ad` writes for the same arguments, built in memory (no file): the
    same chunks decoded and drawn by the same code, X (and ``layers['counts']``) as anndata reads them back,
    obs, var and uns as stored. Returns (AnnData, the decoded values' (min, max))."""
    if decoder_precision not in ("fp32", "bf16"):
        raise ValueError(f"decoder_precision must be 'fp32' or 'bf16', not {decoder_precision!r}")
    if decoder_precision == "bf16" and library_sizes is None:
        raise ValueError("decoder_precision bf16 applies to count draws only; decoded means are float32")
    labels = autoencoder.decoder_codes(obs)
    obs = obs.copy()
    value_range = [np.inf, -np.inf]
    shape = (len(latents), len(autoencoder.genes))
    layers = {}
    if library_sizes is None:
        blocks = [decoded for _, decoded in _decoded_means(autoencoder, latents, labels, chunk_size, value_range,
                                                           progress)]
        matrix = np.concatenate(blocks) if blocks else np.zeros(shape, np.float32)
    else:
        row_totals = np.zeros(shape[0], dtype=np.float64)
        blocks = list(_drawn_counts(autoencoder, latents, labels, library_sizes, chunk_size, seed, decoder_precision,
                                    value_range, progress, row_totals))
        layers["counts"] = _stacked_csr(blocks, shape, lambda block: block[0])
        matrix = _stacked_csr(blocks, shape, lambda block: block[1])
        obs["library_size"] = row_totals.astype(np.float32)
        obs["target_library_size"] = np.asarray(library_sizes, dtype=np.float32)
    obs, var, uns = _stored_annotations(obs, autoencoder.genes, uns)
    return anndata.AnnData(X=matrix, obs=obs, var=var, uns=uns, layers=layers), tuple(value_range)
