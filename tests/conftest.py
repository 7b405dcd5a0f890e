import pytest

from synthetic import make_counts_adata


@pytest.fixture
def counts_adata():
    return make_counts_adata()


@pytest.fixture
def counts_h5ad(tmp_path, counts_adata):
    path = tmp_path / "counts.h5ad"
    counts_adata.write_h5ad(path)
    return path
