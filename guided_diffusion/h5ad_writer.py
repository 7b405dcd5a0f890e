"""Decoded latents straight into an .h5ad, chunk by chunk (anndata's on-disk layout, written with h5py so
that no N x genes matrix is ever held in memory), under a temporary name renamed when complete.

Used by the sampler and by ``exp_script/reconstruct.py``. The decoder runs in float32 whatever the
sampler's ``--precision``: everything written is computed and stored in float32.
"""
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import write_elem
from tqdm.auto import tqdm

from . import seed_streams
from .atomic import atomic_output

SCANPY_LOG1P = {"base": None}  # what sc.pp.log1p stores: natural log


class StreamedCsrMatrix:
    """An anndata ``csr_matrix`` element in an open h5py group, written one block of rows at a time.

    ``indices`` and ``indptr`` share one integer type (int32 while the matrix could hold fewer than 2**31
    entries, else int64): scipy's kernels that scanpy calls (``eliminate_zeros`` in ``rank_genes_groups``)
    refuse a matrix read back with mixed index types."""

    def __init__(self, parent, name, shape, dtype="float32"):
        index_dtype = "int32" if int(shape[0]) * int(shape[1]) < 2 ** 31 else "int64"
        group = parent.create_group(name)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        self.data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
        self.indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=index_dtype,
                                            chunks=(1 << 16,))
        self.indptr = group.create_dataset("indptr", shape=(shape[0] + 1,), dtype=index_dtype)
        self.indptr[0] = 0
        self.rows, self.nnz = 0, 0

    def append(self, block):
        nnz = block.nnz
        for dataset, values in ((self.data, block.data), (self.indices, block.indices)):
            dataset.resize((self.nnz + nnz,))
            dataset[self.nnz:] = values
        self.indptr[self.rows + 1:self.rows + 1 + block.shape[0]] = block.indptr[1:] + self.nnz
        self.rows += block.shape[0]
        self.nnz += nnz


def log_normalize_counts(counts, target_sum):
    """CSR counts -> CSR log1p(counts / cell total x target_sum), as the loader normalizes real cells."""
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = np.where(totals > 0, target_sum / np.maximum(totals, 1e-12), 0.0)
    normalized = counts.astype(np.float32, copy=True)
    normalized.data = np.log1p(normalized.data * np.repeat(scale, np.diff(normalized.indptr))).astype(np.float32)
    return normalized


class NonFiniteOutput(ValueError):
    """The decoder produced NaN or infinite values (raised before the output gets its final name)."""


def _decode_mean(autoencoder, block):
    decoded = autoencoder.model.decode(block.float()).float().cpu().numpy()
    if not np.isfinite(decoded).all():
        raise NonFiniteOutput("decoded values")
    return decoded


def _draw_counts(autoencoder, block, totals, generator):
    counts = autoencoder.model.sample_counts(block.float(), totals, generator).cpu()
    counts = sp.csr_matrix((counts.values().numpy(), counts.col_indices().numpy().astype(np.int32),
                            counts.crow_indices().numpy()), shape=tuple(counts.shape))
    if not (np.isfinite(counts.data).all() and (counts.data >= 0).all()):
        raise NonFiniteOutput("drawn counts (NaN, infinite or negative)")
    return counts


def write_decoded_h5ad(path, autoencoder, latents, obs, uns, chunk_size=1024, progress=True, library_sizes=None,
                       seed=0):
    """Decode latents chunk by chunk straight into an .h5ad (temp name, renamed when complete).

    Without ``library_sizes``, X is the decoded mean expression (dense). With them (one target total per
    cell), counts are drawn from the autoencoder's negative binomial: X holds their log-normalized values,
    ``layers['counts']`` the counts (both sparse), ``obs['library_size']`` each cell's row total of
    ``layers['counts']`` and ``obs['target_library_size']`` the total the draw was asked for; chunk ``i``
    draws from a generator seeded by (seed, i). X is log-normalized either way, recorded as ``sc.pp.log1p``
    records it (``uns['log1p']``), so scanpy does not warn. Returns the decoded values' (min, max).
    """
    n_cells, n_genes = len(latents), len(autoencoder.genes)
    device = autoencoder.device
    obs = obs.copy()
    low, high = np.inf, -np.inf
    with atomic_output(path) as temp_path:
        with h5py.File(temp_path, "w") as store:
            store.attrs["encoding-type"] = "anndata"
            store.attrs["encoding-version"] = "0.1.0"
            write_elem(store, "layers", {})
            if library_sizes is None:
                matrix = store.create_dataset("X", shape=(n_cells, n_genes), dtype="float32",
                                              chunks=(max(1, min(chunk_size, n_cells, 256)), n_genes))
                matrix.attrs["encoding-type"] = "array"
                matrix.attrs["encoding-version"] = "0.2.0"
            else:
                matrix = StreamedCsrMatrix(store, "X", (n_cells, n_genes))
                counts_matrix = StreamedCsrMatrix(store["layers"], "counts", (n_cells, n_genes))
                row_totals = np.zeros(n_cells, dtype=np.float64)
            chunks = range(0, n_cells, chunk_size)
            for number, start in enumerate(tqdm(chunks, desc="decode", unit="chunk", disable=not progress)):
                block = torch.as_tensor(latents[start:start + chunk_size]).to(device)
                if library_sizes is None:
                    decoded = _decode_mean(autoencoder, block)
                    matrix[start:start + len(block)] = decoded
                    low, high = min(low, float(decoded.min())), max(high, float(decoded.max()))
                    continue
                generator = seed_streams.torch_generator(seed, seed_streams.COUNT_DRAWS, number, device)
                totals = torch.as_tensor(library_sizes[start:start + chunk_size]).to(device)
                counts = _draw_counts(autoencoder, block, totals, generator)
                counts_matrix.append(counts)
                row_totals[start:start + counts.shape[0]] = np.asarray(counts.sum(axis=1)).ravel()
                normalized = log_normalize_counts(counts, autoencoder.normalization.target_sum)
                matrix.append(normalized)
                if normalized.nnz:
                    low, high = min(low, 0.0, float(normalized.data.min())), max(high, float(normalized.data.max()))
            if library_sizes is not None:
                obs["library_size"] = row_totals.astype(np.float32)
                obs["target_library_size"] = np.asarray(library_sizes, dtype=np.float32)
            write_elem(store, "obs", obs)
            write_elem(store, "var", pd.DataFrame(index=pd.Index(autoencoder.genes, name="gene")))
            write_elem(store, "uns", {**uns, "log1p": SCANPY_LOG1P})
            for empty in ("obsm", "varm", "obsp", "varp"):
                write_elem(store, empty, {})
    return low, high
