"""cell_train.py and cell_sample.py end to end on tiny synthetic data (CPU, small models)."""
import os

import anndata
import numpy as np
import pytest
import torch

import cell_sample
import cell_train
from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.training.trainer import ema_warmup_rate
from synthetic import make_counts_adata
from VAE import VAE_train

TINY_UNET = ["--hidden_dims", "64", "64", "32", "16"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Counts h5ad + a small trained autoencoder + a 2-key diffusion model, shared by the tests."""
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "counts.h5ad"
    make_counts_adata(n_cells=240, n_genes=40, seed=1).write_h5ad(data)
    vae = VAE_train.main(["--data_dir", str(data), "--save_dir", str(root / "ae"), "--max_steps", "150",
                          "--hidden_dims", "64", "64", "64", "--latent_dim", "16", "--batch_size", "64",
                          "--progress", "False"])
    model = cell_train.main(["--data_dir", str(data), "--vae_path", vae, "--model_name", "two_keys",
                             "--save_dir", str(root / "diffusion"), "--lr_anneal_steps", "40",
                             "--label_key", "cell_type1", "--label_key", "donor", "--num_classes", "3", "2",
                             "--branch", "0", "--cache_interval", "5", "--non_uniform", "False",
                             "--save_interval", "20", "--log_interval", "10", "--progress", "False", *TINY_UNET])
    return {"root": root, "data": str(data), "vae": vae, "model": model}


def train(workspace, name, *extra):
    return cell_train.main(["--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--model_name", name,
                            "--save_dir", str(workspace["root"] / "diffusion"), "--progress", "False",
                            *TINY_UNET, *extra])


def sample(model_path, sample_dir, *extra):
    return cell_sample.main(["--model_path", str(model_path), "--sample_dir", str(sample_dir),
                             "--progress", "False", *extra])


def test_original_command_lines_and_outputs(workspace, tmp_path):
    model_path = train(workspace, "faithful", "--lr_anneal_steps", "30", "--num_classes", "3", "--branch", "0",
                       "--cache_interval", "5", "--non_uniform", "False", "--save_interval", "30")
    folder = os.path.dirname(model_path)
    assert sorted(os.listdir(folder)) == ["ema_0.9999_000030.pt", "model000030.pt", "opt000030.pt", "train_log.csv"]
    payload = load_checkpoint(model_path)  # weights_only=True
    assert payload["label_keys"] == ["cell_type1"]
    assert payload["vocabularies"] == {"cell_type1": ["type_0", "type_1", "type_2"]}
    assert payload["genes"] == [f"gene{j}" for j in range(40)]
    assert len(payload["vae_sha256"]) == 64 and payload["step"] == 30

    out = sample(model_path, tmp_path, "--num_classes", "3", "--branch", "0", "--cache_interval", "5",
                 "--non_uniform", "False", "--num_samples", "6", "--timestep_respacing", "100")
    assert sorted(os.listdir(tmp_path)) == ["cell0_cache5_uniform.npy", "cell1_cache5_uniform.npy",
                                            "cell2_cache5_uniform.npy", "generated.h5ad", "manifest.json"]
    assert np.load(tmp_path / "cell1_cache5_uniform.npy").shape == (6, 16)
    generated = anndata.read_h5ad(out)
    assert generated.shape == (18, 40)
    assert list(generated.var_names) == payload["genes"]
    assert generated.obs["cell_type1"].value_counts().to_dict() == {"type_0": 6, "type_1": 6, "type_2": 6}
    provenance = generated.uns["cfdiffusion"]
    assert provenance["step"] == 30 and provenance["weights"] == "ema" and provenance["cache_interval"] == 5
    assert provenance["sampler"] == "ddpm" and provenance["guide_w"] == 0.5
    # the autoencoder models counts (--loss_ae auto on raw counts): X is log-normalized drawn counts
    assert provenance["observation"] == "counts"
    counts = generated.layers["counts"].toarray()
    assert np.array_equal(counts, np.round(counts)) and (counts >= 0).all()
    totals = counts.sum(axis=1, keepdims=True)
    expected = np.log1p(counts / np.maximum(totals, 1) * 1e4)
    np.testing.assert_allclose(generated.X.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert (generated.obs["library_size"] > 0).all()


def test_training_log_anneals_lr_to_zero_with_quartile_losses(workspace):
    log = np.genfromtxt(os.path.join(os.path.dirname(workspace["model"]), "train_log.csv"), delimiter=",",
                        names=True)
    assert log["step"].tolist() == [10, 20, 30, 40]
    assert log["lr"][-1] == 0.0 and np.all(np.diff(log["lr"]) < 0)
    assert np.isfinite([log[f"loss_q{i}"][-1] for i in range(4)]).all()


def test_multi_condition_defaults_conditions_and_match_counts(workspace, tmp_path):
    model = workspace["model"]
    out = sample(model, tmp_path / "seen", "--num_samples", "3", "--timestep_respacing", "ddim20",
                 "--use_ddim", "True")
    generated = anndata.read_h5ad(out)
    assert generated.obs.groupby(["cell_type1", "donor"], observed=True).size().tolist() == [3] * 6

    out = sample(model, tmp_path / "partial", "--condition", "cell_type1=type_2", "--num_samples", "4",
                 "--timestep_respacing", "ddim20", "--use_ddim", "True", "--cache_interval", "1")
    assert os.path.exists(tmp_path / "partial" / "cell2_x_cache1_uniform.npy")
    obs = anndata.read_h5ad(out).obs
    assert set(obs["cell_type1"]) == {"type_2"} and obs["donor"].isna().all()  # unconditioned: missing

    out = sample(model, tmp_path / "matched", "--match_counts", "--timestep_respacing", "ddim10", "--use_ddim", "True")
    counts = anndata.read_h5ad(workspace["data"]).obs.groupby(["cell_type1", "donor"], observed=True).size()
    generated_counts = anndata.read_h5ad(out).obs.groupby(["cell_type1", "donor"], observed=True).size()
    assert generated_counts.to_dict() == counts.to_dict()


def test_unknown_condition_lists_valid_values(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample(workspace["model"], tmp_path, "--condition", "cell_type1=neuron")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: --condition cell_type1=neuron: unknown value; valid values "
                                               "of cell_type1: type_0, type_1, type_2")
    assert not os.path.exists(tmp_path / "generated.h5ad")


@pytest.mark.parametrize("flags, message", [
    (["--num_classes", "14"], "--num_classes 14 contradicts the checkpoint (3 2)"),
    (["--branch", "3"], "cache branch must be an int in [0, 2]"),
    (["--cache_interval", "0"], "--cache_interval must be 1 or more"),
    (["--timestep_respacing", "ddim5000", "--use_ddim", "True"], "--timestep_respacing 'ddim5000'"),
])
def test_sampler_refuses_bad_settings(workspace, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        sample(workspace["model"], tmp_path, "--num_samples", "2", *flags)
    assert message in capsys.readouterr().err


def test_trainer_refuses_bad_input(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(workspace, "bad", "--label_key", "celltype", "--lr_anneal_steps", "2")
    assert "label key 'celltype' not in obs; available columns: cell_type1, donor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(workspace, "bad", "--num_classes", "14", "--lr_anneal_steps", "2")
    assert "--num_classes 14 contradicts the data (cell_type1: 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(workspace, "bad", "--branch", "7", "--lr_anneal_steps", "2")
    assert "--branch 7" in capsys.readouterr().err

    other = tmp_path / "other_genes.h5ad"
    adata = make_counts_adata(n_cells=50, n_genes=42)
    adata.write_h5ad(other)
    with pytest.raises(SystemExit):
        cell_train.main(["--data_dir", str(other), "--vae_path", workspace["vae"], "--save_dir", str(tmp_path)])
    assert "2 not in the autoencoder" in capsys.readouterr().err


def test_checkpoint_kinds_are_checked(workspace, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample(workspace["vae"], tmp_path)
    assert "is an autoencoder checkpoint (VAE/VAE_train.py), but a diffusion model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cell_train.main(["--data_dir", workspace["data"], "--vae_path", workspace["model"], "--save_dir", str(tmp_path)])
    assert "is a diffusion model checkpoint" in capsys.readouterr().err


def test_resume_is_bit_identical(workspace):
    common = ["--lr_anneal_steps", "16", "--label_key", "cell_type1", "--label_key", "donor", "--save_interval", "8",
              "--p_uncond", "0.3", "--dropout", "0.1"]
    straight = train(workspace, "straight", *common)
    half = os.path.join(os.path.dirname(straight), "model000008.pt")
    resumed = train(workspace, "resumed", *common, "--resume_checkpoint", half)
    for kind in ("model000016.pt", "ema_0.9999_000016.pt"):
        first = load_checkpoint(os.path.join(os.path.dirname(straight), kind))["state_dict"]
        second = load_checkpoint(os.path.join(os.path.dirname(resumed), kind))["state_dict"]
        assert all(torch.equal(first[name], second[name]) for name in first), kind


def test_same_seed_same_cells_and_use_ema_switch(workspace, tmp_path):
    flags = ["--num_samples", "3", "--timestep_respacing", "50", "--seed", "7"]
    first = anndata.read_h5ad(sample(workspace["model"], tmp_path / "a", *flags)).X.toarray()
    second = anndata.read_h5ad(sample(workspace["model"], tmp_path / "b", *flags)).X.toarray()
    np.testing.assert_array_equal(first, second)
    raw = anndata.read_h5ad(sample(workspace["model"], tmp_path / "c", *flags, "--use_ema", "False"))
    assert raw.uns["cfdiffusion"]["weights"] == "raw"
    sample(workspace["model"], tmp_path / "d", *flags[:-1], "8")
    # compared on the latents: a briefly trained model's decoded counts can coincide although the latents differ
    assert not np.array_equal(latents_of(tmp_path / "c"), latents_of(tmp_path / "a"))
    assert not np.array_equal(latents_of(tmp_path / "d"), latents_of(tmp_path / "a"))
    np.testing.assert_array_equal(latents_of(tmp_path / "b"), latents_of(tmp_path / "a"))


def latents_of(sample_dir):
    """The latents of one sampling run, all conditions in file-name order."""
    names = sorted(name for name in os.listdir(sample_dir) if name.endswith(".npy"))
    return np.concatenate([np.load(os.path.join(sample_dir, name)) for name in names])


def test_autoencoder_hash_is_checked(workspace, tmp_path, capsys):
    other_vae = VAE_train.main(["--data_dir", workspace["data"], "--save_dir", str(tmp_path / "ae2"),
                                "--max_steps", "2", "--hidden_dims", "64", "64", "64", "--latent_dim", "16",
                                "--progress", "False", "--seed", "3"])
    with pytest.raises(SystemExit):
        sample(workspace["model"], tmp_path, "--vae_path", other_vae)
    assert "is not the one this model was trained with" in capsys.readouterr().err


def test_ema_warmup():
    assert ema_warmup_rate(0.9999, 0) == pytest.approx(0.1)
    assert ema_warmup_rate(0.9999, 90) == pytest.approx(0.91)
    assert ema_warmup_rate(0.9999, 10 ** 7) == 0.9999


def test_observation_mean_decodes_the_saved_latents(workspace, tmp_path):
    from VAE.VAE_model import load_autoencoder

    out = sample(workspace["model"], tmp_path, "--condition", "cell_type1=type_1,donor=donor0", "--num_samples", "5",
                 "--timestep_respacing", "20", "--observation", "mean", "--precision", "fp32")
    generated = anndata.read_h5ad(out)
    assert generated.uns["cfdiffusion"]["observation"] == "mean" and "counts" not in generated.layers
    assert "library_size" not in generated.obs
    autoencoder, _ = load_autoencoder(workspace["vae"])
    latents = torch.from_numpy(np.load(tmp_path / "cell1_0_cache1_uniform.npy"))  # 5 of 1000 steps -> 1 of 20
    type_1 = torch.full((5,), autoencoder.model.decoder_labels[0].index("type_1"))  # the decoder reads the cell type
    np.testing.assert_allclose(np.asarray(generated.X), autoencoder.model.decode(latents, type_1).numpy(), rtol=1e-6)


def test_library_sizes_follow_the_training_cells_of_the_condition(workspace):
    from guided_diffusion.data import load_dataset
    from guided_diffusion.sampling.conditions import draw_library_sizes

    payload = load_checkpoint(workspace["model"])
    entries, sizes = payload["library_size_quantiles"], [3, 2]
    dataset = load_dataset(workspace["data"], label_keys=["cell_type1", "donor"])
    totals, codes = dataset.library_sizes(), dataset.label_codes
    for row, chosen in (([2, 1], (codes[:, 0] == 2) & (codes[:, 1] == 1)), ([0, 2], codes[:, 0] == 0)):
        drawn = draw_library_sizes(row, entries, sizes, 20000, seed=5, condition_index=0)
        real = totals[chosen]
        assert real.min() * 0.999 <= drawn.min() and drawn.max() <= real.max() * 1.001
        # the pooled condition (donor left out) mixes both donors in proportion to their cells
        np.testing.assert_allclose(np.median(np.log(drawn)), np.median(np.log(real)), atol=0.1)
        np.testing.assert_allclose(np.log(drawn).mean(), np.log(real).mean(), atol=0.05)
    np.testing.assert_array_equal(draw_library_sizes([2, 1], entries, sizes, 50, 5, 0),
                                  draw_library_sizes([2, 1], entries, sizes, 50, 5, 0))


def test_counts_need_a_count_autoencoder(workspace, tmp_path, capsys):
    data = workspace["data"]
    vae = VAE_train.main(["--data_dir", data, "--save_dir", str(tmp_path / "ae"), "--max_steps", "3",
                          "--hidden_dims", "32", "32", "32", "--latent_dim", "16", "--loss_ae", "mse",
                          "--progress", "False"])
    model = cell_train.main(["--data_dir", data, "--vae_path", vae, "--model_name", "mse",
                             "--save_dir", str(tmp_path / "diffusion"), "--lr_anneal_steps", "2",
                             "--progress", "False", *TINY_UNET])
    out = sample(model, tmp_path / "auto", "--num_samples", "2", "--timestep_respacing", "10")
    assert anndata.read_h5ad(out).uns["cfdiffusion"]["observation"] == "mean"
    with pytest.raises(SystemExit) as exit_info:
        sample(model, tmp_path / "counts", "--num_samples", "2", "--timestep_respacing", "10",
               "--observation", "counts")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --observation counts needs an autoencoder trained with --loss_ae nb; this one was trained "
        "with mse: use --observation mean")
    assert not os.path.exists(tmp_path / "counts" / "generated.h5ad")


def test_reconstruction_cli_draws_counts_at_each_cells_total(workspace, tmp_path):
    from exp_script import reconstruct
    from guided_diffusion.data import load_dataset
    from VAE.VAE_model import load_autoencoder

    argv = ["--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--progress", "False"]
    counts_path = reconstruct.main([*argv, "--out", str(tmp_path / "counts.h5ad")])
    mean_path = reconstruct.main([*argv, "--out", str(tmp_path / "mean.h5ad"), "--observation", "mean"])
    real = anndata.read_h5ad(workspace["data"])
    drawn, mean = anndata.read_h5ad(counts_path), anndata.read_h5ad(mean_path)
    assert list(drawn.obs["cell_type1"]) == list(real.obs["cell_type1"].astype(str))
    np.testing.assert_allclose(drawn.obs["target_library_size"], np.asarray(real.X.sum(axis=1)).ravel(), rtol=1e-6)
    dataset = load_dataset(workspace["data"])
    autoencoder, _ = load_autoencoder(workspace["vae"])
    latents = torch.from_numpy(autoencoder.encode_dataset(dataset, progress=False))
    types = torch.from_numpy(dataset.label_codes[:, 0])  # the decoder reads the cell type (sorted as the loader's)
    np.testing.assert_allclose(np.asarray(mean.X), autoencoder.model.decode(latents, types).numpy(), rtol=1e-5,
                               atol=1e-6)
    # drawn totals scatter around each cell's own total; a cell without counts gets none
    drawn_totals, totals = drawn.obs["library_size"].to_numpy(), drawn.obs["target_library_size"].to_numpy()
    np.testing.assert_array_equal(drawn_totals, np.asarray(drawn.layers["counts"].sum(axis=1)).ravel())
    assert (drawn_totals[totals == 0] == 0).all() and (totals == 0).sum() == 1
    assert 0.8 < np.median(drawn_totals[totals > 0] / totals[totals > 0]) < 1.2


def test_unseen_combinations_take_library_sizes_of_their_first_keys():
    from guided_diffusion.sampling.conditions import draw_library_sizes

    # type 0 was seen only with donor 0, type 1 only with donor 1
    entries = [[0, 0, 10, [np.log(100.0)] * 3], [1, 1, 10, [np.log(5000.0)] * 3]]
    np.testing.assert_allclose(draw_library_sizes([0, 1], entries, [2, 2], 4, 0, 0), 100.0, rtol=1e-5)
    np.testing.assert_allclose(draw_library_sizes([1, 0], entries, [2, 2], 4, 0, 0), 5000.0, rtol=1e-5)
    np.testing.assert_allclose(draw_library_sizes([0, 2], entries, [2, 2], 4, 0, 0), 100.0, rtol=1e-5)


def test_bf16_matmuls_stay_close_to_fp32(workspace, tmp_path):
    flags = ["--condition", "cell_type1=type_0,donor=donor1", "--num_samples", "64", "--timestep_respacing", "50",
             "--cache_interval", "1"]
    sample(workspace["model"], tmp_path / "fp32", *flags, "--precision", "fp32")
    out = sample(workspace["model"], tmp_path / "bf16", *flags, "--precision", "bf16")
    assert anndata.read_h5ad(out).uns["cfdiffusion"]["precision"] == "bf16"
    name = "cell0_1_cache1_uniform.npy"
    full, half = np.load(tmp_path / "fp32" / name), np.load(tmp_path / "bf16" / name)
    assert half.dtype == np.float32 and not np.array_equal(full, half)
    # same noise, same steps: bf16 rounding moves each latent by well under 1% of its norm (measured 0.16%)
    relative = np.linalg.norm(half - full, axis=1) / np.linalg.norm(full, axis=1)
    assert np.median(relative) < 0.01, np.median(relative)


def test_default_settings_scale_the_recorded_cache_to_the_sampled_steps():
    from guided_diffusion.sampling.settings import DEFAULT_SETTINGS, SamplerSettings, resolve_settings

    recorded = {"cache_interval": 5, "branch": 0, "non_uniform": False}
    default = resolve_settings(DEFAULT_SETTINGS, recorded, "cpu", schedule_steps=1000)
    assert (default.solver, default.timestep_respacing, default.cache_interval) == ("dpmpp2m_sde", "logsnr10", 1)
    assert default.precision in ("fp32", "bf16")
    faithful = resolve_settings(SamplerSettings(timestep_respacing="1000", precision="fp32"), recorded, "cpu")
    assert (faithful.cache_interval, faithful.branch, faithful.non_uniform) == (5, 0, False)
    assert resolve_settings(SamplerSettings(timestep_respacing="500"), recorded, "cpu").cache_interval == 2
    assert resolve_settings(SamplerSettings(timestep_respacing="ddim50", use_ddim=True, cache_interval=5), recorded,
                            "cpu").cache_interval == 5  # given explicitly: used as given


def test_autoencoder_refuses_the_other_input_kind(workspace, tmp_path, capsys):
    from exp_script import reconstruct

    with pytest.raises(SystemExit) as exit_info:
        reconstruct.main(["--data_dir", workspace["data"], "--vae_path", workspace["vae"], "--input_is_log", "True",
                          "--allow_count_like_log", "True", "--out", str(tmp_path / "r.h5ad"), "--progress", "False"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("error: the autoencoder was trained on raw-count input but "
                                               "--input_is_log is True")
    assert not (tmp_path / "r.h5ad").exists()


def test_a_condition_leaving_the_decoders_label_open_is_refused_before_sampling(workspace, tmp_path, capsys):
    # the workspace's autoencoder reads cell_type1 (the default): a cell of donor0 of no given type cannot be decoded
    with pytest.raises(SystemExit) as stopped:
        sample(workspace["model"], tmp_path / "out", "--condition", "donor=donor0", "--num_samples", "3")
    assert stopped.value.code != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every --condition must name cell_type1" in line and "'donor=donor0' leaves it open" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
