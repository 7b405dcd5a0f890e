"""--count_split: the encoder reads a random share of each training cell's counts and the loss scores the rest
(molecular cross-validation). The parts add up to the cell, follow the closed-form moments of binomial splitting
(independent under Poisson sampling, covarying through the cell's expression under the negative binomial), a fixed
generator repeats its split, a run records the setting and resumes exactly, and bad settings are refused."""
import numpy as np
import pytest
import torch

from guided_diffusion.core.container import load_checkpoint
from guided_diffusion.data.normalize import log_normalize
from VAE.autoencoder_training import split_counts
from test_autoencoder_count_thinning import poisson_counts, train


def test_the_parts_add_up_to_the_cell_and_the_encoder_reads_its_own_part():
    torch.manual_seed(0)
    counts = poisson_counts(300, 200, 3.0, 1)
    counts[:, :4] = 0
    x, held, totals = split_counts(counts, 0.7, 1e4)
    given = counts - held
    assert torch.equal(held, held.round()) and (held >= 0).all() and (given >= 0).all()
    assert (held[:, :4] == 0).all()
    assert abs(float(given.sum() / counts.sum()) - 0.7) < 0.005
    torch.testing.assert_close(totals, held.sum(1))
    torch.testing.assert_close(x, torch.from_numpy(log_normalize(given.numpy(), 1e4)), rtol=1e-5, atol=1e-5)


def test_poisson_parts_are_independent_and_negative_binomial_parts_covary_through_the_expression():
    """X ~ Poisson(mu): the parts are Poisson(p mu) and Poisson((1 - p) mu), uncorrelated. X ~ NB(mu, theta), a
    Poisson count around a gamma expression: Cov(parts) = p (1 - p) mu^2 / theta, what the two parts share is the
    expression, which is what the decoder should learn."""
    torch.manual_seed(1)
    cells, mu, theta, share = 80000, 5.0, 2.0, 0.6
    counts = torch.poisson(torch.full((cells, 1), mu))
    _, held, _ = split_counts(counts, share, 1e4)
    given = counts - held
    assert abs(float(given.mean()) - share * mu) < 0.03 and abs(float(held.mean()) - (1 - share) * mu) < 0.03
    assert abs(float(np.corrcoef(given[:, 0].numpy(), held[:, 0].numpy())[0, 1])) < 0.015
    expression = torch.distributions.Gamma(torch.full((cells, 1), theta), torch.full((cells, 1), theta / mu)).sample()
    counts = torch.poisson(expression)
    _, held, _ = split_counts(counts, share, 1e4)
    given = counts - held
    covariance = float(((given - given.mean()) * (held - held.mean())).mean())
    expected = share * (1 - share) * mu ** 2 / theta
    assert abs(covariance / expected - 1) < 0.08


def test_a_given_generator_repeats_its_split_and_the_global_one_moves_on():
    counts = poisson_counts(50, 40, 4.0, 2)
    first = split_counts(counts, 0.5, 1e4, torch.Generator().manual_seed(0))[1]
    again = split_counts(counts, 0.5, 1e4, torch.Generator().manual_seed(0))[1]
    assert torch.equal(first, again)
    torch.manual_seed(0)
    one, two = split_counts(counts, 0.5, 1e4)[1], split_counts(counts, 0.5, 1e4)[1]
    assert not torch.equal(one, two)


def test_a_run_records_the_setting_and_resumes_exactly(tmp_path, counts_h5ad):
    straight = train(counts_h5ad, tmp_path / "a", "--count_split", "0.5")
    resumed = train(counts_h5ad, tmp_path / "b", "--count_split", "0.5",
                    "--state_dict", str(tmp_path / "a" / "model_seed=0_step=6.pt"))
    plain = train(counts_h5ad, tmp_path / "c")
    first, second, third = (load_checkpoint(path) for path in (straight, resumed, plain))
    assert first["train_config"]["count_split"] == 0.5 and third["train_config"]["count_split"] == 0.0
    assert all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in first["state_dict"])
    assert not all(torch.equal(first["state_dict"][k], third["state_dict"][k]) for k in first["state_dict"])
    log = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    assert all(row.split(",")[2] for row in log[1:])  # every row has its validation loss


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1"])
def test_a_share_outside_zero_to_one_is_refused(tmp_path, counts_h5ad, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--count_split", value)
    assert exit_info.value.code == 2
    assert "--count_split" in capsys.readouterr().err


@pytest.mark.parametrize("extra, flags", [(["--loss_ae", "mse"], ["--count_split", "--loss_ae nb"]),
                                          (["--count_thinning", "0.3"], ["--count_split", "--count_thinning"])])
def test_the_mse_model_and_thinning_refuse_the_split_in_one_line(tmp_path, counts_h5ad, capsys, extra, flags):
    with pytest.raises(SystemExit) as exit_info:
        train(counts_h5ad, tmp_path, "--count_split", "0.5", *extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and all(flag in err for flag in flags)
    assert not list(tmp_path.glob("*.pt"))
