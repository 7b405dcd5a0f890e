"""benchmarks/prepare_pbmc14k.py: raw counts recovered exactly from log2(CPM + 1), inputs that are not that
refused in one line."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from benchmarks import prepare_pbmc14k


def log_cpm(counts):
    """genes x cells log2(counts per million + 1), CSC, as scMINER stores it."""
    cpm = counts / counts.sum(axis=1, keepdims=True) * 1e6
    return sp.csc_matrix(np.log2(cpm + 1.0).T)


def test_counts_are_recovered_exactly():
    counts = np.array([[0, 3, 1, 9], [2, 0, 1, 0], [5, 1, 0, 40], [1, 0, 0, 117]], dtype=np.float64)
    recovered = prepare_pbmc14k.counts_from_log_cpm(log_cpm(counts))
    assert sp.isspmatrix_csr(recovered) and recovered.dtype == np.float32
    np.testing.assert_array_equal(recovered.toarray(), counts)


def test_a_cell_whose_smallest_count_is_not_one_is_refused():
    with pytest.raises(SystemExit, match="cell 1's counts are not whole numbers"):
        prepare_pbmc14k.counts_from_log_cpm(log_cpm(np.array([[1, 5, 0], [0, 2, 3]], dtype=np.float64)))


def test_values_that_are_not_log2_cpm_are_refused():
    with pytest.raises(SystemExit, match="not log2"):
        prepare_pbmc14k.counts_from_log_cpm(sp.csc_matrix(np.log1p(np.array([[1.0], [3.0], [2.0]]))))


def test_labels_and_names_become_an_h5ad():
    counts = sp.csr_matrix(np.array([[1, 0], [0, 2]], dtype=np.float32))
    obs = pd.DataFrame({"trueLabel": ["B", "NK"], "trueLabel_full": ["CD19+ B", "CD56+ NK"]}, index=["c1", "c2"])
    cells = prepare_pbmc14k.to_anndata(counts, np.array(["GENE1", "GENE2"]), np.array(["c1", "c2"]), obs)
    assert list(cells.obs["cell_type"]) == ["B", "NK"] and list(cells.var_names) == ["GENE1", "GENE2"]


def test_a_file_that_is_not_r_data_is_refused(tmp_path):
    pytest.importorskip("rdata")
    (tmp_path / "x.rda").write_bytes(b"not R data")
    with pytest.raises(SystemExit, match="x.rda"):
        prepare_pbmc14k.read_source(str(tmp_path / "x.rda"))
