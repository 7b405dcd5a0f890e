"""The screened negative-binomial count draws (the sampler's): the same distribution as scipy's NB and as the
dense draws they replaced (benchmarks/baselines.py), no entry lost by the byte screen, reproducible,
independent of the block size."""
import numpy as np
import pytest
import torch
from scipy.stats import nbinom

from benchmarks.baselines import sample_negative_binomial
from synthetic import small_count_decoder
from VAE.count_model import (_fine_uniforms, _heavy_threshold, _inverse_cdf_draws, _random_bytes,
                             sample_negative_binomial_screened)


def means_for(theta):
    # tiny means (most genes), small ones, one in between and two past the heavy-tail ratio (Gamma-Poisson)
    return torch.tensor([0.0004, 0.002, 0.04 * theta, 0.3, theta, 4.0 * theta, 8.0 * theta, 12.0 * theta,
                         30.0 * theta])


def screened(means, theta, n, seed, block_rows=4096):
    """Draws of n cells whose decoded means are ``means`` (logits log(means), library size their sum)."""
    logits = torch.log(means).repeat(n, 1)
    totals = torch.full((n,), float(means.sum()))
    return sample_negative_binomial_screened(logits, totals, theta, torch.Generator().manual_seed(seed),
                                             block_rows=block_rows)


def assert_matches_nbinom(draws, means, theta):
    n = len(draws)
    assert torch.equal(draws, torch.round(draws)) and (draws >= 0).all()
    p = (theta / (theta + means.double())).numpy()
    for column in range(len(means)):
        values = draws[:, column].numpy()
        for k in range(3):  # P(0), P(1), P(2) within 5 standard errors (+1e-5 for the tiny ones)
            probability = nbinom.pmf(k, theta, p[column])
            assert abs((values == k).mean() - probability) < 5 * np.sqrt(probability * (1 - probability) / n) + 1e-5
        mean = float(means[column])
        variance = mean + mean ** 2 / theta
        assert abs(values.mean() - mean) < 5 * np.sqrt(variance / n)
        # the variance too: its standard error from the NB's fourth central moment
        fourth = nbinom.moment(4, theta, p[column]) - 4 * mean * nbinom.moment(3, theta, p[column]) \
            + 6 * mean ** 2 * nbinom.moment(2, theta, p[column]) - 3 * mean ** 4
        assert abs(values.var() - variance) < 5 * np.sqrt(max(fourth - variance ** 2, 0) / n) + 1e-5


@pytest.mark.parametrize("theta", [0.05, 0.7, 1.9, 4.0, 30.0])
def test_draws_match_scipy_nbinom(theta):
    means = means_for(theta)
    heavy = means > _heavy_threshold(torch.tensor(theta))
    assert heavy[-2:].all() and not heavy[:4].any()  # both the inverse CDF and Gamma-Poisson are tested
    thetas = torch.full((len(means),), theta)
    draws = screened(means, thetas, 100_000, seed=3, block_rows=4099).to_dense()  # a partial last block
    # the float32 means the draws were asked for
    assert_matches_nbinom(draws, torch.softmax(torch.log(means), 0) * means.sum(), theta)


def test_screened_and_dense_draw_the_same_distribution():
    """Per gene, the two paths' frequencies of 0, 1, 2, 3+ agree (two-sample, 5 standard errors)."""
    torch.manual_seed(0)
    n, genes = 40_000, 40
    theta = torch.exp(torch.empty(genes).uniform_(-2, 3))
    means = torch.exp(torch.empty(genes).uniform_(-8, 3))
    a = screened(means, theta, n, seed=1).to_dense()
    b = sample_negative_binomial((torch.softmax(torch.log(means), 0) * means.sum()).repeat(n, 1), theta,
                                 torch.Generator().manual_seed(2)).to_dense()
    for k in range(4):
        fa = ((a == k) if k < 3 else (a >= k)).double().mean(0)
        fb = ((b == k) if k < 3 else (b >= k)).double().mean(0)
        pooled = (fa + fb) / 2
        assert ((fa - fb).abs() <= 5 * torch.sqrt(pooled * (1 - pooled) * 2 / n) + 1e-4).all(), k
    assert abs(float(a.mean() - b.mean())) < 0.02 * float(means.mean())


def test_the_walk_is_the_nb_quantile_function():
    """Given the uniforms, the inverse-CDF draw is scipy's nbinom.ppf of them (not only in distribution)."""
    rng = np.random.default_rng(0)
    count = 20_000
    theta = torch.tensor(np.exp(rng.uniform(-2, 3, 50)), dtype=torch.float32)
    genes = torch.as_tensor(rng.integers(0, 50, count))
    t = theta[genes]
    mean = (t * torch.as_tensor(rng.uniform(0.001, 8.5, count), dtype=torch.float32)).float()  # ratio < 0.9
    u = torch.as_tensor(rng.uniform(1e-12, 1.0, count))
    draws = _inverse_cdf_draws(mean, u, theta, genes, _heavy_threshold(theta), torch.Generator().manual_seed(0))
    m, td = mean.double().numpy(), t.double().numpy()
    expected = nbinom.ppf(u.numpy(), td, td / (td + m))
    walked = (mean <= _heavy_threshold(theta)[genes]).numpy()  # the others are Gamma-Poisson draws
    assert walked.mean() > 0.5 and expected[walked].max() > 30
    assert np.array_equal(draws.numpy()[walked], expected[walked])


def test_the_byte_screen_loses_no_entry():
    """Every entry's draw is the NB quantile of its uniform v = (byte + w) / 256: the entries the screen
    drops (byte >= 256 x mean) have a zero quantile even at their smallest possible v, byte / 256."""
    torch.manual_seed(0)
    n, genes, block = 96, 700, 32
    theta = torch.exp(torch.empty(genes).uniform_(0.5, 3))  # theta > 1.6: only large means are Gamma-Poisson
    logits = torch.randn(n, genes) * 2
    totals = torch.full((n,), 300.0)
    draws = sample_negative_binomial_screened(logits, totals, theta, torch.Generator().manual_seed(7),
                                              block_rows=block).to_dense()
    mean = torch.softmax(logits, 1) * totals[:, None]
    # the same random stream: the bytes block by block, then a fine uniform per candidate
    generator = torch.Generator().manual_seed(7)
    bytes_ = torch.cat([_random_bytes(block * genes, generator, "cpu") for _ in range(0, n, block)]).view(n, genes)
    candidates = bytes_.float() < mean * 256
    w = torch.zeros(n, genes, dtype=torch.float64)
    w[candidates] = _fine_uniforms(int(candidates.sum()), generator, "cpu")
    v = (bytes_.double() + w) / 256
    m, t = mean.double().numpy(), theta.double().numpy()[None, :].repeat(n, 0)
    expected = nbinom.ppf(1 - v.numpy(), t, t / (t + m))
    walked = (mean <= _heavy_threshold(theta)).numpy()  # the others (0.3%) are Gamma-Poisson draws
    assert walked.mean() > 0.99
    assert np.array_equal(draws.numpy()[walked], expected[walked])
    assert (expected[~candidates.numpy()] == 0).all() and draws.sum() > 0
    assert candidates.float().mean() < 1.5 * (draws > 0).float().mean() + 1 / 256 + 0.01  # the screen is tight


def test_screened_draws_are_reproducible_and_independent_of_the_block_size():
    torch.manual_seed(0)
    means = torch.exp(torch.empty(333).uniform_(-9, 2))
    theta = torch.exp(torch.empty(333).uniform_(-3, 2))  # some heavy-tailed entries (Gamma-Poisson)
    first = screened(means, theta, 200, seed=11, block_rows=8).to_dense()
    for block_rows in (8, 64, 200, 1024):  # any multiple of 8 rows: the same random stream
        assert torch.equal(screened(means, theta, 200, seed=11, block_rows=block_rows).to_dense(), first)
    assert not torch.equal(screened(means, theta, 200, seed=12).to_dense(), first)


def test_sample_counts_draws_the_requested_library_sizes():
    model, latent, totals = small_count_decoder(50, 2000)
    with torch.inference_mode():
        draws = torch.stack([model.sample_counts(latent, totals, torch.Generator().manual_seed(s)).to_dense()
                             for s in range(40)])
    np.testing.assert_allclose(draws.sum(2).mean().item(), 2000, rtol=0.02)
