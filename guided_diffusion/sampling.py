"""Sampling: checkpoint -> conditions -> guided, cached reverse diffusion -> latents -> decoded h5ad.

The checkpoint rebuilds its own model (config, label vocabularies, genes, normalization, autoencoder
path and hash), so ``--model_path`` is all a user has to give.
"""
import itertools
import os
from dataclasses import asdict, dataclass, replace
from typing import Optional

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
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
    timestep_respacing: str = "50"
    eta: float = 0.0
    cache_interval: Optional[int] = None  # None: the checkpoint's, scaled to the sampled steps
    branch: Optional[int] = None  # None: the checkpoint's
    non_uniform: Optional[bool] = None  # None: the checkpoint's
    clip_denoised: bool = False
    batch_size: int = 1024
    seed: int = 0
    observation: str = "auto"
    precision: str = "auto"
    solver: str = ""  # "dpmpp2m": DPM-Solver++(2M); "": DDIM or ancestral DDPM as use_ddim says

    def describe(self):
        steps = self.timestep_respacing or "1000"
        method = "DPM-Solver++(2M)" if self.solver == "dpmpp2m" else "DDIM" if self.use_ddim else "DDPM"
        return f"{method} {steps} steps, cache {self.cache_interval} " \
               f"({'non-uniform' if self.non_uniform else 'uniform'}, branch {self.branch}), w={self.guide_w}"


OBSERVATIONS = ("auto", "counts", "mean")
PRECISIONS = ("auto", "fp32", "bf16")
FULL_SCHEDULE_STEPS = 1000


def has_fast_bf16(device):
    """True where bfloat16 matmuls run natively: CUDA devices that support them, CPUs with AMX or
    AVX512-BF16 (elsewhere bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


def resolve_precision(precision, device):
    """``auto`` -> ``bf16`` where the device has fast bf16 matmuls, else ``fp32``."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if has_fast_bf16(device) else "fp32"
    return precision


def matmul_precision(precision, device):
    """A context in which matrix multiplications run in ``precision`` (bf16: torch.autocast; the
    elementwise math, LayerNorm, softmax and the diffusion updates stay float32)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")


def scaled_cache_interval(recorded_interval, steps):
    """The checkpoint's cache interval counts steps of the full 1000-step schedule (as the original
    sampler ran); on ``steps`` respaced steps the same span of diffusion time is interval x steps / 1000
    steps, at least 1 (no reuse): 5 -> 5 at 1000 steps, 2 at 500, 1 at 250 or fewer."""
    return max(1, int(round(recorded_interval * steps / FULL_SCHEDULE_STEPS)))


def resolve_settings(settings, recorded, device):
    """Settings with nothing left open: the cache settings the user did not give come from the checkpoint's
    ``sampling_defaults`` (the interval scaled to the sampled steps), ``auto`` precision from the device."""
    if settings.cache_interval is not None and settings.cache_interval <= 0:
        raise UsageError(f"--cache_interval must be 1 or more (1 = no feature reuse), got {settings.cache_interval}")
    steps = build_sampling_diffusion(settings).num_timesteps
    return replace(
        settings,
        cache_interval=scaled_cache_interval(recorded["cache_interval"], steps)
        if settings.cache_interval is None else settings.cache_interval,
        branch=recorded["branch"] if settings.branch is None else settings.branch,
        non_uniform=recorded["non_uniform"] if settings.non_uniform is None else settings.non_uniform,
        precision=resolve_precision(settings.precision, device))


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


# The default: ancestral DDPM on 50 of the 1000 training steps (respaced), the checkpoint's cache interval
# scaled to them (5 of 1000 -> 1 of 50: no reuse), bf16 matmuls where the device runs them natively.
# Chosen by measurement against the faithful configuration (use_ddim False, timestep_respacing 1000,
# cache 5) on two datasets: README, "Speed".
DEFAULT_SETTINGS = SamplerSettings()
FAITHFUL_FLAGS = "--use_ddim False --timestep_respacing 1000 --cache_interval 5 --precision fp32"


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


def condition_matches(row, codes, condition_sizes):
    """Whether training label codes ``codes`` fall under condition ``row`` (a null key matches anything)."""
    return all(r == size or r == c for r, c, size in zip(row, codes, condition_sizes))


def training_cell_count(row, condition_counts, condition_sizes):
    """Training cells matching ``row`` (null keys match anything)."""
    return sum(entry[-1] for entry in condition_counts if condition_matches(row, entry[:-1], condition_sizes))


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


def draw_library_sizes(row, quantile_entries, condition_sizes, count, seed, condition_index):
    """Total counts for ``count`` generated cells of condition ``row``.

    ``quantile_entries`` is the checkpoint's ``library_size_quantiles``: per training label combination
    [code_1..code_K, n_cells, [quantiles of log total counts]]. Each cell picks a combination matching
    ``row`` (null keys match anything) in proportion to its cells, then a total interpolated from its
    quantiles at a uniform level. A combination never seen in training (--all_combinations) matches on
    its first keys only (e.g. the cell type of an unseen cell type x donor). Reproducible from
    (seed, condition_index).
    """
    row = list(row)
    for relaxed in range(len(row), -1, -1):  # an unseen combination: drop keys from the last until cells match
        wanted = row[:relaxed] + list(condition_sizes[relaxed:])
        matching = [entry for entry in quantile_entries if condition_matches(wanted, entry[:-2], condition_sizes)]
        if matching:
            break
    weights = np.array([entry[-2] for entry in matching], dtype=np.float64)
    quantiles = np.array([entry[-1] for entry in matching], dtype=np.float64)
    rng = np.random.default_rng([seed, 3_000_017, condition_index])
    chosen = rng.choice(len(matching), size=count, p=weights / weights.sum())
    levels = rng.random(count) * (quantiles.shape[1] - 1)
    lower = np.floor(levels).astype(np.int64)
    upper = np.minimum(lower + 1, quantiles.shape[1] - 1)
    fraction = levels - lower
    log_totals = quantiles[chosen, lower] * (1 - fraction) + quantiles[chosen, upper] * fraction
    return np.exp(log_totals).astype(np.float32)


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
        with matmul_precision(settings.precision, device):
            if settings.solver == "dpmpp2m":
                x = diffusion.dpm_solver_sample_loop(eps_fn, noise[part].shape, **common)
            elif settings.use_ddim:
                x = diffusion.ddim_sample_loop(eps_fn, noise[part].shape, eta=settings.eta, **common)
            else:
                x = diffusion.p_sample_loop(eps_fn, noise[part].shape, **common)
        x = x.float()
        latents[start - first_row:start - first_row + len(x)] = x.cpu()
    bar.close()
    return latents / latent_scale


# ---- outputs -----------------------------------------------------------------------------------------
def _atomic_npy(path, array):
    with atomic_output(path) as temp_path, open(temp_path, "wb") as stream:
        np.save(stream, array)


class StreamedCsrMatrix:
    """An anndata ``csr_matrix`` element in an open h5py group, written one block of rows at a time."""

    def __init__(self, parent, name, shape, dtype="float32"):
        group = parent.create_group(name)
        group.attrs["encoding-type"] = "csr_matrix"
        group.attrs["encoding-version"] = "0.1.0"
        group.attrs["shape"] = np.asarray(shape, dtype=np.int64)
        self.data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1 << 16,))
        self.indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="int32",
                                            chunks=(1 << 16,))
        self.indptr = group.create_dataset("indptr", shape=(shape[0] + 1,), dtype="int64")
        self.indptr[0] = 0
        self.rows, self.nnz = 0, 0

    def append(self, block):
        nnz = block.nnz
        for dataset, values in ((self.data, block.data), (self.indices, block.indices)):
            dataset.resize((self.nnz + nnz,))
            dataset[self.nnz:] = values
        self.indptr[self.rows + 1:self.rows + 1 + block.shape[0]] = block.indptr[1:] + self.nnz
        self.rows += block.shape[0]
        self.nnz += nnz


def log_normalize_counts(counts, target_sum):
    """CSR counts -> CSR log1p(counts / cell total x target_sum), as the loader normalizes real cells."""
    totals = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    scale = np.where(totals > 0, target_sum / np.maximum(totals, 1e-12), 0.0)
    normalized = counts.astype(np.float32, copy=True)
    normalized.data = np.log1p(normalized.data * np.repeat(scale, np.diff(normalized.indptr))).astype(np.float32)
    return normalized


def write_decoded_h5ad(path, autoencoder, latents, obs, uns, chunk_size=1024, progress=True, library_sizes=None,
                       seed=0, precision="fp32"):
    """Decode latents chunk by chunk straight into an .h5ad (temp name, renamed when complete).

    Without ``library_sizes``, X is the decoded mean expression (dense). With them (one total per cell),
    counts are drawn from the autoencoder's negative binomial: X holds their log-normalized values and
    ``layers['counts']`` the counts, both sparse; chunk ``i`` draws from a generator seeded by (seed, i).
    """
    n_cells, n_genes = len(latents), len(autoencoder.genes)
    device = autoencoder.device
    with atomic_output(path) as temp_path:
        with h5py.File(temp_path, "w") as store:
            store.attrs["encoding-type"] = "anndata"
            store.attrs["encoding-version"] = "0.1.0"
            if library_sizes is None:
                matrix = store.create_dataset("X", shape=(n_cells, n_genes), dtype="float32",
                                              chunks=(max(1, min(chunk_size, n_cells, 256)), n_genes))
                matrix.attrs["encoding-type"] = "array"
                matrix.attrs["encoding-version"] = "0.2.0"
                write_elem(store, "layers", {})
            else:
                matrix = StreamedCsrMatrix(store, "X", (n_cells, n_genes))
                write_elem(store, "layers", {})
                counts_matrix = StreamedCsrMatrix(store["layers"], "counts", (n_cells, n_genes))
            chunks = range(0, n_cells, chunk_size)
            for number, start in enumerate(tqdm(chunks, desc="decode", unit="chunk", disable=not progress)):
                block = torch.as_tensor(latents[start:start + chunk_size]).to(device)
                if library_sizes is None:
                    with matmul_precision(precision, device):
                        decoded = autoencoder.model.decode(block)
                    matrix[start:start + len(block)] = decoded.float().cpu().numpy()
                    continue
                generator = torch.Generator(device=device).manual_seed(
                    int(np.random.SeedSequence([seed, 2_000_003, number]).generate_state(1)[0]))
                totals = torch.as_tensor(library_sizes[start:start + chunk_size]).to(device)
                with matmul_precision(precision, device):
                    counts = autoencoder.model.sample_counts(block, totals, generator).cpu()
                counts = sp.csr_matrix((counts.values().numpy(), counts.col_indices().numpy().astype(np.int32),
                                        counts.crow_indices().numpy()), shape=tuple(counts.shape))
                counts_matrix.append(counts)
                matrix.append(log_normalize_counts(counts, autoencoder.normalization.target_sum))
            write_elem(store, "obs", obs)
            write_elem(store, "var", pd.DataFrame(index=pd.Index(autoencoder.genes, name="gene")))
            write_elem(store, "uns", uns)
            for empty in ("obsm", "varm", "obsp", "varp"):
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
    observation = resolve_observation(settings.observation, autoencoder)
    library_sizes = None
    if observation == "counts":
        quantiles = loaded.payload.get("library_size_quantiles")
        if not quantiles:
            raise UsageError(f"{loaded.path} records no library sizes (trained on log-normalized input); "
                             f"use --observation mean")
        library_sizes = np.concatenate([
            draw_library_sizes(row, quantiles, sizes, count, settings.seed, condition_index)
            for condition_index, (row, count) in enumerate(plan)])

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
    if library_sizes is not None:
        labels["library_size"] = library_sizes
    obs = pd.DataFrame(labels, index=pd.Index([f"generated_{i}" for i in range(len(latents))], name="cell"))
    uns = {"cfdiffusion": {
        "checkpoint": os.path.basename(loaded.path), "step": int(loaded.payload["step"]), "weights": loaded.weights,
        "vae_path": os.path.basename(autoencoder.path), "normalization": "log1p(normalize_total 1e4)"
        if not autoencoder.normalization.input_is_log else "as the training input (log-normalized)",
        "label_keys": keys, "n_cells": int(len(latents)), **{k: v for k, v in asdict(settings).items()},
        "sampler": "ddim" if settings.use_ddim else "ddpm", "observation": observation,
    }}
    write_decoded_h5ad(path, autoencoder, latents, obs, uns, progress=progress, library_sizes=library_sizes,
                       seed=settings.seed, precision=settings.precision)
    if context is not None:
        context.barrier()
    return path, latents
