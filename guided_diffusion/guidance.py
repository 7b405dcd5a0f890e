"""Classifier-free guidance: null labels, label dropout for training, guided epsilon."""

from typing import Optional, Sequence

import torch

from .feature_cache import FeatureCache


def null_condition(cond: torch.Tensor, condition_sizes: Sequence[int]) -> torch.Tensor:
    """A (B, K) LongTensor with every key set to its null value condition_sizes[k]."""
    null_row = torch.as_tensor(list(condition_sizes), dtype=torch.long, device=cond.device)
    return null_row.expand(cond.shape[0], -1).clone()


def drop_conditions(
    cond: torch.Tensor,
    condition_sizes: Sequence[int],
    p_uncond: float,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Replace each key of each row by its null value independently with probability p_uncond."""
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if generator is None:
        uniform = torch.rand(cond.shape, device=cond.device)
    else:
        uniform = torch.rand(cond.shape, generator=generator, device=generator.device).to(cond.device)
    return torch.where(uniform < p_uncond, null_condition(cond, condition_sizes), cond)


def guided_eps(
    model,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    guide_w: float,
    cache: Optional[FeatureCache] = None,
    cond_scales=None,
) -> torch.Tensor:
    """Classifier-free guided noise prediction (1 + w) * eps_cond - w * eps_uncond.

    The conditional and unconditional halves run as one doubled batch, so a
    cache used here holds features for the doubled batch. With guide_w == 0
    only the conditional pass runs and is returned unchanged.
    """
    if guide_w == 0:
        return model(x, t, cond, cache=cache, cond_scales=cond_scales)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), guidance_batch(cond, model.condition_sizes),
                cache=cache, cond_scales=cond_scales)
    eps_cond, eps_uncond = eps.chunk(2)
    return (1 + guide_w) * eps_cond - guide_w * eps_uncond


def guidance_batch(cond: torch.Tensor, condition_sizes: Sequence[int]) -> torch.Tensor:
    """The condition rows of one guided forward: the conditional rows, then their null copies."""
    return torch.cat([cond, null_condition(cond, condition_sizes)])


def guided_eps_fn(
    model,
    cond: torch.Tensor,
    guide_w: float,
    cache: Optional[FeatureCache] = None,
    refresh: Optional[Sequence[bool]] = None,
):
    """An ``eps_fn(x, t, step_index)`` for the diffusion samplers.

    With a cache, ``refresh[step_index]`` (e.g. from ``refresh_schedule``)
    decides whether the step runs a full pass; the cache branch is checked
    against the model here, before sampling starts.
    """
    if cache is not None:
        if refresh is None:
            raise ValueError("a refresh schedule is required when a cache is given")
        model.validate_branch(cache.branch)
        if not refresh[0]:
            raise ValueError("the refresh schedule must refresh at step 0 to fill the cache")

    # the condition projections do not depend on the step: compute them once for the whole loop
    cond_scales = model.condition_scales(cond if guide_w == 0 else guidance_batch(cond, model.condition_sizes))

    def eps_fn(x: torch.Tensor, t: torch.Tensor, step_index: int) -> torch.Tensor:
        if cache is not None:
            cache.refresh = bool(refresh[step_index])
        return guided_eps(model, x, t, cond, guide_w, cache=cache, cond_scales=cond_scales)

    return eps_fn
