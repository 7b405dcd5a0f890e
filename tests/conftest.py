"""Shared fixtures. Tests run single-threaded: on a 2-core machine several test processes (and the
2-process distributed tests) would otherwise oversubscribe the cores, and exact-resume comparisons need
one fixed thread count."""
import os

for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_variable] = "1"  # also for the subprocesses the tests start (exact-resume checks need one thread)

import pytest  # noqa: E402
import torch  # noqa: E402

from synthetic import make_counts_adata  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def single_thread():
    """Some libraries used by earlier tests change torch's thread count; pin it for every test."""
    torch.set_num_threads(1)


@pytest.fixture
def counts_adata():
    return make_counts_adata()


@pytest.fixture
def counts_h5ad(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    return path


@pytest.fixture
def log_h5ad(tmp_path, counts_adata):
    """The synthetic cells log-normalized (normalize_total 1e4, log1p), stored in X."""
    import scanpy as sc

    adata = counts_adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    path = tmp_path / "log.h5ad"
    adata.write_h5ad(path)
    return path
