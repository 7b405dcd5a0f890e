"""The composed (product-of-experts) guidance form: it is the formula it claims, it never evaluates a row
with two keys conditioned, it equals the single-weight guidance for one key, it works with the cache in
one batched forward, and on an additive model it recovers the combination it never queried."""
import numpy as np
import pytest
import torch

from guided_diffusion.diffusion.feature_cache import refresh_schedule
from guided_diffusion.diffusion.guidance import (COMPOSED_FORMULA, composed_coefficients, guidance_formula,
                                                 guided_eps, guided_eps_fn, null_condition, single_key_condition)
from guided_diffusion.diffusion.respace import create_diffusion
from test_guidance import LATENT, inputs, tiny_model


def test_the_composed_form_is_its_formula():
    model, (x, t, cond) = tiny_model(), inputs()
    w_type, w_donor = 0.5, 3.0
    with torch.no_grad():
        none = model(x, t, null_condition(cond, model.condition_sizes))
        type_only = model(x, t, single_key_condition(cond, model.condition_sizes, 0))
        donor_only = model(x, t, single_key_condition(cond, model.condition_sizes, 1))
        by_hand = none + (1 + w_type) * (type_only - none) + (1 + w_donor) * (donor_only - none)
        torch.testing.assert_close(guided_eps(model, x, t, cond, [w_type, w_donor], form="composed"), by_hand,
                                   atol=1e-5, rtol=0)


def test_no_row_conditions_two_keys():
    model, (x, t, cond) = tiny_model(sizes=(3, 2, 4), seed=2), inputs(sizes=(3, 2, 4))
    seen = []
    forward = model.forward

    def recording(x, t, rows, **kwargs):
        seen.append(rows.clone())
        return forward(x, t, rows, **kwargs)

    model.forward = recording
    with torch.no_grad():
        guided_eps(model, x, t, cond, [1.0, 2.0, 0.5], form="composed")
    rows = torch.cat(seen)
    conditioned = (rows != torch.tensor(model.condition_sizes)).sum(dim=1)
    assert int(conditioned.max()) == 1 and len(seen) == 1  # one batched forward, at most one key per row


def test_one_key_composed_is_the_single_weight_guidance():
    model, (x, t, cond) = tiny_model(sizes=(4,)), inputs(sizes=(4,))
    with torch.no_grad():
        assert torch.equal(guided_eps(model, x, t, cond, 1.5, form="composed"), guided_eps(model, x, t, cond, 1.5))


def test_coefficients_sum_to_one_and_skip_zero_terms():
    terms = composed_coefficients([0.5, -1.0, 2.0])
    assert [key for key, _ in terms] == [0, 2, None]  # key 1 has 1 + w = 0: not evaluated
    assert sum(c for _, c in terms) == pytest.approx(1.0)


class AdditiveModel(torch.nn.Module):
    """eps(x, cond) = base + a[type] + b[donor], each key's null value adding 0: the exact model of two
    independent effects, for which the composed form at w = 0 gives eps(type, donor) without querying it."""

    condition_sizes = (3, 2)

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.base = torch.randn(LATENT, generator=generator)
        self.a = torch.cat([torch.randn(3, LATENT, generator=generator), torch.zeros(1, LATENT)])
        self.b = torch.cat([torch.randn(2, LATENT, generator=generator), torch.zeros(1, LATENT)])
        self.queried = []

    def forward(self, x, t, cond, cache=None, cond_scales=None):
        self.queried.append(cond.clone())
        return self.base + self.a[cond[:, 0]] + self.b[cond[:, 1]] + 0 * x

    def condition_scales(self, rows):
        return None


def test_the_composed_form_recovers_an_additive_combination_it_never_queried():
    model, (x, t, cond) = AdditiveModel(), inputs()
    truth = model(x, t, cond)
    model.queried.clear()
    composed = guided_eps(model, x, t, cond, [0.0, 0.0], form="composed")
    torch.testing.assert_close(composed, truth)
    rows = torch.cat(model.queried)
    assert not ((rows[:, 0] < 3) & (rows[:, 1] < 2)).any()


@pytest.mark.parametrize("interval", [1, 3])
def test_composed_guidance_with_the_feature_cache(interval):
    model, (_, _, cond) = tiny_model(), inputs()
    diffusion = create_diffusion(1000, "12")
    noise = torch.randn(cond.shape[0], LATENT, generator=torch.Generator().manual_seed(3))

    def sample(cache, refresh):
        eps_fn = guided_eps_fn(model, cond, [0.5, 2.0], cache, refresh, form="composed")
        with torch.no_grad():
            return diffusion.p_sample_loop(eps_fn, noise.shape, noise=noise,
                                           generator=torch.Generator().manual_seed(4))

    plain = sample(None, None)
    cached = sample(model.make_cache(0), refresh_schedule(diffusion.num_timesteps, interval))
    assert torch.isfinite(cached).all()
    if interval == 1:  # a cache refreshed at every step is no cache
        torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)


def test_unknown_form_is_refused_and_the_formula_is_recorded():
    model, (x, t, cond) = tiny_model(), inputs()
    with pytest.raises(ValueError, match="guidance form"):
        guided_eps(model, x, t, cond, 1.0, form="sum")
    assert guidance_formula({"a": 1.0, "b": 2.0}, "composed") == COMPOSED_FORMULA


def test_mixed_rows_take_each_their_own_form_in_one_forward():
    model, (x, t, cond) = tiny_model(), inputs()
    composed_rows = torch.tensor([True, False] * 5)
    calls = []
    forward = model.forward
    model.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)
    with torch.no_grad():
        mixed = guided_eps(model, x, t, cond, [0.5, 2.0], composed_rows=composed_rows)
        assert len(calls) == 1
        nested = guided_eps(model, x, t, cond, [0.5, 2.0])
        composed = guided_eps(model, x, t, cond, [0.5, 2.0], form="composed")
    torch.testing.assert_close(mixed[composed_rows], composed[composed_rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[~composed_rows], nested[~composed_rows], atol=1e-5, rtol=0)


def test_mixed_rows_take_their_own_weights():
    model, (x, t, cond) = tiny_model(), inputs()
    rows = torch.tensor([True, False] * 5)
    with torch.no_grad():
        mixed = guided_eps(model, x, t, cond, 0.5, composed_rows=rows, composed_weights=[0.5, 4.0])
        seen = guided_eps(model, x, t, cond, 0.5)
        unseen = guided_eps(model, x, t, cond, [0.5, 4.0], form="composed")
        both_composed = guided_eps(model, x, t, cond, 0.5, form="composed", composed_rows=rows,
                                   composed_weights=[0.5, 4.0])
        composed_seen = guided_eps(model, x, t, cond, 0.5, form="composed")
    torch.testing.assert_close(mixed[rows], unseen[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[~rows], seen[~rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(both_composed[~rows], composed_seen[~rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(both_composed[rows], unseen[rows], atol=1e-5, rtol=0)


def test_the_sampler_guides_unseen_conditions_with_the_composed_form_by_default():
    from guided_diffusion.sampling.pipeline import guidance_forms
    from guided_diffusion.sampling.settings import SamplerSettings

    counts = [[0, 0, 30], [1, 1, 20]]  # seen: (0, 0) and (1, 1); (0, 1) was never seen
    plan = [([0, 0], 2), ([0, 1], 3), ([1, 1], 1)]
    rows, forms = guidance_forms(plan, counts, [2, 2], SamplerSettings())
    assert rows.tolist() == [False, False, True, True, True, False] and forms == {"composed": 1, "nested": 2}
    assert guidance_forms(plan, counts, [2, 2], SamplerSettings(guidance_form="nested")) == (None, {"nested": 3})
    rows, forms = guidance_forms(plan, counts, [2, 2], SamplerSettings(guidance_form="composed"))
    assert rows.tolist() == [False, False, True, True, True, False] and forms == {"composed": 3, "nested": 0}
    assert guidance_forms(plan[:1], counts, [2, 2], SamplerSettings()) == (None, {"composed": 0, "nested": 1})


def test_the_unseen_weights_rule():
    from guided_diffusion.sampling.settings import (UNSEEN_DECODED_KEY_WEIGHT, UNSEEN_KEY_WEIGHT,
                                                    resolve_unseen_guide_w)

    keys = ["cell_type1", "donor", "batch"]
    assert resolve_unseen_guide_w(None, 0.5, keys) == {"cell_type1": 0.5, "donor": UNSEEN_KEY_WEIGHT,
                                                       "batch": UNSEEN_KEY_WEIGHT}
    assert resolve_unseen_guide_w(None, {"cell_type1": 1.0, "donor": 0.0, "batch": 0.0}, keys)["cell_type1"] == 1.0
    assert resolve_unseen_guide_w(2.0, 0.5, keys) == {"cell_type1": 2.0, "donor": 2.0, "batch": 2.0}
    assert resolve_unseen_guide_w({"donor": 3.0}, 0.5, keys) == {"cell_type1": 0.0, "donor": 3.0, "batch": 0.0}
    # a key the decoder reads gets the smaller default weight; a flag or a recorded choice still decides
    assert resolve_unseen_guide_w(None, 0.5, keys, decoded_keys=["cell_type1", "donor"]) == {
        "cell_type1": 0.5, "donor": UNSEEN_DECODED_KEY_WEIGHT, "batch": UNSEEN_KEY_WEIGHT}
    assert UNSEEN_DECODED_KEY_WEIGHT != UNSEEN_KEY_WEIGHT
    assert resolve_unseen_guide_w(3.0, 0.5, keys, decoded_keys=["donor"])["donor"] == 3.0
    assert resolve_unseen_guide_w(None, 0.5, keys, {"cell_type1": 1.0, "donor": 1.0, "batch": 1.0},
                                  decoded_keys=["donor"])["donor"] == 1.0


def test_unseen_weights_with_the_nested_form_are_refused():
    from guided_diffusion.core.errors import UsageError
    from guided_diffusion.sampling.settings import SamplerSettings, check_settings

    with pytest.raises(UsageError, match="--unseen_guide_w"):
        check_settings(SamplerSettings(guidance_form="nested", unseen_guide_w=2.0))
    with pytest.raises(UsageError, match="--unseen_guide_w"):
        check_settings(SamplerSettings(unseen_guide_w=float("nan")))


def train_two_key_model(folder, *ae_flags):
    """A tiny cell type x donor model trained in ``folder`` without the combination type_2 x donor1."""
    import cell_train
    from synthetic import make_counts_adata
    from VAE import VAE_train

    adata = make_counts_adata(n_cells=150, n_genes=12, n_types=3, n_donors=2, seed=5)
    held_out = (adata.obs["cell_type1"].astype(str) == "type_2") & (adata.obs["donor"].astype(str) == "donor1")
    adata[~held_out.to_numpy()].copy().write_h5ad(folder / "train.h5ad")
    VAE_train.main(["--data_dir", str(folder / "train.h5ad"), "--num_genes", "12", "--save_dir", str(folder / "ae"),
                    "--max_steps", "5", "--checkpoint_freq", "5", "--hidden_dims", "8", "8", "--latent_dim", "4",
                    "--batch_size", "16", "--progress", "False", *ae_flags])
    cell_train.main(["--data_dir", str(folder / "train.h5ad"), "--vae_path", str(folder / "ae" / "model_seed=0_step=5.pt"),
                     "--label_key", "cell_type1", "--label_key", "donor", "--model_name", "m",
                     "--save_dir", str(folder), "--lr_anneal_steps", "4", "--save_interval", "4",
                     "--hidden_dims", "8", "8", "8", "8", "--batch_size", "16", "--progress", "False"])
    return folder / "m" / "model000004.pt"


@pytest.fixture(scope="module")
def two_key_model(tmp_path_factory):
    """A tiny cell type x donor model trained without the combination type_2 x donor1."""
    return train_two_key_model(tmp_path_factory.mktemp("two_key"))


def test_cell_sample_guides_an_unseen_combination_by_the_rule_and_records_it(two_key_model, tmp_path):
    import anndata

    import cell_sample

    def run(name, *extra):
        cell_sample.main(["--model_path", str(two_key_model), "--sample_dir", str(tmp_path / name),
                          "--num_samples", "6", "--progress", "False", "--precision", "fp32",
                          "--condition", "cell_type1=type_0,donor=donor0",
                          "--condition", "cell_type1=type_2,donor=donor1", *extra])  # the second never seen
        return anndata.read_h5ad(tmp_path / name / "generated.h5ad")

    default, nested = run("default"), run("nested", "--guidance_form", "nested")
    record = default.uns["cfdiffusion"]
    assert dict(record["guidance_forms"]) == {"composed": 1, "nested": 1}
    assert dict(record["unseen_guide_w"]) == {"cell_type1": 0.5, "donor": 4.0}
    assert list(record["unseen_guidance_interval"]) == [0.0, 0.5]
    assert nested.uns["cfdiffusion"].get("unseen_guide_w") in (None, "None")
    folder = tmp_path / "default"
    unseen_file = next(p.name for p in folder.glob("cell2_1_*.npy"))
    seen_file = next(p.name for p in folder.glob("cell0_0_*.npy"))
    assert not np.allclose(np.load(folder / unseen_file), np.load(tmp_path / "nested" / unseen_file), atol=1e-3)
    # the seen cells: the same guidance; the batch's stacked forward differs, so equal up to float rounding
    np.testing.assert_allclose(np.load(folder / seen_file), np.load(tmp_path / "nested" / seen_file), rtol=1e-5,
                               atol=1e-4)


def test_a_decoder_reading_the_donor_takes_the_smaller_default_weight(tmp_path):
    import anndata

    import cell_sample
    from guided_diffusion.sampling.settings import UNSEEN_DECODED_KEY_WEIGHT

    model = train_two_key_model(tmp_path, "--decoder_label_key", "cell_type1,donor")
    cell_sample.main(["--model_path", str(model), "--sample_dir", str(tmp_path / "s"), "--num_samples", "4",
                      "--progress", "False", "--precision", "fp32", "--condition", "cell_type1=type_2,donor=donor1"])
    generated = anndata.read_h5ad(tmp_path / "s" / "generated.h5ad")
    record = generated.uns["cfdiffusion"]
    assert dict(record["unseen_guide_w"]) == {"cell_type1": 0.5, "donor": UNSEEN_DECODED_KEY_WEIGHT}
    assert "UNSEEN_DECODED_KEY_WEIGHT" in record["unseen_guide_w_source"]
    assert list(generated.obs["donor"].astype(str)) == ["donor1"] * 4


# ---- the guidance interval of the composed rows --------------------------------------------------------------
def _eps_at(model, cond, step, **kwargs):
    eps_fn = guided_eps_fn(model, cond, 0.5, **kwargs)
    x = torch.randn(cond.shape[0], LATENT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return eps_fn(x, torch.full((cond.shape[0],), step, dtype=torch.long), 0)


@pytest.mark.parametrize("step", [10, 700])
def test_the_interval_switches_the_unseen_weights_off_outside_it(step):
    model, (_, _, cond) = tiny_model(), inputs()
    rows = torch.tensor([True, False] * 5)
    common = dict(composed_rows=rows, composed_weights=[0.5, 4.0])
    inside, outside = _eps_at(model, cond, step, **common), _eps_at(model, cond, step, composed_rows=rows,
                                                                     composed_weights=[0.0, 0.0])
    limited = _eps_at(model, cond, step, composed_interval=(0.0, 500.0), **common)
    torch.testing.assert_close(limited, inside if step < 500 else outside, atol=1e-5, rtol=0)
    torch.testing.assert_close(limited[~rows], inside[~rows], atol=1e-5, rtol=0)  # seen rows: guided at every step


def test_an_interval_over_every_step_is_no_interval():
    model, (_, _, cond) = tiny_model(), inputs()
    diffusion = create_diffusion(1000, "12")
    noise = torch.randn(cond.shape[0], LATENT, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([True, False] * 5)

    def sample(**extra):
        eps_fn = guided_eps_fn(model, cond, 0.5, composed_rows=rows, composed_weights=[0.5, 4.0], **extra)
        with torch.no_grad():
            return diffusion.p_sample_loop(eps_fn, noise.shape, noise=noise,
                                           generator=torch.Generator().manual_seed(4))

    torch.testing.assert_close(sample(composed_interval=(0.0, float("inf"))), sample(), atol=1e-5, rtol=0)
    assert not torch.allclose(sample(composed_interval=(0.0, 500.0)), sample(), atol=1e-3)


@pytest.mark.parametrize("all_unseen", [True, False])
def test_the_interval_keeps_one_batch_shape_with_a_zero_term(all_unseen):
    """A weight of -1 drops its term from the composed form; with an interval every term is kept, so the stacked
    batch (and a feature cache filled at step 0) is the same inside and outside the interval."""
    model, (_, _, cond) = tiny_model(), inputs()
    rows = torch.ones(10, dtype=torch.bool) if all_unseen else torch.tensor([True, False] * 5)
    sizes = []
    forward = model.forward
    model.forward = lambda x, *args, **kwargs: sizes.append(x.shape[0]) or forward(x, *args, **kwargs)
    eps_fn = guided_eps_fn(model, cond, 0.5, composed_rows=rows, composed_weights=[-1.0, 2.0],
                           composed_interval=(0.0, 500.0))
    x = torch.randn(10, LATENT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        inside = eps_fn(x, torch.full((10,), 100, dtype=torch.long), 0)
        outside = eps_fn(x, torch.full((10,), 900, dtype=torch.long), 1)
        plain = guided_eps(model, x, torch.full((10,), 900, dtype=torch.long), cond, [0.0, 0.0], form="composed")
        weighted = guided_eps(model, x, torch.full((10,), 100, dtype=torch.long), cond, [-1.0, 2.0], form="composed")
    assert sizes[0] == sizes[1]
    torch.testing.assert_close(outside[rows], plain[rows], atol=1e-5, rtol=0)
    torch.testing.assert_close(inside[rows], weighted[rows], atol=1e-5, rtol=0)


def test_interval_settings_are_checked_and_resolved():
    import argparse

    from guided_diffusion.core.errors import UsageError
    from guided_diffusion.sampling.settings import (UNSEEN_GUIDANCE_INTERVAL, SamplerSettings, check_settings,
                                                    interval_timesteps, parse_interval,
                                                    resolve_unseen_guidance_interval)

    assert parse_interval("0,0.5") == (0.0, 0.5)
    with pytest.raises(argparse.ArgumentTypeError, match="LO,HI"):
        parse_interval("0.5")
    for bad in [(0.5, 0.2), (-0.1, 0.5), (0.0, 1.5), (0.0, float("nan"))]:
        with pytest.raises(UsageError, match="--unseen_guidance_interval"):
            check_settings(SamplerSettings(unseen_guidance_interval=bad))
    with pytest.raises(UsageError, match="--guidance_form nested"):
        check_settings(SamplerSettings(guidance_form="nested", unseen_guidance_interval=(0.0, 0.5)))
    assert resolve_unseen_guidance_interval(None) == UNSEEN_GUIDANCE_INTERVAL == (0.0, 0.5)
    assert resolve_unseen_guidance_interval(None, [0.0, 1.0]) == (0.0, 1.0)
    assert resolve_unseen_guidance_interval((0.2, 0.4), [0.0, 1.0]) == (0.2, 0.4)
    assert interval_timesteps((0.0, 0.5), 1000) == (0.0, 500.0)
    assert interval_timesteps((0.5, 1.0), 1000) == (500.0, float("inf"))  # the last timestep (999) included


def test_a_bad_interval_flag_is_one_line(two_key_model, tmp_path, capsys):
    import cell_sample
    from test_checkpoints import refused

    line = refused(capsys, cell_sample.main, ["--model_path", str(two_key_model), "--sample_dir", str(tmp_path / "s"),
                                              "--condition", "cell_type1=type_2,donor=donor1",
                                              "--unseen_guidance_interval", "0.7,0.2"])
    assert line.startswith("error: --unseen_guidance_interval 0.7,0.2:")
    assert not (tmp_path / "s" / "generated.h5ad").exists()
    line = refused(capsys, cell_sample.main, ["--model_path", str(two_key_model), "--sample_dir", str(tmp_path / "s"),
                                              "--unseen_guidance_interval", "0.5"])
    assert line.startswith("error: argument --unseen_guidance_interval: expected LO,HI")
    line = refused(capsys, cell_sample.main, ["--model_path", str(two_key_model), "--sample_dir", str(tmp_path / "s"),
                                              "--unseen_guidance_interval", "0,0.5", "--guidance_form", "nested"])
    assert line.startswith("error: --unseen_guidance_interval applies to the composed form")
