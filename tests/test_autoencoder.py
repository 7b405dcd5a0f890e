import subprocess
import sys

import numpy as np
import pytest
import torch

from guided_diffusion.checkpoint import load_checkpoint
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


def test_loss_falls_and_checkpoint_rebuilds_model(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path, "--max_steps", "60", "--checkpoint_freq", "30", "--val_fraction", "0.2")
    assert path.endswith("model_seed=0_step=60.pt")
    assert (tmp_path / "model_seed=0_step=30.pt").exists()
    log = np.genfromtxt(tmp_path / "train_log.csv", delimiter=",", names=True)
    assert log["train_loss"][-1] < 0.7 * log["train_loss"][0]

    payload = load_checkpoint(path)  # weights_only=True inside
    assert payload["kind"] == "autoencoder" and payload["step"] == 60
    assert payload["genes"] == [f"gene{j}" for j in range(40)]
    autoencoder, _ = load_autoencoder(path)
    again, _ = load_autoencoder(path)
    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    latents = autoencoder.encode_dataset(dataset, batch_size=64, progress=False)
    assert latents.shape == (150, 128)
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
    from VAE.autoencoder_training import gene_means

    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    means = gene_means(dataset, np.arange(dataset.n_cells), seed=0, chunk=16)
    np.testing.assert_allclose(means, dataset.rows(np.arange(dataset.n_cells)).mean(axis=0), rtol=1e-5)
    model = VAE(num_genes=dataset.n_genes, hidden_dims=(16, 16, 16))
    model.init_output_bias(means)
    output = [m for m in model.decoder if isinstance(m, torch.nn.Linear)][-1]
    np.testing.assert_allclose(output.bias.detach().numpy(), means, rtol=1e-6)
