"""The diffusion trainer's fast paths compute what today's straightforward ones compute."""
import warnings

import numpy as np
import pytest
import torch

from benchmarks.baselines import (ForwardBackwardOnly, OneCastForward, OneCastTrainer, TodayTrainer,
                                  todays_projections)
from benchmarks.bench_diffusion_training import compiled_denoiser
from guided_diffusion.diffusion.denoiser import CellUNet, gather_rows, unique_rows
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.training.trainer import DiffusionTrainer

SIZES = (3, 2)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return CellUNet(latent_dim=8, hidden_dims=(32, 32, 16), condition_sizes=SIZES, time_embed_dim=16,
                    cond_embed_dim=16)


def inputs(batch=24, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    t[:6] = t[6]  # some repeated timesteps
    cond = torch.stack([torch.randint(0, s + 1, (batch,), generator=generator) for s in SIZES], dim=1)
    return x, t, cond


def forward_and_gradients(model, x, t, cond, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(x, t, cond, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reference", ["today", "per-row"])
def test_fast_gathers_give_todays_outputs_and_gradients(reference):
    model = tiny_model()
    x, t, cond = inputs()
    fast, fast_grads = forward_and_gradients(model, x, t, cond)
    if reference == "per-row":
        slow, slow_grads = forward_and_gradients(model, x, t, cond, gather_embeddings=False)
    else:
        with todays_projections():
            slow, slow_grads = forward_and_gradients(model, x, t, cond)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert fast_grads.keys() == slow_grads.keys()
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_gather_rows_is_indexing_with_the_same_gradient():
    rows = torch.randn(5, 7, requires_grad=True)
    index = torch.tensor([4, 0, 0, 2, 1, 3, 4, 4])
    weights = torch.randn(8, 7)
    (gather_rows(rows, index) * weights).sum().backward()
    fast = rows.grad.clone()
    rows.grad = None
    (rows[index] * weights).sum().backward()
    assert torch.equal(gather_rows(rows, index), rows[index])
    torch.testing.assert_close(fast, rows.grad)
    assert gather_rows(rows, None) is rows


def test_unique_rows_equals_unique_dim0():
    generator = torch.Generator().manual_seed(0)
    sizes = (14, 3, 7)
    rows = torch.stack([torch.randint(0, s + 1, (300,), generator=generator) for s in sizes], dim=1)
    unique, index = unique_rows(rows, sizes)
    expected, expected_index = torch.unique(rows, dim=0, return_inverse=True)
    assert torch.equal(unique, expected) and torch.equal(index, expected_index)
    assert torch.equal(unique[index], rows)


def trainer(trainer_class=DiffusionTrainer, tmp_path=None, **kwargs):
    generator = np.random.default_rng(0)
    latents = generator.standard_normal((60, 8)).astype(np.float32)
    labels = np.stack([generator.integers(0, s, 60) for s in SIZES], axis=1)
    return trainer_class(tiny_model(), create_diffusion(1000), latents, labels, {}, str(tmp_path), batch_size=16,
                         lr=1e-3, seed=3, **kwargs)


def test_foreach_ema_and_stacked_projections_train_like_todays_step(tmp_path):
    fast, today = trainer(tmp_path=tmp_path / "fast"), trainer(TodayTrainer, tmp_path=tmp_path / "today")
    for _ in range(5):
        fast_losses, fast_t = fast.run_step()
        today_losses, today_t = today.run_step()
        assert torch.equal(fast_t, today_t)
        torch.testing.assert_close(fast_losses, today_losses, atol=1e-5, rtol=1e-4)
    for fast_param, today_param in zip(fast.ema_model.parameters(), today.ema_model.parameters()):
        torch.testing.assert_close(fast_param, today_param, atol=1e-5, rtol=1e-4)


def test_foreach_ema_is_the_per_tensor_update_exactly(tmp_path):
    fast, today = trainer(tmp_path=tmp_path / "a"), trainer(TodayTrainer, tmp_path=tmp_path / "b")
    today.model.load_state_dict(fast.model.state_dict())
    today.ema_model.load_state_dict(fast.ema_model.state_dict())
    with torch.no_grad():
        for p in list(fast.model.parameters()):
            p.add_(1.0)
        today.model.load_state_dict(fast.model.state_dict())
    for step in (0, 7, 1000):
        fast.step = today.step = step
        DiffusionTrainer._update_ema(fast)
        TodayTrainer._update_ema(today)
    for a, b in zip(fast.ema_model.parameters(), today.ema_model.parameters()):
        assert torch.equal(a, b)


def test_bf16_training_steps_follow_fp32(tmp_path):
    fp32, bf16 = trainer(tmp_path=tmp_path / "a", precision="fp32"), trainer(tmp_path=tmp_path / "b", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    first32, _ = fp32.run_step()
    first16, _ = bf16.run_step()
    torch.testing.assert_close(first16, first32, rtol=0.05, atol=0.02)
    for _ in range(10):
        fp32.run_step(), bf16.run_step()
    for a, b in zip(fp32.model.parameters(), bf16.model.parameters()):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.01)


def test_compiled_denoiser_matches_eager_or_falls_back(monkeypatch):
    model = tiny_model()
    x, t, cond = inputs()

    def unavailable(function, **kwargs):
        def fails(*args):
            raise RuntimeError("no C++ compiler")
        return fails

    monkeypatch.setattr(torch, "compile", unavailable)
    fallback = compiled_denoiser(model)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        out = fallback(x, t, cond=cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fallback(x, t, cond=cond)
    expected = model(x, t, cond)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, expected, atol=1e-5, rtol=1e-5)


def test_one_weight_cast_per_step_is_autocasts_step_bit_for_bit(tmp_path):
    adopted = trainer(tmp_path=tmp_path / "a", precision="bf16")
    one_cast = trainer(OneCastTrainer, tmp_path=tmp_path / "b", precision="bf16")
    assert isinstance(one_cast.replica, OneCastForward) and len(one_cast.replica.names) == 2 * sum(
        isinstance(m, torch.nn.Linear) for m in one_cast.model.modules())
    for _ in range(4):
        adopted_losses, _ = adopted.run_step()
        one_cast_losses, _ = one_cast.run_step()
        assert torch.equal(adopted_losses, one_cast_losses)
    for a, b in zip(adopted.model.parameters(), one_cast.model.parameters()):
        assert torch.equal(a, b)


def test_the_forward_backward_bound_computes_gradients_and_changes_no_weights(tmp_path):
    bound = trainer(ForwardBackwardOnly, tmp_path=tmp_path, precision="bf16")
    before = [p.detach().clone() for p in bound.model.parameters()]
    ema_before = [p.detach().clone() for p in bound.ema_model.parameters()]
    losses, _ = bound.run_step()
    assert torch.isfinite(losses).all() and bound.step == 1
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bound.model.encoder[0].parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, bound.model.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(ema_before, bound.ema_model.parameters()))
