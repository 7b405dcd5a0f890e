"""h5ad -> normalize -> encode with the autoencoder -> latents -> train the conditional denoiser."""
import os

import numpy as np
import torch

from VAE.VAE_model import load_autoencoder

from .cell_model import CellUNet
from .checkpoint import file_sha256
from .cli import UsageError, resolve_device
from .data import check_genes, check_num_classes, load_dataset
from .respace import create_diffusion
from .train_util import DiffusionTrainer

DIFFUSION_STEPS = 1000


def condition_counts(label_codes):
    """Every label combination seen in the data with its number of cells: [[code_1..code_K, count], ...]."""
    combos, counts = np.unique(label_codes, axis=0, return_counts=True)
    return [[int(c) for c in combo] + [int(n)] for combo, n in zip(combos, counts)]


def prepare_latents(args, device, progress=True):
    """Load the data and the autoencoder, check they agree, and encode every cell (in batches)."""
    dataset = load_dataset(args.data_dir, label_keys=args.label_key, layer=args.layer,
                           input_is_log=args.input_is_log, filters=args.filter)
    check_num_classes(args.num_classes, dataset)
    autoencoder, _ = load_autoencoder(args.vae_path, device=device)
    check_genes(autoencoder.genes, dataset.genes, what=f"the autoencoder {args.vae_path}")
    if autoencoder.normalization.input_is_log != dataset.normalization.input_is_log:
        raise UsageError(f"the autoencoder was trained on {'log-normalized' if autoencoder.normalization.input_is_log else 'raw-count'} "
                         f"input but --input_is_log is {dataset.normalization.input_is_log}")
    latents = autoencoder.encode_dataset(dataset, batch_size=1024, progress=progress)
    return dataset, autoencoder, latents


def train_diffusion(args, progress=True):
    """Train (or resume) the diffusion model; returns the path of the last model file."""
    device = resolve_device(args.device)
    save_dir = os.path.join(args.save_dir, args.model_name)
    os.makedirs(save_dir, exist_ok=True)
    if not os.access(save_dir, os.W_OK):
        raise UsageError(f"cannot write to {save_dir}")
    dataset, autoencoder, latents = prepare_latents(args, device, progress)

    torch.manual_seed(args.seed)
    model = CellUNet(latent_dim=latents.shape[1], hidden_dims=args.hidden_dims,
                     condition_sizes=dataset.num_classes, dropout=args.dropout)
    try:
        model.validate_branch(args.branch)
    except ValueError as error:
        raise UsageError(f"--branch {args.branch}: {error}") from None
    metadata = {
        "label_keys": dataset.label_keys,
        "vocabularies": dataset.vocabularies,
        "condition_counts": condition_counts(dataset.label_codes),
        "genes": dataset.genes,
        "normalization": dataset.normalization.to_dict(),
        "vae_path": args.vae_path,
        "vae_path_from_model": os.path.relpath(os.path.abspath(args.vae_path), os.path.abspath(save_dir)),
        "vae_sha256": file_sha256(args.vae_path),
        "diffusion": {"steps": DIFFUSION_STEPS, "schedule": "linear", "predict": "epsilon"},
        "sampling_defaults": {"branch": args.branch, "cache_interval": args.cache_interval,
                              "non_uniform": args.non_uniform},
        "p_uncond": args.p_uncond,
        "seed": args.seed,
    }
    trainer = DiffusionTrainer(
        model, create_diffusion(DIFFUSION_STEPS), latents, dataset.label_codes, metadata, save_dir,
        batch_size=args.batch_size, microbatch=args.microbatch, lr=args.lr, weight_decay=args.weight_decay,
        ema_rate=args.ema_rate, lr_anneal_steps=args.lr_anneal_steps, p_uncond=args.p_uncond,
        save_interval=args.save_interval, log_interval=args.log_interval, seed=args.seed, device=device,
        max_minutes=args.max_minutes)
    if args.resume_checkpoint:
        trainer.resume(args.resume_checkpoint)
    return trainer.run_loop(progress=progress)
