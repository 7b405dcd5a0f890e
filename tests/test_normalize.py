"""guided_diffusion/data/normalize.py: the one log1p(normalize_total), dense and sparse, as scanpy computes it and
bit for bit as the loader, the sampler's writer and the evaluation's controls computed it before."""
import anndata
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from exp_script.evaluation.controls import log_normalize as controls_log_normalize
from guided_diffusion.data import CellDataset, InMemoryRows, Normalization
from guided_diffusion.data.normalize import TARGET_SUM, cell_totals, log_normalize, size_factors
from guided_diffusion.sampling.writer import log_normalize_counts


def counts(seed=0, cells=40, genes=30):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(0.5, 0.05, size=(cells, genes)).astype(np.float32)
    x[3] = 0  # a cell without counts
    return x


@pytest.mark.parametrize("target_sum", [TARGET_SUM, 1e6])
@pytest.mark.parametrize("sparse", [False, True])
def test_matches_scanpy(target_sum, sparse):
    x = counts()
    adata = anndata.AnnData(sp.csr_matrix(x) if sparse else x.copy())
    sc.pp.normalize_total(adata, target_sum=target_sum)
    sc.pp.log1p(adata)
    expected = adata.X.toarray() if sparse else adata.X
    got = log_normalize(sp.csr_matrix(x) if sparse else x, target_sum)
    got = got.toarray() if sparse else got
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert (got[3] == 0).all()


def test_dense_and_sparse_agree_and_share_the_pattern():
    x = sp.csr_matrix(counts(1))
    normalized = log_normalize(x)
    assert np.array_equal(normalized.toarray(), log_normalize(x.toarray()))
    assert np.shares_memory(normalized.indices, x.indices) and np.shares_memory(normalized.indptr, x.indptr)


def test_bit_identical_to_the_former_implementations():
    x = counts(2)
    # the sampler's writer: float64 scale of the CSR row totals
    csr = sp.csr_matrix(x)
    totals = np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
    scale = np.where(totals > 0, TARGET_SUM / np.maximum(totals, 1e-12), 0.0)
    writer = np.log1p(csr.data.astype(np.float32) * np.repeat(scale, np.diff(csr.indptr))).astype(np.float32)
    assert np.array_equal(log_normalize_counts(csr, TARGET_SUM).data, writer)
    # the controls: float64 counts and totals
    x64 = x.astype(np.float64)
    row_totals = x64.sum(axis=1, keepdims=True)
    row_totals[row_totals == 0] = 1.0
    assert np.array_equal(controls_log_normalize(x), np.log1p(x64 * (TARGET_SUM / row_totals)).astype(np.float32))
    # the loader: float32 factors, in place
    factors = size_factors(cell_totals(x))
    assert factors.dtype == np.float32 and factors[3] == TARGET_SUM
    loader = x.copy()
    loader *= factors[:, None]
    np.log1p(loader, out=loader)
    batch = x.copy()
    assert log_normalize(batch, factors=factors, out=batch) is batch
    assert np.array_equal(batch, loader)


def test_the_loader_normalizes_with_it():
    x = counts(3)
    dataset = CellDataset(InMemoryRows(sp.csr_matrix(x)), [f"g{i}" for i in range(x.shape[1])], [], {}, {},
                          Normalization())
    index = np.array([5, 3, 0, 17])
    expected = log_normalize(x[index], factors=size_factors(cell_totals(x))[index])
    assert np.array_equal(dataset.rows(index), expected)
