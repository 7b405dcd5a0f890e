"""Issue 25, findings 6, 8 and 9: float16 expression is read (cast to float32) by every tool, conflicting
sampler flags are refused, and evaluate.py refuses (or warns about) generated labels the real data lacks."""
import json

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cell_sample
import cell_train
from exp_script import evaluate, guidance_sweep, split, unseen_combination
from exp_script.evaluation.guidance_inputs import read_cells
from guided_diffusion.data import load_dataset
from synthetic import make_counts_adata
from test_checkpoints import LEGACY, MODEL, VAE
from VAE import VAE_train

TINY_AE = ["--hidden_dims", "16", "16", "16", "--latent_dim", "8", "--batch_size", "16", "--progress", "False"]
TINY_UNET = ["--hidden_dims", "16", "16", "8", "8", "--batch_size", "16", "--progress", "False",
             "--precision", "fp32", "--label_key", "cell_type1"]


def one_line_error(capsys, main, argv, *expected):
    with pytest.raises(SystemExit) as exit_info:
        main([str(item) for item in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def as_float16(source, target, sparse):
    """``source`` (an .h5ad) rewritten with X stored as float16: dense, or CSR with float16 data (which
    scipy cannot even hold, so anndata cannot read it)."""
    adata = anndata.read_h5ad(source)
    if not sparse:
        adata.X = (adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)).astype(np.float16)
        adata.write_h5ad(target)
        return str(target)
    adata.X = sp.csr_matrix(adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X, dtype=np.float32))
    adata.write_h5ad(target)
    with h5py.File(target, "r+") as file:
        data = file["X/data"][:]
        del file["X/data"]
        file["X/data"] = data.astype(np.float16)
    return str(target)


# ---- 6: float16 ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def half(tmp_path_factory):
    root = tmp_path_factory.mktemp("float16")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=90, n_genes=24, seed=2).write_h5ad(data)
    files = {"data": str(data), "dense": as_float16(data, root / "dense16.h5ad", sparse=False),
             "sparse": as_float16(data, root / "sparse16.h5ad", sparse=True)}
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), "--max_steps", "2", *TINY_AE])
    return {"root": root, "vae": vae, **files}


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("backed", ["False", "True"])
def test_the_loader_reads_float16_as_float32(half, layout, backed):
    reference = load_dataset(half["data"])
    dataset = load_dataset(half[layout], backed=backed == "True", block_rows=16)
    assert dataset.raw_rows(np.arange(90)).dtype == np.float32
    np.testing.assert_array_equal(dataset.raw_rows(np.arange(90)), reference.raw_rows(np.arange(90)))
    assert dataset.fingerprint["matrix"] == reference.fingerprint["matrix"]
    dataset.close()
    reference.close()


@pytest.mark.parametrize("layout", ["dense", "sparse"])
@pytest.mark.parametrize("backed", ["False", "True"])
def test_both_trainers_accept_float16(half, tmp_path, layout, backed):
    vae = VAE_train.main(["--data_dir", half[layout], "--save_dir", str(tmp_path / "ae"), "--max_steps", "2",
                          "--backed", backed, "--block_rows", "32", *TINY_AE])
    assert vae.endswith("model_seed=0_step=2.pt")
    model = cell_train.main(["--data_dir", half[layout], "--vae_path", half["vae"], "--save_dir", str(tmp_path / "d"),
                             "--model_name", "run", "--lr_anneal_steps", "2", "--backed", backed,
                             "--block_rows", "32", *TINY_UNET])
    assert model.endswith("model000002.pt")


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_split_and_unseen_combination_accept_float16(half, tmp_path, layout):
    split.main(["--data_dir", half[layout], "--label_key", "cell_type1", "--out", str(tmp_path / "split")])
    train = anndata.read_h5ad(tmp_path / "split" / "train.h5ad")
    assert train.X.dtype == np.float32 and train.n_obs > 0
    removed, kept = unseen_combination.main(["exclude", "--data", half[layout], "--out", str(tmp_path / "t.h5ad"),
                                             "--cell_type", "type_0", "--donor", "donor0"])
    assert removed > 0 and kept + removed == 90


@pytest.mark.parametrize("layout", ["sparse"])  # dense float16 was already read here (anndata reads it)
def test_the_label_classifier_and_guidance_sweep_read_float16(tmp_path, layout):
    validation = as_float16(LEGACY / "counts.h5ad", tmp_path / "validation16.h5ad", sparse=layout == "sparse")
    expression, genes, obs = read_cells(validation, ["cell_type1"])
    assert expression.dtype == np.float32 and len(genes) == expression.shape[1]
    table, _, _ = guidance_sweep.main([
        "--model_path", str(LEGACY / MODEL), "--vae_path", str(LEGACY / VAE), "--validation", validation,
        "--weights", "0", "--seeds", "0", "--out", str(tmp_path / "sweep"), "--timestep_respacing", "5",
        "--max_per_condition", "4"])
    assert len(table) == 1


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_evaluate_accepts_float16_real_and_generated(half, tmp_path, layout):
    real = anndata.read_h5ad(half["data"])
    counts = real.X.toarray()
    values = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4)
    generated = anndata.AnnData(X=values.astype(np.float16), obs=real.obs.copy(), var=real.var.copy())
    generated.obs_names = [f"g{i}" for i in range(generated.n_obs)]
    generated_path = tmp_path / "generated.h5ad"
    generated.write_h5ad(generated_path)
    if layout == "sparse":
        as_float16(generated_path, tmp_path / "generated_sparse.h5ad", sparse=True)
        generated_path = tmp_path / "generated_sparse.h5ad"
    result = evaluate.main(["--real", half[layout], "--generated", str(generated_path), "--label_key", "cell_type1",
                            "--out", str(tmp_path / "out"), "--progress", "False", "--plots", "False",
                            "--controls", "False", "--metrics", "scc", "--min_cells", "5"])
    assert result["generated"]["overall"]["scc"] > 0.9


# ---- 8: conflicting sampler flags ------------------------------------------------------------------------------
def sample(tmp_path, *extra):
    return ["--model_path", LEGACY / MODEL, "--vae_path", LEGACY / VAE, "--sample_dir", tmp_path / "out",
            "--timestep_respacing", "ddim4", "--use_ddim", "True", "--progress", "False", *extra]


@pytest.mark.parametrize("extra, flags", [
    (["--match_counts", "True", "--num_samples", "5"], ("--match_counts", "--num_samples")),
    (["--num_samples", "1000", "--match_counts"], ("--match_counts", "--num_samples")),  # the default, but given
    (["--all_combinations", "True", "--condition", "cell_type1=beta"], ("--all_combinations", "--condition")),
])
def test_conflicting_sampler_flags_are_refused(tmp_path, capsys, extra, flags):
    one_line_error(capsys, cell_sample.main, sample(tmp_path, *extra), *flags)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_match_counts_with_the_default_num_samples_still_works(tmp_path):
    path = cell_sample.main([str(item) for item in sample(tmp_path, "--match_counts", "True")])
    generated = anndata.read_h5ad(path)
    assert generated.n_obs == anndata.read_h5ad(LEGACY / "counts.h5ad").n_obs  # the model's training cells


def test_the_python_api_refuses_the_same_conflicts(tmp_path):
    from guided_diffusion.api import generate
    from guided_diffusion.cli import UsageError

    with pytest.raises(UsageError, match="match_counts.*num_samples|num_samples.*match_counts"):
        generate(str(LEGACY / MODEL), vae_path=str(LEGACY / VAE), match_counts=True, num_samples=5,
                 timestep_respacing="ddim4", use_ddim=True, progress=False)


# ---- 9: generated labels the real data lacks ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    real = make_counts_adata(n_cells=120, n_genes=24, seed=4)
    real_path = root / "real.h5ad"
    real.write_h5ad(real_path)
    counts = real.X.toarray()
    values = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) * 1e4).astype(np.float32)
    return {"root": root, "real": str(real_path), "values": values, "labels": real.obs["cell_type1"].astype(str)}


def write_generated(labelled, path, labels):
    obs = pd.DataFrame({"cell_type1": pd.Categorical(labels)}, index=[f"g{i}" for i in range(len(labels))])
    adata = anndata.AnnData(X=labelled["values"], obs=obs,
                            var=pd.DataFrame(index=[f"gene{j}" for j in range(labelled["values"].shape[1])]))
    adata.write_h5ad(path)
    return str(path)


def run_evaluate(labelled, generated, out):
    return [str(item) for item in ["--real", labelled["real"], "--generated", generated, "--label_key", "cell_type1",
                                   "--out", out, "--progress", "False", "--plots", "False", "--controls", "False",
                                   "--metrics", "scc", "--min_cells", "5"]]


@pytest.mark.parametrize("rename", [lambda label: label.replace("type_", ""),  # codes instead of names
                                    lambda label: f"human_{label}"])  # a prefix
def test_evaluate_refuses_generated_labels_none_of_which_is_real(labelled, tmp_path, capsys, rename):
    generated = write_generated(labelled, tmp_path / "generated.h5ad", [rename(x) for x in labelled["labels"]])
    line = one_line_error(capsys, evaluate.main, run_evaluate(labelled, generated, tmp_path / "out"),
                          "none of the generated labels", "cell_type1")
    assert "type_0" in line  # the real labels are named
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_evaluate_warns_when_most_generated_cells_have_unknown_labels(labelled, tmp_path, capsys):
    labels = np.array(labelled["labels"], dtype=object)
    labels[: int(len(labels) * 0.7)] = "unknown_type"
    generated = write_generated(labelled, tmp_path / "generated.h5ad", labels)
    result = evaluate.main(run_evaluate(labelled, generated, tmp_path / "out"))
    err = capsys.readouterr().err
    assert "warning: " in err and "unknown_type" in err and "84 of the 120 generated cells" in err, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert any("84 of the 120 generated cells" in warning for warning in metrics["warnings"])
    assert any("84 of the 120 generated cells" in warning for warning in result["warnings"])
    assert "84 of the 120 generated cells" in (tmp_path / "out" / "report.md").read_text()


def test_evaluate_is_quiet_when_most_generated_labels_are_known(labelled, tmp_path, capsys):
    labels = np.array(labelled["labels"], dtype=object)
    labels[:10] = "unknown_type"
    generated = write_generated(labelled, tmp_path / "generated.h5ad", labels)
    evaluate.main(run_evaluate(labelled, generated, tmp_path / "out"))
    assert "generated cells" not in capsys.readouterr().err
