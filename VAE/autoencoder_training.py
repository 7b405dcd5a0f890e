"""Training loop of the autoencoder: resumable exactly, checkpoints atomic, CSV log, tqdm progress;
one process, or several on torch.distributed (torchrun / mpiexec)."""
import csv
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from guided_diffusion.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from guided_diffusion.cli import StopAtStepBoundary, UsageError, check_writable_dir
from guided_diffusion.data import check_genes, load_dataset, make_batch_sampler, split_train_validation
from guided_diffusion.dist_util import setup_distributed
from guided_diffusion.heap_reuse import reuse_freed_memory
from guided_diffusion.train_util import adamw

from .VAE_model import VAE


def checkpoint_path(save_dir, seed, step):
    return os.path.join(save_dir, f"model_seed={seed}_step={step}.pt")


def resolve_loss(loss_ae, dataset):
    """``auto``: the negative-binomial count model for raw counts, MSE for log-normalized input."""
    if loss_ae == "auto":
        return "mse" if dataset.normalization.input_is_log else "nb"
    if loss_ae == "nb" and dataset.normalization.input_is_log:
        raise UsageError("--loss_ae nb models raw counts, but the input is log-normalized (--input_is_log True); "
                         "use --loss_ae mse or give the raw counts (e.g. --layer counts)")
    return loss_ae


def batch_loss(model, forward, dataset, index, device):
    """Reconstruction loss of the cells ``index`` (``forward`` is the model or its DDP replica)."""
    if model.models_counts:
        x, counts, totals = (torch.from_numpy(a).to(device) for a in dataset.rows_and_counts(index))
    else:
        x, counts, totals = torch.from_numpy(dataset.rows(index)).to(device), None, None
    output, _ = forward(x)
    return model.reconstruction_loss(output, x, counts, totals), output, x


@torch.no_grad()
def evaluate_reconstruction(model, dataset, indices, batch_size=512):
    """Held-out loss, MSE and per-cell Pearson correlation between the log-normalized input and the
    decoded mean expression (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, squared_error, count, correlations = 0.0, 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        index = indices[start:start + batch_size]
        batch_loss_value, output, batch = batch_loss(model, model, dataset, index, device)
        reconstruction = model._mean_expression(output)
        loss += float(batch_loss_value) * len(index)
        squared_error += float(((reconstruction - batch) ** 2).sum())
        count += batch.numel()
        x = batch - batch.mean(dim=1, keepdim=True)
        y = reconstruction - reconstruction.mean(dim=1, keepdim=True)
        denominator = (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-12)
        correlations.append(((x * y).sum(dim=1) / denominator).cpu().numpy())
    model.train(was_training)
    correlations = np.concatenate(correlations) if correlations else np.array([np.nan])
    return {"loss": loss / max(len(indices), 1), "mse": squared_error / max(count, 1),
            "median_cell_pearson": float(np.median(correlations)), "n_cells": int(len(indices))}


class CsvLog:
    def __init__(self, path, fields):
        self.path, self.fields = path, fields
        if not os.path.exists(path):
            with open(path, "w", newline="") as stream:
                csv.writer(stream).writerow(fields)

    def write(self, **row):
        with open(self.path, "a", newline="") as stream:
            csv.writer(stream).writerow([row.get(field, "") for field in self.fields])


def output_bias(dataset, indices, models_counts, seed, max_cells=50000, chunk=1024):
    """Per-gene starting value of the decoder output, from (at most ``max_cells`` of) the training cells:
    the mean log-normalized expression (mse), or the log of the mean share of each cell's counts (nb)."""
    indices = np.asarray(indices)
    if len(indices) > max_cells:
        indices = np.sort(np.random.default_rng([seed, 7]).choice(indices, max_cells, replace=False))
    total = np.zeros(dataset.n_genes, dtype=np.float64)
    for start in range(0, len(indices), chunk):
        index = indices[start:start + chunk]
        if models_counts:
            _, counts, totals = dataset.rows_and_counts(index)
            total += (counts / totals[:, None]).sum(axis=0, dtype=np.float64)
        else:
            total += dataset.rows(index).sum(axis=0, dtype=np.float64)
    mean = total / max(len(indices), 1)
    if models_counts:  # genes never seen get a share far below one count per cell
        return np.log(np.maximum(mean, 1e-3 / dataset.normalization.target_sum / max(len(indices), 1)))
    return mean


def train_autoencoder(args, progress=True):
    """Train (or resume) the autoencoder described by the parsed ``args``; returns the last checkpoint path.

    Under torchrun/mpiexec every rank trains a DistributedDataParallel replica on its slice of each
    global batch of ``--batch_size`` cells (BatchNorm statistics synchronized over ranks); rank 0
    evaluates, logs and writes checkpoints, which hold only global state (any world size resumes).
    """
    context = setup_distributed(args.device)
    device = context.device
    context.check_batch_size(args.batch_size)
    dataset = load_dataset(args.data_dir, label_keys=[], layer=args.layer, input_is_log=args.input_is_log,
                           filters=args.filter, require_labels=False, backed=args.backed,
                           block_rows=args.block_rows)
    try:
        return _train(args, dataset, context, device, progress and context.is_main)
    finally:
        dataset.close()


def _train(args, dataset, context, device, progress):
    if args.num_genes is not None and args.num_genes != dataset.n_genes:
        raise UsageError(f"--num_genes {args.num_genes} contradicts the data, which has {dataset.n_genes} "
                         f"genes; omit --num_genes or fix it")
    if context.is_main:
        check_writable_dir(args.save_dir, "--save_dir")

    train_index, val_index = split_train_validation(dataset.n_cells, args.val_fraction, args.seed)
    torch.manual_seed(args.seed)
    model = VAE(dataset.n_genes, latent_dim=args.latent_dim, hidden_dims=args.hidden_dims, dropout=args.dropout,
                decoder_activation=args.decoder_activation, loss_ae=resolve_loss(args.loss_ae, dataset),
                target_sum=dataset.normalization.target_sum)
    model = context.synchronize_batchnorm(model).to(device)
    model.set_precision(args.precision, device)
    if not args.backed:  # the step's large buffers are reused instead of page-faulted in again every step
        reuse_freed_memory()
    optimizer = adamw(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = make_batch_sampler(dataset, train_index, args.batch_size, args.seed)
    step = 0
    if args.state_dict and os.path.isdir(args.state_dict):  # a folder: its newest checkpoint of this seed
        folder = args.state_dict
        args.state_dict = latest_checkpoint(folder, rf"model_seed={args.seed}_step=(\d+)\.pt")
        if args.state_dict is None:
            raise UsageError(f"--state_dict {folder} holds no model_seed={args.seed}_step=*.pt; give a checkpoint "
                             f"file or start without --state_dict")
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
    else:
        model.init_output_bias(output_bias(dataset, train_index, model.models_counts, args.seed))
    if args.start_step is not None:
        step = args.start_step
    replica = context.wrap(model)

    def save(at_step, wait=True):
        path = checkpoint_path(args.save_dir, args.seed, at_step)
        if context.is_main:
            save_checkpoint({
                "model_config": model.config(), "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(), "rng": rng_state(),
                "step": at_step, "genes": dataset.genes, "normalization": dataset.normalization.to_dict(),
                "train_config": {k: v for k, v in vars(args).items()
                                 if isinstance(v, (int, float, str, bool, list))},
                "val_fraction": args.val_fraction, "seed": args.seed,
            }, path, kind="autoencoder")
        if wait:
            context.barrier()
        return path

    if context.is_main:
        os.makedirs(args.save_dir, exist_ok=True)
    log = CsvLog(os.path.join(args.save_dir, "train_log.csv"),
                 ["step", "train_loss", "val_loss", "seconds"]) if context.is_main else None
    started = time.monotonic()
    deadline = started + args.max_minutes * 60 if args.max_minutes else None
    last_path, running, running_count = None, 0.0, 0
    model.train()
    bar = tqdm(total=args.max_steps, initial=step, desc="autoencoder", disable=not progress, unit="step")
    with StopAtStepBoundary() as stop:  # Ctrl-C/SIGTERM: finish the step, save, exit 130/143
        while step < args.max_steps:
            batch_index = sampler.next_batch()
            local_index = batch_index[context.shard(len(batch_index))]
            local_loss, _, _ = batch_loss(model, replica, dataset, local_index, device)
            # the mean over this rank's cells, weighted so that DDP's average over ranks is the global mean
            share = len(local_index) / len(batch_index)
            optimizer.zero_grad(set_to_none=True)
            (local_loss * (share * context.world_size)).backward()
            optimizer.step()
            step += 1
            running += local_loss.item() * share
            running_count += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / running_count:.4f}")
            out_of_time = deadline is not None and context.any(time.monotonic() >= deadline)
            if step % args.log_interval == 0 or step % args.checkpoint_freq == 0 or step == args.max_steps \
                    or out_of_time:
                train_loss = float(context.sum([running])[0]) / running_count
                if context.is_main:
                    val_loss = ""
                    if len(val_index) and (step % args.checkpoint_freq == 0 or step == args.max_steps
                                           or out_of_time):
                        val_loss = evaluate_reconstruction(model, dataset, val_index[:2048])["loss"]
                    log.write(step=step, train_loss=train_loss, val_loss=val_loss,
                              seconds=round(time.monotonic() - started, 2))
                running, running_count = 0.0, 0
            if step % args.checkpoint_freq == 0:
                last_path = save(step)
            if context.any(stop.requested):
                if last_path is None or not last_path.endswith(f"_step={step}.pt"):
                    last_path = save(step)
                bar.close()
                if context.is_main:
                    print(f"interrupted: saved {last_path}; resume with --state_dict {last_path}", flush=True)
                raise SystemExit(stop.exit_code if stop.requested else 130)
            if out_of_time:
                if context.is_main:
                    bar.write(f"--max_minutes {args.max_minutes} reached at step {step}")
                break
    bar.close()
    if last_path is None or not last_path.endswith(f"_step={step}.pt"):
        last_path = save(step)
    seconds = time.monotonic() - started
    report = None
    if context.is_main and len(val_index):
        report = evaluate_reconstruction(model, dataset, val_index)
    return last_path, report, seconds
