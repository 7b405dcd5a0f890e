"""benchmarks/prepare_cbmc.py: scDCC's HDF5 layout to an h5ad, bad files refused in one line."""
import h5py
import numpy as np
import pytest

from benchmarks import prepare_cbmc


def write_source(path, counts, labels):
    with h5py.File(path, "w") as file:
        file["X"] = counts
        file["Y"] = labels


def test_counts_and_labels_become_an_h5ad(tmp_path):
    counts = np.array([[0, 3, 1], [2, 0, 0], [5, 1, 0], [0, 0, 7]], dtype=np.float32)
    write_source(tmp_path / "s.h5", counts, np.array([1.0, 2.0, 1.0, 15.0]))
    cells = prepare_cbmc.to_anndata(*prepare_cbmc.read_source(str(tmp_path / "s.h5")))
    np.testing.assert_array_equal(cells.X.toarray(), counts)
    assert list(cells.obs["cell_type"]) == ["cluster01", "cluster02", "cluster01", "cluster15"]
    assert list(cells.var_names) == ["gene0000", "gene0001", "gene0002"]


@pytest.mark.parametrize("counts, labels, message", [
    (np.array([[0.5, 1.0]]), np.array([1.0]), "not counts"),
    (np.array([[1.0, 1.0]]), np.array([1.0, 2.0]), "labels"),
])
def test_files_that_are_not_the_source_are_refused(tmp_path, counts, labels, message):
    write_source(tmp_path / "s.h5", counts, labels)
    with pytest.raises(SystemExit, match=message):
        prepare_cbmc.read_source(str(tmp_path / "s.h5"))
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    with pytest.raises(SystemExit, match="cannot read"):
        prepare_cbmc.read_source(str(tmp_path / "other.h5"))
