"""The Python API (guided_diffusion/api.py): each call gives what its command-line tool gives, in memory,
with the tool's defaults and checks; the quickstart notebook runs it end to end."""
import json
import sys
import warnings

import anndata
import nbformat
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cell_sample
import cell_train
from exp_script import evaluate as evaluate_cli
from exp_script import reconstruct
from guided_diffusion import api
from exp_script import api as evaluation_api
from guided_diffusion.core.errors import UsageError
from synthetic import REPO_ROOT, make_counts_adata
from VAE import VAE_train

AUTOENCODER = dict(max_steps=30, hidden_dims=[32, 32], latent_dim=8, batch_size=64)
DIFFUSION = dict(lr_anneal_steps=30, hidden_dims=[32, 32, 16, 8], label_key="cell_type1")
SAMPLING = dict(num_samples=40, seed=3, batch_size=64)
NOTEBOOK = REPO_ROOT / "exp_script" / "quickstart.ipynb"


def flags(options):
    """Keyword arguments as the command-line flags that set the same settings."""
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return argv


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One autoencoder and diffusion model trained through the API from an in-memory AnnData."""
    root = tmp_path_factory.mktemp("api")
    adata = make_counts_adata(n_cells=240, n_genes=40, seed=1)
    data_path = root / "counts.h5ad"
    adata.write_h5ad(data_path)
    torch.set_num_threads(1)
    vae = api.train_autoencoder(adata, root / "ae", progress=False, **AUTOENCODER)
    model = api.train_diffusion(adata, vae, root / "diffusion", progress=False, **DIFFUSION)
    return {"root": root, "adata": adata, "data": str(data_path), "vae": vae, "model": model}


def test_training_from_an_anndata_equals_the_clis_from_its_file(trained, tmp_path):
    vae = VAE_train.main(["--data_dir", trained["data"], "--save_dir", str(tmp_path / "ae"), "--progress", "False",
                          *flags(AUTOENCODER)])
    model_path = cell_train.main(["--data_dir", trained["data"], "--vae_path", vae, "--save_dir", str(tmp_path),
                                  "--progress", "False", *flags(DIFFUSION)])
    for ours, theirs in ((trained["vae"], vae), (trained["model"].path, model_path)):
        ours, theirs = (torch.load(path, weights_only=True)["state_dict"] for path in (ours, theirs))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


def test_trained_model_describes_itself_and_loads_again(trained):
    model = trained["model"]
    assert model.label_keys == ["cell_type1"] and model.vocabularies["cell_type1"] == ["type_0", "type_1", "type_2"]
    assert model.conditions() == ["cell_type1=type_0", "cell_type1=type_1", "cell_type1=type_2"]
    assert model.step == DIFFUSION["lr_anneal_steps"]
    assert api.load_model(model.path) == model


def test_generate_in_memory_equals_the_clis_file(trained, tmp_path):
    adata = api.generate(trained["model"], conditions=[{"cell_type1": "type_2"}, "cell_type1=type_0"],
                         progress=False, **SAMPLING)
    path = cell_sample.main(["--model_path", trained["model"].path, "--sample_dir", str(tmp_path), "--progress",
                             "False", "--condition", "cell_type1=type_2", "--condition", "cell_type1=type_0",
                             *flags(SAMPLING)])
    on_disk = anndata.read_h5ad(path)
    assert adata.shape == on_disk.shape == (80, 40)
    assert list(adata.obs["cell_type1"][:40].unique()) == ["type_2"]
    pd.testing.assert_frame_equal(adata.obs, on_disk.obs)
    pd.testing.assert_frame_equal(adata.var, on_disk.var)
    assert (adata.X != on_disk.X).nnz == 0 and (adata.layers["counts"] != on_disk.layers["counts"]).nnz == 0
    assert adata.X.nnz > 0
    assert json.dumps(adata.uns["cfdiffusion"], default=str) == json.dumps(on_disk.uns["cfdiffusion"], default=str)
    assert adata.uns["log1p"] == on_disk.uns["log1p"] == {"base": None}


def test_generate_keeps_the_files_in_a_given_sample_dir(trained, tmp_path):
    adata = api.generate(trained["model"].path, conditions="cell_type1=type_1", sample_dir=tmp_path / "out",
                         vae_path=trained["vae"], progress=False, **SAMPLING)
    assert (tmp_path / "out" / "manifest.json").exists()
    assert adata.n_obs == SAMPLING["num_samples"] and set(adata.obs["cell_type1"]) == {"type_1"}


@pytest.fixture
def scanpy_log():
    """What scanpy logs (its warnings go to its log, not to ``warnings``), whatever stream it was set up with."""
    import io

    import scanpy as sc

    previous, log = sc.settings.logfile, io.StringIO()
    sc.settings.logfile = log
    yield log
    sc.settings.logfile = previous


def test_scanpy_takes_the_generated_cells_as_log_normalized(trained, scanpy_log):
    import scanpy as sc

    adata = api.generate(trained["model"], progress=False, **SAMPLING)
    assert adata.X.indices.dtype == adata.X.indptr.dtype  # scipy kernels in rank_genes_groups need one type
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sc.tl.rank_genes_groups(adata, "cell_type1")
    assert not [w for w in caught if "log" in str(w.message).lower()]
    assert "logarithmize" not in scanpy_log.getvalue()
    assert len(sc.get.rank_genes_groups_df(adata, group="type_0")) == adata.n_vars
    sc.pp.log1p(adata)  # scanpy recognizes the record and warns against logging twice
    assert "already log-transformed" in scanpy_log.getvalue()


def test_reconstruction_records_log1p_too(trained, tmp_path):
    path = reconstruct.main(["--data_dir", trained["data"], "--vae_path", trained["vae"], "--out",
                             str(tmp_path / "reconstruction.h5ad"), "--progress", "False"])
    assert anndata.read_h5ad(path).uns["log1p"] == {"base": None}


def test_evaluate_anndata_equals_the_clis_metrics(trained, tmp_path):
    generated = api.generate(trained["model"], progress=False, **SAMPLING)
    generated_path = tmp_path / "generated.h5ad"
    generated.write_h5ad(generated_path)
    settings = {"metrics": ["scc", "pcc", "wasserstein", "mmd"], "n_hvg": 30, "n_pcs": 5, "controls": False}
    result = evaluation_api.evaluate(trained["adata"], generated, label_key="cell_type1", progress=False, **settings)
    evaluate_cli.main(["--real", trained["data"], "--generated", str(generated_path), "--label_key", "cell_type1",
                       "--out", str(tmp_path / "cli"), "--plots", "False", "--progress", "False", *flags(settings)])
    written = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for section in ("generated", "real_vs_real"):
        assert result[section]["overall"] == pytest.approx(written[section]["overall"])
    assert set(result["generated"]["overall"]) == set(settings["metrics"])
    assert result["plots"] == {}  # no out_dir: no plots made, none to keep
    assert 0.0 < result["real_vs_real"]["overall"]["scc"] <= 1.0


def test_evaluate_writes_its_files_into_a_given_out_dir(trained, tmp_path):
    generated = api.generate(trained["model"], progress=False, **SAMPLING)
    result = evaluation_api.evaluate(trained["data"], generated, out_dir=tmp_path / "eval", progress=False, metrics=["scc"],
                          n_hvg=30, n_pcs=5, controls=False, plots=False)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["generated"]["overall"]["scc"] == \
        pytest.approx(result["generated"]["overall"]["scc"])
    assert (tmp_path / "eval" / "report.md").exists()


@pytest.mark.parametrize("call, message", [
    (lambda t: api.train_autoencoder(t["adata"], t["root"] / "x", max_step=3), "unknown option 'max_step'"),
    (lambda t: api.train_autoencoder([[1, 2]], t["root"] / "x"), "an .h5ad path or an AnnData, got list"),
    (lambda t: api.train_autoencoder(t["adata"], t["root"] / "x", data_dir="d"), "data_dir is an argument"),
    (lambda t: api.train_autoencoder(t["adata"], t["root"] / "x", batch_size=1), "batch_size 1 is too small"),
    (lambda t: api.generate(t["model"], conditions=["cell_type1=nope"]), "unknown value"),
    (lambda t: api.generate(t["model"], conditions=[{"cell_type1": "a,b"}]), "cannot be given"),
    (lambda t: api.generate(t["model"], guide_weight=2), "unknown option 'guide_weight'"),
    (lambda t: api.load_model(t["root"] / "missing.pt"), "missing.pt"),
    (lambda t: evaluation_api.evaluate(t["adata"], t["adata"], label_key="nope"), "nope"),
    (lambda t: evaluation_api.evaluate(t["adata"], t["adata"], generated_layers="counts"), "unknown option 'generated_layers'"),
])
def test_bad_input_is_a_one_line_usage_error(trained, call, message):
    with pytest.raises(UsageError) as error:
        call(trained)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_scaled_anndata_points_to_its_raw(tmp_path):
    """As scanpy's pbmc68k_reduced: X scaled (negative values), .raw log-normalized."""
    import scanpy as sc

    adata = make_counts_adata(n_cells=61, n_genes=20)[1:].copy()  # without its empty cell
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata.raw = adata
    adata.X = adata.X.toarray()  # a new array: scaling it leaves .raw alone
    sc.pp.scale(adata)
    with pytest.raises(UsageError, match=r"negative values .* has \.raw: pass layer='raw'"):
        api.train_autoencoder(adata, tmp_path / "ae", max_steps=2)
    path = api.train_autoencoder(adata, tmp_path / "ae", layer="raw", input_is_log=True, max_steps=2,
                                 hidden_dims=[8], latent_dim=4, batch_size=16, progress=False)
    assert torch.load(path, weights_only=True)["normalization"]["input_is_log"] is True


def test_an_anndata_is_written_whole_for_the_loader():
    adata = make_counts_adata(n_cells=20, n_genes=10)
    adata.layers["counts"] = adata.X.copy()
    adata.uns["unwritable"] = object()  # a notebook's uns may hold anything; only the data is written
    adata.raw = adata
    with api.h5ad_path(adata) as path:
        written = anndata.read_h5ad(path)
        assert (written.X != adata.X).nnz == 0 and "counts" in written.layers and written.raw is not None
        pd.testing.assert_frame_equal(written.obs, adata.obs)
    assert not __import__("os").path.exists(path)


# ---- the quickstart notebook ---------------------------------------------------------------------
def test_quickstart_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert sum("parameters" in cell.metadata.get("tags", []) for cell in notebook.cells) == 1
    assert all(cell.outputs == [] for cell in notebook.cells if cell.cell_type == "code")


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernel spec that starts this interpreter (first on JUPYTER_PATH), whatever kernels are installed."""
    spec = tmp_path / "jupyter" / "kernels" / "cfdiffusion-api-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cfDiffusion tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return "cfdiffusion-api-test"


def test_quickstart_notebook_runs_the_whole_job(kernel_name, tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    position = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(position + 1, nbformat.v4.new_code_cell(f"out_dir = {str(tmp_path / 'run')!r}"))
    NotebookClient(notebook, kernel_name=kernel_name, timeout=300,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = json.dumps(outputs, ensure_ascii=False)
    assert "n_obs × n_vars = 300 × " in text and "uns: 'cfdiffusion', 'log1p'" in text  # generated AnnData
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the UMAP
    assert "logarithmize" not in text and "Traceback" not in text
    assert "real_vs_real" in text and "celltypist_accuracy" in text  # the metrics table
    assert list((tmp_path / "run" / "diffusion" / "cfDiffusion").glob("model*.pt"))
