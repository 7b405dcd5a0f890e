"""Sampling: checkpoint -> conditions -> guided, cached reverse diffusion -> latents -> decoded h5ad.

The pipeline, one concern per module:

| module                            | owns                                                                |
| --------------------------------- | ------------------------------------------------------------------- |
| ``guided_diffusion.checkpoints``  | the checkpoint schema; the denoiser and its autoencoder, found and hashed |
| ``sampling.settings``             | :class:`SamplerSettings`, their checks and checkpoint defaults      |
| ``core.device``                   | bf16 probing and the denoiser's autocast context                   |
| ``sampling.conditions``           | condition planning, library sizes, output labels                    |
| ``sampling.reverse``              | noise streams and the batched reverse loop                          |
| ``sampling.writer``               | the streamed, atomic .h5ad writer (also used by reconstruct.py)     |
| ``core.seed_streams``             | every random stream's seed                                          |
| this module                       | :func:`generate`, the pipeline in order, and the output set        |

The checkpoint rebuilds its own model (config, label vocabularies, genes, normalization, autoencoder
path and hash, noise schedule), so ``--model_path`` is all a user has to give.
"""
import os
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.core.device import OUT_OF_MEMORY_ERRORS, resolve_device
from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.distributed import setup_distributed
from guided_diffusion.sampling.conditions import (describe_condition, draw_library_sizes, label_columns,
                                                  latent_file_name, plan_conditions, unseen_conditions)
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.sampling.writer import NonFiniteOutput, decode_to_anndata, write_decoded_h5ad
from guided_diffusion.checkpoints import load_diffusion_model, resolve_autoencoder
from guided_diffusion.diffusion.guidance import guidance_formula
from guided_diffusion.sampling.output_set import (GENERATED, _naming_the_sample_dir, claim_sample_dir,
                                                  commit_output_set, write_manifest)
from guided_diffusion.sampling.request import check_sampling_inputs
from guided_diffusion.sampling.reverse import condition_noise, sample_latents
from guided_diffusion.sampling.settings import (build_sampling_diffusion, check_settings, record,
                                                resolve_decoder_precision, resolve_guide_w, resolve_observation,
                                                resolve_unseen_guide_w, unseen_guide_w_source,
                                                resolve_unseen_guidance_interval,
                                                resolve_settings)

# a generated latent further than this many training ranges (0.1%-99.9% quantiles) outside it is "far out"
FAR_OUT_RANGES = 1.0
FAR_OUT_CELL_FRACTION = 0.01


def generate(loaded, autoencoder, plan, settings, sample_dir, progress=True, context=None, compression="none",
             claim=None):
    """Sample every planned condition, save one decoded, labelled h5ad, per-condition latents and, last, a
    manifest naming the set (a folder without ``manifest.json`` holds no complete run).

    The set is written into a staging folder of this run inside ``sample_dir`` and swapped in only when it
    is complete (:func:`commit_output_set`): a failure, a full disk or a kill leaves the folder's earlier set
    as it was. ``claim`` (:func:`claim_sample_dir`, taken by :func:`sample_cells` before any work) locks the
    folder; without it, one is taken here.

    With a distributed ``context`` each rank samples a contiguous range of whole batches, the latents
    are gathered and rank 0 writes the outputs (identical to one process with the same seed and
    --batch_size); the other ranks return (path, None) once they are written. ``compression`` (none, gzip,
    lzf) applies to generated.h5ad's matrices.
    """
    sizes = list(loaded.model.condition_sizes)
    path = os.path.join(sample_dir, GENERATED)
    # 1.-3. what to draw, the reverse process, the checks on the latents
    observation, settings, library_sizes, cond_rows, latents, forms = draw_latents(loaded, autoencoder, plan,
                                                                                   settings, progress, context)
    if context is not None and context.is_distributed and not context.is_main:
        context.barrier()
        return path, None
    warnings = latent_warnings(loaded, plan, latents)
    own_claim = claim is None
    try:
        # 4. the output set is written whole into this run's staging folder; the earlier set stays until
        # the new one is complete and verified, then it is swapped in (manifest last)
        if own_claim:
            claim = claim_sample_dir(sample_dir)
        staging = claim.staging
        obs = label_table(cond_rows, loaded)
        uns = provenance(loaded, autoencoder, settings, observation, len(latents), warnings, forms)
        # 5. decode (fp32) into generated.h5ad, then the per-condition latents, then the manifest
        try:
            value_range = decode_to_h5ad(os.path.join(staging, GENERATED), autoencoder, latents, obs, uns,
                                         library_sizes, settings, progress, compression)
            warnings += decoded_range_warnings(value_range, autoencoder, observation)
            latent_files = write_latent_files(staging, plan, sizes, settings, latents)
            write_manifest(staging, [GENERATED] + latent_files, uns["cfdiffusion"])
        except Exception as error:
            raise _naming_the_sample_dir(error, sample_dir, staging, len(latents), loaded.model.latent_dim,
                                         len(autoencoder.genes), observation) from None
        commit_output_set(sample_dir, staging)
    finally:
        if own_claim and claim is not None:
            claim.release()
        if context is not None and context.is_distributed:
            context.barrier()
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return path, latents


def draw_latents(loaded, autoencoder, plan, settings, progress=True, context=None):
    """Steps 1-3 of :func:`generate`: the observation, each cell's library size, condition row and starting
    noise, the reverse process from the recorded noise schedule, and the refusal of non-finite latents
    (every rank). Returns (observation, settings with the decoder precision resolved, library sizes or
    None, condition rows, latents, the number of conditions per guidance form)."""
    sizes = list(loaded.model.condition_sizes)
    observation = resolve_observation(settings.observation, autoencoder)
    settings = replace(settings, decoder_precision=resolve_decoder_precision(settings, observation,
                                                                             autoencoder.device))
    check_memory(sum(count for _, count in plan), loaded.model.latent_dim)
    library_sizes = plan_library_sizes(loaded, plan, settings) if observation == "counts" else None
    cond_rows, noise = starting_points(plan, settings.seed, len(sizes), loaded.model.latent_dim)
    composed_rows, forms = guidance_forms(plan, loaded.checkpoint.condition_counts, sizes, settings)
    latents = run_reverse_process(loaded, cond_rows, noise, settings, progress, context, composed_rows)
    if composed_rows is None:  # nothing was guided with the unseen conditions' weights: record none
        settings = replace(settings, unseen_guide_w=None, unseen_guide_w_source=None, unseen_guidance_interval=None)
    check_finite_latents(latents)
    return observation, settings, library_sizes, cond_rows, latents, forms


def latent_warnings(loaded, plan, latents):
    """Latents far outside the training range; conditions never seen in training."""
    checkpoint, sizes = loaded.checkpoint, list(loaded.model.condition_sizes)
    warnings = range_warnings(latents, checkpoint.latent_range)
    unseen = unseen_conditions(plan, checkpoint.condition_counts, sizes)
    if unseen:
        warnings.append(f"{len(unseen)} of {len(plan)} conditions were never seen in training (e.g. "
                        f"{describe_condition(unseen[0], loaded.label_keys, loaded.vocabularies)}): their cells "
                        f"are extrapolated")
    return warnings


# ---- 1. what to draw -------------------------------------------------------------------------------
def check_memory(n_cells, latent_dim):
    """Refuse a run whose per-cell arrays alone (noise, latents, conditions) exceed the machine's memory."""
    needed = n_cells * (3 * 4 * latent_dim + 64)
    try:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if needed > available:
        raise UsageError(f"{n_cells} cells need about {needed / 1e9:.0f} GB for their latents alone, more than "
                         f"this machine's {available / 1e9:.0f} GB (--batch_size does not change that); lower "
                         f"--num_samples or generate in several runs with different --seed and --sample_dir")


def plan_library_sizes(loaded, plan, settings):
    quantiles = loaded.checkpoint.library_size_quantiles
    if not quantiles:
        raise UsageError(f"{loaded.path} records no library sizes (trained on log-normalized input); "
                         f"use --observation mean")
    sizes = list(loaded.model.condition_sizes)
    return np.concatenate([draw_library_sizes(row, quantiles, sizes, count, settings.seed, index)
                           for index, (row, count) in enumerate(plan)])


def starting_points(plan, seed, n_keys, latent_dim):
    """The (N, K) condition rows and the (N, latent_dim) starting noise, condition by condition."""
    try:
        rows = [torch.tensor(row, dtype=torch.long).expand(count, n_keys) for row, count in plan]
        noises = [condition_noise(seed, index, count, latent_dim) for index, (_, count) in enumerate(plan)]
        return torch.cat(rows), torch.cat(noises)
    except OUT_OF_MEMORY_ERRORS + (RuntimeError,) as error:
        if isinstance(error, RuntimeError) and "memory" not in str(error).lower():
            raise
        raise UsageError(f"out of memory allocating {sum(c for _, c in plan)} cells' latents (--batch_size "
                         f"does not change that); lower --num_samples or generate in several runs") from None


# ---- 2. the reverse process ----------------------------------------------------------------------
def guidance_forms(plan, condition_counts, condition_sizes, settings):
    """The cells guided as conditions never seen in training (composed form, ``unseen_guide_w``): a boolean
    tensor over the cells, or None when there are none (or ``--guidance_form nested``, or one label key); and
    the number of conditions per form, {"composed": n, "nested": n}, for the record."""
    form = settings.guidance_form
    if form == "nested" or len(condition_sizes) < 2:
        return None, {"nested": len(plan)}
    unseen = {tuple(row) for row in unseen_conditions(plan, condition_counts, condition_sizes)}
    flags = [tuple(row) in unseen for row, _ in plan]
    n_composed = len(plan) if form == "composed" else sum(flags)
    forms = {"composed": n_composed, "nested": len(plan) - n_composed}
    if not any(flags):
        return None, forms
    return torch.cat([torch.full((count,), flag) for (_, count), flag in zip(plan, flags)]), forms


def run_reverse_process(loaded, cond_rows, noise, settings, progress, context, composed_rows=None):
    common = dict(latent_scale=float(loaded.checkpoint.latent_scale), composed_rows=composed_rows,
                  schedule_steps=int(loaded.checkpoint.diffusion["steps"]),
                  schedule=loaded.checkpoint.diffusion["schedule"])
    if context is not None and context.is_distributed:
        n_batches = -(-len(cond_rows) // settings.batch_size)
        batches = range(n_batches)[context.shard(n_batches)]
        local = sample_latents(loaded.model, cond_rows, noise, settings, progress=progress and context.is_main,
                               batches=batches, **common).numpy()
        return context.all_gather_rows(local)
    return sample_latents(loaded.model, cond_rows, noise, settings, progress=progress, **common).numpy()


# ---- 3. checks on the result ---------------------------------------------------------------------
def check_finite_latents(latents):
    bad = int((~np.isfinite(latents)).any(axis=1).sum())
    if bad:
        raise UsageError(f"sampling produced non-finite latents for {bad} of {len(latents)} cells (the model "
                         f"diverged in training, or --guide_w is too large); nothing was written")


def range_warnings(latents, latent_range):
    """A warning when more than 1% of the cells have a latent far outside the training latents' range."""
    if latent_range is None:
        return []
    quantiles = np.asarray(latent_range["quantiles"], dtype=np.float64)
    low, high = quantiles[0], quantiles[-1]
    span = np.maximum(high - low, 1e-6) * FAR_OUT_RANGES
    far = ((latents < low - span) | (latents > high + span)).any(axis=1)
    if far.mean() <= FAR_OUT_CELL_FRACTION:
        return []
    return [f"{int(far.sum())} of {len(latents)} generated cells have latents far outside the training latents' "
            f"range (beyond the 0.1-99.9% range by more than its width); their expression is unreliable: "
            f"train longer, or lower --guide_w"]


def decoded_range_warnings(value_range, autoencoder, observation):
    """Decoded means above log1p(target_sum) are impossible for log-normalized cells (all counts in one gene)."""
    normalization = autoencoder.normalization
    if observation != "mean" or normalization.input_is_log:
        return []
    bound = float(np.log1p(normalization.target_sum))
    if value_range[1] <= bound:
        return []
    return [f"decoded values reach {value_range[1]:.1f}, above {bound:.2f} = log1p({normalization.target_sum:g}), "
            f"the most any log-normalized cell can hold: the latents are out of the autoencoder's range; train "
            f"longer, or lower --guide_w"]


# ---- 4./5. the output set (its folder, staging and swap: sampling/output_set.py) ------------------


def label_table(cond_rows, loaded):
    columns = label_columns(cond_rows.numpy(), loaded.label_keys, loaded.vocabularies)
    return pd.DataFrame(columns, index=pd.Index([f"generated_{i}" for i in range(len(cond_rows))], name="cell"))


def provenance(loaded, autoencoder, settings, observation, n_cells, warnings, forms=None):
    """The run's record (uns['cfdiffusion'], manifest.json's "run"): the sampler that ran, its steps and spacing and
    every setting that took effect (sampling.settings.record), the checkpoint, autoencoder and observation."""
    schedule_steps = int(loaded.checkpoint.diffusion["steps"])
    steps = build_sampling_diffusion(settings, schedule_steps, schedule=loaded.checkpoint.diffusion["schedule"])
    return {"cfdiffusion": {
        "checkpoint": os.path.basename(loaded.path), "step": int(loaded.checkpoint.step), "weights": loaded.weights,
        "vae_path": os.path.basename(autoencoder.path), "normalization": "log1p(normalize_total 1e4)"
        if not autoencoder.normalization.input_is_log else "as the training input (log-normalized)",
        "label_keys": loaded.label_keys, "n_cells": int(n_cells), **record(settings, steps.num_timesteps),
        "observation": observation, "guidance": guidance_formula(settings.guide_w),
        # conditions per guidance form (the composed one for unseen conditions with --guidance_form auto)
        "guidance_forms": dict(forms or {"nested": 0}),
        "guidance_composed": guidance_formula(settings.guide_w, "composed"),
        # the weights of the conditions never seen in training, where there were any (else None), and the part of
        # the noise schedule (fractions, low to high noise) where they applied
        "unseen_guide_w": settings.unseen_guide_w,
        "unseen_guidance_interval": None if settings.unseen_guidance_interval is None
        else list(settings.unseen_guidance_interval),
        "schedule_steps": schedule_steps,
        "unconditioned": "a label key left unconditioned is a missing value (NaN) in obs",
        "warnings": list(warnings),
    }}


def decode_to_h5ad(path, autoencoder, latents, obs, uns, library_sizes, settings, progress, compression="none"):
    try:
        return write_decoded_h5ad(path, autoencoder, latents, obs, uns, progress=progress,
                                  library_sizes=library_sizes, seed=settings.seed, compression=compression,
                                  decoder_precision=settings.decoder_precision)
    except NonFiniteOutput as error:
        raise UsageError(f"the autoencoder decoded the generated latents to non-finite {error}; nothing was "
                         f"written (train longer, or lower --guide_w)") from None


def write_latent_files(sample_dir, plan, sizes, settings, latents):
    names, start = [], 0
    for row, count in plan:
        name = latent_file_name(row, sizes, settings)
        with atomic_output(os.path.join(sample_dir, name)) as temp_path, open(temp_path, "wb") as stream:
            np.save(stream, latents[start:start + count])
        names.append(name)
        start += count
    return names


# ---- the whole job, as cell_sample.py runs it -------------------------------------------------------


def prepare_run(request, settings, device, loaded=None, autoencoder=None):
    """Load the checkpoint (unless ``loaded`` is given), resolve the settings against it, plan the conditions
    and find the autoencoder (unless given); returns (loaded, settings, plan, autoencoder)."""
    torch.manual_seed(settings.seed)
    if loaded is None:
        loaded = load_diffusion_model(request.model_path, use_ema=request.use_ema, device=device)
    sizes = list(loaded.model.condition_sizes)
    if request.num_classes is not None and list(request.num_classes) != sizes:
        raise UsageError(f"--num_classes {' '.join(map(str, request.num_classes))} contradicts the checkpoint "
                         f"({' '.join(map(str, sizes))}); omit it")
    settings = replace(settings, guide_w=resolve_guide_w(settings.guide_w, loaded.label_keys))
    if autoencoder is None:
        autoencoder = resolve_autoencoder(loaded, request.vae_path, device)
    if len(loaded.label_keys) > 1 and settings.guidance_form != "nested":
        defaults = loaded.checkpoint.sampling_defaults
        recorded = defaults.get("unseen_guide_w")
        # a recorded interval goes with the recorded weights (chosen under it; weights recorded without one were
        # chosen guiding every step); explicit weights take the default
        recorded_interval = None
        if settings.unseen_guide_w is None and recorded:
            recorded_interval = defaults.get("unseen_guidance_interval", (0.0, 1.0))
        settings = replace(settings, unseen_guide_w=resolve_unseen_guide_w(
                               settings.unseen_guide_w, settings.guide_w, loaded.label_keys, recorded,
                               decoded_keys=autoencoder.model.decoder_label_keys),
                           unseen_guide_w_source=unseen_guide_w_source(settings.unseen_guide_w, recorded),
                           unseen_guidance_interval=resolve_unseen_guidance_interval(
                               settings.unseen_guidance_interval, recorded_interval))
    settings = resolve_settings(settings,
                                loaded.checkpoint.sampling_defaults, device,
                                schedule_steps=int(loaded.checkpoint.diffusion["steps"]))
    plan = plan_conditions(loaded, request.conditions, request.all_combinations, request.match_counts,
                           request.num_samples)
    check_decoder_labels(plan, loaded, autoencoder)
    return loaded, settings, plan, autoencoder


def check_decoder_labels(plan, loaded, autoencoder):
    """Before any sampling: a decoder that reads labels needs every planned condition to name each of its keys."""
    for key in autoencoder.model.decoder_label_keys:
        if key not in loaded.label_keys:
            raise UsageError(f"the autoencoder decodes each cell with its {key!r} label, which this diffusion model "
                             f"is not conditioned on; use the autoencoder it was trained with")
        column = loaded.label_keys.index(key)
        open_rows = [row for row, _ in plan if row[column] >= loaded.model.condition_sizes[column]]
        if open_rows:
            raise UsageError(f"the autoencoder decodes each cell with its {key!r} label: every --condition must "
                             f"name {key} (e.g. {key}={loaded.vocabularies[key][0]}), but "
                             f"{describe_condition(open_rows[0], loaded.label_keys, loaded.vocabularies)!r} leaves "
                             f"it open")


def print_plan(plan, loaded):
    for row, count in plan[:20]:
        print(f"  {describe_condition(row, loaded.label_keys, loaded.vocabularies)}: {count}")
    if len(plan) > 20:
        print(f"  ... and {len(plan) - 20} more conditions")


def sample_cells(request, settings, loaded=None, autoencoder=None):
    """Load the checkpoint, plan the conditions, find the autoencoder and generate; returns the h5ad path.
    Every input is checked before any output is touched. ``loaded`` and ``autoencoder`` (from
    :func:`~guided_diffusion.checkpoints.load_diffusion_model` and
    :func:`~guided_diffusion.checkpoints.resolve_autoencoder`) skip loading them again."""
    check_sampling_inputs(request, settings)
    check_settings(settings)
    # keep freed memory for reuse: the output stages allocate and free the same few-MB blocks for every
    # 128 cells, which glibc would otherwise map afresh (page faults; measured 1.2x the output stages' rate)
    reuse_freed_memory()
    context = setup_distributed(request.device)
    # the folder is locked before any work (a second run is refused at once); rank 0 writes the outputs
    claim = claim_sample_dir(request.sample_dir) if context.is_main else None
    try:
        loaded, settings, plan, autoencoder = prepare_run(request, settings, context.device, loaded, autoencoder)
        if context.is_main:
            print(f"generating {sum(n for _, n in plan)} cells in {len(plan)} conditions with "
                  f"{settings.describe()}")
        path, _ = generate(loaded, autoencoder, plan, settings, request.sample_dir, progress=request.progress,
                           context=context, compression=request.compression, claim=claim)
        if context.is_main:
            print_plan(plan, loaded)
            print(f"wrote {path}")
        return path
    finally:
        if claim is not None:
            claim.release()


# ---- the same job into memory -----------------------------------------------------------------------
def generate_anndata(loaded, autoencoder, plan, settings, progress=True):
    """What :func:`generate` writes to generated.h5ad (one process), returned as an AnnData instead, with
    no file written: the same steps up to the latents, decoded by the writer's code into memory. Returns
    (AnnData, latents)."""
    observation, settings, library_sizes, cond_rows, latents, forms = draw_latents(loaded, autoencoder, plan,
                                                                                   settings, progress, None)
    warnings = latent_warnings(loaded, plan, latents)
    obs = label_table(cond_rows, loaded)
    uns = provenance(loaded, autoencoder, settings, observation, len(latents), warnings, forms)
    try:
        adata, value_range = decode_to_anndata(autoencoder, latents, obs, uns, progress=progress,
                                               library_sizes=library_sizes, seed=settings.seed,
                                               decoder_precision=settings.decoder_precision)
    except NonFiniteOutput as error:
        raise UsageError(f"the autoencoder decoded the generated latents to non-finite {error}; no cells were "
                         f"returned (train longer, or lower --guide_w)") from None
    warnings += decoded_range_warnings(value_range, autoencoder, observation)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return adata, latents


def sample_cells_in_memory(request, settings, loaded=None, autoencoder=None):
    """:func:`sample_cells` without files: the same checks, plan and cells (bit for bit, for the same seed and
    settings, as its generated.h5ad read back), returned as an AnnData; ``request.sample_dir`` and
    ``request.compression`` are not used. One process."""
    check_sampling_inputs(request, settings)
    check_settings(settings)
    reuse_freed_memory()
    device = resolve_device(request.device) if loaded is None else next(loaded.model.parameters()).device
    loaded, settings, plan, autoencoder = prepare_run(request, settings, device, loaded, autoencoder)
    print(f"generating {sum(n for _, n in plan)} cells in {len(plan)} conditions with {settings.describe()}")
    adata, _ = generate_anndata(loaded, autoencoder, plan, settings, progress=request.progress)
    print_plan(plan, loaded)
    return adata
