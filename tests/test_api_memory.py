"""The Python API works in memory: load_model holds the networks, generate returns the sampler's
generated.h5ad bit for bit without touching the disk, training reads an in-memory AnnData in place."""
import tempfile

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import cell_sample
from guided_diffusion import api
from guided_diffusion.data import load_dataset
from guided_diffusion.sampling import pipeline, writer
from synthetic import make_counts_adata

AUTOENCODER = dict(max_steps=20, hidden_dims=[32, 32], latent_dim=8, batch_size=64)
DIFFUSION = dict(lr_anneal_steps=20, hidden_dims=[32, 32, 16, 8], label_key=["cell_type1", "donor"])
SAMPLING = dict(num_samples=30, seed=5, batch_size=16)


def refuse(*_, **__):
    raise AssertionError("touched the disk")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("api_memory")
    adata = make_counts_adata(n_cells=200, n_genes=30, seed=2)
    torch.set_num_threads(1)
    vae = api.train_autoencoder(adata, root / "ae", progress=False, **AUTOENCODER)
    model = api.train_diffusion(adata, vae, root / "diffusion", progress=False, **DIFFUSION)
    return {"root": root, "adata": adata, "vae": vae, "model": model}


def same_values(ours, theirs):
    """Equal and of the same types, nested dicts/arrays included."""
    assert type(ours) is type(theirs)
    if isinstance(ours, dict):
        assert list(ours) == list(theirs)
        for key in ours:
            same_values(ours[key], theirs[key])
    elif isinstance(ours, np.ndarray):
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
    else:
        assert ours == theirs or (ours != ours and theirs != theirs)


def same_matrix(ours, theirs):
    if sp.issparse(theirs):
        assert sp.issparse(ours) and ours.format == theirs.format == "csr"
        for part in ("data", "indices", "indptr"):
            assert getattr(ours, part).dtype == getattr(theirs, part).dtype
            assert np.array_equal(getattr(ours, part), getattr(theirs, part))
    else:
        assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.parametrize("extra", [[], ["--observation", "mean", "--guide_w", "1.5"]])
def test_generate_is_the_samplers_file_bit_for_bit(trained, tmp_path, extra):
    options = dict(SAMPLING, **({"observation": "mean", "guide_w": 1.5} if extra else {}))
    adata = api.generate(trained["model"], conditions=["cell_type1=type_1,donor=donor0", "cell_type1=type_2"],
                         progress=False, **options)
    path = cell_sample.main(["--model_path", trained["model"].path, "--sample_dir", str(tmp_path), "--progress",
                             "False", "--condition", "cell_type1=type_1,donor=donor0", "--condition",
                             "cell_type1=type_2", "--num_samples", "30", "--seed", "5", "--batch_size", "16", *extra])
    on_disk = anndata.read_h5ad(path)
    assert adata.shape == on_disk.shape == (60, 30)
    same_matrix(adata.X, on_disk.X)
    assert list(adata.layers.keys()) == list(on_disk.layers.keys())
    for name in on_disk.layers:
        same_matrix(adata.layers[name], on_disk.layers[name])
    pd.testing.assert_frame_equal(adata.obs, on_disk.obs, check_exact=True)
    pd.testing.assert_frame_equal(adata.var, on_disk.var, check_exact=True)
    same_values(dict(adata.uns), dict(on_disk.uns))
    assert ("counts" in adata.layers) == (not extra)


def test_generate_touches_no_file_and_loads_nothing_again(trained, monkeypatch):
    model = trained["model"]
    assert model.loaded is not None and model.autoencoder is not None  # load_model holds the networks
    for module, name in ((tempfile, "mkdtemp"), (tempfile, "mkstemp"), (anndata, "read_h5ad"),
                         (anndata.AnnData, "write_h5ad"), (writer, "atomic_output"), (pipeline, "atomic_output"),
                         (pipeline, "load_diffusion_model"), (pipeline, "resolve_autoencoder"),
                         (api, "check_writable_dir")):
        monkeypatch.setattr(module, name, refuse)
    adata = api.generate(model, progress=False, **SAMPLING)
    assert adata.n_obs == SAMPLING["num_samples"] * len(model.conditions())
    assert adata.uns["cfdiffusion"]["checkpoint"] == model.path.rsplit("/", 1)[-1]


def test_a_loaded_model_keeps_its_record_and_compares_by_it(trained):
    model = trained["model"]
    again = api.load_model(model.path)
    assert again == model and again.loaded is not model.loaded
    assert model.label_keys == ["cell_type1", "donor"] and model.step == DIFFUSION["lr_anneal_steps"]
    assert model.vae_path == trained["vae"] and model.vocabularies["donor"] == ["donor0", "donor1"]
    assert "cell_type1=type_0,donor=donor0" in model.conditions()
    raw = api.load_model(model.path, use_ema=False)
    assert raw != model and raw.loaded.weights == "raw"


def test_other_weights_than_the_loaded_ones_are_loaded(trained, monkeypatch):
    calls = []
    load = pipeline.load_diffusion_model
    monkeypatch.setattr(pipeline, "load_diffusion_model", lambda *a, **k: calls.append(k) or load(*a, **k))
    adata = api.generate(trained["model"], use_ema=False, progress=False, **SAMPLING)
    assert calls and calls[0]["use_ema"] is False and adata.uns["cfdiffusion"]["weights"] == "raw"


def test_training_reads_an_anndata_in_place(trained, tmp_path, monkeypatch):
    adata = trained["adata"]
    for module, name in ((tempfile, "mkdtemp"), (anndata.AnnData, "write_h5ad"), (anndata, "read_h5ad")):
        monkeypatch.setattr(module, name, refuse)
    before = adata.X.copy()
    path = api.train_autoencoder(adata, tmp_path / "ae", progress=False, **dict(AUTOENCODER, max_steps=3))
    assert path.endswith(".pt") and (adata.X != before).nnz == 0  # trained, the data left as it was


@pytest.mark.parametrize("options", [dict(label_keys=["cell_type1", "donor"]),
                                     dict(label_keys=["donor"], filters=["cell_type1=type_0,type_2"]),
                                     dict(label_keys=[], layer="counts", require_labels=False),
                                     dict(label_keys=[], layer="raw", input_is_log=True, require_labels=False)])
def test_an_anndata_loads_as_its_file_does(tmp_path, options):
    adata = make_counts_adata(n_cells=50, n_genes=12, seed=4)
    adata.layers["counts"] = adata.X.copy()
    log = adata.copy()
    log.X = log.X.log1p()
    adata.raw = log
    adata.X = adata.X.toarray()  # a dense X too
    path = tmp_path / "data.h5ad"
    adata.write_h5ad(path)
    from_file, in_memory = load_dataset(str(path), **options), load_dataset(adata, **options)
    assert in_memory.genes == from_file.genes and in_memory.label_keys == from_file.label_keys
    assert in_memory.vocabularies == from_file.vocabularies
    assert np.array_equal(in_memory.label_codes, from_file.label_codes)
    index = np.arange(in_memory.n_cells)
    assert np.array_equal(in_memory.rows(index), from_file.rows(index))
    assert in_memory.obs_names == from_file.obs_names


def test_an_anndata_with_a_missing_layer_is_one_line(tmp_path):
    from guided_diffusion.core.errors import UsageError

    with pytest.raises(UsageError, match="layer 'nope' not in the AnnData; available layers: \\(none\\)"):
        load_dataset(make_counts_adata(n_cells=10, n_genes=5), label_keys=[], layer="nope", require_labels=False)
