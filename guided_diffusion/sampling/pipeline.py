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
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import h5py
import numpy as np
import pandas as pd
import torch

<<<<<<< HEAD
from guided_diffusion.core.atomic import (DiskFull, _fsync as fsync_folder, atomic_output, disk_error, lock_folder,
                                          remove_quietly, remove_stale_temporaries)
from guided_diffusion.core.device import OUT_OF_MEMORY_ERRORS
=======
from guided_diffusion.core.atomic import atomic_output
from guided_diffusion.core.device import OUT_OF_MEMORY_ERRORS, resolve_device
>>>>>>> h-api
from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.distributed import setup_distributed
from guided_diffusion.sampling.conditions import (describe_condition, draw_library_sizes, label_columns,
                                                  latent_file_name, plan_conditions, unseen_conditions)
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.sampling.writer import COMPRESSIONS, NonFiniteOutput, decode_to_anndata, write_decoded_h5ad
from guided_diffusion.checkpoints import load_diffusion_model, resolve_autoencoder
from guided_diffusion.diffusion.guidance import guidance_formula
from guided_diffusion.sampling.reverse import condition_noise, sample_latents
<<<<<<< HEAD
from guided_diffusion.sampling.settings import (build_sampling_diffusion, check_settings, record,
                                                resolve_decoder_precision, resolve_guide_w, resolve_observation,
                                                resolve_settings)
=======
from guided_diffusion.sampling.settings import (OBSERVATIONS, PRECISIONS, SOLVERS, SamplerSettings, check_settings,
                                                resolve_decoder_precision, resolve_guide_w, resolve_observation,
                                                resolve_settings)
from guided_diffusion.core.checks import (check_bool, check_int, check_int_list, check_path, check_real, check_str,
                                          check_str_list)
>>>>>>> h-api

MANIFEST = "manifest.json"
GENERATED = "generated.h5ad"
_LATENT_FILE = re.compile(r"cell[0-9x_]+_cache[0-9]+_(non_)?uniform\.npy")
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
<<<<<<< HEAD
    # 1. what to draw: the observation, each cell's library size, its condition row and starting noise
    observation = resolve_observation(settings.observation, autoencoder)
    settings = replace(settings, decoder_precision=resolve_decoder_precision(settings, observation,
                                                                             autoencoder.device))
    check_memory(sum(count for _, count in plan), loaded.model.latent_dim)
    library_sizes = plan_library_sizes(loaded, plan, settings) if observation == "counts" else None
    cond_rows, noise = starting_points(plan, settings.seed, len(sizes), loaded.model.latent_dim)
    composed_rows, forms = guidance_forms(plan, checkpoint.condition_counts, sizes, settings)
    # 2. the reverse process, from the recorded noise schedule
    latents = run_reverse_process(loaded, cond_rows, noise, settings, progress, context, composed_rows)
    # 3. refuse non-finite latents (every rank), warn about latents far outside the training range
    check_finite_latents(latents)
    if context is not None and context.is_distributed and not context.is_main:
        context.barrier()
        return path, None
    warnings = range_warnings(latents, checkpoint.latent_range)
    unseen = unseen_conditions(plan, checkpoint.condition_counts, sizes)
    if unseen:
        warnings.append(f"{len(unseen)} of {len(plan)} conditions were never seen in training (e.g. "
                        f"{describe_condition(unseen[0], loaded.label_keys, loaded.vocabularies)}): their cells "
                        f"are extrapolated")
    own_claim = claim is None
=======
    # 1.-3. what to draw, the reverse process, the checks on the latents
    observation, settings, library_sizes, cond_rows, latents = draw_latents(loaded, autoencoder, plan, settings,
                                                                            progress, context, timings)
    if context is not None and context.is_distributed and not context.is_main:
        context.barrier()
        return path, None
    warnings = latent_warnings(loaded, plan, latents)
>>>>>>> h-api
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


def draw_latents(loaded, autoencoder, plan, settings, progress=True, context=None, timings=None):
    """Steps 1-3 of :func:`generate`: the observation, each cell's library size, condition row and starting
    noise, the reverse process from the recorded noise schedule, and the refusal of non-finite latents
    (every rank). Returns (observation, settings with the decoder precision resolved, library sizes or
    None, condition rows, latents)."""
    sizes = list(loaded.model.condition_sizes)
    observation = resolve_observation(settings.observation, autoencoder)
    settings = replace(settings, decoder_precision=resolve_decoder_precision(settings, observation,
                                                                             autoencoder.device))
    check_memory(sum(count for _, count in plan), loaded.model.latent_dim)
    library_sizes = plan_library_sizes(loaded, plan, settings) if observation == "counts" else None
    cond_rows, noise = starting_points(plan, settings.seed, len(sizes), loaded.model.latent_dim)
    started = time.perf_counter()
    latents = run_reverse_process(loaded, cond_rows, noise, settings, progress, context)
    if timings is not None:
        timings["reverse diffusion"] = timings.get("reverse diffusion", 0.0) + time.perf_counter() - started
    check_finite_latents(latents)
    return observation, settings, library_sizes, cond_rows, latents


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
    """Which guidance form each planned cell takes: (a boolean tensor over the cells, True for the composed
    form, or None when every cell takes the nested one; {"composed": n conditions, "nested": n conditions})."""
    if settings.guidance_form == "nested" or len(condition_sizes) < 2:
        return None, {"nested": len(plan)}
    if settings.guidance_form == "composed":
        composed = [True] * len(plan)
    else:  # auto: the composed form for the conditions never seen in training
        unseen = {tuple(row) for row in unseen_conditions(plan, condition_counts, condition_sizes)}
        composed = [tuple(row) in unseen for row, _ in plan]
    if not any(composed):
        return None, {"nested": len(plan)}
    rows = torch.cat([torch.full((count,), flag) for (_, count), flag in zip(plan, composed)])
    return rows, {"composed": sum(composed), "nested": len(plan) - sum(composed)}


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


# ---- 4./5. the output set ------------------------------------------------------------------------
STAGING_PREFIX = ".cell_sample-"
RUN_RECORD = "run.json"


class SampleDirClaim:
    """``--sample_dir`` locked by this run (``flock`` on the folder, as the trainers lock theirs) and this
    run's staging folder in it (``.cell_sample-PID-XXXX``, with ``run.json`` naming the run)."""

    def __init__(self, sample_dir, descriptor, staging, created=False):
        self.sample_dir, self._descriptor, self.staging, self.created = sample_dir, descriptor, staging, created

    def release(self):
        """Remove this run's staging folder (nothing else) and unlock the folder."""
        if self.staging is not None:
            remove_quietly(self.staging)
            self.staging = None
        if self._descriptor is not None:
            if self.created:  # a run refused or failed before writing leaves no folder it made
                with contextlib.suppress(OSError):
                    os.rmdir(self.sample_dir)
            os.close(self._descriptor)
            self._descriptor = None


def claim_sample_dir(sample_dir, flag="--sample_dir"):
    """Lock ``sample_dir`` for this run and make its staging folder; refuse a folder another run holds,
    naming that run. With the lock held, the staging folders and temporaries of killed runs are removed
    (no other run can be writing them)."""
    created = not os.path.exists(sample_dir)
    descriptor = lock_folder(sample_dir)
    if descriptor is None:
        raise UsageError(f"{flag} {sample_dir} is in use by another {_holder(sample_dir)}; wait for it to finish "
                         f"or choose another folder")
    try:
        for name in os.listdir(sample_dir):
            if name.startswith(STAGING_PREFIX):
                remove_quietly(os.path.join(sample_dir, name))
        remove_stale_temporaries(sample_dir)
        staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=sample_dir)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(os.path.join(staging, RUN_RECORD), "w") as stream:
            json.dump(record, stream)
    except BaseException:
        os.close(descriptor)
        raise
    return SampleDirClaim(sample_dir, descriptor, staging, created)


def _holder(sample_dir):
    """The run that holds ``sample_dir``, in words (from its staging folder's run.json)."""
    for name in sorted(os.listdir(sample_dir)):
        try:
            with open(os.path.join(sample_dir, name, RUN_RECORD)) as stream:
                record = json.load(stream)
            return (f"cell_sample.py run (pid {record['pid']} on {record['host']}, started {record['started']}: "
                    f"{record['command']})")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "run (a sampler or a trainer)"


def _naming_the_sample_dir(error, sample_dir, staging, n_cells, latent_dim, n_genes, observation):
    """A full disk while staging, reported for the final file and the space the whole set needs."""
    code = disk_error(error)
    if code is None:
        return error
    name = os.path.basename(getattr(error, "filename", "") or GENERATED)
    written = sum(os.path.getsize(os.path.join(base, file)) for base, _, files in os.walk(staging) for file in files)
    needed = n_cells * latent_dim * 4 + (n_cells * n_genes * 4 if observation == "mean" else 0) + (1 << 20)
    return DiskFull(os.path.join(sample_dir, name), code, needed=needed if observation == "mean" else None,
                    written=written)


def commit_output_set(sample_dir, staging):
    """Verify the staged set against its manifest, then swap it in: the earlier manifest goes first (a folder
    never looks complete with a mixed set), the new files replace the old ones, the earlier run's other
    output files are removed and the new manifest is renamed last. SIGINT/SIGTERM wait until it is done."""
    with open(os.path.join(staging, MANIFEST)) as stream:
        files = json.load(stream)["files"]
    for name, size in files.items():
        if os.path.getsize(os.path.join(staging, name)) != size:
            raise OSError(errno.EIO, f"{name} is {os.path.getsize(os.path.join(staging, name))} bytes, its "
                                     f"manifest says {size}", os.path.join(sample_dir, name))
    with h5py.File(os.path.join(staging, GENERATED), "r") as store:
        if "X" not in store or "obs" not in store:
            raise OSError(errno.EIO, "the written file is not a complete h5ad", os.path.join(sample_dir, GENERATED))
    with _signals_deferred():
        old = [name for name in os.listdir(sample_dir)
               if name in (MANIFEST, GENERATED) or _LATENT_FILE.fullmatch(name)]
        if MANIFEST in old:
            os.remove(os.path.join(sample_dir, MANIFEST))
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(sample_dir, name))
        for name in old:
            if name not in files and name != MANIFEST:
                os.remove(os.path.join(sample_dir, name))
        os.replace(os.path.join(staging, MANIFEST), os.path.join(sample_dir, MANIFEST))
        fsync_folder(sample_dir)
    replaced = [name for name in old if name != MANIFEST]
    if replaced:
        print(f"removed {len(replaced)} output files of an earlier run in {sample_dir}", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM arriving inside the block take effect when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {signum: signal.signal(signum, lambda number, frame: pending.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending[:1]:
            signal.raise_signal(signum)


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


def write_manifest(sample_dir, files, record):
    manifest = {"complete": True, "files": {name: os.path.getsize(os.path.join(sample_dir, name)) for name in files},
                "run": record}
    with atomic_output(os.path.join(sample_dir, MANIFEST)) as temp_path, open(temp_path, "w") as stream:
        json.dump(manifest, stream, indent=1, default=str)


# ---- the whole job, as cell_sample.py runs it -------------------------------------------------------
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


<<<<<<< HEAD
def sample_cells(request, settings):
    """Load the checkpoint, plan the conditions, find the autoencoder and generate; returns the h5ad path.
    Every input is checked before any output is touched."""
    check_settings(settings)
    # keep freed memory for reuse: the output stages allocate and free the same few-MB blocks for every
    # 128 cells, which glibc would otherwise map afresh (page faults; measured 1.2x the output stages' rate)
    reuse_freed_memory()
    context = setup_distributed(request.device)
    # the folder is locked before any work (a second run is refused at once); rank 0 writes the outputs
    claim = claim_sample_dir(request.sample_dir) if context.is_main else None
    try:
        return _sample_cells(request, settings, context, claim)
    finally:
        if claim is not None:
            claim.release()


def _sample_cells(request, settings, context, claim):
=======
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
    check_int(request.num_samples, "num_samples", 1)
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
    check_bool(settings.use_ddim, "use_ddim")
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
    check_str(settings.solver, "solver", SOLVERS)
    check_str(settings.decoder_precision, "decoder_precision", PRECISIONS)


def prepare_run(request, settings, device, loaded=None, autoencoder=None):
    """Load the checkpoint (unless ``loaded`` is given), resolve the settings against it, plan the conditions
    and find the autoencoder (unless given); returns (loaded, settings, plan, autoencoder)."""
>>>>>>> h-api
    torch.manual_seed(settings.seed)
    if loaded is None:
        loaded = load_diffusion_model(request.model_path, use_ema=request.use_ema, device=device)
    sizes = list(loaded.model.condition_sizes)
    if request.num_classes is not None and list(request.num_classes) != sizes:
        raise UsageError(f"--num_classes {' '.join(map(str, request.num_classes))} contradicts the checkpoint "
                         f"({' '.join(map(str, sizes))}); omit it")
    settings = resolve_settings(replace(settings, guide_w=resolve_guide_w(settings.guide_w, loaded.label_keys)),
                                loaded.checkpoint.sampling_defaults, device,
                                schedule_steps=int(loaded.checkpoint.diffusion["steps"]))
    plan = plan_conditions(loaded, request.conditions, request.all_combinations, request.match_counts,
                           request.num_samples)
    if autoencoder is None:
        autoencoder = resolve_autoencoder(loaded, request.vae_path, device)
    return loaded, settings, plan, autoencoder


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
    loaded, settings, plan, autoencoder = prepare_run(request, settings, context.device, loaded, autoencoder)
    if context.is_main:
        print(f"generating {sum(n for _, n in plan)} cells in {len(plan)} conditions with {settings.describe()}")
    path, _ = generate(loaded, autoencoder, plan, settings, request.sample_dir, progress=request.progress,
                       context=context, compression=request.compression, claim=claim)
    if context.is_main:
        print_plan(plan, loaded)
        print(f"wrote {path}")
    return path


# ---- the same job into memory -----------------------------------------------------------------------
def generate_anndata(loaded, autoencoder, plan, settings, progress=True, timings=None):
    """What :func:`generate` writes to generated.h5ad (one process), returned as an AnnData instead, with
    no file written: the same steps up to the latents, decoded by the writer's code into memory. Returns
    (AnnData, latents)."""
    observation, settings, library_sizes, cond_rows, latents = draw_latents(loaded, autoencoder, plan, settings,
                                                                            progress, None, timings)
    warnings = latent_warnings(loaded, plan, latents)
    obs = label_table(cond_rows, loaded)
    uns = provenance(loaded, autoencoder, settings, observation, len(latents), warnings)
    try:
        adata, value_range = decode_to_anndata(autoencoder, latents, obs, uns, progress=progress,
                                               library_sizes=library_sizes, seed=settings.seed, timings=timings,
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
