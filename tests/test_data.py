import anndata
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import BatchSampler, check_genes, load_dataset, split_train_validation
from synthetic import BUNDLED_DATA, make_counts_adata


def scanpy_log_normalized(adata):
    reference = adata.copy()
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    return reference.X.toarray()


def test_normalization_equals_scanpy(counts_h5ad, counts_adata):
    dataset = load_dataset(str(counts_h5ad))
    rows = dataset.rows(np.arange(dataset.n_cells))
    np.testing.assert_allclose(rows, scanpy_log_normalized(counts_adata), rtol=1e-5, atol=1e-6)
    assert not rows[0].any(), "an all-zero cell stays all zero"


def test_rows_in_any_order_match_sorted(counts_h5ad):
    dataset = load_dataset(str(counts_h5ad))
    index = np.array([7, 3, 3, 120, 0])
    full = dataset.rows(np.arange(dataset.n_cells))
    np.testing.assert_array_equal(dataset.rows(index), full[index])


def test_records_genes_labels_and_normalization(counts_h5ad):
    dataset = load_dataset(str(counts_h5ad), label_keys=["cell_type1", "donor"])
    assert dataset.genes == [f"gene{j}" for j in range(40)]
    assert dataset.vocabularies == {"cell_type1": ["type_0", "type_1", "type_2"], "donor": ["donor0", "donor1"]}
    assert dataset.label_codes.shape == (150, 2)
    decoded = dataset.label_strings("donor", dataset.label_codes[:, 1])
    assert decoded == list(anndata.read_h5ad(counts_h5ad).obs["donor"].astype(str))
    assert dataset.normalization.to_dict() == {"input_is_log": False, "target_sum": 1e4, "layer": ""}


def test_loader_never_densifies_the_whole_matrix(counts_h5ad, monkeypatch):
    dataset = load_dataset(str(counts_h5ad))
    assert sp.issparse(dataset.source.matrix)
    largest = []
    original = sp.csr_matrix.toarray

    def recording_toarray(self, *args, **kwargs):
        largest.append(self.shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sp.csr_matrix, "toarray", recording_toarray)
    for start in range(0, dataset.n_cells, 32):
        dataset.rows(np.arange(start, min(start + 32, dataset.n_cells)))
    assert largest and max(largest) <= 32


def test_log_normalized_input_is_used_as_is():
    pbmc = sc.datasets.pbmc68k_reduced()
    raw = anndata.AnnData(X=pbmc.raw.X, obs=pbmc.obs, var=pbmc.raw.var)
    path = __import__("tempfile").mkdtemp() + "/pbmc.h5ad"
    raw.write_h5ad(path)
    with pytest.raises(UsageError, match="--input_is_log True"):
        load_dataset(path, label_keys=["bulk_labels"])
    dataset = load_dataset(path, label_keys=["bulk_labels", "phase"], input_is_log=True)
    np.testing.assert_array_equal(dataset.rows(np.arange(5)), pbmc.raw.X[:5].toarray())
    assert len(dataset.vocabularies["bulk_labels"]) == 10


def test_layer_raw_and_filter(tmp_path):
    pbmc = sc.datasets.pbmc68k_reduced()
    path = tmp_path / "pbmc.h5ad"
    pbmc.write_h5ad(path)
    dataset = load_dataset(str(path), label_keys=["bulk_labels"], layer="raw", input_is_log=True,
                           filters=["phase=G1,S"])
    assert dataset.n_genes == pbmc.raw.shape[1]
    assert dataset.n_cells == int(pbmc.obs["phase"].isin(["G1", "S"]).sum())


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.X.data.__setitem__(0, np.nan), "NaN or infinite"),
    (lambda a: a.X.data.__setitem__(0, -1.0), "negative values"),
    (lambda a: a.X.data.__setitem__(0, 0.5), "--input_is_log True"),
])
def test_bad_values_are_refused(tmp_path, mutate, message):
    adata = make_counts_adata()
    mutate(adata)
    path = tmp_path / "bad.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(UsageError, match=message):
        load_dataset(str(path))


def test_missing_label_key_lists_columns(counts_h5ad):
    with pytest.raises(UsageError, match="available columns: cell_type1, donor"):
        load_dataset(str(counts_h5ad), label_keys=["celltype"])


def test_default_label_key_missing_lists_columns(tmp_path):
    adata = make_counts_adata()
    adata.obs = adata.obs.rename(columns={"cell_type1": "annotation"})
    path = tmp_path / "other.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(UsageError, match="choose one of: annotation, donor"):
        load_dataset(str(path))


def test_missing_and_non_h5ad_files(tmp_path):
    with pytest.raises(UsageError, match="data file not found"):
        load_dataset(str(tmp_path / "nope.h5ad"))
    text = tmp_path / "cells.csv"
    text.write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="not an .h5ad file"):
        load_dataset(str(text))


def test_check_genes_names_the_difference():
    with pytest.raises(UsageError, match=r"2 missing from the data \(first: g3, g4\)"):
        check_genes(["g1", "g2", "g3", "g4"], ["g1", "g2", "x"])
    check_genes(["a", "b"], ["a", "b"])


def test_batch_sampler_resumes_exactly():
    first = BatchSampler(np.arange(10), batch_size=4, seed=3)
    batches = [first.next_batch() for _ in range(7)]
    assert sorted(np.concatenate(batches[:2]).tolist() + batches[2][:2].tolist()) == list(range(10))
    resumed = BatchSampler(np.arange(10), batch_size=4, seed=3)
    replay = BatchSampler(np.arange(10), batch_size=4, seed=3)
    for _ in range(3):
        replay.next_batch()
    resumed.load_state_dict(replay.state_dict())
    for expected in batches[3:]:
        np.testing.assert_array_equal(resumed.next_batch(), expected)


def test_split_is_deterministic_and_disjoint():
    train, val = split_train_validation(100, 0.1, seed=1)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    np.testing.assert_array_equal(split_train_validation(100, 0.1, seed=1)[1], val)


@pytest.mark.skipif(not BUNDLED_DATA.exists(), reason="bundled dataset missing")
def test_bundled_dataset_loads():
    dataset = load_dataset(str(BUNDLED_DATA))
    assert (dataset.n_cells, dataset.n_genes) == (2142, 20125)
    assert len(dataset.vocabularies["cell_type1"]) == 14
    rows = dataset.rows(np.arange(64))
    assert rows.dtype == np.float32 and np.isfinite(rows).all()
    sums = np.expm1(rows.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(sums, 1e4, rtol=1e-3)
