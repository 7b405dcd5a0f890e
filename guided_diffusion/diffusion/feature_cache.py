"""DeepCache-style feature caching for the cell denoiser.

A :class:`FeatureCache` is plain state handed to ``CellUNet.forward``; the
model itself stays stateless.  :func:`refresh_schedule` decides, for every
sampling step, whether the model runs a full pass (refreshing the cache) or a
shallow pass that reuses the cached deep feature.
"""

import math
from typing import List, Optional

import torch


class FeatureCache:
    """Holds the deep feature reused by shallow passes of ``CellUNet``.

    Attributes:
        branch: decoder block ``Dec_branch`` whose input ``u_{branch+1}`` is
            cached. Smaller branches skip more of the network.
        refresh: when True the next forward runs the full network and stores
            a new feature; when False it runs the shallow pass.
        feature: the cached ``u_{branch+1}`` tensor, or None until filled.

    Construct through ``CellUNet.make_cache(branch)`` so the branch is checked
    against the model depth before any sampling work starts.
    """

    def __init__(self, branch: int):
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ValueError(f"cache branch must be a non-negative int, got {branch!r}")
        self.branch = branch
        self.refresh = True
        self.feature: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        shape = None if self.feature is None else tuple(self.feature.shape)
        return f"FeatureCache(branch={self.branch}, refresh={self.refresh}, feature_shape={shape})"


def _uniform_refresh_steps(num_steps: int, cache_interval: int) -> List[int]:
    return list(range(0, num_steps, cache_interval))


def _power_law_refresh_steps(num_steps: int, num_refresh: int, center_step: int, power: float) -> List[int]:
    """Place ``num_refresh`` distinct step indices, densest around ``center_step``.

    A monotone map g: [0, 1) -> [0, num_steps - 1] with zero slope at
    s* = center_step / (num_steps - 1) is sampled on the uniform grid
    s_j = j / num_refresh, so step 0 is always chosen and points crowd
    around the centre.
    """
    last = num_steps - 1
    if last == 0:
        return [0]
    s_center = center_step / last
    positions = []
    for j in range(num_refresh):
        s = j / num_refresh
        if s < s_center:
            offset = -center_step * ((s_center - s) / s_center) ** power
        elif s > s_center:
            offset = (last - center_step) * ((s - s_center) / (1.0 - s_center)) ** power
        else:
            offset = 0.0
        positions.append(int(round(center_step + offset)))

    steps = sorted(positions)
    steps[0] = 0
    for j in range(1, len(steps)):
        steps[j] = max(steps[j], steps[j - 1] + 1)
    steps[-1] = min(steps[-1], last)
    for j in range(len(steps) - 2, 0, -1):
        steps[j] = min(steps[j], steps[j + 1] - 1)
    return steps


def refresh_schedule(
    num_steps: int,
    cache_interval: int,
    non_uniform: bool = False,
    center: Optional[int] = None,
    power: float = 1.5,
) -> List[bool]:
    """Per sampling step, whether to run a full pass that refreshes the cache.

    Entry i refers to the i-th step executed (i = 0 is the noisiest step, at
    timestep ``num_steps - 1 - i``).  Both schedules refresh
    ``ceil(num_steps / cache_interval)`` times and always refresh at step 0.

    Args:
        num_steps: number of sampling steps.
        cache_interval: average number of steps per refresh; 1 disables caching.
        non_uniform: place refreshes on a power-law grid densest around ``center``
            instead of every ``cache_interval`` steps.
        center: timestep (in the 0..num_steps-1 scale) where refreshes are
            densest; defaults to ``round(0.12 * num_steps)`` (timestep 120 of 1000).
        power: exponent of the grid (> 1 concentrates refreshes near ``center``).
    """
    if num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if cache_interval <= 0:
        raise ValueError(f"cache_interval must be >= 1, got {cache_interval}")
    if cache_interval == 1:
        return [True] * num_steps

    if non_uniform:
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        if center is None:
            center = round(0.12 * num_steps)
        if not 0 <= center <= num_steps - 1:
            raise ValueError(f"center must be a timestep in [0, {num_steps - 1}], got {center}")
        num_refresh = math.ceil(num_steps / cache_interval)
        center_step = num_steps - 1 - center
        steps = _power_law_refresh_steps(num_steps, num_refresh, center_step, power)
    else:
        steps = _uniform_refresh_steps(num_steps, cache_interval)

    schedule = [False] * num_steps
    for i in steps:
        schedule[i] = True
    return schedule
