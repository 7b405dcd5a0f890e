"""--latent_norm: the deterministic latent L2-normalized (the original, the default) or the encoder's linear
output; recorded in the checkpoint, old checkpoints load as normalized, a bad value is refused."""
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
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "16", "--latent_dim", "6",
            "--max_steps", "10", "--checkpoint_freq", "10", *extra]
    return VAE_train.main(argv)


def test_none_is_the_encoders_linear_output_and_sphere_its_direction():
    torch.manual_seed(0)
    plain = VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae="nb", latent_norm="none")
    sphere = VAE(num_genes=30, latent_dim=6, hidden_dims=(16,), loss_ae="nb")
    sphere.load_state_dict(plain.state_dict())
    x = torch.rand(9, 30) * 3
    raw = plain.encode(x)
    plain.eval()
    with torch.no_grad():
        np.testing.assert_allclose(raw.numpy(), plain.encoder(x).numpy(), rtol=1e-6)
    assert not np.allclose(raw.norm(dim=1).numpy(), 1.0, atol=1e-3)
    np.testing.assert_allclose(sphere.encode(x).numpy(), (raw / raw.norm(dim=1, keepdim=True)).numpy(), rtol=1e-5)
    assert sphere.latent_on_sphere and not plain.latent_on_sphere
    assert not VAE(num_genes=30, latent_dim=6, variational=True, latent_norm="sphere").latent_on_sphere


def test_checkpoint_records_it_and_rebuilds_an_unnormalized_encoder(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path, "--latent_norm", "none")
    assert load_checkpoint(path)["model_config"]["latent_norm"] == "none"
    autoencoder, _ = load_autoencoder(path)
    assert autoencoder.model.latent_norm == "none"
    latents = autoencoder.encode_dataset(load_dataset(str(counts_h5ad), label_keys=[]), progress=False)
    assert np.isfinite(latents).all() and np.ptp(np.linalg.norm(latents, axis=1)) > 1e-3


def test_default_is_the_sphere_and_old_checkpoints_load_on_it(tmp_path, counts_h5ad):
    path = train(counts_h5ad, tmp_path)
    assert load_checkpoint(path)["model_config"]["latent_norm"] == "sphere"
    for old in ("tests/data/legacy_v1/autoencoder.pt", "tests/data/schema_v2/model_seed=0_step=5.pt"):
        assert "latent_norm" not in load_checkpoint(str(REPO_ROOT / old))["model_config"]
        autoencoder, _ = load_autoencoder(str(REPO_ROOT / old))
        assert autoencoder.model.latent_norm == "sphere" and autoencoder.model.latent_on_sphere


def test_an_unknown_value_is_refused(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(counts_h5ad, tmp_path, "--latent_norm", "cube")
    assert stopped.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "--latent_norm" in err[-1]
    with pytest.raises(Exception, match="latent_norm"):
        VAE(num_genes=5, latent_norm="cube")
