"""The reverse loop: guided, optionally cached DDPM, DDIM or (SDE-)DPM-Solver++(2M) from per-condition noise to
latents, in batches that mix conditions and draw their step noise from their own seed stream."""
import torch
from tqdm.auto import tqdm

from guided_diffusion.core import seed_streams
from guided_diffusion.core.errors import UsageError
from guided_diffusion.diffusion.feature_cache import refresh_schedule
from guided_diffusion.diffusion.guidance import guided_eps_fn
from guided_diffusion.core.device import matmul_precision
from guided_diffusion.diffusion.schedules import DIFFUSION_STEPS
from guided_diffusion.sampling.settings import (DPM_SOLVERS, build_sampling_diffusion, guide_weights,
                                                interval_timesteps, sampler_of)


def condition_noise(seed, condition_index, n_cells, latent_dim):
    """Every condition gets its own noise stream, independent of batching and of other conditions."""
    generator = seed_streams.torch_generator(seed, seed_streams.CONDITION_NOISE, condition_index)
    return torch.randn((n_cells, latent_dim), generator=generator)


@torch.inference_mode()
def sample_latents(model, cond_rows, noise, settings, progress=True, batches=None, latent_scale=1.0,
                   schedule_steps=DIFFUSION_STEPS, schedule="linear", composed_rows=None):
    """Reverse diffusion for every row of ``cond_rows`` starting from ``noise``; batches mix conditions.

    ``schedule_steps`` and ``schedule`` are the length and name of the noise schedule the model was trained on
    (the checkpoint's).
    Batch ``b`` holds rows ``[b * batch_size, (b + 1) * batch_size)`` and draws its step noise from a
    generator seeded by (seed, b), so a batch's result does not depend on which process runs it.
    ``batches`` (a ``range`` of batch numbers, default all) runs only those and returns their rows.
    The model works on latents multiplied by ``latent_scale`` (recorded at training); the result is
    returned in the autoencoder's latent space (divided by it), in float32. ``composed_rows`` (a boolean tensor,
    one entry per row) marks the rows of conditions never seen in training, guided with the composed form and
    ``settings.unseen_guide_w`` on the part of the schedule ``settings.unseen_guidance_interval`` names (every weight
    0 elsewhere; diffusion/guidance.py); the others take ``settings.guidance_form`` (auto: nested) at every step.
    """
    device = next(model.parameters()).device
    sampler = sampler_of(settings)
    diffusion = build_sampling_diffusion(settings, schedule_steps, latent_scale=latent_scale, schedule=schedule)
    try:
        refresh = refresh_schedule(diffusion.num_timesteps, settings.cache_interval, settings.non_uniform)
        model.validate_branch(settings.branch)
    except ValueError as error:
        raise UsageError(f"{error}; check --branch, --cache_interval and --non_uniform") from None
    n_cells = len(cond_rows)
    batches = range(-(-n_cells // settings.batch_size)) if batches is None else batches
    first_row = min(batches.start * settings.batch_size, n_cells)
    latents = noise.new_empty((min(batches.stop * settings.batch_size, n_cells) - first_row,) + noise.shape[1:])
    bar = tqdm(total=len(batches) * diffusion.num_timesteps, desc="sampling", unit="step", disable=not progress)
    for batch_index in batches:
        start = batch_index * settings.batch_size
        part = slice(start, start + settings.batch_size)
        cache = model.make_cache(settings.branch) if settings.cache_interval > 1 else None
        eps_fn = guided_eps_fn(model, cond_rows[part].to(device), guide_weights(settings.guide_w), cache,
                               refresh if cache is not None else None,
                               form="composed" if settings.guidance_form == "composed" else "nested",
                               composed_rows=None if composed_rows is None else composed_rows[part],
                               composed_weights=None if settings.unseen_guide_w is None
                               else guide_weights(settings.unseen_guide_w),
                               composed_interval=None if settings.unseen_guidance_interval is None
                               else interval_timesteps(settings.unseen_guidance_interval, schedule_steps))
        generator = seed_streams.torch_generator(settings.seed, seed_streams.STEP_NOISE, batch_index, device)
        common = dict(noise=noise[part].to(device), generator=generator, clip_denoised=settings.clip_denoised,
                      on_step=lambda *_: bar.update(1))
        with matmul_precision(settings.precision, device):  # the denoiser's matmuls; the updates stay fp32
            if sampler in DPM_SOLVERS:
                x = diffusion.dpm_solver_sample_loop(eps_fn, noise[part].shape, stochastic=sampler == "dpmpp2m_sde",
                                                     **common)
            elif sampler == "ddim":
                x = diffusion.ddim_sample_loop(eps_fn, noise[part].shape, eta=settings.eta, **common)
            else:
                x = diffusion.p_sample_loop(eps_fn, noise[part].shape, **common)
        latents[start - first_row:start - first_row + len(x)] = x.float().cpu()
    bar.close()
    return latents / latent_scale
