"""--variable_gene_weight: the negative-binomial likelihood weighted per gene. The weighted loss against scipy's
negative-binomial pmf (known answer), unit weights equal the plain loss, which genes are weighted, that weight 1 is
the original run bit for bit, that a weighted run trains on and validates with the weights, and the refusals."""
import numpy as np
import pytest
import torch
from scipy import stats

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data import load_dataset
from guided_diffusion.data.variable_genes import rank_variable_genes
from VAE import VAE_train, autoencoder_training
from VAE.VAE_model import VAE


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "3", "--hidden_dims", "16", "--latent_dim", "6",
            "--max_steps", "9", "--checkpoint_freq", "9", "--decoder_label_key", "none",
            "--refit_dispersion", "False", *extra]
    return VAE_train.main(argv)


def count_model(genes=5):
    torch.manual_seed(0)
    model = VAE(genes, latent_dim=3, hidden_dims=(8,), loss_ae="nb")
    with torch.no_grad():
        model.log_theta.copy_(torch.linspace(-1.0, 2.0, genes))
    return model


def test_the_weighted_loss_is_the_weighted_mean_of_scipys_negative_binomial():
    model = count_model()
    rng = np.random.default_rng(0)
    output = torch.from_numpy(rng.normal(size=(4, 5)).astype(np.float32))
    counts = torch.from_numpy(rng.poisson(3.0, size=(4, 5)).astype(np.float32))
    totals = counts.sum(dim=1) + 1
    weights = torch.tensor([0.5, 2.0, 1.0, 0.25, 1.25])
    with torch.no_grad():
        loss = float(model.reconstruction_loss(output, None, counts, totals, weights))
    mean = (torch.softmax(output.double(), dim=1) * totals.double()[:, None]).numpy()
    theta = np.exp(model.log_theta.detach().double().numpy())
    log_pmf = stats.nbinom.logpmf(counts.numpy(), theta[None, :], theta[None, :] / (theta[None, :] + mean))
    assert loss == pytest.approx(float((-log_pmf * weights.numpy()[None, :]).mean()), rel=1e-5)


def test_unit_weights_give_the_plain_loss():
    model = count_model()
    rng = np.random.default_rng(1)
    output = torch.from_numpy(rng.normal(size=(6, 5)).astype(np.float32))
    counts = torch.from_numpy(rng.poisson(2.0, size=(6, 5)).astype(np.float32))
    totals = counts.sum(dim=1) + 1
    with torch.no_grad():
        plain = float(model.reconstruction_loss(output, None, counts, totals))
        weighted = float(model.reconstruction_loss(output, None, counts, totals, torch.ones(5)))
    assert weighted == pytest.approx(plain, rel=1e-6)


def test_the_most_variable_training_genes_get_the_weight_and_the_weights_average_one(counts_h5ad):
    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    try:
        train_cells = np.arange(0, dataset.n_cells, 2)
        weights = autoencoder_training.variable_gene_weights(dataset, train_cells, 4.0, seed=0, count=7)
        expected = set(int(g) for g in rank_variable_genes(dataset.rows(train_cells))[:7])
        assert autoencoder_training.variable_gene_weights(dataset, train_cells, 1.0, seed=0, count=7) is None
        assert autoencoder_training.variable_gene_weights(dataset, train_cells, 4.0, seed=0, count=40) is None
    finally:
        dataset.close()
    weights = weights.numpy()
    assert weights.mean() == pytest.approx(1.0, rel=1e-6)
    assert set(np.flatnonzero(weights > 1).tolist()) == expected
    assert weights.max() / weights.min() == pytest.approx(4.0, rel=1e-6)


def test_weight_one_is_the_original_run_bit_for_bit(tmp_path, counts_h5ad, monkeypatch):
    monkeypatch.setattr(autoencoder_training, "VARIABLE_GENE_WEIGHT_GENES", 8)
    plain = load_checkpoint(train(counts_h5ad, tmp_path / "a"))
    one = load_checkpoint(train(counts_h5ad, tmp_path / "b", "--variable_gene_weight", "1"))
    weighted = load_checkpoint(train(counts_h5ad, tmp_path / "c", "--variable_gene_weight", "5"))
    assert all(torch.equal(plain["state_dict"][k], one["state_dict"][k]) for k in plain["state_dict"])
    assert not all(torch.equal(plain["state_dict"][k], weighted["state_dict"][k]) for k in plain["state_dict"])
    assert weighted["train_config"]["variable_gene_weight"] == 5.0


def test_the_validation_loss_is_weighted_as_training_is(tmp_path, counts_h5ad, monkeypatch):
    monkeypatch.setattr(autoencoder_training, "VARIABLE_GENE_WEIGHT_GENES", 8)
    calls = []
    original = autoencoder_training.evaluate_reconstruction

    def recording(*args, **kwargs):
        calls.append(kwargs.get("gene_weights"))
        return original(*args, **kwargs)

    monkeypatch.setattr(autoencoder_training, "evaluate_reconstruction", recording)
    train(counts_h5ad, tmp_path, "--variable_gene_weight", "5", "--max_steps", "3")
    weighted = [w for w in calls if w is not None]
    assert weighted and all(int((w > 1).sum()) == 8 for w in weighted)


def test_resuming_with_another_weight_is_refused_in_one_line(tmp_path, counts_h5ad, capsys):
    train(counts_h5ad, tmp_path / "a", "--variable_gene_weight", "3")
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path / "a", "--state_dict", str(tmp_path / "a"), "--max_steps", "12")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--variable_gene_weight 3.0" in err and "--variable_gene_weight 1.0" in err


@pytest.mark.parametrize("value", ["0", "-2"])
def test_a_weight_that_is_not_positive_is_refused(tmp_path, counts_h5ad, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--variable_gene_weight", value)
    assert exit_info.value.code == 2
    assert "--variable_gene_weight" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))


def test_the_mse_model_refuses_gene_weights_in_one_line(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--loss_ae", "mse", "--variable_gene_weight", "3")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--variable_gene_weight" in err and "--loss_ae" in err
    assert not list(tmp_path.glob("*.pt"))
