"""How the reverse process runs: :class:`SamplerSettings`, their checks, and the defaults taken from the
checkpoint (cache settings, the noise schedule) and the device (precision)."""
import argparse
import math
import re
from dataclasses import dataclass, replace
from typing import Dict, Optional, Union

from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import PRECISIONS, resolve_precision
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.diffusion.schedules import DIFFUSION_STEPS

OBSERVATIONS = ("auto", "counts", "mean")
GUIDE_W_RANGE = (-1.0, 100.0)  # w < -1 inverts the condition; beyond 100 the guided epsilon overflows usefulness
MAX_SEED = 2 ** 63 - 1
_RESPACING = re.compile(r"(ddim|logsnr)?([0-9]+)")
# auto: SDE-DPM-Solver++(2M) on log-SNR-spaced steps (timestep_respacing logsnrN), else as ddpm; ddpm (or ""): ancestral
# DDPM, or DDIM with use_ddim; dpmpp2m: DPM-Solver++(2M) on whatever steps are given; dpmpp2m_sde: its stochastic
# form (SDE-DPM-Solver++(2M), fresh noise at every step)
SOLVERS = ("auto", "ddpm", "dpmpp2m", "dpmpp2m_sde", "")
DPM_SOLVERS = ("dpmpp2m", "dpmpp2m_sde")
GUIDANCE_FORMS = ("auto", "nested", "composed")


@dataclass
class SamplerSettings:
    """How the reverse process runs; recorded in the output's ``uns``."""

    guide_w: Union[float, Dict[str, float]] = 0.5  # one weight, or {label key: weight} (resolve_guide_w)
    use_ddim: bool = False
    timestep_respacing: str = "logsnr10"
    eta: float = 0.0
    cache_interval: Optional[int] = None  # None: the checkpoint's, scaled to the sampled steps
    branch: Optional[int] = None  # None: the checkpoint's
    non_uniform: Optional[bool] = None  # None: the checkpoint's
    clip_denoised: bool = False
    batch_size: int = 1024
    seed: int = 0
    observation: str = "auto"
    precision: str = "auto"
    solver: str = "auto"  # see SOLVERS; resolve_settings leaves one of DPM_SOLVERS or "" (the DDPM family)
    # the count decoder's output layer; auto: bf16 when the denoiser's matmuls are and counts are drawn
    # (resolve_decoder_precision), decoded means always fp32
    decoder_precision: str = "auto"
    # auto: the composed form for conditions never seen in training, the nested one for seen conditions;
    # nested or composed: that form for every condition (diffusion/guidance.py)
    guidance_form: str = "auto"

    def describe(self):
        methods = {"dpmpp2m": "DPM-Solver++(2M)", "dpmpp2m_sde": "SDE-DPM-Solver++(2M)"}
        method = methods.get(solver_of(self)) or ("DDIM" if self.use_ddim else "DDPM")
        return f"{method} {self.timestep_respacing} steps, cache {self.cache_interval} " \
               f"({'non-uniform' if self.non_uniform else 'uniform'}, branch {self.branch}), " \
               f"w={format_guide_w(self.guide_w)}"


def solver_of(settings):
    """The solver that runs: "dpmpp2m", "dpmpp2m_sde", or "" (ancestral DDPM, or DDIM with use_ddim). ``auto`` takes
    SDE-DPM-Solver++(2M) when the steps are spaced in log-SNR (logsnrN) and DDIM is not asked for (the ODE form,
    ``dpmpp2m``, was the default until 2026-12-04), else DDPM/DDIM, so the original command lines
    (--timestep_respacing 1000, ddim50 with --use_ddim True) run what they did."""
    if settings.solver == "auto":
        spaced_in_log_snr = str(settings.timestep_respacing).startswith("logsnr")
        return "dpmpp2m_sde" if spaced_in_log_snr and not settings.use_ddim else ""
    return "" if settings.solver == "ddpm" else settings.solver


def parse_guide_w(text):
    """``--guide_w``: one number (every key), or ``KEY=W[,KEY=W]`` (one weight per label key)."""
    text = str(text).strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or KEY=W[,KEY=W], got {text!r}") from None
    weights = {}
    for part in text.split(","):
        key, _, value = (piece.strip() for piece in part.partition("="))
        if not key or key in weights:
            raise argparse.ArgumentTypeError(f"expected KEY=W[,KEY=W] with each key once, got {text!r}")
        try:
            weights[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value}: the weight must be a number") from None
    return weights


def format_guide_w(guide_w):
    if isinstance(guide_w, dict):
        return ",".join(f"{key}={weight:g}" for key, weight in guide_w.items())
    return f"{guide_w:g}"


def resolve_guide_w(guide_w, label_keys):
    """One weight stays one weight; per-key weights become {key: weight} over every label key in the model's
    order, keys not named getting 0 (no guidance on that key's term). Unknown keys are refused."""
    if not isinstance(guide_w, dict):
        return guide_w
    unknown = [key for key in guide_w if key not in label_keys]
    if unknown:
        raise UsageError(f"--guide_w key {unknown[0]!r} is not a label key of this model; label keys: "
                         f"{', '.join(label_keys)}")
    return {key: float(guide_w.get(key, 0.0)) for key in label_keys}


def guide_weights(guide_w):
    """What the guidance code takes: the one weight, or the per-key weights in label-key order."""
    return list(guide_w.values()) if isinstance(guide_w, dict) else guide_w


# The default: SDE-DPM-Solver++(2M) on 10 steps evenly spaced in log-SNR, the checkpoint's cache interval scaled
# to them (5 of 1000 -> 1 of 10: no reuse), bf16 matmuls where the device runs them natively (the count decoder's
# output layer too). Chosen by measurement on held-out cells against the faithful configuration (use_ddim False,
# timestep_respacing 1000, cache 5; benchmarks/bench_fidelity.sh): README, "Speed". The earlier defaults:
# --solver dpmpp2m (the ODE form, until 2026-12-04), --timestep_respacing 50 (DDPM-50, until 2026-12-02).
DEFAULT_SETTINGS = SamplerSettings()
FAITHFUL_FLAGS = "--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32"


def check_settings(settings):
    """The checks that need no checkpoint; each failure one line naming the flag."""
    low, high = GUIDE_W_RANGE
    if isinstance(settings.guide_w, dict):
        for key, weight in settings.guide_w.items():
            if not math.isfinite(weight) or not low <= weight <= high:
                raise UsageError(f"--guide_w {key}={weight}: each weight must be a finite number in "
                                 f"[{low:g}, {high:g}] (typically 0 to 5)")
    elif not math.isfinite(settings.guide_w) or not low <= settings.guide_w <= high:
        raise UsageError(f"--guide_w must be a finite number in [{low:g}, {high:g}] (typically 0 to 5), "
                         f"got {settings.guide_w}")
    if not math.isfinite(settings.eta) or settings.eta < 0:
        raise UsageError(f"--eta must be a finite number >= 0, got {settings.eta}")
    if not 0 <= settings.seed <= MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, 2^63), got {settings.seed}")
    if settings.cache_interval is not None and settings.cache_interval <= 0:
        raise UsageError(f"--cache_interval must be 1 or more (1 = no feature reuse), got {settings.cache_interval}")
    respacing = settings.timestep_respacing
    match = _RESPACING.fullmatch(respacing) if isinstance(respacing, str) else None
    if match is None or int(match.group(2)) < 1:
        raise UsageError(f"--timestep_respacing {respacing!r}: give a step count such as 50 or 1000 (all steps), "
                         f"ddim50 with --use_ddim True, or logsnr15 with --solver dpmpp2m (no spaces; section lists "
                         f"such as 10,10,10 are not supported)")
    if settings.decoder_precision not in PRECISIONS:
        raise UsageError(f"--decoder_precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{settings.decoder_precision!r}")
    if settings.guidance_form not in GUIDANCE_FORMS:
        raise UsageError(f"--guidance_form must be one of {', '.join(GUIDANCE_FORMS)}, got {settings.guidance_form!r}")
    if settings.solver not in SOLVERS:
        raise UsageError(f"--solver {settings.solver!r}: choose one of {', '.join(repr(s) for s in SOLVERS)}")
    solver = solver_of(settings)
    if match.group(1) == "logsnr" and settings.use_ddim and solver not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps in log-SNR for DPM-Solver++; with "
                         f"--use_ddim True give DDIM steps, e.g. --timestep_respacing ddim{match.group(2)}")
    if match.group(1) == "logsnr" and solver not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps in log-SNR for DPM-Solver++, but "
                         f"--solver {settings.solver or repr('')} is not one; drop --solver (auto: SDE-DPM-Solver++) or give "
                         f"{match.group(2)} for DDPM")
    if match.group(1) == "ddim" and not settings.use_ddim and solver not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps for DDIM, but --use_ddim is False; "
                         f"add --use_ddim True, or give {match.group(2)} for DDPM")


def build_sampling_diffusion(settings, num_timesteps=DIFFUSION_STEPS, latent_scale=1.0, schedule="linear"):
    """The respaced diffusion of the checkpoint's ``num_timesteps``-step ``schedule`` that the settings ask for."""
    try:
        return create_diffusion(num_timesteps, settings.timestep_respacing, clip_bound=latent_scale, schedule=schedule)
    except ValueError as error:
        raise UsageError(f"--timestep_respacing {settings.timestep_respacing!r}: {error}; give a step count "
                         f"such as 250 or ddim50 (at most {num_timesteps})") from None


def scaled_cache_interval(recorded_interval, steps, schedule_steps):
    """The checkpoint's cache interval counts steps of the full ``schedule_steps`` schedule (as the original
    sampler ran); on ``steps`` respaced steps the same span of diffusion time is interval x steps /
    schedule_steps steps, at least 1 (no reuse): of 1000, 5 -> 5 at 1000 steps, 2 at 500, 1 at 250 or fewer."""
    return max(1, int(round(recorded_interval * steps / schedule_steps)))


def resolve_settings(settings, recorded, device, schedule_steps=DIFFUSION_STEPS):
    """Settings with nothing left open: the cache settings the user did not give come from the checkpoint's
    ``sampling_defaults`` (``recorded``; the interval scaled to the sampled steps of its ``schedule_steps``
    schedule, which the sampler takes from the checkpoint), ``auto`` precision from the device."""
    check_settings(settings)
    steps = build_sampling_diffusion(settings, schedule_steps).num_timesteps
    return replace(
        settings,
        cache_interval=scaled_cache_interval(recorded["cache_interval"], steps, schedule_steps)
        if settings.cache_interval is None else settings.cache_interval,
        branch=recorded["branch"] if settings.branch is None else settings.branch,
        non_uniform=recorded["non_uniform"] if settings.non_uniform is None else settings.non_uniform,
        precision=resolve_precision(settings.precision, device),
        solver=solver_of(settings))


def resolve_observation(observation, autoencoder):
    """``counts`` (draw counts from the decoder's negative binomial; the default for autoencoders trained
    with --loss_ae nb) or ``mean`` (the decoded mean expression; the only choice for mse autoencoders)."""
    if observation not in OBSERVATIONS:
        raise UsageError(f"--observation must be one of {', '.join(OBSERVATIONS)}, got {observation!r}")
    if observation == "auto":
        return "counts" if autoencoder.model.models_counts else "mean"
    if observation == "counts" and not autoencoder.model.models_counts:
        raise UsageError("--observation counts needs an autoencoder trained with --loss_ae nb; this one was "
                         "trained with mse: use --observation mean")
    return observation


def resolve_decoder_precision(settings, observation, device):
    """The count decoder's output-layer precision: ``auto`` -> ``bf16`` when counts are drawn and the
    denoiser's matmuls run in bf16 (so ``--precision fp32`` keeps the whole sampler exact), else ``fp32``.
    Decoded means are written as computed and stay float32: ``bf16`` with them is refused."""
    if settings.decoder_precision == "auto":
        fast = resolve_precision(settings.precision, device) == "bf16"
        return "bf16" if fast and observation == "counts" else "fp32"
    if settings.decoder_precision == "bf16" and observation != "counts":
        raise UsageError("--decoder_precision bf16 applies to count draws; decoded means (--observation mean) "
                         "are computed in fp32: omit it or use --decoder_precision fp32")
    return resolve_precision(settings.decoder_precision, device)


__all__ = ["OBSERVATIONS", "PRECISIONS", "SOLVERS", "DPM_SOLVERS", "SamplerSettings", "solver_of", "DEFAULT_SETTINGS", "FAITHFUL_FLAGS", "check_settings",
           "parse_guide_w", "format_guide_w", "resolve_guide_w", "guide_weights",
           "build_sampling_diffusion", "scaled_cache_interval", "resolve_settings", "resolve_observation",
           "resolve_decoder_precision"]
