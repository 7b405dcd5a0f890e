"""What a sampling run is asked for: :class:`SamplingRequest` (which model, which cells, where to) and the
type and range checks of a request and its :class:`~guided_diffusion.sampling.settings.SamplerSettings`,
shared by ``cell_sample.py`` and the Python API."""
from dataclasses import dataclass, field
from typing import Optional

from guided_diffusion.core.checks import (check_bool, check_int, check_int_list, check_path, check_real, check_str,
                                          check_str_list)
from guided_diffusion.core.errors import SettingError, UsageError, literal
from guided_diffusion.sampling.settings import (GUIDANCE_FORMS, OBSERVATIONS, PRECISIONS, SAMPLERS, SOLVERS,
                                                SamplerSettings)
from guided_diffusion.sampling.writer import COMPRESSIONS


@dataclass
class SamplingRequest:
    """What to generate and from which model (the settings say how)."""

    model_path: str
    sample_dir: str = "output"
    vae_path: str = ""
    use_ema: bool = True
    num_classes: Optional[list] = None  # checked against the checkpoint if given
    conditions: list = field(default_factory=list)  # KEY=VALUE[,KEY=VALUE] specs
    all_combinations: bool = False
    match_counts: bool = False
    num_samples: Optional[int] = None  # cells per condition; None: not given (1000, or --match_counts)
    device: str = "auto"
    progress: bool = True
    compression: str = "none"  # of generated.h5ad's matrices: none, gzip or lzf


def check_sampling_inputs(request, settings):
    """The type and range checks of every field of a :class:`SamplingRequest` and :class:`SamplerSettings`,
    as ``cell_sample.py``'s flags check them (one :class:`SettingError` naming the field; the CLI words it
    as its flag). Strings are not taken as numbers or booleans, nor booleans as numbers; the checks that
    relate settings to each other are :func:`check_settings`'s."""
    if not isinstance(request, SamplingRequest):
        raise UsageError(f"expected a SamplingRequest, got {type(request).__name__}")
    if not isinstance(settings, SamplerSettings):
        raise UsageError(f"expected SamplerSettings, got {type(settings).__name__}")
    check_path(request.model_path, "model_path")
    check_path(request.sample_dir, "sample_dir")
    check_path(request.vae_path, "vae_path")
    check_bool(request.use_ema, "use_ema")
    check_int_list(request.num_classes, "num_classes", optional=True)
    check_str_list(request.conditions, "conditions")
    check_bool(request.all_combinations, "all_combinations")
    check_bool(request.match_counts, "match_counts")
    check_int(request.num_samples, "num_samples", 1, optional=True)  # None: not given (1000, or --match_counts)
    check_str(request.device, "device")
    check_bool(request.progress, "progress")
    check_str(request.compression, "compression", COMPRESSIONS)
    # types only for the settings whose ranges check_settings checks (its messages name the flags)
    weight = "a number, or a dict of numbers per label key"
    if isinstance(settings.guide_w, dict):
        for key, value in settings.guide_w.items():
            check_str(key, "guide_w")
            check_real(value, "guide_w", weight)
    else:
        check_real(settings.guide_w, "guide_w", weight)
    check_str(settings.sampler, "sampler", SAMPLERS, optional=True)
    check_bool(settings.use_ddim, "use_ddim", optional=True)
    check_str(settings.timestep_respacing, "timestep_respacing")
    check_real(settings.eta, "eta")
    check_int(settings.cache_interval, "cache_interval", optional=True)
    check_int(settings.branch, "branch", 0, optional=True)
    check_bool(settings.non_uniform, "non_uniform", optional=True)
    check_bool(settings.clip_denoised, "clip_denoised")
    check_int(settings.batch_size, "batch_size", 1)
    check_int(settings.seed, "seed")
    check_str(settings.observation, "observation", OBSERVATIONS)
    check_str(settings.precision, "precision", PRECISIONS)
    check_str(settings.solver, "solver", SOLVERS, optional=True)
    check_str(settings.guidance_form, "guidance_form", GUIDANCE_FORMS)
    if isinstance(settings.unseen_guide_w, dict):
        for key, value in settings.unseen_guide_w.items():
            check_str(key, "unseen_guide_w")
            check_real(value, "unseen_guide_w", weight)
    elif settings.unseen_guide_w is not None:
        check_real(settings.unseen_guide_w, "unseen_guide_w", weight)
    interval = settings.unseen_guidance_interval
    if interval is not None:
        if not isinstance(interval, (tuple, list)) or len(interval) != 2:
            raise SettingError(f"{{unseen_guidance_interval}} must be a pair of numbers (low, high), got "
                               f"{literal(interval)}", "unseen_guidance_interval")
        for value in interval:
            check_real(value, "unseen_guidance_interval", "a pair of numbers (low, high)")
    check_str(settings.decoder_precision, "decoder_precision", PRECISIONS)


