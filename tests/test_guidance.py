"""Per-key (nested) classifier-free guidance: one weight for every key is today's guidance bit for bit, the
per-key form is the telescoping sum it claims to be, in one batched forward, and it works with the cache
and through cell_sample.py (recorded, validated)."""
import anndata
import numpy as np
import pytest
import torch

from guided_diffusion.diffusion.denoiser import CellUNet
from guided_diffusion.diffusion.feature_cache import refresh_schedule
from guided_diffusion.diffusion.guidance import (guidance_batch, guided_eps, guided_eps_fn, null_condition,
                                                 prefix_coefficients, prefix_condition)
from guided_diffusion.diffusion.respace import create_diffusion
from test_checkpoints import legacy, refused, sample  # noqa: F401

LATENT = 8


def tiny_model(sizes=(3, 2), seed=0):
    torch.manual_seed(seed)
    return CellUNet(latent_dim=LATENT, hidden_dims=(32, 32, 16), condition_sizes=sizes, time_embed_dim=16,
                    cond_embed_dim=16).eval()


def inputs(sizes=(3, 2), batch=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, LATENT, generator=generator)
    t = torch.full((batch,), 600)
    cond = torch.stack([torch.randint(0, size, (batch,), generator=generator) for size in sizes], dim=1)
    return x, t, cond


def classic_eps_fn(model, cond, w):
    """The guidance as it was before per-key weights: (1 + w) eps(cond) - w eps(uncond), one doubled batch."""
    rows = torch.cat([cond, null_condition(cond, model.condition_sizes)])
    scales = model.condition_scales(rows)

    def eps_fn(x, t, step_index):
        eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), rows, cond_scales=scales).chunk(2)
        return (1 + w) * eps_cond - w * eps_uncond
    return eps_fn


def run(eps_fn, cond, diffusion):
    noise = torch.randn(cond.shape[0], LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return diffusion.p_sample_loop(eps_fn, noise.shape, noise=noise, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("w", [0.5, 2.0, -1.0])
def test_one_weight_for_every_key_is_todays_guidance_bit_for_bit(w):
    model, (_, _, cond) = tiny_model(), inputs()
    diffusion = create_diffusion(1000, "20")
    reference = run(classic_eps_fn(model, cond, w), cond, diffusion)
    assert torch.equal(run(guided_eps_fn(model, cond, w), cond, diffusion), reference)
    assert torch.equal(run(guided_eps_fn(model, cond, [w, w]), cond, diffusion), reference)


def test_weight_zero_is_the_conditional_model():
    model, (x, t, cond) = tiny_model(), inputs()
    with torch.no_grad():
        assert torch.equal(guided_eps(model, x, t, cond, [0.0, 0.0]), model(x, t, cond))
        assert torch.equal(guided_eps(model, x, t, cond, 0.0), model(x, t, cond))


def test_per_key_weights_of_a_one_key_model_are_the_single_weight():
    model, (x, t, cond) = tiny_model(sizes=(4,)), inputs(sizes=(4,))
    with torch.no_grad():
        assert torch.equal(guided_eps(model, x, t, cond, [1.5]), guided_eps(model, x, t, cond, 1.5))


def test_per_key_guidance_is_the_nested_sum_of_each_keys_effect():
    model, (x, t, cond) = tiny_model(), inputs()
    w_type, w_donor = 0.7, 2.5
    with torch.no_grad():
        both, type_only, none = (model(x, t, prefix_condition(cond, (3, 2), k)) for k in (2, 1, 0))
        by_hand = both + w_type * (type_only - none) + w_donor * (both - type_only)
        torch.testing.assert_close(guided_eps(model, x, t, cond, [w_type, w_donor]), by_hand, atol=1e-5, rtol=0)
        # equal weights telescope to the classic form
        torch.testing.assert_close(both + 1.2 * (type_only - none) + 1.2 * (both - type_only),
                                   guided_eps(model, x, t, cond, 1.2), atol=1e-5, rtol=0)


def test_only_the_prefixes_with_a_coefficient_run_in_one_batched_forward():
    assert prefix_coefficients([0.5, 0.5]) == [(2, 1.5), (0, -0.5)]
    assert prefix_coefficients([0.0, 2.0]) == [(2, 3.0), (1, -2.0)]  # the type term is off: no null rows
    assert prefix_coefficients([1.0, 3.0]) == [(2, 4.0), (1, -2.0), (0, -1.0)]
    assert sum(c for _, c in prefix_coefficients([0.3, -0.4, 2.0])) == pytest.approx(1.0)
    model, (x, t, cond) = tiny_model(), inputs(batch=4)
    calls = []
    original = model.forward
    model.forward = lambda x, *args, **kwargs: calls.append(len(x)) or original(x, *args, **kwargs)
    with torch.no_grad():
        guided_eps(model, x, t, cond, [1.0, 3.0])
    assert calls == [12]
    rows = guidance_batch(cond, (3, 2), [1.0, 3.0])
    assert torch.equal(rows[:4], cond) and torch.equal(rows[4:8, 0], cond[:, 0]) and (rows[4:8, 1] == 2).all()
    assert (rows[8:] == torch.tensor([3, 2])).all()


def test_the_feature_cache_works_with_per_key_weights():
    model, (_, _, cond) = tiny_model(), inputs()
    diffusion = create_diffusion(1000, "20")
    weights = [0.5, 2.0]
    reference = run(guided_eps_fn(model, cond, weights), cond, diffusion)
    every_step = guided_eps_fn(model, cond, weights, model.make_cache(0), refresh_schedule(20, 1))
    assert torch.equal(run(every_step, cond, diffusion), reference)
    reused = run(guided_eps_fn(model, cond, weights, model.make_cache(0), refresh_schedule(20, 4)), cond, diffusion)
    assert torch.isfinite(reused).all() and not torch.equal(reused, reference)
    assert (reused - reference).abs().max() < 0.5 * reference.abs().max()


def test_cell_sample_takes_per_key_weights_and_records_them(legacy, tmp_path):
    single = anndata.read_h5ad(sample(legacy, tmp_path / "single", "--guide_w", "0.8"))
    both = anndata.read_h5ad(sample(legacy, tmp_path / "both", "--guide_w", "cell_type1=0.8,donor=0.8"))
    assert np.array_equal(single.X.toarray(), both.X.toarray())
    per_key = anndata.read_h5ad(sample(legacy, tmp_path / "per_key", "--guide_w", "donor=3"))
    record = per_key.uns["cfdiffusion"]
    assert dict(record["guide_w"]) == {"cell_type1": 0.0, "donor": 3.0}
    assert "S_k" in record["guidance"] and "S_k" not in single.uns["cfdiffusion"]["guidance"]
    assert single.uns["cfdiffusion"]["guide_w"] == 0.8
    assert not np.array_equal(per_key.X.toarray(), single.X.toarray())


@pytest.mark.parametrize("value, message", [
    ("batch=1", "error: --guide_w key 'batch' is not a label key of this model; label keys: cell_type1, donor"),
    ("donor=nan", "error: --guide_w donor=nan: each weight must be a finite number in [-1, 100] (typically 0 to 5)"),
    ("donor=1,donor=2", "error: argument --guide_w: expected KEY=W[,KEY=W] with each key once, got 'donor=1,donor=2'"),
    ("donor=x", "error: argument --guide_w: donor=x: the weight must be a number"),
])
def test_bad_per_key_weights_are_one_line_errors(legacy, tmp_path, capsys, value, message):
    line = refused(capsys, sample, legacy, tmp_path / "out", f"--guide_w={value}")
    assert line.startswith(message), line
