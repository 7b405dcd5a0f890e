"""The diffusion checkpoint's schema: what a ``model{step}.pt`` / ``ema_*.pt`` file holds, in one place.

:class:`DiffusionCheckpoint` is written by the trainer (``training/pipeline.py`` builds its metadata with
:func:`training_metadata`; ``training/trainer.py`` adds weights, model config, step and EMA rate) and read by
the sampler with :meth:`DiffusionCheckpoint.load`, which checks the file's internal consistency
(required fields present and typed, vocabularies sorted and without duplicates, vocabulary sizes equal
to the condition sizes and to the weights' embedding shape) before anything is written.

Schema versions: 1 is the layout written before this module (no ``schema_version``, no training
config, no latent range); it is read here, and only here, with those fields left empty.
"""
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Optional

import numpy as np

from VAE.VAE_model import load_autoencoder
from guided_diffusion.core.container import file_sha256, latest_checkpoint, load_checkpoint, save_checkpoint
from guided_diffusion.core.errors import SettingError, UsageError, literal
from guided_diffusion.data import RESERVED_OBS_COLUMNS, check_genes
from guided_diffusion.diffusion.denoiser import CellUNet
from guided_diffusion.diffusion.schedules import SCHEDULES

SCHEMA_VERSION = 2
KINDS = ("diffusion_model", "diffusion_ema")
# obs columns the sampler writes beside the label keys: a label key may not take one of these names
SAMPLER_OBS_COLUMNS = tuple(RESERVED_OBS_COLUMNS)  # obs columns the sampler writes beside the labels
LATENT_QUANTILE_LEVELS = (0.001, 0.5, 0.999)
TRAINING_FIELDS = ("lr", "batch_size", "microbatch", "weight_decay", "ema_rate", "lr_anneal_steps", "p_uncond",
                   "seed")


@dataclass
class DiffusionCheckpoint:
    """Everything the sampler needs to rebuild and run a trained model, and how it was trained."""

    state_dict: dict
    model_config: dict
    step: int
    ema_rate: float
    label_keys: list
    vocabularies: dict
    condition_counts: list  # [[code_1..code_K, n_cells], ...] per label combination seen in training
    genes: list
    normalization: dict
    vae_path: str
    vae_path_from_model: str
    vae_sha256: str
    diffusion: dict  # the noise schedule: {"steps", "schedule", "predict"}
    sampling_defaults: dict  # {"branch", "cache_interval", "non_uniform"}
    latent_scale: float
    p_uncond: float
    seed: int
    library_size_quantiles: Optional[list] = None  # None: trained on log-normalized input
    latent_range: Optional[dict] = None  # {"levels", "quantiles" (per level, per dim)}; None before schema 2
    training: Optional[dict] = None  # the run's training config; None before schema 2
    data_fingerprint: Optional[dict] = None  # the training data's (guided_diffusion.data.fingerprint); None before
    data_changes: Optional[list] = None  # resumes on new data (--resume_on_new_data True), oldest first
    kind: str = "diffusion_model"
    schema_version: int = SCHEMA_VERSION

    # ---- layout ------------------------------------------------------------------------------
    def to_payload(self):
        return asdict(self)

    @classmethod
    def from_payload(cls, payload, path="checkpoint"):
        """Parse and check a loaded payload (either schema version); raises a one-line UsageError."""
        payload = dict(payload)
        payload.pop("format_version", None)
        version = payload.get("schema_version", 1)
        if type(version) is not int or not 1 <= version <= SCHEMA_VERSION:
            raise UsageError(f"{path} has diffusion schema version {version!r}; this code reads 1 to "
                             f"{SCHEMA_VERSION} (update cfDiffusion)")
        if version == 1:  # the layout before this module: no training config, no latent range
            payload.update(schema_version=1)
        known = {f.name for f in fields(cls)}
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in payload]
        if missing:
            raise UsageError(f"{path} is not a complete diffusion checkpoint: {', '.join(sorted(missing))} missing; "
                             f"it was edited or written by other software")
        checkpoint = cls(**{name: payload[name] for name in known if name in payload})
        checkpoint.validate(path)
        return checkpoint

    def metadata(self):
        """The fields the trainer stores beside weights, model config, step and EMA rate."""
        payload = self.to_payload()
        for name in ("state_dict", "model_config", "step", "ema_rate", "kind"):
            payload.pop(name)
        return payload

    def save(self, path):
        return save_checkpoint({k: v for k, v in self.to_payload().items() if k != "kind"}, path, kind=self.kind)

    @classmethod
    def load(cls, path, kinds=KINDS):
        return cls.from_payload(load_checkpoint(path, kinds=kinds), path)

    # ---- derived -----------------------------------------------------------------------------
    @property
    def condition_sizes(self):
        return [len(self.vocabularies[key]) for key in self.label_keys]

    @property
    def vae_file_name(self):
        return os.path.basename(self.vae_path)

    # ---- checks ------------------------------------------------------------------------------
    def validate(self, path="checkpoint"):
        """Internal consistency; each failure one line naming the file and the field."""
        def fail(message):
            raise UsageError(f"{path} is inconsistent: {message}; it was edited, is corrupt or was written by "
                             f"other software")

        typed = {"state_dict": dict, "model_config": dict, "step": int, "label_keys": list, "vocabularies": dict,
                 "condition_counts": list, "genes": list, "normalization": dict, "vae_path": str,
                 "vae_path_from_model": str, "vae_sha256": str, "diffusion": dict, "sampling_defaults": dict,
                 "seed": int}
        for name, kind in typed.items():
            if not isinstance(getattr(self, name), kind) or isinstance(getattr(self, name), bool):
                fail(f"{name} is a {type(getattr(self, name)).__name__}, not a {kind.__name__}")
        for name in ("ema_rate", "latent_scale", "p_uncond"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name} is {value!r}, not a finite number")
        if not self.latent_scale > 0:
            fail(f"latent_scale is {self.latent_scale}, not positive")
        _check_names(self.genes, "genes", fail)
        _check_names(self.label_keys, "label_keys", fail)
        if sorted(self.vocabularies) != sorted(self.label_keys):
            fail(f"vocabularies hold keys {sorted(self.vocabularies)} but label_keys are {self.label_keys}")
        for key in self.label_keys:
            vocabulary = self.vocabularies[key]
            _check_names(vocabulary, f"the vocabulary of {key}", fail)
            if vocabulary != sorted(vocabulary):
                fail(f"the vocabulary of {key} is not in sorted order (labels would be swapped)")
        sizes = list(self.model_config.get("condition_sizes", []))
        if sizes != self.condition_sizes:
            fail(f"the vocabulary sizes {self.condition_sizes} differ from the model's condition sizes {sizes}")
        embedding = self.state_dict.get("cond_embed.0.weight")
        if embedding is None or tuple(embedding.shape)[1:] != (sum(sizes),):
            shape = None if embedding is None else tuple(embedding.shape)
            fail(f"the condition embedding weight has shape {shape}, the vocabularies need {sum(sizes)} inputs")
        self._check_counts(fail)
        self._check_schedule(fail)
        if len(self.vae_sha256) != 64:
            fail("vae_sha256 is not a sha256 hex digest")
        clashes = sorted(set(self.label_keys) & set(SAMPLER_OBS_COLUMNS))
        if clashes:
            raise UsageError(f"label key {clashes[0]!r} of {path} is also a column the sampler writes "
                             f"({', '.join(SAMPLER_OBS_COLUMNS)}); rename that obs column and retrain")

    def _check_counts(self, fail):
        sizes, width = self.condition_sizes, len(self.label_keys)
        for entry in self.condition_counts:
            if not isinstance(entry, list) or len(entry) != width + 1 or \
                    any(not 0 <= code < size for code, size in zip(entry[:-1], sizes)):
                fail(f"condition_counts entry {entry!r} does not match the {width} label keys")
        for entry in self.library_size_quantiles or []:
            if not isinstance(entry, list) or len(entry) != width + 2 or not isinstance(entry[-1], list) or \
                    any(not 0 <= code < size for code, size in zip(entry[:-2], sizes)):
                fail("a library_size_quantiles entry does not match the label keys")

    def _check_schedule(self, fail):
        steps = self.diffusion.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            fail(f"the noise schedule's steps is {steps!r}")
        if self.diffusion.get("schedule") not in SCHEDULES or self.diffusion.get("predict") != "epsilon":
            fail(f"the noise schedule {self.diffusion} is not one this code samples ({', '.join(SCHEDULES)}; "
                 f"epsilon)")
        defaults = self.sampling_defaults
        interval, branch = defaults.get("cache_interval"), defaults.get("branch")
        if type(interval) is not int or interval < 1 or type(branch) is not int or branch < 0 or \
                type(defaults.get("non_uniform")) is not bool:
            fail(f"sampling_defaults {defaults} are not a cache interval >= 1, a branch >= 0 and non_uniform")
        unseen = defaults.get("unseen_guide_w")
        if unseen is not None and (not isinstance(unseen, dict) or sorted(unseen) != sorted(self.label_keys) or any(
                isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0
                for w in unseen.values())):
            fail(f"sampling_defaults' unseen_guide_w {unseen!r} is not a weight >= 0 per label key")
        interval = defaults.get("unseen_guidance_interval")
        if interval is not None and (not isinstance(interval, (list, tuple)) or len(interval) != 2 or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in interval)
                or not 0 <= interval[0] < interval[1] <= 1):
            fail(f"sampling_defaults' unseen_guidance_interval {interval!r} is not (low, high) with "
                 f"0 <= low < high <= 1")


def _check_names(names, what, fail):
    if any(not isinstance(name, str) for name in names):
        fail(f"{what} holds a value that is not a string")
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        fail(f"{what} holds {duplicate!r} twice")


def latent_range(latents, scale=1.0, levels=LATENT_QUANTILE_LEVELS):
    """Per-dimension quantiles of the training latents in the autoencoder's latent space (``latents``
    divided by ``scale``, the latent scale they were multiplied by): the sampler compares against them."""
    latents = np.asarray(latents)
    latents = latents[::max(1, len(latents) // 200_000)]  # a strided subset of very large runs
    quantiles = np.quantile(latents.astype(np.float64), levels, axis=0) / scale
    return {"levels": [float(level) for level in levels], "quantiles": quantiles.tolist()}


def training_metadata(*, dataset, condition_counts, library_size_quantiles, vae_path, vae_sha256, save_dir,
                      diffusion_steps, noise_schedule, sampling_defaults, latent_scale, latents, training):
    """The metadata dict the trainer stores in every model/EMA file (``latents``: the training latents,
    multiplied by ``latent_scale``)."""
    missing = [name for name in TRAINING_FIELDS if name not in training]
    if missing:
        raise ValueError(f"training config lacks {missing}")
    return {
        "label_keys": list(dataset.label_keys),
        "vocabularies": dataset.vocabularies,
        "condition_counts": condition_counts,
        "library_size_quantiles": library_size_quantiles,
        "genes": list(dataset.genes),
        "normalization": dataset.normalization.to_dict(),
        "vae_path": vae_path,
        "vae_path_from_model": os.path.relpath(os.path.abspath(vae_path), os.path.abspath(save_dir)),
        "vae_sha256": vae_sha256,
        "diffusion": {"steps": int(diffusion_steps), "schedule": noise_schedule, "predict": "epsilon"},
        "sampling_defaults": dict(sampling_defaults),
        "latent_scale": float(latent_scale),
        "latent_range": latent_range(latents, latent_scale),
        "p_uncond": float(training["p_uncond"]),
        "seed": int(training["seed"]),
        "training": {name: training[name] for name in TRAINING_FIELDS},
        "data_fingerprint": dataset.fingerprint,
        "data_changes": [],
        "schema_version": SCHEMA_VERSION,
    }


# ---- file names in a run folder ----
def model_file(save_dir, step):
    return os.path.join(save_dir, f"model{step:06d}.pt")


def ema_file(save_dir, rate, step):
    return os.path.join(save_dir, f"ema_{rate}_{step:06d}.pt")


def optimizer_file(save_dir, step):
    return os.path.join(save_dir, f"opt{step:06d}.pt")


def latest_model_file(folder):
    """The newest ``model{step}.pt`` in ``folder`` whose ``opt{step}.pt`` exists: a complete set, since the
    model file is written last (a run killed mid-save leaves an older complete set as the newest)."""
    path = latest_checkpoint(folder, r"model(\d+)\.pt", lambda step: [os.path.basename(optimizer_file(folder, step))])
    if path is None:
        raise SettingError(f"{{resume_checkpoint}} {literal(folder)} holds no complete checkpoint (model*.pt with its "
                           f"opt*.pt); give a model*.pt file or start without {{resume_checkpoint}}",
                           "resume_checkpoint")
    return path


def checkpoint_files(folder):
    """Names of the diffusion checkpoint files (model, EMA, optimizer) in ``folder``."""
    if not os.path.isdir(folder):
        return []
    return [name for name in os.listdir(folder) if name.endswith(".pt") and not name.startswith(".")
            and (name.startswith("model") or name.startswith("ema_") or name.startswith("opt"))]


# ---- the sampler's side: the denoiser rebuilt, its autoencoder found ----
class LoadedModel:
    """A diffusion checkpoint turned back into a model plus the record it carries."""

    def __init__(self, model, checkpoint, path, weights):
        self.model = model
        self.checkpoint = checkpoint
        self.path = path
        self.weights = weights  # "ema" or "raw"

    @property
    def label_keys(self):
        return list(self.checkpoint.label_keys)

    @property
    def vocabularies(self):
        return self.checkpoint.vocabularies


def record_unseen_guidance(path, weights, choice, interval=(0.0, 1.0)):
    """Record ``weights`` ({label key: weight}) as the guidance weights of conditions never seen in training in
    the diffusion checkpoint ``path`` and, for a ``model{step}.pt``, its EMA sibling (the file the sampler
    reads by default): ``sampling_defaults["unseen_guide_w"]``, with ``choice`` (how they were chosen) and
    ``interval`` (the part of the noise schedule they were chosen to guide, ``unseen_guidance_interval``) beside
    them. Each file is rewritten atomically and otherwise unchanged; returns the files written."""
    checkpoint = DiffusionCheckpoint.load(path)
    paths = [path]
    if checkpoint.kind == "diffusion_model":
        sibling = ema_file(os.path.dirname(path), checkpoint.ema_rate, checkpoint.step)
        if os.path.exists(sibling):
            paths.append(sibling)
    for each in paths:
        target = checkpoint if each == path else DiffusionCheckpoint.load(each, kinds=("diffusion_ema",))
        unknown = sorted(set(weights) ^ set(target.label_keys))
        if unknown:
            raise UsageError(f"the weights name keys {sorted(weights)}, {each} has label keys {target.label_keys}")
        target.sampling_defaults = dict(target.sampling_defaults, unseen_guide_w={k: float(weights[k])
                                                                                  for k in target.label_keys},
                                        unseen_guide_w_choice=choice,
                                        unseen_guidance_interval=[float(interval[0]), float(interval[1])])
        target.validate(each)
        target.save(each)
    return paths


def load_diffusion_model(path, use_ema=True, device="cpu"):
    """Rebuild the denoiser from ``model{step}.pt`` (EMA sibling by default) or an ``ema_*.pt`` file."""
    checkpoint = DiffusionCheckpoint.load(path)
    weights = "ema" if checkpoint.kind == "diffusion_ema" else "raw"
    if checkpoint.kind == "diffusion_model" and use_ema:
        sibling = ema_file(os.path.dirname(path), checkpoint.ema_rate, checkpoint.step)
        if not os.path.exists(sibling):
            raise UsageError(f"the EMA weights {sibling} next to {path} are missing; "
                             f"pass --use_ema False to sample the raw weights")
        checkpoint = DiffusionCheckpoint.load(sibling, kinds=("diffusion_ema",))
        weights = "ema"
    try:
        model = CellUNet(**checkpoint.model_config)
        model.load_state_dict(checkpoint.state_dict)
    except (TypeError, ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path}: the weights do not fit the recorded model config ({first_line}); the file "
                         f"was edited or is corrupt") from None
    model.to(device).eval()
    return LoadedModel(model, checkpoint, path, weights)


def autoencoder_candidates(loaded):
    """Where the autoencoder may be: the recorded path, the recorded path relative to the model, and a file
    of the recorded name beside the model (a model folder moved together with its autoencoder)."""
    folder = os.path.dirname(os.path.abspath(loaded.path))
    checkpoint = loaded.checkpoint
    paths = [checkpoint.vae_path, os.path.join(folder, checkpoint.vae_path_from_model),
             os.path.join(folder, checkpoint.vae_file_name)]
    return list(dict.fromkeys(p for p in paths if p))


def resolve_autoencoder(loaded, vae_path, device):
    """Find the autoencoder (flag, or the first recorded candidate with the recorded hash) and check it."""
    candidates = [vae_path] if vae_path else autoencoder_candidates(loaded)
    existing = [p for p in candidates if os.path.isfile(p)]
    if not existing:
        raise UsageError(f"autoencoder not found at {' or '.join(candidates)}; pass --vae_path")
    found = next((p for p in existing if file_sha256(p) == loaded.checkpoint.vae_sha256), None)
    if found is None:
        raise UsageError(f"the autoencoder {existing[0]} is not the one this model was trained with "
                         f"(sha256 differs); pass the right --vae_path")
    autoencoder, _ = load_autoencoder(found, device=device)
    check_genes(loaded.checkpoint.genes, autoencoder.genes, what=f"the diffusion model {loaded.path}")
    return autoencoder
