"""Sampling: checkpoint -> conditions -> guided, cached reverse diffusion -> latents -> decoded h5ad.

The checkpoint rebuilds its own model (config, label vocabularies, genes, normalization, autoencoder
path and hash), so ``--model_path`` is all a user has to give.
"""
import itertools
import os
from dataclasses import asdict, dataclass

import h5py
import numpy as np
import pandas as pd
import torch
from anndata.io import write_elem
from tqdm.auto import tqdm

from VAE.VAE_model import load_autoencoder

from .cell_model import CellUNet
from .atomic import atomic_output
from .checkpoint import file_sha256, load_checkpoint
from .cli import UsageError
from .data import check_genes
from .feature_cache import refresh_schedule
from .guidance import guided_eps_fn
from .respace import create_diffusion
from .train_util import ema_file


@dataclass
class SamplerSettings:
    """How the reverse process runs; recorded in the output's ``uns``."""

    guide_w: float = 0.5
    use_ddim: bool = False
    timestep_respacing: str = ""
    eta: float = 0.0
    cache_interval: int = 5
    branch: int = 0
    non_uniform: bool = False
    clip_denoised: bool = False
    batch_size: int = 1024
    seed: int = 0

    def describe(self):
        steps = self.timestep_respacing or "1000"
        return f"{'DDIM' if self.use_ddim else 'DDPM'} {steps} steps, cache {self.cache_interval} " \
               f"({'non-uniform' if self.non_uniform else 'uniform'}, branch {self.branch}), w={self.guide_w}"


DEFAULT_SETTINGS = SamplerSettings()


class LoadedModel:
    """A diffusion checkpoint turned back into a model plus the metadata it carries."""

    def __init__(self, model, payload, path, weights):
        self.model = model
        self.payload = payload
        self.path = path
        self.weights = weights  # "ema" or "raw"

    @property
    def label_keys(self):
        return list(self.payload["label_keys"])

    @property
    def vocabularies(self):
        return self.payload["vocabularies"]


def load_diffusion_model(path, use_ema=True, device="cpu"):
    """Rebuild the denoiser from ``model{step}.pt`` (EMA sibling by default) or an ``ema_*.pt`` file."""
    payload = load_checkpoint(path, kinds=("diffusion_model", "diffusion_ema"))
    weights = "ema" if payload["kind"] == "diffusion_ema" else "raw"
    if payload["kind"] == "diffusion_model" and use_ema:
        sibling = ema_file(os.path.dirname(path), payload["ema_rate"], int(payload["step"]))
        if not os.path.exists(sibling):
            raise UsageError(f"the EMA weights {sibling} next to {path} are missing; "
                             f"pass --use_ema False to sample the raw weights")
        payload = load_checkpoint(sibling, kinds=("diffusion_ema",))
        weights = "ema"
    model = CellUNet(**payload["model_config"])
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    return LoadedModel(model, payload, path, weights)


def resolve_autoencoder(loaded, vae_path, device):
    """Find the autoencoder (flag, recorded path, or recorded path relative to the model) and check it."""
    payload = loaded.payload
    candidates = [vae_path] if vae_path else [
        payload["vae_path"],
        os.path.join(os.path.dirname(os.path.abspath(loaded.path)), payload["vae_path_from_model"]),
    ]
    found = next((p for p in candidates if p and os.path.exists(p)), None)
    if found is None:
        raise UsageError(f"autoencoder not found at {' or '.join(candidates)}; pass --vae_path")
    if file_sha256(found) != payload["vae_sha256"]:
        raise UsageError(f"the autoencoder {found} is not the one this model was trained with "
                         f"(sha256 differs); pass the right --vae_path")
    autoencoder, _ = load_autoencoder(found, device=device)
    check_genes(payload["genes"], autoencoder.genes, what=f"the diffusion model {loaded.path}")
    return autoencoder


# ---- conditions ------------------------------------------------------------------------------------
def parse_condition(spec, label_keys, vocabularies, condition_sizes):
    """``KEY=VALUE[,KEY=VALUE]`` -> a code row; keys left out get their null (unconditioned) value."""
    row = list(condition_sizes)
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UsageError(f"--condition takes KEY=VALUE[,KEY=VALUE], got {spec!r}")
        if key not in label_keys:
            raise UsageError(f"--condition key {key!r} is not a label key of this model; "
                             f"label keys: {', '.join(label_keys)}")
        if value not in vocabularies[key]:
            raise UsageError(f"--condition {key}={value}: unknown value; valid values of {key}: "
                             f"{', '.join(vocabularies[key])}")
        row[label_keys.index(key)] = vocabularies[key].index(value)
    return row


def training_cell_count(row, condition_counts, condition_sizes):
    """Training cells matching ``row`` (null keys match anything)."""
    total = 0
    for entry in condition_counts:
        codes, count = entry[:-1], entry[-1]
        if all(r == size or r == c for r, c, size in zip(row, codes, condition_sizes)):
            total += count
    return total


def plan_conditions(loaded, specs=(), all_combinations=False, match_counts=False, num_samples=1000):
    """The conditions to generate and the number of cells of each: [(code_row, n_cells), ...]."""
    keys, vocabularies = loaded.label_keys, loaded.vocabularies
    sizes = list(loaded.model.condition_sizes)
    seen = [entry[:-1] for entry in loaded.payload["condition_counts"]]
    if specs:
        rows = [parse_condition(spec, keys, vocabularies, sizes) for spec in specs]
    elif all_combinations:
        rows = [list(combo) for combo in itertools.product(*[range(n) for n in sizes])]
    else:
        rows = seen
    plan = []
    for row in rows:
        if match_counts:
            count = training_cell_count(row, loaded.payload["condition_counts"], sizes)
            if count == 0:
                raise UsageError(f"--match_counts: condition {describe_condition(row, keys, vocabularies)} "
                                 f"has no training cells; give --num_samples without --match_counts")
        else:
            count = num_samples
        plan.append((row, count))
    return plan


def describe_condition(row, label_keys, vocabularies):
    parts = [f"{key}={vocabularies[key][code]}" for key, code in zip(label_keys, row) if code < len(vocabularies[key])]
    return ",".join(parts) or "unconditional"


def latent_file_name(row, condition_sizes, settings):
    index = "_".join(str(code) if code < size else "x" for code, size in zip(row, condition_sizes))
    mode = "non_uniform" if settings.non_uniform else "uniform"
    return f"cell{index}_cache{settings.cache_interval}_{mode}.npy"


def condition_noise(seed, condition_index, n_cells, latent_dim):
    """Every condition gets its own noise stream, independent of batching and of other conditions."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, condition_index]).generate_state(1)[0]))
    return torch.randn((n_cells, latent_dim), generator=generator)


# ---- the reverse process ---------------------------------------------------------------------------
def build_sampling_diffusion(settings, num_timesteps=1000, latent_scale=1.0):
    try:
        return create_diffusion(num_timesteps, settings.timestep_respacing or str(num_timesteps),
                                clip_bound=latent_scale)
    except ValueError as error:
        raise UsageError(f"--timestep_respacing {settings.timestep_respacing!r}: {error}; give a step count "
                         f"such as 250 or ddim50 (at most {num_timesteps})") from None


@torch.inference_mode()
def sample_latents(model, cond_rows, noise, settings, progress=True, batches=None, latent_scale=1.0):
    """Reverse diffusion for every row of ``cond_rows`` starting from ``noise``; batches mix conditions.

    Batch ``b`` holds rows ``[b * batch_size, (b + 1) * batch_size)`` and draws its step noise from a
    generator seeded by (seed, b), so a batch's result does not depend on which process runs it.
    ``batches`` (a ``range`` of batch numbers, default all) runs only those and returns their rows.
    The model works on latents multiplied by ``latent_scale`` (recorded at training); the result is
    returned in the autoencoder's latent space (divided by it).
    """
    device = next(model.parameters()).device
    diffusion = build_sampling_diffusion(settings, latent_scale=latent_scale)
    try:
        refresh = refresh_schedule(diffusion.num_timesteps, settings.cache_interval, settings.non_uniform)
        if settings.cache_interval > 1:
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
        cond = cond_rows[part].to(device)
        cache = model.make_cache(settings.branch) if settings.cache_interval > 1 else None
        eps_fn = guided_eps_fn(model, cond, settings.guide_w, cache, refresh if cache is not None else None)
        generator = torch.Generator(device=device).manual_seed(
            int(np.random.SeedSequence([settings.seed, 1_000_003, batch_index]).generate_state(1)[0]))
        common = dict(noise=noise[part].to(device), generator=generator, clip_denoised=settings.clip_denoised,
                      on_step=lambda *_: bar.update(1))
        if settings.use_ddim:
            x = diffusion.ddim_sample_loop(eps_fn, noise[part].shape, eta=settings.eta, **common)
        else:
            x = diffusion.p_sample_loop(eps_fn, noise[part].shape, **common)
        latents[start - first_row:start - first_row + len(x)] = x.cpu()
    bar.close()
    return latents / latent_scale


# ---- outputs -----------------------------------------------------------------------------------------
def _atomic_npy(path, array):
    with atomic_output(path) as temp_path, open(temp_path, "wb") as stream:
        np.save(stream, array)


def write_decoded_h5ad(path, autoencoder, latents, obs, uns, chunk_size=2048, progress=True):
    """Decode latents chunk by chunk straight into an .h5ad (temp name, renamed when complete)."""
    n_cells, n_genes = len(latents), len(autoencoder.genes)
    with atomic_output(path) as temp_path:
        with h5py.File(temp_path, "w") as store:
            store.attrs["encoding-type"] = "anndata"
            store.attrs["encoding-version"] = "0.1.0"
            matrix = store.create_dataset("X", shape=(n_cells, n_genes), dtype="float32",
                                          chunks=(max(1, min(chunk_size, n_cells, 256)), n_genes))
            matrix.attrs["encoding-type"] = "array"
            matrix.attrs["encoding-version"] = "0.2.0"
            for start in tqdm(range(0, n_cells, chunk_size), desc="decode", unit="chunk", disable=not progress):
                block = torch.as_tensor(latents[start:start + chunk_size]).to(autoencoder.device)
                matrix[start:start + len(block)] = autoencoder.model.decode(block).cpu().numpy()
            write_elem(store, "obs", obs)
            write_elem(store, "var", pd.DataFrame(index=pd.Index(autoencoder.genes, name="gene")))
            write_elem(store, "uns", uns)
            for empty in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(store, empty, {})


def generate(loaded, autoencoder, plan, settings, sample_dir, progress=True, context=None):
    """Sample every planned condition, save per-condition latents and one decoded, labelled h5ad.

    With a distributed ``context`` each rank samples a contiguous range of whole batches, the latents
    are gathered and rank 0 writes the outputs (identical to one process with the same seed and
    --batch_size); the other ranks return (path, None) once they are written.
    """
    keys, vocabularies = loaded.label_keys, loaded.vocabularies
    sizes = list(loaded.model.condition_sizes)
    latent_dim = loaded.model.latent_dim
    rows, noises = [], []
    for condition_index, (row, count) in enumerate(plan):
        rows.append(torch.tensor([row] * count, dtype=torch.long).reshape(count, len(sizes)))
        noises.append(condition_noise(settings.seed, condition_index, count, latent_dim))
    cond_rows, noise = torch.cat(rows), torch.cat(noises)
    latent_scale = float(loaded.payload.get("latent_scale", 1.0))
    path = os.path.join(sample_dir, "generated.h5ad")
    if context is not None and context.is_distributed:
        n_batches = -(-len(cond_rows) // settings.batch_size)
        batches = range(n_batches)[context.shard(n_batches)]
        local = sample_latents(loaded.model, cond_rows, noise, settings, progress=progress and context.is_main,
                               batches=batches, latent_scale=latent_scale).numpy()
        latents = context.all_gather_rows(local)
        if not context.is_main:
            context.barrier()
            return path, None
    else:
        latents = sample_latents(loaded.model, cond_rows, noise, settings, progress=progress,
                                 latent_scale=latent_scale).numpy()

    os.makedirs(sample_dir, exist_ok=True)
    start = 0
    for row, count in plan:
        _atomic_npy(os.path.join(sample_dir, latent_file_name(row, sizes, settings)), latents[start:start + count])
        start += count

    labels = {}
    for column, key in enumerate(keys):
        names = vocabularies[key] + ["unconditioned"]
        codes = cond_rows[:, column].numpy()
        labels[key] = pd.Categorical([names[c] for c in codes], categories=sorted(set(names[c] for c in codes)))
    obs = pd.DataFrame(labels, index=pd.Index([f"generated_{i}" for i in range(len(latents))], name="cell"))
    uns = {"cfdiffusion": {
        "checkpoint": os.path.basename(loaded.path), "step": int(loaded.payload["step"]), "weights": loaded.weights,
        "vae_path": os.path.basename(autoencoder.path), "normalization": "log1p(normalize_total 1e4)"
        if not autoencoder.normalization.input_is_log else "as the training input (log-normalized)",
        "label_keys": keys, "n_cells": int(len(latents)), **{k: v for k, v in asdict(settings).items()},
        "sampler": "ddim" if settings.use_ddim else "ddpm",
    }}
    write_decoded_h5ad(path, autoencoder, latents, obs, uns, progress=progress)
    if context is not None:
        context.barrier()
    return path, latents
