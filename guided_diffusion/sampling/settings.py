"""How the reverse process runs: :class:`SamplerSettings`, their checks, and the defaults taken from the
checkpoint (cache settings, the noise schedule) and the device (precision)."""
import argparse
import math
import re
import sys
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple, Union

from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import PRECISIONS, resolve_precision
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.diffusion.schedules import DIFFUSION_STEPS

OBSERVATIONS = ("auto", "counts", "mean")
GUIDE_W_RANGE = (-1.0, 100.0)  # w < -1 inverts the condition; beyond 100 the guided epsilon overflows usefulness
MAX_SEED = 2 ** 63 - 1
_RESPACING = re.compile(r"(ddim|logsnr)?([0-9]+)")
# the algorithms of the reverse process: ancestral DDPM, DDIM, DPM-Solver++(2M) (deterministic) and its stochastic
# form SDE-DPM-Solver++(2M) (fresh noise at every step); docs/sampling.md compares them
SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "dpmpp2m_sde")
ETA_SAMPLERS = ("ddim",)  # the samplers that use --eta
METHODS = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp2m": "DPM-Solver++(2M)", "dpmpp2m_sde": "SDE-DPM-Solver++(2M)"}
# --timestep_respacing's prefix names how its N steps are spaced over the checkpoint's schedule
SPACINGS = {"": "uniform", "ddim": "strided", "logsnr": "log-snr"}
# --solver, an alias of --sampler: auto (the sampler follows --use_ddim and the steps: dpmpp2m_sde on logsnrN steps,
# else ddpm, ddim with --use_ddim True), ddpm or "" (ddpm, ddim with --use_ddim True), dpmpp2m, dpmpp2m_sde
SOLVERS = ("auto", "ddpm", "dpmpp2m", "dpmpp2m_sde", "")
DPM_SOLVERS = ("dpmpp2m", "dpmpp2m_sde")
GUIDANCE_FORMS = ("auto", "nested", "composed")


@dataclass
class SamplerSettings:
    """How the reverse process runs; recorded in the output's ``uns`` (:func:`record`)."""

    guide_w: Union[float, Dict[str, float]] = 0.5  # one weight, or {label key: weight} (resolve_guide_w)
    # the algorithm (SAMPLERS); None: chosen by the aliases use_ddim and solver and the steps (sampler_of), which
    # without them is dpmpp2m_sde on the default logsnr10 steps
    sampler: Optional[str] = None
    # the original flags, aliases of sampler (None: not given); resolve_settings sets them to agree with it
    use_ddim: Optional[bool] = None  # True: ddim
    timestep_respacing: str = "logsnr10"  # the steps and their spacing: N (uniform), ddimN (strided), logsnrN
    eta: float = 0.0  # ddim only
    cache_interval: Optional[int] = None  # None: the checkpoint's, scaled to the sampled steps
    branch: Optional[int] = None  # None: the checkpoint's
    non_uniform: Optional[bool] = None  # None: the checkpoint's
    clip_denoised: bool = False
    batch_size: int = 1024
    seed: int = 0
    observation: str = "auto"
    precision: str = "auto"
    solver: Optional[str] = None  # see SOLVERS
    # the count decoder's output layer; auto: bf16 when the denoiser's matmuls are and counts are drawn
    # (resolve_decoder_precision), decoded means always fp32
    decoder_precision: str = "auto"
    # auto: the composed form for conditions never seen in training, the nested one for seen conditions;
    # nested: the nested form for every condition (and guide_w: the behaviour before guidance forms);
    # composed: the composed form for every condition (diffusion/guidance.py)
    guidance_form: str = "auto"
    # the weights of the conditions never seen in training (composed form); None: resolve_unseen_guide_w's rule
    unseen_guide_w: Optional[Union[float, Dict[str, float]]] = None
    # where the resolved unseen_guide_w came from (unseen_guide_w_source); set by the sampler, recorded
    unseen_guide_w_source: Optional[str] = None
    # the part of the noise range, (lo, hi) as fractions of the schedule's steps, where unseen_guide_w applies (at
    # the other steps unseen conditions take the composed form with every weight 0); None: the checkpoint's
    # recorded interval, else UNSEEN_GUIDANCE_INTERVAL (resolve_unseen_guidance_interval)
    unseen_guidance_interval: Optional[Tuple[float, float]] = None

    def describe(self):
        cache = f"cache {self.cache_interval}"
        if self.cache_interval is None or self.cache_interval > 1:
            cache += f" ({'non-uniform' if self.non_uniform else 'uniform'}, branch {self.branch})"
        return f"{METHODS[sampler_of(self)]} {self.timestep_respacing} steps, {cache}, w={format_guide_w(self.guide_w)}"


def _sampler_of_aliases(use_ddim, solver, timestep_respacing):
    """The sampler the original flags choose: --solver dpmpp2m / dpmpp2m_sde is that sampler; auto (or not given)
    is dpmpp2m_sde on log-SNR-spaced steps (logsnrN) without --use_ddim True; otherwise ddim with --use_ddim True,
    else ddpm (so --timestep_respacing 1000, and ddim50 with --use_ddim True, run what they always did)."""
    if solver in DPM_SOLVERS:
        return solver
    if solver in (None, "auto") and str(timestep_respacing).startswith("logsnr") and not use_ddim:
        return "dpmpp2m_sde"
    return "ddim" if use_ddim else "ddpm"


def sampler_of(settings):
    """The algorithm that runs (one of SAMPLERS): ``sampler`` when given, else the one its aliases choose."""
    if settings.sampler is not None:
        return settings.sampler
    return _sampler_of_aliases(settings.use_ddim, settings.solver, settings.timestep_respacing)


def solver_of(settings):
    """The sampler as the ``solver`` alias names it: "dpmpp2m", "dpmpp2m_sde", or "" (ddpm or ddim)."""
    sampler = sampler_of(settings)
    return sampler if sampler in DPM_SOLVERS else ""


def alias_conflict(settings):
    """A one-line message when ``sampler`` and an alias given beside it name different samplers, else None."""
    sampler = settings.sampler
    if sampler is None:
        return None
    if settings.use_ddim is not None and settings.use_ddim != (sampler == "ddim"):
        return (f"--sampler {sampler} contradicts --use_ddim {settings.use_ddim} "
                f"({'ddim' if settings.use_ddim else 'not ddim'}); give --sampler alone")
    solver = settings.solver
    if solver in DPM_SOLVERS and solver != sampler or solver in ("ddpm", "") and sampler in DPM_SOLVERS:
        chooses = "" if solver in DPM_SOLVERS else " (ddpm or ddim)"
        return f"--sampler {sampler} contradicts --solver {solver or repr('')}{chooses}; give --sampler alone"
    return None


def spacing_of(timestep_respacing):
    """``uniform`` (N), ``strided`` (ddimN) or ``log-snr`` (logsnrN)."""
    match = _RESPACING.fullmatch(str(timestep_respacing))
    return SPACINGS[match.group(1) or ""] if match else None


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


# an unseen combination's keys after the first (the donor of a cell type x donor pair) get this weight by
# default: measured on held-out combinations of the bundled data (docs/sampling.md, "Unseen combinations")
UNSEEN_KEY_WEIGHT = 4.0
# the same for a key the autoencoder's decoder also reads (VAE_train.py --decoder_label_key cell_type1,donor): the
# decoder adds that key's effect, and a smaller weight calls the donor right as often with more realistic cells
UNSEEN_DECODED_KEY_WEIGHT = 2.0


UNSEEN_SOURCES = {"flag": "--unseen_guide_w", "checkpoint": "the checkpoint (chosen on validation combinations)",
                  "rule": "the default rule (first key: --guide_w, later keys: UNSEEN_KEY_WEIGHT, or "
                          "UNSEEN_DECODED_KEY_WEIGHT for a key the decoder reads)"}


def unseen_guide_w_source(unseen_guide_w, recorded=None):
    """Where the weights of unseen conditions come from (a value of UNSEEN_SOURCES): the flag, the weights
    recorded in the checkpoint, or the default rule."""
    if unseen_guide_w is not None:
        return UNSEEN_SOURCES["flag"]
    return UNSEEN_SOURCES["checkpoint" if recorded else "rule"]


def resolve_unseen_guide_w(unseen_guide_w, guide_w, label_keys, recorded=None, decoded_keys=()):
    """The per-key weights of the conditions never seen in training: as given (one weight or per key, like
    ``--guide_w``); else the weights ``recorded`` in the checkpoint (``sampling_defaults["unseen_guide_w"]``,
    chosen on validation combinations by ``exp_script/guidance_sweep.py --unseen_weights ... --record True``);
    else the first label key's weight from ``guide_w`` and, for every later key (the keys that make the
    combination new: a donor, a perturbation), ``UNSEEN_DECODED_KEY_WEIGHT`` if it is one of ``decoded_keys``
    (those the autoencoder's decoder reads), else ``UNSEEN_KEY_WEIGHT``."""
    if unseen_guide_w is not None:
        resolved = resolve_guide_w(unseen_guide_w, label_keys)
        return resolved if isinstance(resolved, dict) else {key: float(resolved) for key in label_keys}
    if recorded:
        return {key: float(recorded[key]) for key in label_keys}
    first = guide_w[label_keys[0]] if isinstance(guide_w, dict) else guide_w
    return {key: float(first) if index == 0 else
            UNSEEN_DECODED_KEY_WEIGHT if key in decoded_keys else UNSEEN_KEY_WEIGHT
            for index, key in enumerate(label_keys)}


# the unseen conditions' weights apply on the low-noise half of the schedule only: on two held-out combinations of
# the bundled data (three training seeds each) the intended donor was called more often than with guidance at every
# step, at the same realism; guiding only the high-noise half lost the donor (docs/sampling.md)
UNSEEN_GUIDANCE_INTERVAL = (0.0, 0.5)


def parse_interval(text):
    """``--unseen_guidance_interval``: ``LO,HI``, fractions of the noise schedule (0 = no noise, 1 = pure noise)."""
    parts = str(text).split(",")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (fractions of the noise schedule, e.g. 0,0.5), "
                                         f"got {text!r}") from None
    return (low, high)


def check_interval(interval, flag="--unseen_guidance_interval"):
    low, high = interval
    if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low < high <= 1.0):
        raise UsageError(f"{flag} {low:g},{high:g}: give LO,HI with 0 <= LO < HI <= 1 (fractions of the noise "
                         f"schedule; 0,1 guides every step)")


def resolve_unseen_guidance_interval(interval, recorded=None):
    """The unseen conditions' guidance interval: as given, else the one ``recorded`` in the checkpoint with its
    weights (``sampling_defaults["unseen_guidance_interval"]``), else :data:`UNSEEN_GUIDANCE_INTERVAL`."""
    if interval is not None:
        return (float(interval[0]), float(interval[1]))
    if recorded is not None:
        return (float(recorded[0]), float(recorded[1]))
    return UNSEEN_GUIDANCE_INTERVAL


def interval_timesteps(interval, schedule_steps):
    """The interval as model timesteps ``[lo, hi)`` of a ``schedule_steps``-step schedule (hi = 1 includes the
    last timestep)."""
    low, high = interval
    return (low * schedule_steps, high * schedule_steps if high < 1.0 else float("inf"))


def guide_weights(guide_w):
    """What the guidance code takes: the one weight, or the per-key weights in label-key order."""
    return list(guide_w.values()) if isinstance(guide_w, dict) else guide_w


# The default: SDE-DPM-Solver++(2M) on 10 steps evenly spaced in log-SNR, the checkpoint's cache interval scaled
# to them (5 of 1000 -> 1 of 10: no reuse), bf16 matmuls where the device runs them natively (the count decoder's
# output layer too). Chosen by measurement on held-out cells against the faithful configuration (ddpm on all
# 1000 steps, cache 5, fp32; benchmarks/bench_fidelity.sh): docs/sampling.md.
DEFAULT_SETTINGS = SamplerSettings()
# the original sampler in the original flags; the same as --sampler ddpm --timestep_respacing 1000 ...
FAITHFUL_FLAGS = "--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32"


def check_weights(guide_w, flag):
    low, high = GUIDE_W_RANGE
    if isinstance(guide_w, dict):
        for key, weight in guide_w.items():
            if not math.isfinite(weight) or not low <= weight <= high:
                raise UsageError(f"{flag} {key}={weight}: each weight must be a finite number in "
                                 f"[{low:g}, {high:g}] (typically 0 to 5)")
    elif not math.isfinite(guide_w) or not low <= guide_w <= high:
        raise UsageError(f"{flag} must be a finite number in [{low:g}, {high:g}] (typically 0 to 5), "
                         f"got {guide_w}")


def check_settings(settings):
    """The checks that need no checkpoint; each failure one line naming the flag."""
    check_weights(settings.guide_w, "--guide_w")
    if settings.unseen_guide_w is not None:
        check_weights(settings.unseen_guide_w, "--unseen_guide_w")
        if settings.guidance_form == "nested":
            raise UsageError("--unseen_guide_w weighs the composed form of unseen conditions; --guidance_form nested "
                             "guides every condition with --guide_w: drop one of them")
    if settings.unseen_guidance_interval is not None:
        check_interval(settings.unseen_guidance_interval)
        if settings.guidance_form == "nested":
            raise UsageError("--unseen_guidance_interval applies to the composed form of unseen conditions; "
                             "--guidance_form nested guides every condition at every step: drop one of them")
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
                         f"ddim50 (strided) or logsnr15 (spaced in log-SNR, for --sampler dpmpp2m or dpmpp2m_sde; "
                         f"no spaces; section lists such as 10,10,10 are not supported)")
    if settings.decoder_precision not in PRECISIONS:
        raise UsageError(f"--decoder_precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{settings.decoder_precision!r}")
    if settings.guidance_form not in GUIDANCE_FORMS:
        raise UsageError(f"--guidance_form must be one of {', '.join(GUIDANCE_FORMS)}, got {settings.guidance_form!r}")
    if settings.sampler is not None and settings.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {settings.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if settings.solver is not None and settings.solver not in SOLVERS:
        raise UsageError(f"--solver {settings.solver!r}: choose one of {', '.join(repr(s) for s in SOLVERS)}")
    conflict = alias_conflict(settings)
    if conflict:
        raise UsageError(conflict)
    sampler, prefix, count = sampler_of(settings), match.group(1), match.group(2)
    if settings.sampler is not None:
        if prefix == "logsnr" and sampler not in DPM_SOLVERS:
            raise UsageError(f"--timestep_respacing {respacing} spaces the steps in log-SNR for --sampler dpmpp2m or "
                             f"dpmpp2m_sde; with --sampler {sampler} give {count} (uniform) or ddim{count} (strided)")
    elif prefix == "logsnr" and settings.use_ddim and sampler not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps in log-SNR for DPM-Solver++; with "
                         f"--use_ddim True give DDIM steps, e.g. --timestep_respacing ddim{count}")
    elif prefix == "logsnr" and sampler not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps in log-SNR for DPM-Solver++, but "
                         f"--solver {settings.solver or repr('')} is not one; drop --solver (auto: SDE-DPM-Solver++) "
                         f"or give {count} for DDPM")
    elif prefix == "ddim" and not settings.use_ddim and sampler not in DPM_SOLVERS:
        raise UsageError(f"--timestep_respacing {respacing} spaces the steps for DDIM, but --use_ddim is False; "
                         f"add --use_ddim True, or give {count} for DDPM")
    if settings.eta != 0 and sampler not in ETA_SAMPLERS:
        raise UsageError(f"--eta {settings.eta:g} applies to --sampler {' and '.join(ETA_SAMPLERS)} only (also "
                         f"spelled --use_ddim True); this run's sampler, {sampler}, does not use it: drop --eta")


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
    """Settings with nothing left open: ``sampler`` from its aliases (which are then set to agree with it), the
    cache settings the user did not give from the checkpoint's ``sampling_defaults`` (``recorded``; the
    interval scaled to the sampled steps of its ``schedule_steps`` schedule, which the sampler takes from the
    checkpoint), ``auto`` precision from the device. Cache flags given for a run without feature reuse
    (cache interval 1) are warned about on stderr."""
    check_settings(settings)
    steps = build_sampling_diffusion(settings, schedule_steps).num_timesteps
    sampler = sampler_of(settings)
    resolved = replace(
        settings,
        sampler=sampler, use_ddim=sampler == "ddim", solver=sampler if sampler in DPM_SOLVERS else "",
        cache_interval=scaled_cache_interval(recorded["cache_interval"], steps, schedule_steps)
        if settings.cache_interval is None else settings.cache_interval,
        branch=recorded["branch"] if settings.branch is None else settings.branch,
        non_uniform=recorded["non_uniform"] if settings.non_uniform is None else settings.non_uniform,
        precision=resolve_precision(settings.precision, device))
    unused = [flag for flag, value in (("--branch", settings.branch), ("--non_uniform", settings.non_uniform))
              if value is not None]
    if unused and resolved.cache_interval == 1:
        flags, several = " and ".join(unused), len(unused) > 1
        print(f"warning: {flags} {'set' if several else 'sets'} how deep features are reused, but the cache interval "
              f"is 1 (no reuse) on {steps} steps: {'they have' if several else 'it has'} no effect",
              file=sys.stderr, flush=True)
    return resolved


def record(settings, steps):
    """What a run's ``uns['cfdiffusion']`` and manifest.json record of resolved ``settings`` that ran ``steps``
    sampled steps: the sampler, its steps and their spacing, and each setting that took effect (eta only with
    a sampler that uses it; the cache branch and its refresh pattern only with feature reuse)."""
    sampler = sampler_of(settings)
    entry = {"sampler": sampler, "steps": int(steps), "spacing": spacing_of(settings.timestep_respacing),
             "timestep_respacing": settings.timestep_respacing}
    if sampler in ETA_SAMPLERS:
        entry["eta"] = settings.eta
    entry["cache_interval"] = settings.cache_interval
    if settings.cache_interval is None or settings.cache_interval > 1:
        entry.update(branch=settings.branch, non_uniform=settings.non_uniform)
    entry.update(clip_denoised=settings.clip_denoised, batch_size=settings.batch_size, seed=settings.seed,
                 guide_w=settings.guide_w, guidance_form=settings.guidance_form,
                 unseen_guide_w=settings.unseen_guide_w, unseen_guide_w_source=settings.unseen_guide_w_source,
                 unseen_guidance_interval=None if settings.unseen_guidance_interval is None
                 else list(settings.unseen_guidance_interval),
                 precision=settings.precision,
                 decoder_precision=settings.decoder_precision)
    return entry


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


__all__ = ["OBSERVATIONS", "PRECISIONS", "SAMPLERS", "ETA_SAMPLERS", "SPACINGS", "SOLVERS", "DPM_SOLVERS",
           "SamplerSettings", "sampler_of", "solver_of", "alias_conflict", "spacing_of", "record", "DEFAULT_SETTINGS",
           "FAITHFUL_FLAGS", "check_settings",
           "parse_guide_w", "format_guide_w", "resolve_guide_w", "resolve_unseen_guide_w", "guide_weights",
           "build_sampling_diffusion", "scaled_cache_interval", "resolve_settings", "resolve_observation",
           "resolve_decoder_precision"]
