"""The diffusion checkpoint schema: legacy files load and sample, edited files are refused before anything
is written, the recorded schedule and latent scale drive the sampler, the autoencoder is found when moved."""
import os
import shutil
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

import cell_sample
from guided_diffusion.core.container import load_checkpoint, save_checkpoint
from guided_diffusion.checkpoints import SCHEMA_VERSION, DiffusionCheckpoint

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v1"
MODEL, EMA, VAE = "model000004.pt", "ema_0.9999_000004.pt", "autoencoder.pt"


@pytest.fixture
def legacy(tmp_path):
    """A copy of the legacy (schema 1) model, EMA and autoencoder in a folder of their own."""
    folder = tmp_path / "legacy"
    folder.mkdir()
    for name in (MODEL, EMA, VAE):
        shutil.copy(LEGACY / name, folder / name)
    return folder


def edit(path, change):
    """Rewrite a checkpoint with ``change(payload)`` applied (as a user or another tool might)."""
    payload = load_checkpoint(str(path))
    kind = payload.pop("kind")
    payload.pop("format_version")
    change(payload)
    save_checkpoint(payload, str(path), kind=kind)


def edit_both(folder, change):
    for name in (MODEL, EMA):
        edit(folder / name, change)


def sample(folder, out, *extra):
    return cell_sample.main(["--model_path", str(folder / MODEL), "--sample_dir", str(out), "--progress", "False",
                             "--vae_path", str(folder / VAE), "--num_samples", "3", "--timestep_respacing", "10",
                             *extra])


def refused(capsys, call, *args):
    with pytest.raises(SystemExit) as exit_info:
        call(*args)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_legacy_checkpoint_loads_and_samples(legacy, tmp_path):
    checkpoint = DiffusionCheckpoint.load(str(legacy / MODEL))
    assert checkpoint.schema_version == 1 and checkpoint.training is None and checkpoint.latent_range is None
    assert checkpoint.diffusion == {"steps": 1000, "schedule": "linear", "predict": "epsilon"}
    out = sample(legacy, tmp_path / "out")
    generated = anndata.read_h5ad(out)
    assert generated.shape == (18, 12) and list(generated.var_names) == checkpoint.genes
    assert generated.obs.groupby(["cell_type1", "donor"], observed=True).size().tolist() == [3] * 6
    assert generated.uns["cfdiffusion"]["weights"] == "ema"


def test_a_new_checkpoint_records_the_schema_and_round_trips(tmp_path):
    from test_pipeline_end_to_end import TINY_UNET  # noqa: F401  (the same tiny denoiser)
    import cell_train
    from synthetic import make_counts_adata
    from VAE import VAE_train

    data = tmp_path / "counts.h5ad"
    make_counts_adata(n_cells=60, n_genes=12, seed=3).write_h5ad(data)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(tmp_path / "ae"), "--max_steps", "3",
                          "--hidden_dims", "8", "8", "--latent_dim", "4", "--progress", "False"])
    model = cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--save_dir", str(tmp_path / "d"),
                             "--model_name", "m", "--lr_anneal_steps", "3", "--hidden_dims", "8", "8",
                             "--batch_size", "16", "--lr", "0.001", "--progress", "False"])
    payload = load_checkpoint(model)
    checkpoint = DiffusionCheckpoint.from_payload(payload, model)
    assert checkpoint.schema_version == SCHEMA_VERSION and checkpoint.step == 3
    assert checkpoint.training == {"lr": 0.001, "batch_size": 16, "microbatch": -1, "weight_decay": 1e-4,
                                   "ema_rate": 0.9999, "lr_anneal_steps": 3, "p_uncond": 0.1, "seed": 0}
    quantiles = np.asarray(checkpoint.latent_range["quantiles"])
    assert quantiles.shape == (3, 4) and (quantiles[0] <= quantiles[1]).all() and (quantiles[1] <= quantiles[2]).all()
    # the trainer's file is exactly the schema's payload: one layout, written and read in one place
    written = {k: v for k, v in payload.items() if k != "format_version"}
    rebuilt = checkpoint.to_payload()
    assert sorted(written) == sorted(rebuilt)
    assert all(written[k] == rebuilt[k] for k in written if k != "state_dict")


@pytest.mark.parametrize("change, message", [
    (lambda p: p["vocabularies"]["donor"].reverse(), "the vocabulary of donor is not in sorted order"),
    (lambda p: p["vocabularies"].update(donor=["donor0", "donor0"]), "the vocabulary of donor holds 'donor0' twice"),
    (lambda p: p["vocabularies"]["donor"].append("donor2"), "the vocabulary sizes [3, 3] differ from the model's"),
    (lambda p: p.update(model_config=dict(p["model_config"], condition_sizes=[3, 3]),
                        vocabularies=dict(p["vocabularies"], donor=["donor0", "donor1", "donor2"])),
     "the condition embedding weight has shape (128, 5), the vocabularies need 6 inputs"),
    (lambda p: p.pop("genes"), "is not a complete diffusion checkpoint: genes missing"),
    (lambda p: p.update(step="4"), "step is a str, not a int"),
    (lambda p: p.update(latent_scale=float("nan")), "latent_scale is nan, not a finite number"),
    (lambda p: p.update(diffusion={"steps": 0, "schedule": "linear", "predict": "epsilon"}), "steps is 0"),
    (lambda p: p.update(label_keys=["cell_type1", "library_size"],
                        vocabularies={"cell_type1": p["vocabularies"]["cell_type1"],
                                      "library_size": p["vocabularies"]["donor"]}),
     "label key 'library_size'"),
    (lambda p: p.update(schema_version=99), "diffusion schema version 99"),
])
def test_an_edited_checkpoint_is_refused_before_anything_is_written(legacy, tmp_path, capsys, change, message):
    edit_both(legacy, change)
    line = refused(capsys, sample, legacy, tmp_path / "out")
    assert message in line, line
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_weights_that_do_not_fit_the_config_are_refused(legacy, tmp_path, capsys):
    edit_both(legacy, lambda p: p.update(model_config=dict(p["model_config"], hidden_dims=[8, 8, 8, 16])))
    assert "the weights do not fit the recorded model config" in refused(capsys, sample, legacy, tmp_path / "o")


def test_the_sampler_uses_the_recorded_schedule(legacy, tmp_path, capsys):
    edit_both(legacy, lambda p: p.update(diffusion={"steps": 500, "schedule": "linear", "predict": "epsilon"}))
    out = sample(legacy, tmp_path / "ok", "--timestep_respacing", "500")
    assert anndata.read_h5ad(out).uns["cfdiffusion"]["schedule_steps"] == 500
    assert "(at most 500)" in refused(capsys, sample, legacy, tmp_path / "bad", "--timestep_respacing", "1000")


def test_latent_scale_divides_the_sampled_latents(legacy, tmp_path):
    flags = ("--condition", "cell_type1=type_1,donor=donor0", "--observation", "mean", "--precision", "fp32")
    edit_both(legacy, lambda p: p.update(latent_scale=1.0))
    sample(legacy, tmp_path / "one", *flags)
    edit_both(legacy, lambda p: p.update(latent_scale=2.0))
    sample(legacy, tmp_path / "two", *flags)
    name = "cell1_0_cache1_uniform.npy"
    one, two = np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)
    # the denoiser works in the scaled space: same noise, same steps, the latents come back divided by 2
    np.testing.assert_allclose(two * 2.0, one, rtol=1e-5, atol=1e-6)


def test_finding_a_moved_autoencoder_beside_the_model(legacy, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # neither the recorded path nor the recorded relative path exists from here
    argv = ["--model_path", str(legacy / MODEL), "--progress", "False", "--num_samples", "2",
            "--timestep_respacing", "5"]
    out = cell_sample.main([*argv, "--sample_dir", str(tmp_path / "found")])
    assert anndata.read_h5ad(out).uns["cfdiffusion"]["vae_path"] == VAE
    # a different file under that name is not taken: the hash decides
    shutil.copy(legacy / MODEL, legacy / VAE)
    line = refused(capsys, cell_sample.main, [*argv, "--sample_dir", str(tmp_path / "wrong")])
    assert "is not the one this model was trained with (sha256 differs)" in line
    os.remove(legacy / VAE)
    line = refused(capsys, cell_sample.main, [*argv, "--sample_dir", str(tmp_path / "none")])
    assert line.startswith("error: autoencoder not found at ") and line.endswith("; pass --vae_path")
    assert str(legacy / VAE) in line


def test_a_missing_ema_file_is_named(legacy, tmp_path, capsys):
    os.remove(legacy / EMA)
    line = refused(capsys, sample, legacy, tmp_path / "out")
    assert line == (f"error: the EMA weights {legacy / EMA} next to {legacy / MODEL} are missing; "
                    f"pass --use_ema False to sample the raw weights")
    out = sample(legacy, tmp_path / "raw", "--use_ema", "False")
    assert anndata.read_h5ad(out).uns["cfdiffusion"]["weights"] == "raw"


def test_non_finite_weights_are_refused_after_sampling_and_nothing_is_written(legacy, tmp_path, capsys):
    def poison(payload):
        payload["state_dict"]["head.3.bias"] = torch.full_like(payload["state_dict"]["head.3.bias"], float("nan"))
    edit_both(legacy, poison)
    line = refused(capsys, sample, legacy, tmp_path / "out")
    assert "sampling produced non-finite latents for 18 of 18 cells" in line and "nothing was written" in line
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_save_and_load_round_trip_upgrades_a_legacy_file(legacy, tmp_path):
    checkpoint = DiffusionCheckpoint.load(str(legacy / MODEL))
    upgraded = tmp_path / "upgraded.pt"
    checkpoint.schema_version = SCHEMA_VERSION
    checkpoint.save(str(upgraded))
    again = DiffusionCheckpoint.load(str(upgraded))
    assert again.schema_version == SCHEMA_VERSION and again.kind == "diffusion_model"
    for name in ("label_keys", "vocabularies", "condition_counts", "genes", "diffusion", "latent_scale", "step"):
        assert getattr(again, name) == getattr(checkpoint, name), name
    assert all(torch.equal(again.state_dict[k], v) for k, v in checkpoint.state_dict.items())
