"""Training loop of the autoencoder: resumable exactly, checkpoints atomic, CSV log, tqdm progress."""
import csv
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from guided_diffusion.cli import UsageError, resolve_device
from guided_diffusion.data import (BatchSampler, check_genes, load_dataset, split_train_validation)

from .VAE_model import VAE


def checkpoint_path(save_dir, seed, step):
    return os.path.join(save_dir, f"model_seed={seed}_step={step}.pt")


@torch.no_grad()
def evaluate_reconstruction(model, dataset, indices, batch_size=512):
    """Held-out MSE and per-cell Pearson correlation between input and reconstruction (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    squared_error, count, correlations = 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(dataset.rows(indices[start:start + batch_size])).to(device)
        reconstruction, _ = model(batch)
        squared_error += float(((reconstruction - batch) ** 2).sum())
        count += batch.numel()
        x = batch - batch.mean(dim=1, keepdim=True)
        y = reconstruction - reconstruction.mean(dim=1, keepdim=True)
        denominator = (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
        correlations.append(((x * y).sum(dim=1) / denominator).cpu().numpy())
    model.train(was_training)
    correlations = np.concatenate(correlations) if correlations else np.array([np.nan])
    return {"mse": squared_error / max(count, 1), "median_cell_pearson": float(np.median(correlations)),
            "n_cells": int(len(indices))}


class CsvLog:
    def __init__(self, path, fields):
        self.path, self.fields = path, fields
        if not os.path.exists(path):
            with open(path, "w", newline="") as stream:
                csv.writer(stream).writerow(fields)

    def write(self, **row):
        with open(self.path, "a", newline="") as stream:
            csv.writer(stream).writerow([row.get(field, "") for field in self.fields])


def train_autoencoder(args, progress=True):
    """Train (or resume) the autoencoder described by the parsed ``args``; returns the last checkpoint path."""
    device = resolve_device(args.device)
    dataset = load_dataset(args.data_dir, label_keys=[], layer=args.layer, input_is_log=args.input_is_log,
                           filters=args.filter, require_labels=False)
    if args.num_genes is not None and args.num_genes != dataset.n_genes:
        raise UsageError(f"--num_genes {args.num_genes} contradicts the data, which has {dataset.n_genes} "
                         f"genes; omit --num_genes or fix it")
    os.makedirs(args.save_dir, exist_ok=True)
    if not os.access(args.save_dir, os.W_OK):
        raise UsageError(f"cannot write to --save_dir {args.save_dir}")

    train_index, val_index = split_train_validation(dataset.n_cells, args.val_fraction, args.seed)
    torch.manual_seed(args.seed)
    model = VAE(dataset.n_genes, latent_dim=args.latent_dim, hidden_dims=args.hidden_dims, dropout=args.dropout,
                decoder_activation=args.decoder_activation).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = BatchSampler(train_index, args.batch_size, args.seed)
    step = 0
    if args.state_dict:
        payload = load_checkpoint(args.state_dict, kinds=("autoencoder",))
        check_genes(payload["genes"], dataset.genes, what=f"checkpoint {args.state_dict}")
        if payload["model_config"] != model.config():
            raise UsageError(f"--state_dict {args.state_dict} was trained with {payload['model_config']}, "
                             f"this run asks for {model.config()}")
        model.load_state_dict(payload["state_dict"])
        if "optimizer" in payload:
            optimizer.load_state_dict(payload["optimizer"])
            sampler.load_state_dict(payload["sampler"])
            set_rng_state(payload["rng"])
        step = int(payload["step"])
    if args.start_step is not None:
        step = args.start_step

    def save(at_step):
        path = checkpoint_path(args.save_dir, args.seed, at_step)
        save_checkpoint({
            "model_config": model.config(), "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state(),
            "step": at_step, "genes": dataset.genes, "normalization": dataset.normalization.to_dict(),
            "train_config": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))},
            "val_fraction": args.val_fraction, "seed": args.seed,
        }, path, kind="autoencoder")
        return path

    log = CsvLog(os.path.join(args.save_dir, "train_log.csv"), ["step", "train_loss", "val_loss", "seconds"])
    started = time.monotonic()
    deadline = started + args.max_minutes * 60 if args.max_minutes else None
    last_path, running, running_count = None, 0.0, 0
    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc="autoencoder", disable=not progress, unit="step")
    try:
        while step < args.max_steps:
            batch = torch.from_numpy(dataset.rows(sampler.next_batch())).to(device)
            loss = model.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            running += loss.item()
            running_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / running_count:.4f}")
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if step % args.log_interval == 0 or step % args.checkpoint_freq == 0 or step == args.max_steps \
                    or out_of_time:
                val_loss = ""
                if len(val_index) and (step % args.checkpoint_freq == 0 or step == args.max_steps or out_of_time):
                    val_loss = evaluate_reconstruction(model, dataset, val_index[:2048])["mse"]
                log.write(step=step, train_loss=running / running_count, val_loss=val_loss,
                          seconds=round(time.monotonic() - started, 2))
                running, running_count = 0.0, 0
            if step % args.checkpoint_freq == 0:
                last_path = save(step)
            if out_of_time:
                bar.write(f"--max_minutes {args.max_minutes} reached at step {step}")
                break
    except KeyboardInterrupt:
        last_path = save(step)
        bar.close()
        print(f"interrupted: saved {last_path}; resume with --state_dict {last_path}")
        raise SystemExit(130) from None
    bar.close()
    if last_path is None or not last_path.endswith(f"_step={step}.pt"):
        last_path = save(step)
    seconds = time.monotonic() - started
    report = evaluate_reconstruction(model, dataset, val_index) if len(val_index) else None
    return last_path, report, seconds
