"""log1p(normalize_total): how raw counts become log-normalized expression, dense and sparse.

Each cell's counts are scaled to ``target_sum`` (``TARGET_SUM``, 10,000) total counts and then log1p'd,
as ``sc.pp.normalize_total(adata, target_sum=...)`` followed by ``sc.pp.log1p`` does (equal within float32
rounding; scanpy divides by total / target_sum where this multiplies by target_sum / total). The loader
(the model's input), the sampler (generated cells' X) and the evaluation's controls all normalize here.

The arithmetic is done in the precision of the size factors: the loader's float32 factors (float32 products
and log1p, in place on the batch), or float64 factors computed from the cells' totals (the sampler's and the
controls'); the result is float32 either way.
"""
import numpy as np
import scipy.sparse as sp

TARGET_SUM = 1e4


def cell_totals(x):
    """Total counts of each cell (row) of a dense or sparse matrix, float64."""
    return np.asarray(x.sum(axis=1), dtype=np.float64).ravel()


def size_factors(totals, target_sum=TARGET_SUM, dtype=np.float32):
    """``target_sum / total`` per cell (computed in float64, returned as ``dtype``); cells without counts get
    ``target_sum`` (their values are zero and stay zero)."""
    totals = np.asarray(totals, dtype=np.float64).ravel().copy()
    totals[totals == 0] = 1.0
    return (target_sum / totals).astype(dtype)


def log_normalize(x, target_sum=TARGET_SUM, factors=None, out=None):
    """log1p(x x ``target_sum`` / cell total) of raw counts ``x`` (cells x genes), float32.

    ``x`` dense (numpy) or sparse (the result is CSR sharing ``x``'s indices and indptr when ``x`` is CSR).
    ``factors``: per-cell size factors (:func:`size_factors`); by default float64 factors of ``x``'s own row
    totals. The product and the log1p are computed in the factors' precision. ``out`` (dense only): a
    float32 array to write into (``x`` itself normalizes a float32 batch in place).
    """
    if factors is None:
        factors = size_factors(cell_totals(x), target_sum, dtype=np.float64)
    if sp.issparse(x):
        x = x.tocsr()
        scaled = x.data.astype(np.float32) * np.repeat(factors, np.diff(x.indptr))
        return sp.csr_matrix((np.log1p(scaled).astype(np.float32), x.indices, x.indptr), shape=x.shape)
    if out is not None:
        np.multiply(x, factors[:, None], out=out)
        return np.log1p(out, out=out)
    return np.log1p(x * factors[:, None]).astype(np.float32)
