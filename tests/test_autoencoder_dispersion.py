"""--dispersion_lr: the NB decoder's per-gene dispersion learns at its own rate, is recorded, and resumes across
a change of the optimizer's parameter groups."""
import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.training.config import AutoencoderTrainingConfig
from VAE import VAE_train
from VAE.autoencoder_training import parameter_groups, regroup_optimizer_state
from VAE.VAE_model import VAE
from guided_diffusion.training.optim import adamw


def train(counts_h5ad, save_dir, *extra):
    argv = ["--data_dir", str(counts_h5ad), "--save_dir", str(save_dir), "--progress", "False",
            "--batch_size", "32", "--log_interval", "5", "--hidden_dims", "16", "--latent_dim", "4", *extra]
    return VAE_train.main(argv)


def log_theta(path):
    return load_checkpoint(path)["state_dict"]["log_theta"].numpy()


def test_poisson_counts_drive_the_dispersion_up_at_its_own_rate(tmp_path, counts_h5ad):
    # the synthetic counts are Poisson draws: no overdispersion, so the likelihood pushes theta upwards
    slow = train(counts_h5ad, tmp_path / "slow", "--max_steps", "40", "--checkpoint_freq", "40", "--lr", "1e-3",
                 "--refit_dispersion", "False")
    fast = train(counts_h5ad, tmp_path / "fast", "--max_steps", "40", "--checkpoint_freq", "40", "--lr", "1e-3",
                 "--dispersion_lr", "0.1", "--refit_dispersion", "False")
    assert np.abs(log_theta(slow)).max() < 0.05, "at lr 1e-3 AdamW moves it by about 1e-3 a step"
    assert np.median(log_theta(fast)) > 0.2 and log_theta(fast).max() > 1.0
    assert load_checkpoint(fast)["train_config"]["dispersion_lr"] == 0.1
    assert load_checkpoint(slow)["train_config"]["dispersion_lr"] is None


def test_groups_put_the_dispersion_apart_only_when_asked():
    model = VAE(num_genes=12, latent_dim=3, hidden_dims=(8,), loss_ae="nb")
    config = AutoencoderTrainingConfig(save_dir="unused")
    assert len(parameter_groups(model, config)) == 1
    config.dispersion_lr = 0.05
    groups = parameter_groups(model, config)
    assert len(groups) == 2 and groups[1]["params"] == [model.log_theta] and groups[1]["lr"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    mse = VAE(num_genes=12, latent_dim=3, hidden_dims=(8,), loss_ae="mse")
    assert len(parameter_groups(mse, config)) == 1, "an mse decoder has no dispersion"


@pytest.mark.parametrize("before, after", [(None, 0.05), (0.05, None)])
def test_regrouped_state_keeps_every_parameters_moments(before, after):
    torch.manual_seed(0)
    model = VAE(num_genes=12, latent_dim=3, hidden_dims=(8,), loss_ae="nb")
    config = AutoencoderTrainingConfig(save_dir="unused", dispersion_lr=before)
    optimizer = adamw(parameter_groups(model, config), lr=1e-3, weight_decay=0.0)
    model(torch.rand(5, 12))[0].pow(2).mean().add(model.log_theta.sum()).backward()
    optimizer.step()
    moments = {name: optimizer.state[p]["exp_avg"].clone() for name, p in model.named_parameters()}
    config.dispersion_lr = after
    resumed = adamw(parameter_groups(model, config), lr=1e-3, weight_decay=0.0)
    resumed.load_state_dict(regroup_optimizer_state(optimizer.state_dict(), model, resumed))
    assert len(resumed.param_groups) == (1 if after is None else 2)
    for name, p in model.named_parameters():
        torch.testing.assert_close(resumed.state[p]["exp_avg"], moments[name])
    if after is not None:
        assert resumed.param_groups[1]["lr"] == after


def test_a_run_resumes_with_the_dispersion_rate_added(tmp_path, counts_h5ad):
    first = train(counts_h5ad, tmp_path / "a", "--max_steps", "10", "--checkpoint_freq", "10", "--lr", "1e-3",
                  "--refit_dispersion", "False")
    resumed = train(counts_h5ad, tmp_path / "a", "--max_steps", "30", "--checkpoint_freq", "10", "--lr", "1e-3",
                    "--state_dict", str(first), "--dispersion_lr", "0.1", "--refit_dispersion", "False")
    assert load_checkpoint(resumed)["step"] == 30
    assert np.abs(log_theta(first)).max() < 0.02 and np.median(log_theta(resumed)) > 0.05


def test_non_positive_dispersion_rate_is_refused(tmp_path, counts_h5ad, capsys):
    with pytest.raises(SystemExit) as stopped:
        train(counts_h5ad, tmp_path, "--max_steps", "5", "--dispersion_lr", "0")
    assert stopped.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dispersion_lr" in err[0]


# ---- --refit_dispersion -------------------------------------------------------------------------------------
def test_refit_is_each_genes_maximum_likelihood(counts_h5ad):
    from guided_diffusion.data import load_dataset
    from VAE.autoencoder_training import refit_dispersion
    from VAE.count_model import negative_binomial_nll

    dataset = load_dataset(str(counts_h5ad), label_keys=[])
    torch.manual_seed(0)
    model = VAE(num_genes=dataset.n_genes, latent_dim=4, hidden_dims=(16,), loss_ae="nb")
    index = np.arange(dataset.n_cells)
    fitted, record = refit_dispersion(model, dataset, index, seed=0)
    assert record["nll_after"] < record["nll_before"] and record["cells"] == dataset.n_cells
    assert record["learned_log_theta"] == pytest.approx(model.log_theta.detach().tolist())
    # brute force: each gene's likelihood over a grid of log theta, the decoder's means fixed
    x, counts, totals = (torch.from_numpy(a) for a in dataset.rows_and_counts(index))
    model.eval()
    with torch.no_grad():
        log_mean = torch.log_softmax(model(x)[0], dim=1) + torch.log(totals)[:, None]
        grid = torch.linspace(-4, 8, 481)
        for gene in (0, 7, 21):
            losses = [float(negative_binomial_nll(log_mean[:, gene:gene + 1], value.view(1), counts[:, gene:gene + 1]))
                      for value in grid]
            best = float(grid[int(np.argmin(losses))])
            if -4 < best < 8:  # an interior optimum: the fit finds it
                assert float(fitted[gene]) == pytest.approx(best, abs=0.05)
            else:  # no overdispersion in this gene: theta runs up to the grid's end
                assert float(fitted[gene]) >= 7.9


def test_training_refits_the_best_weights_and_keeps_the_learned_dispersion(tmp_path, counts_h5ad):
    train(counts_h5ad, tmp_path, "--max_steps", "20", "--checkpoint_freq", "20", "--early_stopping_patience", "50")
    best, last = load_checkpoint(str(tmp_path / "model_seed=0_best.pt")), load_checkpoint(
        str(tmp_path / "model_seed=0_step=20.pt"))
    fit = best["dispersion_fit"]
    assert fit["nll_after"] < fit["nll_before"]
    np.testing.assert_allclose(best["state_dict"]["log_theta"].numpy() != np.asarray(fit["learned_log_theta"]), True)
    assert "dispersion_fit" not in last, "the resumable checkpoint keeps the learned dispersion"
    assert best["train_config"]["refit_dispersion"] is True


def test_refit_can_be_turned_off_and_the_mse_decoder_has_none(tmp_path, counts_h5ad, log_h5ad):
    off = train(counts_h5ad, tmp_path / "off", "--max_steps", "5", "--checkpoint_freq", "5",
                "--refit_dispersion", "False")
    assert "dispersion_fit" not in load_checkpoint(off)
    mse = VAE_train.main(["--data_dir", str(log_h5ad), "--input_is_log", "True", "--save_dir", str(tmp_path / "mse"),
                          "--progress", "False", "--max_steps", "5", "--checkpoint_freq", "5", "--hidden_dims", "16",
                          "--latent_dim", "4", "--batch_size", "32"])
    assert "dispersion_fit" not in load_checkpoint(mse)


def test_a_refitted_file_is_refitted_from_its_learned_dispersion(tmp_path, counts_h5ad):
    from guided_diffusion.data import load_dataset
    from VAE.autoencoder_training import apply_dispersion_refit

    path = train(counts_h5ad, tmp_path, "--max_steps", "10", "--checkpoint_freq", "10")
    learned = load_checkpoint(path)["dispersion_fit"]["learned_log_theta"]
    dataset = load_dataset(str(counts_h5ad), label_keys=["cell_type1"])  # the decoder reads it (the default)
    cells = np.arange(0, dataset.n_cells, 2)
    apply_dispersion_refit(path, dataset, cells, seed=0)
    first = load_checkpoint(path)
    apply_dispersion_refit(path, dataset, cells, seed=0)
    again = load_checkpoint(path)
    assert first["dispersion_fit"]["learned_log_theta"] == again["dispersion_fit"]["learned_log_theta"] == learned
    torch.testing.assert_close(again["state_dict"]["log_theta"], first["state_dict"]["log_theta"])


def test_refit_moves_the_dispersion_on_a_realistic_number_of_genes(tmp_path):
    """With ~20,000 genes each gene's share of a mean-over-genes loss is tiny (gradients below L-BFGS's
    tolerances, so a fit on it stops with the dispersion barely moved); the fit must reach every gene's own
    optimum. Counts are drawn from a
    NB with a known theta per gene, around means the decoder gives exactly (a decoder whose output does not depend
    on the cell: its bias is the log of each gene's share)."""
    import anndata as ad
    import scipy.sparse as sp

    from guided_diffusion.data import load_dataset
    from VAE.autoencoder_training import refit_dispersion

    rng = np.random.default_rng(0)
    n_cells, n_genes = 300, 20000
    share = rng.lognormal(0, 2.0, n_genes)
    share /= share.sum()
    library = rng.integers(10000, 30000, n_cells)
    true_log_theta = rng.uniform(-1.0, 1.5, n_genes)
    mean = library[:, None] * share[None, :]
    theta = np.exp(true_log_theta)[None, :]
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    path = tmp_path / "many_genes.h5ad"
    ad.AnnData(sp.csr_matrix(counts)).write_h5ad(path)
    dataset = load_dataset(str(path), label_keys=[], require_labels=False)
    torch.manual_seed(0)
    model = VAE(num_genes=n_genes, latent_dim=2, hidden_dims=(4,), loss_ae="nb")
    with torch.no_grad():  # the decoder's mean is each gene's share whatever the cell
        for layer in model.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
        output = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == n_genes][-1]
        output.bias.copy_(torch.as_tensor(np.log(share), dtype=torch.float32))
        model.log_theta.zero_()
    fitted, record = refit_dispersion(model, dataset, np.arange(n_cells), seed=0)
    assert record["nll_after"] < record["nll_before"] - 1e-3
    # genes with enough counts to pin their dispersion: the fit is near the truth (sampling error ~0.1-0.2)
    informative = counts.mean(axis=0) > 2
    assert informative.sum() > 1000
    error = np.abs(fitted.numpy()[informative] - true_log_theta[informative])
    assert np.median(error) < 0.15, np.median(error)


def test_refit_never_makes_a_gene_worse_and_leaves_genes_without_counts_alone(tmp_path):
    """Each gene is fitted on its own: its likelihood never increases (a joint fit over all genes can move a single
    gene far off while the sum improves), and a gene without a count keeps the learned dispersion (its likelihood
    has no finite maximum)."""
    import anndata as ad
    import scipy.sparse as sp

    from guided_diffusion.data import load_dataset
    from VAE.autoencoder_training import refit_dispersion
    from VAE.count_model import negative_binomial_nll, negative_binomial_nll_per_gene

    rng = np.random.default_rng(3)
    n_cells, n_genes = 200, 60
    rates = rng.gamma(0.5, 4.0, size=(n_cells, n_genes)) * rng.lognormal(0, 1.5, n_genes)
    counts = rng.poisson(rates).astype(np.float32)
    counts[:, 5] = 0.0  # a gene never seen
    counts[:7, 6] = [40, 0, 0, 0, 0, 0, 1]  # a gene seen in two cells, one of them with many counts
    counts[7:, 6] = 0.0
    path = tmp_path / "genes.h5ad"
    ad.AnnData(sp.csr_matrix(counts)).write_h5ad(path)
    dataset = load_dataset(str(path), label_keys=[], require_labels=False)
    torch.manual_seed(1)
    model = VAE(num_genes=n_genes, latent_dim=3, hidden_dims=(8,), loss_ae="nb").eval()
    with torch.no_grad():
        model.log_theta.uniform_(-2.0, 2.0)
    index = np.arange(n_cells)
    fitted, record = refit_dispersion(model, dataset, index, seed=0)
    x, counts_t, totals = (torch.from_numpy(a) for a in dataset.rows_and_counts(index))
    with torch.no_grad():
        log_mean = torch.log_softmax(model(x)[0], dim=1) + torch.log(totals)[:, None]
        learned = model.log_theta.detach()
        before = negative_binomial_nll_per_gene(log_mean, learned, counts_t)
        after = negative_binomial_nll_per_gene(log_mean, fitted, counts_t)
        # the per-gene terms are the mean likelihood's, summed by gene
        assert float(before.sum()) == pytest.approx(float(negative_binomial_nll(log_mean, learned, counts_t)) * n_genes,
                                                    rel=1e-5)
    assert bool((after <= before + 1e-7).all())
    assert float(fitted[5]) == float(learned[5])
    assert float(fitted[6]) != float(learned[6]) and np.isfinite(float(fitted[6]))
    assert record["nll_after"] < record["nll_before"]
