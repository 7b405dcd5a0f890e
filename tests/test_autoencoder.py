import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data import load_dataset
from synthetic import REPO_ROOT
from VAE import VAE_train
from VAE.VAE_model import VAE, load_autoencoder


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "64", "64", "64", *extra]
    return VAE_train.main(argv)


def test_architecture_and_l2_normalized_latent():
    model = VAE(num_genes=30, latent_dim=8, hidden_dims=(16, 16, 16), dropout=0.1)
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 16), (16, 16), (16, 16), (16, 8)]
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.encoder)
    assert any(isinstance(m, torch.nn.PReLU) for m in model.decoder)
    assert isinstance(model.decoder[-1], torch.nn.ReLU)
    latent = model.encode(torch.rand(5, 30))
    np.testing.assert_allclose(latent.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert model.training, "encode() restores train mode"
    assert (model.decode(latent) >= 0).all()
    assert VAE(10, decoder_activation="linear").decoder[-1].__class__ is torch.nn.Linear


@pytest.mark.parametrize("loss_ae, drop", [("mse", 0.7), ("nb", 0.95)])
def test_loss_falls_and_checkpoint_rebuilds_model(tmp_path, counts_h5ad, loss_ae, drop):
    path = train(counts_h5ad, tmp_path, "--max_steps", "60", "--checkpoint_freq", "30", "--val_fraction", "0.2",
                 "--loss_ae", loss_ae)
    assert path.endswith("model_seed=0_step=60.pt")
    assert (tmp_path / "model_seed=0_step=30.pt").exists()
    log = np.genfromtxt(tmp_path / "train_log.csv", delimiter=",", names=True)
    assert log["train_loss"][-1] < drop * log["train_loss"][0]
    assert load_checkpoint(path)["model_config"]["loss_ae"] == loss_ae

    payload = load_checkpoint(path)  # weights_only=True inside
    assert payload["kind"] == "autoencoder" and payload["step"] == 60
    assert payload["genes"] == [f"gene{j}" for j in range(40)]
    autoencoder, _ = load_autoencoder(path)
    again, _ = load_autoencoder(path)
    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    latents = autoencoder.encode_dataset(dataset, batch_size=64, progress=False)
    assert latents.shape == (150, 20)  # the default latent_dim
    np.testing.assert_array_equal(latents, again.encode_dataset(dataset, batch_size=64, progress=False))
    np.testing.assert_allclose(latents, again.encode_dataset(dataset, batch_size=7, progress=False), atol=1e-5)


def test_resume_is_exact(tmp_path, counts_h5ad):
    straight = train(counts_h5ad, tmp_path / "a", "--max_steps", "12", "--checkpoint_freq", "6", "--dropout", "0.2")
    half = str(tmp_path / "a" / "model_seed=0_step=6.pt")
    resumed = train(counts_h5ad, tmp_path / "b", "--max_steps", "12", "--checkpoint_freq", "6", "--dropout", "0.2",
                    "--state_dict", half)
    first, second = load_checkpoint(straight)["state_dict"], load_checkpoint(resumed)["state_dict"]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_wrong_num_genes_is_a_clear_error(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--num_genes", "20125", "--max_steps", "2")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --num_genes 20125 contradicts the data, which has 40 genes; "
                   "omit --num_genes or fix it")
    assert not list(tmp_path.glob("*.pt"))


def test_missing_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        VAE_train.main(["--data_dir", str(tmp_path / "missing.h5ad"), "--save_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: data file not found: {tmp_path / 'missing.h5ad'}"]


def test_boolean_flags_parse_strings(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit):
        VAE_train.main(["--data_dir", str(counts_h5ad), "--save_dir", str(tmp_path), "--input_is_log", "maybe"])
    assert "expected True or False" in capsys.readouterr().err


def test_script_runs_from_inside_vae_folder(tmp_path, counts_h5ad):
    result = subprocess.run(
        [sys.executable, "VAE_train.py", "--data_dir", str(counts_h5ad), "--num_genes", "40",
         "--save_dir", str(tmp_path), "--max_steps", "3", "--progress", "False", "--hidden_dims", "32", "32", "32"],
        cwd=REPO_ROOT / "VAE", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "model_seed=0_step=3.pt").exists()


def test_decoder_output_starts_at_gene_means(counts_h5ad):
    from VAE.autoencoder_training import output_bias

    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    everything = np.arange(dataset.n_cells)
    means = output_bias(dataset, everything, models_counts=False, seed=0, chunk=16)
    np.testing.assert_allclose(means, dataset.rows(everything).mean(axis=0), rtol=1e-5)
    model = VAE(num_genes=dataset.n_genes, hidden_dims=(16, 16, 16))
    model.init_output_bias(means)
    output = [m for m in model.decoder if isinstance(m, torch.nn.Linear)][-1]
    np.testing.assert_allclose(output.bias.detach().numpy(), means, rtol=1e-6)

    # nb: the bias is the log of each gene's mean share of the counts, so an untrained decoder's softmax
    # (all hidden units at zero) gives the mean share profile
    log_shares = output_bias(dataset, everything, models_counts=True, seed=0, chunk=16)
    _, counts, totals = dataset.rows_and_counts(everything)
    np.testing.assert_allclose(np.exp(log_shares), (counts / totals[:, None]).mean(axis=0), rtol=1e-5)


def test_loss_auto_picks_the_count_model_for_counts_only(tmp_path, counts_h5ad, log_h5ad, capsys):
    counts_model = load_checkpoint(train(counts_h5ad, tmp_path / "c", "--max_steps", "2"))["model_config"]
    log_model = load_checkpoint(train(log_h5ad, tmp_path / "l", "--max_steps", "2", "--input_is_log", "True"))
    assert counts_model["loss_ae"] == "nb" and log_model["model_config"]["loss_ae"] == "mse"
    with pytest.raises(SystemExit) as exit_info:
        train(log_h5ad, tmp_path / "x", "--max_steps", "2", "--input_is_log", "True", "--loss_ae", "nb")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: --loss_ae nb models raw counts, but the input is log-normalized (--input_is_log True); "
        "use --loss_ae mse or give the raw counts (e.g. --layer counts)")


def test_negative_binomial_nll_matches_scipy():
    from scipy.stats import nbinom

    from VAE.count_model import negative_binomial_nll

    mean = torch.tensor([[0.01, 0.5, 3.0, 40.0], [2.0, 0.2, 10.0, 1.0]], dtype=torch.float64)
    theta = torch.tensor([0.3, 1.0, 2.5, 8.0], dtype=torch.float64)
    counts = torch.tensor([[0.0, 1.0, 2.0, 35.0], [0.0, 3.0, 12.0, 0.0]], dtype=torch.float64)
    expected = -nbinom.logpmf(counts.numpy(), theta.numpy(), (theta / (theta + mean)).numpy()).mean()
    got = negative_binomial_nll(torch.log(mean), torch.log(theta), counts)
    np.testing.assert_allclose(float(got), expected, rtol=1e-10)


def test_count_decoder_means_and_draws():
    torch.manual_seed(0)
    model = VAE(num_genes=30, latent_dim=8, hidden_dims=(16, 16, 16), loss_ae="nb")
    assert isinstance(model.decoder[-1], torch.nn.Linear) and model.config()["decoder_activation"] == "linear"
    latent = model.encode(torch.rand(4, 30))
    with torch.inference_mode():
        shares = torch.softmax(model.eval().decoder(latent), dim=1)
    np.testing.assert_allclose(model.decode(latent).numpy(), torch.log1p(shares * 1e4).numpy(), rtol=1e-6)
    totals = torch.tensor([100.0, 1000.0, 5000.0, 20000.0])
    with torch.inference_mode():
        draws = torch.stack([model.sample_counts(latent, totals, torch.Generator().manual_seed(s)).to_dense()
                             for s in range(200)])
    np.testing.assert_allclose(draws.sum(dim=2).mean(dim=0).numpy(), totals.numpy(), rtol=0.1)
    with pytest.raises(Exception, match="--loss_ae mse"):
        VAE(num_genes=30, hidden_dims=(16, 16, 16)).sample_counts(latent, totals, torch.Generator())


def early_stopping_run(counts_h5ad, save_dir, *extra):
    return train(counts_h5ad, save_dir, "--max_steps", "400", "--val_fraction", "0.2", "--lr", "1e-2",
                 "--early_stopping_patience", "20", *extra)


def test_early_stopping_keeps_the_best_weights_and_stops(tmp_path, counts_h5ad, capsys):
    path = early_stopping_run(counts_h5ad, tmp_path)
    assert path.endswith("model_seed=0_best.pt")
    log = np.genfromtxt(tmp_path / "train_log.csv", delimiter=",", names=True)
    last = int(log["step"][-1])
    best_step = int(log["step"][np.argmin(log["val_loss"])])
    assert last < 400, "the run stops before --max_steps"
    assert last - best_step == 20, "it stops at the first log row 20 steps past the best"
    assert (log["val_loss"][log["step"] > best_step] >= log["val_loss"].min()).all()
    payload = load_checkpoint(path)
    assert payload["step"] == best_step
    assert payload["selection"]["val_loss"] == pytest.approx(log["val_loss"].min(), rel=1e-9)
    assert payload["selection"]["patience"] == 20 and payload["selection"]["saved_at_step"] >= best_step
    last_payload = load_checkpoint(tmp_path / f"model_seed=0_step={last}.pt")
    assert any(not torch.equal(payload["state_dict"][name], last_payload["state_dict"][name])
               for name in payload["state_dict"]), "the best weights are not the last ones"
    out = capsys.readouterr().out
    assert f"stopping at step {last}" in out and f"at step {best_step}: {path}" in out
    load_autoencoder(path)  # a complete model file, usable as --vae_path


def test_early_stopping_resumes_exactly(tmp_path, counts_h5ad):
    straight = early_stopping_run(counts_h5ad, tmp_path / "a", "--checkpoint_freq", "10")
    first = load_checkpoint(straight)
    best_step = first["step"]
    # from a checkpoint before the best (found again) and from one after it (carried over from folder a)
    for name, step in [("before", 10 * max((best_step - 1) // 10, 1)), ("after", 10 * -(-best_step // 10))]:
        resumed = early_stopping_run(counts_h5ad, tmp_path / name, "--checkpoint_freq", "10",
                                     "--state_dict", str(tmp_path / "a" / f"model_seed=0_step={step}.pt"))
        second = load_checkpoint(resumed)
        assert second["step"] == best_step and second["selection"]["val_loss"] == first["selection"]["val_loss"]
        for key in first["state_dict"]:
            assert torch.equal(first["state_dict"][key], second["state_dict"][key]), (name, key)


def test_early_stopping_needs_validation_cells(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--max_steps", "5", "--val_fraction", "0", "--early_stopping_patience", "10")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--early_stopping_patience needs validation cells" in err and "--val_fraction" in err


def test_latent_noise_reaches_only_the_training_decoder(tmp_path, counts_h5ad):
    torch.manual_seed(0)
    model = VAE(num_genes=30, latent_dim=8, hidden_dims=(16, 16, 16), loss_ae="nb")
    x = torch.rand(6, 30)
    plain_output, plain_latent = model(x)
    noisy_output, noisy_latent = model(x, latent_noise=0.1)
    assert torch.equal(plain_latent, noisy_latent), "the encoder's latent is returned without noise"
    assert not torch.allclose(plain_output, noisy_output), "train mode: the decoder reads a noisy latent"
    model.eval()
    assert torch.equal(model(x)[0], model(x, latent_noise=0.1)[0]), "eval mode: no noise"

    straight = train(counts_h5ad, tmp_path / "a", "--max_steps", "12", "--checkpoint_freq", "6", "--latent_noise", "0.05")
    resumed = train(counts_h5ad, tmp_path / "b", "--max_steps", "12", "--checkpoint_freq", "6", "--latent_noise", "0.05",
                    "--state_dict", str(tmp_path / "a" / "model_seed=0_step=6.pt"))
    plain = train(counts_h5ad, tmp_path / "c", "--max_steps", "12")
    first, second, third = (load_checkpoint(path) for path in (straight, resumed, plain))
    assert first["train_config"]["latent_noise"] == 0.05 and third["train_config"]["latent_noise"] == 0.0
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    assert not all(torch.equal(first["state_dict"][k], third["state_dict"][k]) for k in first["state_dict"])
