"""The autoencoder's fast training path computes what the straightforward one computes."""
import csv

import numpy as np
import pytest
import torch

from benchmarks.bench_training import (VARIANTS, SparseInputLinear, dense_negative_binomial_nll,
                                      indexed_negative_binomial_nll, no_likelihood, to_csr, training_step)
from guided_diffusion.training.optim import adamw
from VAE.count_model import negative_binomial_nll
from VAE.VAE_model import VAE


def sparse_counts(generator, shape, zero_fraction=0.9):
    counts = torch.poisson(torch.rand(shape, generator=generator, dtype=torch.float64) * 8, generator=generator)
    return counts * (torch.rand(shape, generator=generator, dtype=torch.float64) > zero_fraction)


def test_sparse_negative_binomial_nll_equals_the_dense_formula_and_its_gradients():
    generator = torch.Generator().manual_seed(0)
    counts = sparse_counts(generator, (16, 50))
    assert 0 < int((counts > 0).sum()) < counts.numel() // 4
    assert 0 < int(((counts > 0).sum(dim=0) == 0).sum()) and int((counts > 0).sum(dim=0).max()) > 1  # lgamma(theta)
    results = []  # is weighted by each gene's non-zero count: genes with none and genes with several
    for nll in (negative_binomial_nll, indexed_negative_binomial_nll, dense_negative_binomial_nll):
        log_mean = (torch.randn(16, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
                    ).requires_grad_()
        log_theta = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64).requires_grad_()
        loss = nll(log_mean, log_theta, counts)
        loss.backward()
        results.append((loss.detach(), log_mean.grad, log_theta.grad))
    for sparse, indexed, dense in zip(*results):
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(indexed, dense, rtol=1e-12, atol=1e-12)


def test_csr_first_layer_matches_the_dense_linear_forward_and_weight_gradient():
    generator = torch.Generator().manual_seed(3)
    x = sparse_counts(generator, (12, 40)).float()
    dense = torch.nn.Linear(40, 8)
    weight, bias = (p.detach().clone().requires_grad_() for p in (dense.weight, dense.bias))
    target = torch.randn(12, 8, generator=generator)
    ((dense(x) - target) ** 2).sum().backward()
    output = SparseInputLinear.apply(to_csr(x), weight, bias)
    ((output - target) ** 2).sum().backward()
    torch.testing.assert_close(output, dense(x))
    torch.testing.assert_close(weight.grad, dense.weight.grad)
    torch.testing.assert_close(bias.grad, dense.bias.grad)


def test_bf16_forward_is_float32_close_to_fp32_and_not_part_of_the_config():
    torch.manual_seed(0)
    model = VAE(300, latent_dim=16, hidden_dims=(64, 64), loss_ae="nb").eval()
    x = torch.log1p(sparse_counts(torch.Generator().manual_seed(4), (32, 300)).float())
    config = model.config()
    assert model.set_precision("fp32") == "fp32"
    with torch.no_grad():
        reference, reference_latent = model(x)
        expected = model.decoder(torch.nn.functional.normalize(model.encoder(x), dim=1))
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)  # fp32 is today's computation exactly
    assert model.set_precision("bf16") == "bf16"
    with torch.no_grad():
        output, latent = model(x)
    assert output.dtype == latent.dtype == torch.float32
    assert not torch.equal(output, reference)  # the matmuls did run in bf16
    torch.testing.assert_close(latent, reference_latent, rtol=0.05, atol=0.03)
    torch.testing.assert_close(output, reference, rtol=0.05, atol=0.05)
    assert model.config() == config
    assert model.set_precision("auto", "cpu") in ("fp32", "bf16")


def test_bf16_training_step_keeps_float32_master_weights_and_loss():
    torch.manual_seed(0)
    model = VAE(200, latent_dim=8, hidden_dims=(32,), loss_ae="nb")
    model.set_precision("bf16")
    counts = sparse_counts(torch.Generator().manual_seed(5), (16, 200)).float()
    totals = counts.sum(dim=1).clamp_min(1)
    x = torch.log1p(counts / totals[:, None] * 1e4)
    output, _ = model(x)
    loss = model.reconstruction_loss(output, x, counts, totals)
    loss.backward()
    assert loss.dtype == torch.float32 and np.isfinite(float(loss.detach()))
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters())


@pytest.mark.parametrize("bound", [name for name in VARIANTS if name.startswith("bound")])
def test_the_bound_rows_reach_every_layer_and_change_no_weight(bound):
    nll, _, _, csr_input, update = VARIANTS[bound]
    assert not update and nll in (negative_binomial_nll, no_likelihood)
    torch.manual_seed(0)
    model = VAE(200, latent_dim=8, hidden_dims=(32,), loss_ae="nb")
    counts = sparse_counts(torch.Generator().manual_seed(6), (16, 200)).float()
    totals = counts.sum(dim=1).clamp_min(1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = adamw(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss = training_step(model, optimizer, (torch.log1p(counts / totals[:, None] * 1e4), counts, totals), nll,
                         csr_input, update)
    assert np.isfinite(float(loss.detach()))
    assert model.encoder[0].weight.grad is not None and float(model.encoder[0].weight.grad.abs().sum()) > 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("enabled", [True, False])
def test_heap_reuse_setting_is_accepted(enabled):
    from guided_diffusion.core.memory import reuse_freed_memory

    try:
        import ctypes.util

        has_glibc = ctypes.util.find_library("c") is not None
    except ImportError:
        has_glibc = False
    assert reuse_freed_memory(enabled) == has_glibc
    reuse_freed_memory(False)


def test_training_cli_precision_flag_bf16_trains_like_fp32(tmp_path, counts_h5ad):
    from guided_diffusion.core.container import load_checkpoint
    from VAE import VAE_train

    def train(name, precision):
        path = VAE_train.main(["--data_dir", str(counts_h5ad), "--save_dir", str(tmp_path / name), "--progress",
                               "False", "--batch_size", "32", "--hidden_dims", "64", "--max_steps", "20",
                               "--precision", precision])
        with open(tmp_path / name / "train_log.csv") as stream:
            last = list(csv.DictReader(stream))[-1]
        return load_checkpoint(path), float(last["val_loss"])

    (fp32, fp32_loss), (bf16, bf16_loss) = train("fp32", "fp32"), train("bf16", "bf16")
    assert fp32["train_config"]["precision"] == "fp32" and bf16["train_config"]["precision"] == "bf16"
    assert fp32["model_config"] == bf16["model_config"]  # the checkpoint does not depend on the precision
    weights = [(a, bf16["state_dict"][name]) for name, a in fp32["state_dict"].items() if a.is_floating_point()]
    assert any(not torch.equal(a, b) for a, b in weights)  # bf16 matmuls did run
    assert abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss  # held-out NB loss after the same steps
