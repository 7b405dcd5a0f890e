"""h5ad -> normalize -> encode with the autoencoder -> latents -> train the conditional denoiser.

With ``--backed`` the h5ad is streamed: cells are encoded block by block. The N x latent_dim latents are
then held in memory, or, with ``--latents_on_disk`` (by default when the h5ad is streamed), kept in the
run folder and read a batch at a time (:mod:`~guided_diffusion.training.latent_store`), so memory does
not grow with the cells. Under torchrun/mpiexec each rank encodes its contiguous share of the cells; in
memory the latents are all-gathered, on disk each rank writes its share into the one file. Training then
runs data-parallel (:class:`~guided_diffusion.training.trainer.DiffusionTrainer`).
"""
import os

import numpy as np
import torch

from VAE.VAE_model import load_autoencoder

from guided_diffusion.diffusion.denoiser import CellUNet
from guided_diffusion.core.container import file_sha256, load_checkpoint
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import check_num_classes, load_dataset
from guided_diffusion.checkpoints import TRAINING_FIELDS, training_metadata
from guided_diffusion.core.distributed import DistributedContext, setup_distributed
from guided_diffusion.diffusion.respace import create_diffusion
from guided_diffusion.diffusion.schedules import DIFFUSION_STEPS, NOISE_SCHEDULE
from guided_diffusion.checkpoints import checkpoint_files, latest_model_file
from guided_diffusion.training.trainer import DiffusionTrainer
from guided_diffusion.training.latent_store import LatentStore, encode_to_store, store_key
from guided_diffusion.core.errors import SettingError, literal
from guided_diffusion.training.loop import claim_run_folder
from guided_diffusion.training.config import validate

LIBRARY_SIZE_QUANTILES = 101


def condition_counts(label_codes):
    """Every label combination seen in the data with its number of cells: [[code_1..code_K, count], ...]."""
    combos, counts = np.unique(label_codes, axis=0, return_counts=True)
    return [[int(c) for c in combo] + [int(n)] for combo, n in zip(combos, counts)]


def library_size_quantiles(library_sizes, label_codes, n_quantiles=LIBRARY_SIZE_QUANTILES):
    """Per label combination (in :func:`condition_counts` order), quantiles of the cells' log total counts:
    [[code_1..code_K, n_cells, [q_0..q_n-1]], ...]; the sampler draws generated cells' totals from them."""
    combos, inverse, cells = np.unique(label_codes, axis=0, return_inverse=True, return_counts=True)
    log_totals = np.log(np.maximum(np.asarray(library_sizes, dtype=np.float64), 1.0))
    levels = np.linspace(0.0, 1.0, n_quantiles)
    return [[int(c) for c in combo] + [int(cells[i]), np.quantile(log_totals[inverse.ravel() == i], levels).tolist()]
            for i, combo in enumerate(combos)]


class CellRange:
    """Cells ``[start, stop)`` of a dataset, seen as a dataset of their own (``n_cells`` and ``rows``)."""

    def __init__(self, dataset, start, stop):
        self.dataset, self.start, self.stop = dataset, start, stop

    @property
    def n_cells(self):
        return self.stop - self.start

    def rows(self, index):
        return self.dataset.rows(np.asarray(index) + self.start)


def use_latents_on_disk(setting, dataset):
    """``--latents_on_disk``: True, False, or auto (on disk when the h5ad is streamed)."""
    return dataset.is_backed if str(setting).lower() == "auto" else bool(setting)


def prepare_latents(data, vae_path, num_classes, device, progress=True, context=None, latents_on_disk=False,
                    folder=None, vae_sha256=None):
    """Load the data (a :class:`~guided_diffusion.training.config.DataConfig`) and the autoencoder, check
    they agree, and encode every cell (in batches).

    In memory (an array), distributed, each rank encodes its share of the cells and every rank receives all
    latents. On disk (``latents_on_disk`` True, or auto with a streamed h5ad; ``folder``: the run folder;
    ``vae_sha256``: the autoencoder's hash) a :class:`~guided_diffusion.training.latent_store.LatentStore`
    over ``folder/latents.npy``, reused when it was encoded from the same data, autoencoder and
    normalization, else written by every rank for its share.
    """
    context = context or DistributedContext(device=device)
    dataset = load_dataset(data.data_dir, label_keys=data.label_key, layer=data.layer,
                           input_is_log=data.input_is_log, filters=data.filter,
                           backed=data.backed, block_rows=data.block_rows,
                           allow_count_like_log=data.allow_count_like_log)
    try:
        check_num_classes(num_classes, dataset)
        autoencoder, _ = load_autoencoder(vae_path, device=device)
        autoencoder.check_dataset(dataset)
        autoencoder.check_conditions(dataset)
        if use_latents_on_disk(latents_on_disk, dataset):
            key = store_key(dataset.fingerprint, vae_sha256 or file_sha256(vae_path), dataset.normalization.to_dict())
            latents = LatentStore(encode_to_store(folder, dataset, autoencoder, key, context, CellRange, progress))
        else:
            share = context.shard(dataset.n_cells)
            local = autoencoder.encode_dataset(CellRange(dataset, share.start, share.stop), batch_size=1024,
                                               progress=progress and context.is_main)
            latents = context.all_gather_rows(local)
    finally:
        dataset.close()
    return dataset, autoencoder, latents


def latent_std(latents, chunk_rows=8192):
    """Standard deviation of all latent components, in float64 row chunks (no N x latent_dim temporary)."""
    count = latents.size
    mean = sum(float(latents[start:start + chunk_rows].sum(dtype=np.float64))
               for start in range(0, len(latents), chunk_rows)) / count
    squares = 0.0
    for start in range(0, len(latents), chunk_rows):
        centred = latents[start:start + chunk_rows].astype(np.float64).ravel() - mean
        squares += float(centred @ centred)
    return (squares / count) ** 0.5


def resolve_latent_scale(value, latents):
    """The factor the latents are multiplied by for diffusion (the sampler divides it out again).

    ``auto`` gives the latent components unit variance: the autoencoder's latents lie on the unit
    sphere, so each of the 128 components is only ~0.09 in size and, unscaled, the signal is drowned
    by the unit-variance noise for most of the schedule. ``1`` keeps the original cfDiffusion scale.
    """
    if str(value).lower() == "auto":
        return float(1.0 / max(latent_std(latents), 1e-8))
    try:
        scale = float(value)
    except ValueError:
        raise SettingError(f"{{latent_scale}} takes 'auto' or a positive number, got {literal(repr(value))}",
                           "latent_scale") from None
    if not 0 < scale < float("inf"):
        raise SettingError(f"{{latent_scale}} must be a positive number, got {literal(value)}", "latent_scale")
    return scale


def train_diffusion(data, model_config, training):
    """Train (or resume) the diffusion model; returns the path of the last model file.

    ``data``, ``model_config`` and ``training`` are the :class:`~guided_diffusion.training.config.DataConfig`,
    :class:`~guided_diffusion.training.config.DiffusionModelConfig` and
    :class:`~guided_diffusion.training.config.DiffusionTrainingConfig` of the run.
    """
    validate(data, model_config, training)
    if training.seed < 0:
        raise SettingError(f"{{seed}} must be zero or positive, got {training.seed}", "seed")
    context = setup_distributed(training.device)
    device = context.device
    context.check_batch_size(training.batch_size)
    save_dir = os.path.join(training.save_dir, training.model_name)
    if context.is_main:
        check_writable_dir(save_dir, "--save_dir")  # created by the trainer once the inputs are checked
    dataset, autoencoder, latents = prepare_latents(data, model_config.vae_path, model_config.num_classes, device,
                                                    training.progress, context, training.latents_on_disk, save_dir)
    on_disk = isinstance(latents, LatentStore)

    latent_scale = resolve_latent_scale(model_config.latent_scale, latents)
    if training.resume_checkpoint and training.resume_on_new_data and str(model_config.latent_scale).lower() == "auto":
        latent_scale = recorded_latent_scale(training.resume_checkpoint, latent_scale)  # the model's scale
    if on_disk:
        latents.scale = latent_scale  # applied to the rows as they are read
    else:
        np.multiply(latents, latent_scale, out=latents)  # in place: the N x latent_dim latents exist once
    torch.manual_seed(training.seed)
    model = CellUNet(latent_dim=latents.shape[1], hidden_dims=model_config.hidden_dims,
                     condition_sizes=dataset.num_classes, dropout=model_config.dropout)
    try:
        model.validate_branch(model_config.branch)
    except ValueError as error:
        raise SettingError(f"{{branch}} {model_config.branch}: {literal(error)}", "branch") from None
    config = _RecordedSettings(model_config, training)
    metadata = training_metadata(
        dataset=dataset, condition_counts=condition_counts(dataset.label_codes),
        library_size_quantiles=None if dataset.library_sizes() is None
        else library_size_quantiles(dataset.library_sizes(), dataset.label_codes),
        vae_path=config.vae_path, vae_sha256=file_sha256(config.vae_path), save_dir=save_dir,
        diffusion_steps=DIFFUSION_STEPS, noise_schedule=NOISE_SCHEDULE, latent_scale=latent_scale,
        latents=latents.subsample() if on_disk else latents,  # on disk: a bounded strided subset of the rows
        sampling_defaults={"branch": config.branch, "cache_interval": config.cache_interval,
                           "non_uniform": config.non_uniform},
        training={name: getattr(config, name) for name in TRAINING_FIELDS})
    trainer = DiffusionTrainer(
        model, create_diffusion(DIFFUSION_STEPS, schedule=NOISE_SCHEDULE), latents, dataset.label_codes, metadata, save_dir,
        batch_size=training.batch_size, microbatch=training.microbatch, lr=training.lr,
        weight_decay=training.weight_decay, ema_rate=training.ema_rate, lr_anneal_steps=training.lr_anneal_steps,
        p_uncond=training.p_uncond, save_interval=training.save_interval, log_interval=training.log_interval,
        seed=training.seed, device=device, max_minutes=training.max_minutes, context=context,
        precision=training.precision, resume_on_new_data=training.resume_on_new_data, data_dir=data.data_dir)
    if training.resume_checkpoint:
        trainer.resume(training.resume_checkpoint)
    folder = claim_run_folder(save_dir, "save_dir", checkpoint_files, resuming=bool(training.resume_checkpoint),
                              overwrite=training.overwrite, resume_setting="resume_checkpoint",
                              is_main=context.is_main)
    try:
        return trainer.run_loop(progress=training.progress)
    finally:
        folder.release()


def recorded_latent_scale(resume_checkpoint, default):
    """The latent scale the checkpoint to resume was trained with (``default`` if it records none): a run
    continued on new data keeps the scale its model learned, not one recomputed from the new cells."""
    path = latest_model_file(resume_checkpoint) if os.path.isdir(resume_checkpoint) else resume_checkpoint
    scale = load_checkpoint(path, kinds=("diffusion_model",)).get("latent_scale")
    return float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else default


class _RecordedSettings:
    """The settings the metadata records, read as ``config.NAME`` from the model or training config."""

    def __init__(self, *configs):
        self._configs = configs

    def __getattr__(self, name):
        for config in self._configs:
            if hasattr(config, name):
                return getattr(config, name)
        raise AttributeError(name)
