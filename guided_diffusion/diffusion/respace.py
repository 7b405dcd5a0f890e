"""Sampling with a subset of the training timesteps."""

from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import torch

from guided_diffusion.diffusion.gaussian_diffusion import GaussianDiffusion
from guided_diffusion.diffusion.schedules import DIFFUSION_STEPS, get_named_beta_schedule


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]], schedule: str = "linear") -> List[int]:
    """Timesteps (sorted) to keep from a process with ``num_timesteps`` steps.

    ``section_counts`` is either
      * "ddimN": the evenly strided range(0, num_timesteps, stride) with exactly N steps;
      * "logsnrN": N steps evenly spaced in log-SNR of the named ``schedule`` (for DPM-Solver++);
      * a comma-separated string or list of counts, e.g. "250" or "10,15,20": the
        process is cut into equal sections and section i keeps counts[i] evenly
        spaced steps (both ends of a section included when the count is > 1).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps + 1):
                steps = list(range(0, num_timesteps, stride))
                if len(steps) == desired:
                    return steps
            raise ValueError(f"cannot take exactly {desired} evenly strided steps from {num_timesteps}")
        if section_counts.startswith("logsnr"):
            return GaussianDiffusion(get_named_beta_schedule(schedule, num_timesteps)).log_snr_spaced_timesteps(
                int(section_counts[len("logsnr"):]))
        counts = [int(part) for part in section_counts.split(",")]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"section counts must be positive, got {section_counts!r}")

    size_per_section, extra = divmod(num_timesteps, len(counts))
    kept: List[int] = []
    section_start = 0
    for i, count in enumerate(counts):
        size = size_per_section + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept.extend(section_start + round(stride * j) for j in range(count))
        section_start += size
    return sorted(set(kept))


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion over ``use_timesteps`` of a base schedule.

    Betas are recomputed so the kept steps have the base ``alphas_cumprod``.
    Internally timesteps are indices 0..len(use_timesteps)-1; the model (and
    any ``eps_fn``) always receives the ORIGINAL timesteps via ``timestep_map``.
    """

    def __init__(self, use_timesteps: Iterable[int], betas: np.ndarray, clip_bound: float = 1.0):
        base = GaussianDiffusion(betas)
        keep = sorted(set(int(t) for t in use_timesteps))
        if not keep or keep[0] < 0 or keep[-1] >= base.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of [0, {base.num_timesteps})")
        self.original_num_steps = base.num_timesteps
        self.timestep_map = np.array(keep, dtype=np.int64)

        new_betas = []
        last_alpha_cumprod = 1.0
        for t in keep:
            alpha_cumprod = base.alphas_cumprod[t]
            new_betas.append(1.0 - alpha_cumprod / last_alpha_cumprod)
            last_alpha_cumprod = alpha_cumprod
        super().__init__(np.array(new_betas, dtype=np.float64), clip_bound=clip_bound)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.timestep_map).to(t.device)[t]


def create_diffusion(steps: int = DIFFUSION_STEPS, timestep_respacing: Optional[Union[str, Sequence[int]]] = "",
                     clip_bound: float = 1.0, schedule: str = "linear") -> SpacedDiffusion:
    """The one factory: the named ``schedule`` (diffusion/schedules.py) over ``steps`` steps, optionally respaced
    for sampling.

    ``timestep_respacing`` "" or None keeps all steps; otherwise see ``space_timesteps``.
    ``clip_bound`` is the range of the data (``clip_denoised`` clamps predicted x0 to it).
    """
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [steps]
    return SpacedDiffusion(space_timesteps(steps, timestep_respacing, schedule), get_named_beta_schedule(schedule, steps),
                           clip_bound)
