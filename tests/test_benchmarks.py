"""benchmarks/baselines.py: the frozen variants the benchmarks compare against and their profiling hooks."""
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import nbinom

from benchmarks.baselines import (sample_counts_dense, sample_negative_binomial, timed_sample_counts,
                                  writer_variant)
from guided_diffusion.data import Normalization
from guided_diffusion.sampling.writer import write_decoded_h5ad
from synthetic import small_count_decoder
from VAE.count_model import INVERSE_CDF_MAX_RATIO
from VAE.VAE_model import VAE, Autoencoder


def test_dense_draws_have_the_nb_distribution():
    theta = 0.7
    means = torch.tensor([0.002, 0.04 * theta, theta, 4.0 * theta, 12.0 * theta, 30.0 * theta])
    assert (means / (theta + means))[-2:].min() > INVERSE_CDF_MAX_RATIO  # Gamma-Poisson entries too
    n = 50_000
    draws = sample_negative_binomial(means.repeat(n, 1), torch.full((6,), theta),
                                     torch.Generator().manual_seed(3)).to_dense().numpy()
    p = (theta / (theta + means)).numpy()
    for column in range(6):
        probability = nbinom.pmf(0, theta, p[column])
        assert abs((draws[:, column] == 0).mean() - probability) < 5 * np.sqrt(probability * (1 - probability) / n)
        variance = float(means[column] + means[column] ** 2 / theta)
        assert abs(draws[:, column].mean() - float(means[column])) < 5 * np.sqrt(variance / n)


def test_dense_and_timed_draws_beside_the_product_draws():
    model, latent, totals = small_count_decoder(50, 2000)
    timings = {}
    with torch.inference_mode():
        product = model.sample_counts(latent, totals, torch.Generator().manual_seed(0)).to_dense()
        timed = timed_sample_counts(model, latent, totals, torch.Generator().manual_seed(0), timings).to_dense()
        dense = torch.stack([sample_counts_dense(model, latent, totals, torch.Generator().manual_seed(s)).to_dense()
                             for s in range(40)])
        with pytest.raises(ValueError, match="screened draws"):
            sample_counts_dense(model, latent, totals, torch.Generator(), precision="bf16")
    assert torch.equal(timed, product)  # the timing hooks leave the draws as they are
    assert {"decoder hidden layers", "decoder output layer", "random bytes", "inverse CDF / Gamma-Poisson",
            "CSR"} <= set(timings)
    np.testing.assert_allclose(dense.sum(2).mean().item(), 2000, rtol=0.02)


def test_writer_variant_times_every_stage_and_restores_the_writer(tmp_path):
    torch.manual_seed(0)
    autoencoder = Autoencoder(VAE(20, latent_dim=4, hidden_dims=(8,), loss_ae="nb").eval(),
                              [f"g{i}" for i in range(20)], Normalization())
    latents = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(30)])
    sizes = np.full(30, 500.0, np.float32)
    plain = write_decoded_h5ad(str(tmp_path / "a.h5ad"), autoencoder, latents, obs, {}, chunk_size=8,
                               progress=False, library_sizes=sizes)
    timings = {}
    with writer_variant(timings=timings):
        timed = write_decoded_h5ad(str(tmp_path / "b.h5ad"), autoencoder, latents, obs, {}, chunk_size=8,
                                   progress=False, library_sizes=sizes)
    assert timed == plain
    assert {"decode and draw", "normalize", "write", "annotations", "sync and rename",
            "draw: random bytes"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values())
    assert VAE.sample_counts.__module__ == "VAE.VAE_model"  # the patches are undone
