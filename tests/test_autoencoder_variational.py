"""The variational autoencoder (--kl_weight > 0): closed-form KL, the loss it adds, the posterior-mean latent,
checkpoints that rebuild it, and old checkpoints that keep loading as deterministic autoencoders."""
import math

import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data import load_dataset
from synthetic import REPO_ROOT
from VAE import VAE_train
from VAE.autoencoder_training import batch_loss
from VAE.VAE_model import VAE, load_autoencoder


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "64", "64", "--latent_dim", "8", *extra]
    return VAE_train.main(argv)


def test_kl_divergence_closed_form():
    mean = torch.tensor([[0.0, 0.0], [1.0, -2.0]])
    log_var = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    # 0.5 (mu^2 + s^2 - 1 - log s^2) per coordinate
    expected = [0.0, 0.5 * (1 + 4 - 1 - math.log(4.0)) + 0.5 * 4.0]
    np.testing.assert_allclose(VAE.kl_divergence(mean, log_var).numpy(), expected, rtol=1e-6)


def test_posterior_mean_is_the_latent_and_not_normalized():
    torch.manual_seed(0)
    model = VAE(num_genes=30, latent_dim=6, hidden_dims=(16, 16), variational=True, loss_ae="nb")
    x = torch.rand(9, 30) * 3
    latent = model.encode(x)
    assert not np.allclose(latent.norm(dim=1).numpy(), 1.0, atol=1e-3)
    assert torch.equal(latent, model.encode(x)), "encoding is deterministic (the posterior mean)"
    model.eval()
    output, returned = model(x)
    assert torch.equal(returned, latent) and torch.equal(output, model(x)[0]), "eval mode decodes the mean"
    model.train()
    torch.manual_seed(1)
    first, _ = model(x)
    torch.manual_seed(2)
    second, _ = model(x)
    assert not torch.allclose(first, second), "train mode decodes a drawn latent"
    assert model.kl_per_cell.shape == (9,) and (model.kl_per_cell >= 0).all()


def test_loss_adds_the_weighted_kl_per_gene(counts_h5ad):
    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    torch.manual_seed(0)
    model = VAE(num_genes=dataset.n_genes, latent_dim=4, hidden_dims=(16,), variational=True, loss_ae="nb").eval()
    index = np.arange(20)
    without, output, x = batch_loss(model, model, dataset, index, "cpu", kl_weight=0.0)
    kl = model.kl_per_cell.mean()
    with_kl, _, _ = batch_loss(model, model, dataset, index, "cpu", kl_weight=0.3)
    assert float(kl) > 0
    assert float(with_kl - without) == pytest.approx(0.3 * float(kl) / dataset.n_genes, rel=1e-5)


def test_trained_variational_checkpoint_rebuilds_itself(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path, "--max_steps", "30", "--checkpoint_freq", "30", "--kl_weight", "0.5")
    payload = load_checkpoint(path)
    assert payload["model_config"]["variational"] is True
    assert payload["train_config"]["kl_weight"] == 0.5
    assert any(name.startswith("encoder_log_var") for name in payload["state_dict"])
    autoencoder, _ = load_autoencoder(path)
    assert autoencoder.model.variational
    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    latents = autoencoder.encode_dataset(dataset, progress=False)
    assert latents.shape == (150, 8) and np.isfinite(latents).all()
    log = np.genfromtxt(tmp_path / "train_log.csv", delimiter=",", names=True)
    assert log["train_loss"][-1] < log["train_loss"][0]


def test_deterministic_checkpoints_record_it_and_old_ones_load(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path, "--max_steps", "5", "--checkpoint_freq", "5")
    assert load_checkpoint(path)["model_config"]["variational"] is False
    for old in ("tests/data/legacy_v1/autoencoder.pt", "tests/data/schema_v2/model_seed=0_step=5.pt"):
        recorded = load_checkpoint(str(REPO_ROOT / old))["model_config"]
        assert "variational" not in recorded  # written before the setting existed
        autoencoder, _ = load_autoencoder(str(REPO_ROOT / old))
        assert autoencoder.model.variational is False


def test_negative_kl_weight_is_refused(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(counts_h5ad, tmp_path, "--max_steps", "5", "--kl_weight", "-1")
    assert stopped.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--kl_weight" in err[0]
