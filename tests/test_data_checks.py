"""Loader refusals: inputs that are easy to get subtly wrong, each refused with one line naming the fix."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cell_train
from guided_diffusion.core.errors import UsageError
from guided_diffusion.data import format_values, load_dataset, split_train_validation
from synthetic import make_counts_adata
from VAE import VAE_train


def write(adata, tmp_path, name="cells.h5ad"):
    path = tmp_path / name
    adata.write_h5ad(path)
    return str(path)


def one_line_error(capsys, main, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(item) for item in argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("backed", [False, True])
def test_counts_declared_log_normalized_are_refused(counts_h5ad, backed):
    with pytest.raises(UsageError) as error:
        load_dataset(str(counts_h5ad), input_is_log=True, backed=backed)
    message = str(error.value)
    assert message.startswith("--input_is_log True, but the values look like raw counts: all ")
    assert "whole numbers (largest " in message and "median cell total is 236" in message
    assert "--allow_count_like_log True" in message
    dataset = load_dataset(str(counts_h5ad), input_is_log=True, backed=backed, allow_count_like_log=True)
    assert dataset.size_factors is None


def test_log_normalized_and_low_total_whole_numbers_are_accepted(log_h5ad, tmp_path):
    assert load_dataset(str(log_h5ad), input_is_log=True).normalization.input_is_log
    binary = make_counts_adata(n_genes=20)
    binary.X = (binary.X > 4).astype(np.float32)  # whole numbers, but cell totals far below count depth
    assert load_dataset(write(binary, tmp_path), input_is_log=True).n_cells == binary.n_obs


def test_every_tool_refuses_counts_declared_log(counts_h5ad, tmp_path, capsys):
    err = one_line_error(capsys, VAE_train.main, ["--data_dir", counts_h5ad, "--save_dir", tmp_path / "ae",
                                                  "--input_is_log", "True", "--max_steps", "1"])
    assert "look like raw counts" in err
    err = one_line_error(capsys, cell_train.main, ["--data_dir", counts_h5ad, "--vae_path", tmp_path / "none.pt",
                                                   "--save_dir", tmp_path / "d", "--input_is_log", "True"])
    assert "look like raw counts" in err
    from exp_script import evaluate
    err = one_line_error(capsys, evaluate.main, ["--real", counts_h5ad, "--generated", counts_h5ad, "--out",
                                                 tmp_path / "eval", "--input_is_log", "True", "--progress", "False"])
    assert "look like raw counts" in err
    err = one_line_error(capsys, evaluate.main, ["--real", counts_h5ad, "--generated", tmp_path / "absent.h5ad",
                                                 "--out", tmp_path / "eval", "--input_is_log", "True",
                                                 "--allow_count_like_log", "True", "--progress", "False"])
    assert "data file not found" in err and "absent.h5ad" in err  # the real file passed the loader
    VAE_train.main(["--data_dir", str(counts_h5ad), "--save_dir", str(tmp_path / "allowed"), "--input_is_log",
                    "True", "--allow_count_like_log", "True", "--max_steps", "1", "--batch_size", "16",
                    "--hidden_dims", "16", "16", "16", "--latent_dim", "4", "--progress", "False"])
    assert list((tmp_path / "allowed").glob("*.pt"))


def test_non_integer_counts_name_the_value_and_where(tmp_path):
    adata = make_counts_adata()
    adata.X = adata.X.tocsr()
    adata.X.data[5] = 0.25
    row = int(np.searchsorted(adata.X.indptr, 5, side="right")) - 1
    gene = adata.var_names[adata.X.indices[5]]
    for backed in (False, True):
        with pytest.raises(UsageError, match=rf"pass --input_is_log True \(found 0.25 for cell "
                                             rf"'{adata.obs_names[row]}', gene '{gene}'\)"):
            load_dataset(write(adata, tmp_path), backed=backed)


def test_negative_values_name_the_smallest(tmp_path):
    adata = make_counts_adata()
    adata.X.data[3], adata.X.data[9] = -0.5, -2.0
    with pytest.raises(UsageError, match=r"contains negative values \(smallest -2, for cell 'cell\d+', gene"):
        load_dataset(write(adata, tmp_path))


@pytest.mark.parametrize("backed", [False, True])
def test_empty_label_is_refused_with_column_and_count(tmp_path, backed):
    adata = make_counts_adata()
    labels = adata.obs["donor"].astype(str).to_numpy()
    labels[[2, 5, 9]] = ["", " ", ""]
    adata.obs["donor"] = pd.Categorical(labels)
    with pytest.raises(UsageError, match=r"label key 'donor' is empty \(or only spaces\) for 3 cells"):
        load_dataset(write(adata, tmp_path), label_keys=["donor"], backed=backed)


@pytest.mark.parametrize("value", ["T cell, CD4", "dose=high", " alpha", "beta "])
def test_labels_that_condition_cannot_name_are_refused(tmp_path, value):
    adata = make_counts_adata()
    labels = adata.obs["cell_type1"].astype(str).to_numpy()
    labels[:10] = value
    adata.obs["cell_type1"] = pd.Categorical(labels)
    with pytest.raises(UsageError) as error:
        load_dataset(write(adata, tmp_path))
    message = str(error.value)
    assert message.startswith("label key 'cell_type1' has 1 value(s) with ',' or '='")
    assert repr(value) in message


def test_format_values_is_unambiguous():
    assert format_values(["a", "b, c", " d"]) == "'a', 'b, c', ' d'"
    assert format_values(range(30), limit=3) == "'0', '1', '2', … (30 values)"


@pytest.mark.parametrize("name", ["library_size", "cell"])
def test_names_the_output_uses_are_refused_as_label_keys(tmp_path, name):
    adata = make_counts_adata()
    adata.obs[name] = pd.Categorical(adata.obs["donor"])
    with pytest.raises(UsageError, match=f"label key '{name}' is a name the tools use in their output obs"):
        load_dataset(write(adata, tmp_path), label_keys=[name])


def test_label_key_named_like_the_output_index_breaks_the_output_write(tmp_path):
    """Why ``cell`` is reserved: the sampler names its obs index ``cell``, and anndata cannot write both."""
    import anndata
    obs = pd.DataFrame({"cell": pd.Categorical(["a", "b"])}, index=pd.Index(["g0", "g1"], name="cell"))
    with pytest.raises(ValueError, match="also used by a column"):
        anndata.AnnData(X=np.zeros((2, 3), dtype=np.float32), obs=obs).write_h5ad(tmp_path / "out.h5ad")


def test_continuous_label_column_is_refused(tmp_path):
    adata = make_counts_adata()
    adata.obs["total"] = np.asarray(adata.X.sum(axis=1)).ravel() / 3.0
    with pytest.raises(UsageError, match=r"label key 'total' holds non-integer numbers \(e.g. .*\), not categories"):
        load_dataset(write(adata, tmp_path), label_keys=["total"])


@pytest.mark.parametrize("backed", [False, True])
def test_filter_value_matching_no_cell_is_refused(counts_h5ad, backed):
    with pytest.raises(UsageError) as error:
        load_dataset(str(counts_h5ad), filters=["donor=donor1,donr0"], backed=backed)
    assert str(error.value) == ("--filter donor=donor1,donr0: 'donr0' matches no cell; "
                                "values of donor: 'donor0', 'donor1'")
    assert load_dataset(str(counts_h5ad), filters=["donor=donor1"], backed=backed).n_cells < 150


@pytest.mark.parametrize("backed", [False, True])
def test_duplicate_gene_names_are_named(tmp_path, backed):
    adata = make_counts_adata()
    adata.var_names = [f"gene{j}" for j in range(38)] + ["gene3", "gene7"]
    with pytest.raises(UsageError, match=r"has duplicate gene names \(2 names, e.g. 'gene3', 'gene7'\)"):
        load_dataset(write(adata, tmp_path), backed=backed)


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), -0.1, 1.0])
def test_split_refuses_a_fraction_outside_zero_one(fraction):
    with pytest.raises(UsageError, match=r"--val_fraction must be in \[0, 1\)"):
        split_train_validation(10, fraction, seed=0)


def test_dense_and_sparse_storage_give_the_same_refusal(tmp_path):
    adata = make_counts_adata()
    adata.X = sp.csr_matrix(adata.X).toarray()
    adata.X[4, 2] = np.inf
    with pytest.raises(UsageError, match=r"NaN or infinite values; clean the file first \(first found: inf for "
                                         r"cell 'cell4', gene 'gene2'\)"):
        load_dataset(write(adata, tmp_path))
