"""DPM-Solver++(2M): with the ideal noise predictor of Gaussian data it reproduces the data and the
probability-flow trajectory of many-step DDIM, in 10-20 network evaluations."""
import pytest
import torch

from guided_diffusion.diffusion.respace import create_diffusion

DATA_MEAN = torch.tensor([0.5, -0.3, 0.0, 0.8])
DATA_STD = torch.tensor([0.3, 0.6, 0.1, 0.45])


def ideal_eps_fn(base_alphas_cumprod):
    """E[eps | x_t] for data ~ N(DATA_MEAN, DATA_STD^2), at the model (original) timesteps."""
    alphas_cumprod = torch.as_tensor(base_alphas_cumprod, dtype=torch.float64)

    def eps_fn(x, t, step_index):
        alpha_bar = alphas_cumprod[t].to(x.dtype)[:, None]
        variance = alpha_bar * DATA_STD ** 2 + 1 - alpha_bar
        return torch.sqrt(1 - alpha_bar) * (x - torch.sqrt(alpha_bar) * DATA_MEAN) / variance

    return eps_fn


@pytest.fixture(scope="module")
def setup():
    eps_fn = ideal_eps_fn(create_diffusion(1000).alphas_cumprod)
    noise = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    reference = create_diffusion(1000, "1000").ddim_sample_loop(eps_fn, noise.shape, noise=noise)
    return eps_fn, noise, reference


@pytest.mark.parametrize("steps", [10, 15, 20])
def test_dpm_solver_reproduces_the_gaussian_data_distribution(setup, steps):
    eps_fn, noise, _ = setup
    samples = create_diffusion(1000, f"logsnr{steps}").dpm_solver_sample_loop(eps_fn, noise.shape, noise=noise)
    torch.testing.assert_close(samples.mean(dim=0), DATA_MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(dim=0), DATA_STD, atol=0.0, rtol=0.08)


def test_evenly_spaced_timesteps_leave_too_few_steps_near_the_data():
    """The reason for log-SNR spacing: on 10 evenly spaced timesteps the narrowest dimension comes out
    at about a third of its spread (with DPM-Solver++ and with DDIM alike)."""
    eps_fn, noise = ideal_eps_fn(create_diffusion(1000).alphas_cumprod), torch.randn(4000, 4)
    samples = create_diffusion(1000, "10").dpm_solver_sample_loop(eps_fn, noise.shape, noise=noise)
    assert float(samples.std(dim=0)[2]) < 0.5 * float(DATA_STD[2])


@pytest.mark.parametrize("steps", [2, 10, 50, 1000])
def test_log_snr_spacing_gives_distinct_steps_from_first_to_last(steps):
    diffusion = create_diffusion(1000, f"logsnr{steps}")
    kept = diffusion.timestep_map.tolist()
    assert len(kept) == steps and kept[0] == 0 and kept[-1] == 999 and kept == sorted(set(kept))
    _, _, log_snr = diffusion.dpm_solver_coefficients()
    if steps == 10:  # evenly spaced in log-SNR within the rounding to whole timesteps
        gaps = log_snr[:-1] - log_snr[1:]
        assert gaps.max() < 1.3 * gaps.mean() and gaps.min() > 0.7 * gaps.mean()


def test_dpm_solver_follows_the_many_step_ddim_trajectory_and_beats_ddim_at_equal_steps(setup):
    eps_fn, noise, reference = setup
    errors = {}
    for steps in ("logsnr10", "logsnr20"):
        diffusion = create_diffusion(1000, steps)
        dpm = diffusion.dpm_solver_sample_loop(eps_fn, noise.shape, noise=noise)
        ddim = diffusion.ddim_sample_loop(eps_fn, noise.shape, noise=noise)
        errors[steps] = (float((dpm - reference).abs().max()), float((ddim - reference).abs().max()))
    assert errors["logsnr20"][0] < 0.06
    for dpm_error, ddim_error in errors.values():
        assert dpm_error < ddim_error / 3  # second order: far closer than first-order DDIM at equal cost


def test_dpm_solver_calls_the_model_once_per_step_with_the_respaced_timesteps_and_step_indices():
    diffusion = create_diffusion(1000, "12")
    calls = []
    eps_fn = ideal_eps_fn(create_diffusion(1000).alphas_cumprod)

    def recording_eps_fn(x, t, step_index):
        calls.append((int(t[0]), step_index))
        return eps_fn(x, t, step_index)

    diffusion.dpm_solver_sample_loop(recording_eps_fn, (3, 4), generator=torch.Generator().manual_seed(1))
    assert [index for _, index in calls] == list(range(12))
    assert [t for t, _ in calls] == sorted(diffusion.timestep_map.tolist(), reverse=True)


@pytest.mark.parametrize("cache_interval", [1, 3])
def test_sampler_runs_dpm_solver_with_guidance_and_the_feature_cache(cache_interval):
    from guided_diffusion.diffusion.denoiser import CellUNet
    from guided_diffusion.sampling.settings import SamplerSettings
    from guided_diffusion.sampling.reverse import sample_latents

    torch.manual_seed(0)
    model = CellUNet(latent_dim=8, hidden_dims=[32, 16], condition_sizes=(3,)).eval()
    cond = torch.tensor([[0], [1], [2], [1]])
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))

    def run(**changes):
        values = dict(timestep_respacing="logsnr12", solver="dpmpp2m", cache_interval=cache_interval, branch=0,
                      non_uniform=False, precision="fp32", batch_size=2, guide_w=0.5)
        values.update(changes)
        return sample_latents(model, cond, noise, SamplerSettings(**values), progress=False)

    latents = run()
    assert latents.shape == (4, 8) and torch.isfinite(latents).all()
    torch.testing.assert_close(run(seed=7), latents, rtol=0, atol=0)  # deterministic: no step noise
    assert not torch.allclose(run(solver="", use_ddim=True), latents)


def test_cell_sample_passes_the_solver_flag_through():
    import cell_sample

    args = cell_sample.build_parser().parse_args(["--model_path", "m.pt", "--solver", "dpmpp2m",
                                                  "--timestep_respacing", "logsnr15"])
    settings = cell_sample.settings_from_args(args)
    assert settings.solver == "dpmpp2m" and settings.timestep_respacing == "logsnr15"
    assert "DPM-Solver++(2M) logsnr15 steps" in settings.describe()


def _resolved(*flags):
    import cell_sample
    from guided_diffusion.sampling.settings import resolve_settings

    args = cell_sample.build_parser().parse_args(["--model_path", "m.pt", *flags])
    return resolve_settings(cell_sample.settings_from_args(args), {"cache_interval": 5, "branch": 0,
                                                                   "non_uniform": False}, "cpu")


def test_the_default_is_sde_dpm_solver_on_log_snr_steps_and_the_original_command_lines_keep_their_sampler():
    from guided_diffusion.sampling.settings import FAITHFUL_FLAGS

    default = _resolved()
    assert (default.solver, default.timestep_respacing, default.cache_interval) == ("dpmpp2m_sde", "logsnr10", 1)
    assert default.describe().startswith("SDE-DPM-Solver++(2M) logsnr10 steps")
    assert _resolved("--solver", "dpmpp2m").solver == "dpmpp2m"  # the ODE form (an earlier default, CHANGELOG.md)
    faithful = _resolved(*FAITHFUL_FLAGS.split())
    assert (faithful.solver, faithful.use_ddim, faithful.timestep_respacing, faithful.cache_interval,
            faithful.precision) == ("", False, "1000", 5, "fp32")
    assert faithful.describe().startswith("DDPM 1000 steps")
    assert _resolved("--timestep_respacing", "50").describe().startswith("DDPM 50 steps")  # the previous default
    ddim = _resolved("--use_ddim", "True", "--timestep_respacing", "ddim50")
    assert ddim.solver == "" and ddim.describe().startswith("DDIM ddim50 steps")
    assert _resolved("--solver", "ddpm", "--timestep_respacing", "20").solver == ""
    assert _resolved("--solver", "dpmpp2m", "--timestep_respacing", "20").solver == "dpmpp2m"


@pytest.mark.parametrize("flags, message", [
    (["--use_ddim", "True"], "with --use_ddim True give DDIM steps, e.g. --timestep_respacing ddim10"),
    (["--solver", "ddpm"], "--timestep_respacing logsnr10 spaces the steps in log-SNR for DPM-Solver++, but "
                           "--solver ddpm is not one; drop --solver"),
])
def test_log_snr_steps_without_dpm_solver_are_refused_naming_the_flag(flags, message):
    from guided_diffusion.core.errors import UsageError

    with pytest.raises(UsageError, match=message.replace("+", r"\+")):
        _resolved(*flags)


def test_auto_runs_what_it_resolves_to():
    from guided_diffusion.diffusion.denoiser import CellUNet
    from guided_diffusion.sampling.settings import DEFAULT_SETTINGS
    from guided_diffusion.sampling.reverse import sample_latents
    from dataclasses import replace

    torch.manual_seed(0)
    model = CellUNet(latent_dim=8, hidden_dims=[32, 16], condition_sizes=(3,)).eval()
    cond = torch.tensor([[0], [1], [2], [1]])
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    common = dict(cache_interval=1, branch=0, non_uniform=False, precision="fp32")

    def run(**changes):
        return sample_latents(model, cond, noise, replace(DEFAULT_SETTINGS, **common, **changes), progress=False)

    torch.testing.assert_close(run(), run(solver="dpmpp2m_sde"), rtol=0, atol=0)
    assert not torch.allclose(run(), run(solver="dpmpp2m"))
    ddpm = run(timestep_respacing="20", seed=3)
    torch.testing.assert_close(ddpm, run(timestep_respacing="20", seed=3, solver="ddpm"), rtol=0, atol=0)
    torch.testing.assert_close(ddpm, run(timestep_respacing="20", seed=3, solver=""), rtol=0, atol=0)
    assert not torch.allclose(ddpm, run(timestep_respacing="20", seed=3, solver="dpmpp2m"))


# ---- SDE-DPM-Solver++(2M): the stochastic form -----------------------------------------------------
@pytest.mark.parametrize("steps, spread", [(15, 0.05), (20, 0.04)])
def test_sde_dpm_solver_reproduces_the_gaussian_data_distribution(setup, steps, spread):
    eps_fn, noise, _ = setup
    samples = create_diffusion(1000, f"logsnr{steps}").dpm_solver_sample_loop(
        eps_fn, noise.shape, noise=noise, stochastic=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples.mean(dim=0), DATA_MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(samples.std(dim=0), DATA_STD, atol=0.0, rtol=spread)


def test_sde_dpm_solver_draws_step_noise_from_its_generator(setup):
    eps_fn, noise, _ = setup
    diffusion = create_diffusion(1000, "logsnr10")

    def run(seed, stochastic=True):
        return diffusion.dpm_solver_sample_loop(eps_fn, noise[:500].shape, noise=noise[:500], stochastic=stochastic,
                                                generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.allclose(run(3), run(4))
    ode = run(3, stochastic=False)
    torch.testing.assert_close(ode, run(4, stochastic=False), rtol=0, atol=0)
    # the same start, other paths: the SDE's cells are not the ODE's, yet from the same distribution
    assert float((run(3) - ode).abs().mean()) > 0.05


def test_the_sde_solver_is_one_flag_and_runs_in_the_sampler():
    from guided_diffusion.diffusion.denoiser import CellUNet
    from guided_diffusion.sampling.reverse import sample_latents

    settings = _resolved("--solver", "dpmpp2m_sde", "--timestep_respacing", "logsnr15")
    assert settings.solver == "dpmpp2m_sde" and settings.describe().startswith("SDE-DPM-Solver++(2M) logsnr15 steps")
    torch.manual_seed(0)
    model = CellUNet(latent_dim=8, hidden_dims=[32, 16], condition_sizes=(3,)).eval()
    cond = torch.tensor([[0], [1], [2], [1]])
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    settings = fp32_settings(settings)
    first = sample_latents(model, cond, noise, settings, progress=False)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(sample_latents(model, cond, noise, settings, progress=False), first, rtol=0, atol=0)
    assert not torch.allclose(sample_latents(model, cond, noise, fp32_settings(settings, seed=1), progress=False),
                              first)


def fp32_settings(settings, **changes):
    from dataclasses import replace

    return replace(settings, precision="fp32", batch_size=2, **changes)
