"""--count_thinning: each training cell keeps a random share of its counts per step (binomial thinning); the
thinned counts, totals and model input agree with each other, 0 changes nothing, a run records the setting and
resumes exactly, the MSE model refuses it."""
import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data.normalize import log_normalize
from VAE import VAE_train
from VAE.autoencoder_training import thin_counts


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "16", "--latent_dim", "6",
            "--max_steps", "12", "--checkpoint_freq", "6", "--decoder_label_key", "none", *extra]
    return VAE_train.main(argv)


def poisson_counts(cells, genes, mean, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.poisson(torch.full((cells, genes), float(mean)), generator=generator)


def test_no_thinning_keeps_every_count():
    counts = poisson_counts(20, 50, 2.0, 0)
    x, thinned, totals = thin_counts(counts, 0.0, 1e4)
    assert torch.equal(thinned, counts)
    torch.testing.assert_close(totals, counts.sum(1))
    torch.testing.assert_close(x, torch.from_numpy(log_normalize(counts.numpy(), 1e4)))


def test_each_cell_keeps_one_share_of_its_counts_between_one_minus_thinning_and_one():
    torch.manual_seed(0)
    counts = poisson_counts(400, 300, 3.0, 1)
    counts[:, :5] = 0  # genes without counts stay without
    x, thinned, totals = thin_counts(counts, 0.6, 1e4)
    assert torch.equal(thinned, thinned.round()) and (thinned >= 0).all() and (thinned <= counts).all()
    assert (thinned[:, :5] == 0).all()
    share = thinned.sum(1) / counts.sum(1)
    assert share.min() > 0.4 - 0.03 and share.max() < 1.0 + 1e-6
    # one share per cell, uniform on [0.4, 1]: mean 0.7, sd 0.6 / sqrt(12) = 0.173
    assert abs(float(share.mean()) - 0.7) < 0.03 and abs(float(share.std()) - 0.173) < 0.02
    # within a cell every gene is thinned by the same share (binomial: the genes' totals follow it)
    per_gene = thinned[:, 5:].sum(0) / counts[:, 5:].sum(0)
    expected = float((share[:, None] * counts[:, 5:]).sum() / counts[:, 5:].sum())
    assert abs(float(per_gene.mean()) - expected) < 0.01 and float(per_gene.std()) < 0.02
    torch.testing.assert_close(totals, thinned.sum(1))
    torch.testing.assert_close(x, torch.from_numpy(log_normalize(thinned.numpy(), 1e4)), rtol=1e-5, atol=1e-5)


def test_thinned_negative_binomial_counts_have_the_closed_form_moments():
    """X ~ NB(mu, theta), each cell thinned by its own p ~ U(a, 1): a binomially thinned NB count is NB(p mu, theta),
    so E[Y] = E[p] mu and Var(Y) = E[p] mu + E[p^2] mu^2 / theta + Var(p) mu^2."""
    torch.manual_seed(3)
    cells, mu, theta, thinning = 60000, 6.0, 2.0, 0.6
    gamma = torch.distributions.Gamma(torch.full((cells, 1), theta), torch.full((cells, 1), theta / mu)).sample()
    counts = torch.poisson(gamma)
    _, thinned, _ = thin_counts(counts, thinning, 1e4)
    low = 1.0 - thinning
    p_mean, p_square = (1 + low) / 2, (1 + low + low ** 2) / 3
    mean = p_mean * mu
    variance = p_mean * mu + p_square * mu ** 2 / theta + (p_square - p_mean ** 2) * mu ** 2
    assert abs(float(thinned.mean()) - mean) < 0.05
    assert abs(float(thinned.var()) / variance - 1) < 0.04


def test_a_cell_left_without_counts_keeps_a_total_of_one():
    counts = torch.zeros(3, 10)
    counts[1, 2] = 1.0
    x, thinned, totals = thin_counts(counts, 0.5, 1e4)
    assert totals[0] == 1.0 and totals[2] == 1.0 and torch.isfinite(x).all() and (x[0] == 0).all()


def test_a_run_records_the_setting_and_resumes_exactly(tmp_path, counts_h5ad):
    straight = train(counts_h5ad, tmp_path / "a", "--count_thinning", "0.5")
    resumed = train(counts_h5ad, tmp_path / "b", "--count_thinning", "0.5",
                    "--state_dict", str(tmp_path / "a" / "model_seed=0_step=6.pt"))
    plain = train(counts_h5ad, tmp_path / "c")
    first, second, third = (load_checkpoint(path) for path in (straight, resumed, plain))
    assert first["train_config"]["count_thinning"] == 0.5 and third["train_config"]["count_thinning"] == 0.0
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    assert not all(torch.equal(first["state_dict"][k], third["state_dict"][k]) for k in first["state_dict"])


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_share_outside_zero_to_one_is_refused(tmp_path, counts_h5ad, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--count_thinning", value)
    assert exit_info.value.code == 2
    assert "--count_thinning" in capsys.readouterr().err


def test_the_mse_model_refuses_thinning(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--count_thinning", "0.3", "--loss_ae", "mse")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--count_thinning" in err and "--loss_ae nb" in err
    assert not list(tmp_path.glob("*.pt"))
