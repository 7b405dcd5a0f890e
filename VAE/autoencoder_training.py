"""Training loop of the autoencoder: resumable exactly, checkpoints atomic, CSV log, tqdm progress;
one process, or several on torch.distributed (torchrun / mpiexec)."""
import copy
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.core.container import rng_state, set_rng_state
from guided_diffusion.core.atomic import check_writable_dir
from guided_diffusion.data import (DEFAULT_LABEL_KEY, check_genes, describe_change, fingerprint_differences,
                                   load_dataset, make_batch_sampler, split_train_validation)
from guided_diffusion.core.distributed import setup_distributed
from guided_diffusion.training.optim import adamw, all_finite, ema_warmup_rate, update_weight_average
from guided_diffusion.core.errors import SettingError, UsageError, literal
from guided_diffusion.training.config import plain_dict, validate
from guided_diffusion.training.loop import CsvLogger, LoopSettings, TrainingTask, claim_run_folder, run_training
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.data.variable_genes import rank_variable_genes

from VAE.autoencoder_checkpoint import (AutoencoderCheckpoint, best_model_path, checkpoint_files, latest_model_path,
                                        model_path)
from VAE.count_model import negative_binomial_nll, negative_binomial_nll_per_gene
from VAE.VAE_model import VAE
from VAE.weight_transfer import transfer_weights

LOG_FIELDS = ["step", "train_loss", "val_loss", "seconds"]
VALIDATION_CELLS = 2048  # the validation loss of each log row is taken on (at most) this many held-out cells
# settings a resumed run must share
RESUME_MUST_MATCH = ("batch_size", "val_fraction", "seed", "ema_rate", "variable_gene_weight")


def checkpoint_path(save_dir, seed, step):
    return model_path(save_dir, seed, step)


def resolve_loss(loss_ae, dataset):
    """``auto``: the negative-binomial count model for raw counts, MSE for log-normalized input."""
    if loss_ae == "auto":
        return "mse" if dataset.normalization.input_is_log else "nb"
    if loss_ae == "nb" and dataset.normalization.input_is_log:
        raise SettingError("{loss_ae} nb models raw counts, but the input is log-normalized ({input_is_log} True); "
                           "use {loss_ae} mse or give the raw counts (e.g. {layer} counts)",
                           "loss_ae", "input_is_log", "layer")
    return loss_ae


def _keep_each_count(counts, keep, generator=None):
    """Binomial thinning of a batch of raw counts (cells x genes, float): each single count is kept with its cell's
    probability ``keep`` (one per cell); returns the kept counts."""
    flat = counts.reshape(-1)
    entries = torch.nonzero(flat, as_tuple=True)[0]
    sizes = flat[entries].round().long()
    # one uniform per count (each count kept or not): a binomial draw per entry, summed back with index_add_
    units = torch.repeat_interleave(entries, sizes)
    draws = torch.rand(len(units), device=counts.device, generator=generator)
    kept = (draws < keep[units // counts.shape[1]]).to(counts.dtype)
    return torch.zeros_like(flat).index_add_(0, units, kept).reshape(counts.shape)


def _totals(counts):
    """Each cell's total count; a cell without counts keeps a total of 1, as the loader gives such cells."""
    totals = counts.sum(dim=1)
    return torch.where(totals > 0, totals, torch.ones_like(totals))


def _log_normalized(counts, target_sum):
    """(log1p of ``counts`` scaled to ``target_sum`` per cell, the totals of :func:`_totals`)."""
    totals = _totals(counts)
    return torch.log1p(counts * (target_sum / totals)[:, None]), totals


def thin_counts(counts, thinning, target_sum):
    """Binomial thinning of a batch of raw counts (cells x genes, float): each cell keeps each of its counts with one
    probability drawn uniformly between ``1 - thinning`` and 1 (torch's global generator, so a resumed run draws
    the same). Returns (log-normalized thinned cells, thinned counts, their totals); a cell left without counts
    keeps a total of 1, as the loader gives such cells."""
    keep = 1.0 - thinning * torch.rand(counts.shape[0], device=counts.device, dtype=counts.dtype)
    thinned = _keep_each_count(counts, keep)
    x, totals = _log_normalized(thinned, target_sum)
    return x, thinned, totals


def split_counts(counts, share, target_sum, generator=None):
    """Each count of a batch of raw counts (cells x genes, float) goes to the encoder's part with probability
    ``share``, else to the held-back part (torch's global generator unless ``generator`` is given). Under Poisson
    sampling the two parts are independent given the cell's expression, so a decoder that predicts the held-back
    part from the encoder's cannot learn a cell's own sampling noise (molecular cross-validation). Returns
    (log-normalized encoder part, held-back counts, their totals); a part without counts keeps a total of 1."""
    keep = torch.full((counts.shape[0],), float(share), device=counts.device, dtype=counts.dtype)
    given = _keep_each_count(counts, keep, generator)
    x, _ = _log_normalized(given, target_sum)
    held = counts - given
    return x, held, _totals(held)


def batch_loss(model, forward, dataset, index, device, latent_noise=0.0, kl_weight=0.0, count_thinning=0.0,
               count_split=0.0, split_generator=None, gene_weights=None):
    """Loss of the cells ``index`` (``forward`` is the model or its DDP replica): the reconstruction loss (a mean
    over entries), plus for a variational model ``kl_weight`` x its KL divergence per cell over the number of
    genes (so that ``kl_weight`` 1 is the evidence lower bound of the negative binomial, per entry).
    Count models only: ``count_thinning``, the cells are thinned first (:func:`thin_counts`); ``count_split``, the
    encoder reads that share of each cell's counts and the loss scores the rest (:func:`split_counts`, drawn with
    ``split_generator`` when given); ``gene_weights`` (one per gene, mean 1), each gene's likelihood terms weighted
    by it (:func:`variable_gene_weights`)."""
    if model.models_counts:
        x, counts, totals = (torch.from_numpy(a).to(device) for a in dataset.rows_and_counts(index))
        if count_thinning:
            x, counts, totals = thin_counts(counts, count_thinning, dataset.normalization.target_sum)
        if count_split:
            x, counts, totals = split_counts(counts, count_split, dataset.normalization.target_sum, split_generator)
    else:
        x, counts, totals = torch.from_numpy(dataset.rows(index)).to(device), None, None
    output, _ = forward(x, latent_noise=latent_noise, labels=decoder_labels(model, dataset, index, device))
    loss = model.reconstruction_loss(output, x, counts, totals, gene_weights)
    if model.variational and kl_weight:
        loss = loss + kl_weight * model.kl_per_cell.mean() / model.num_genes
    return loss, output, x


def decoder_label_keys(decoder_label_key, training):
    """The label keys the autoencoder's data is loaded with: the decoder's (``decoder_label_key``: none, one, or
    several comma-separated). ``auto`` is the keys of the checkpoint a run resumes (or starts from), else the
    loader's default (``cell_type1`` when obs has it, else none)."""
    if decoder_label_key == "auto":
        resume_path = resolve_resume_path(training)
        if not resume_path:
            return None
        return list(VAE.complete_config(AutoencoderCheckpoint.load(resume_path).model_config)["decoder_label_keys"])
    if decoder_label_key in (None, "none"):
        return []
    keys = [key.strip() for key in decoder_label_key.split(",")]
    if not all(keys) or len(set(keys)) != len(keys):
        raise UsageError(f"--decoder_label_key takes obs columns separated by commas, each once; got "
                         f"{decoder_label_key!r}")
    return keys


def decoder_labels(model, dataset, index, device):
    """The codes (cells x keys, into the decoder's labels) of the cells ``index`` for a decoder that reads labels,
    from the dataset's columns of the decoder's keys; None for a decoder that reads none."""
    if not model.reads_labels:
        return None
    index, columns = np.asarray(index), []
    for key in model.decoder_label_keys:
        if key not in dataset.label_keys:
            raise UsageError(f"the autoencoder's decoder reads each cell's {key!r} label: load the cells with it")
        codes = model.codes_of(key, dataset.vocabularies[key])
        columns.append(codes[dataset.label_codes[index, dataset.label_keys.index(key)]])
    return torch.from_numpy(np.stack(columns, axis=1)).to(device)


@torch.no_grad()
def evaluate_reconstruction(model, dataset, indices, batch_size=512, kl_weight=0.0, count_split=0.0,
                            gene_weights=None):
    """Held-out loss (the training loss, a variational model's at its posterior mean), MSE and per-cell Pearson correlation between the log-normalized input and the
    decoded mean expression (eval mode). With ``count_split`` the loss is the training loss on one fixed split of
    each cell's counts (the same at every call, so losses compare across steps); MSE and correlation are the whole
    cells' reconstructions. ``gene_weights``: the loss weighted per gene as in training."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0) if count_split else None
    loss, squared_error, count, correlations = 0.0, 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        index = indices[start:start + batch_size]
        batch_loss_value, output, batch = batch_loss(model, model, dataset, index, device, kl_weight=kl_weight,
                                                     gene_weights=gene_weights)
        if count_split:
            batch_loss_value, _, _ = batch_loss(model, model, dataset, index, device, kl_weight=kl_weight,
                                                count_split=count_split, split_generator=generator,
                                                gene_weights=gene_weights)
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


# --encoder_genes: the variable genes are ranked on at most this many training cells (a seeded draw), read dense
VARIABLE_GENE_CELLS = 4096


def encoder_gene_positions(dataset, indices, count, seed, max_cells=VARIABLE_GENE_CELLS, chunk=1024):
    """The positions of the ``count`` most variable genes among the cells ``indices`` (at most ``max_cells``, a
    seeded draw), ranked as the evaluation ranks them (:func:`guided_diffusion.data.variable_genes.
    rank_variable_genes`); sorted. Every gene (an empty list) when ``count`` is 0 or covers them."""
    if not count or count >= dataset.n_genes:
        return []
    indices = np.asarray(indices)
    if len(indices) > max_cells:
        indices = np.sort(np.random.default_rng([seed, 11]).choice(indices, max_cells, replace=False))
    values = np.vstack([dataset.rows(indices[start:start + chunk]) for start in range(0, len(indices), chunk)])
    return sorted(int(gene) for gene in rank_variable_genes(values)[:count])


VARIABLE_GENE_WEIGHT_GENES = 2000  # --variable_gene_weight: the genes weighted (the evaluation's feature genes)


def variable_gene_weights(dataset, indices, weight, seed, count=None):
    """Per-gene loss weights (float32, mean 1): ``weight`` for the ``count`` most variable genes among the cells
    ``indices`` (:func:`encoder_gene_positions`; VARIABLE_GENE_WEIGHT_GENES by default), 1 for the others, then
    scaled to mean 1. None when ``weight`` is 1 or the variable genes are all the genes."""
    if weight == 1:
        return None
    count = VARIABLE_GENE_WEIGHT_GENES if count is None else count
    positions = encoder_gene_positions(dataset, indices, count, seed)
    if not positions:
        return None
    weights = np.ones(dataset.n_genes, dtype=np.float64)
    weights[positions] = weight
    return torch.from_numpy((weights / weights.mean()).astype(np.float32))


# --refit_dispersion: at most this many training cells (seeded draw) enter the fit; a per-gene dispersion needs
# no more, and their dense counts and means stay below ~0.35 GB for 20,000 genes
REFIT_CELLS = 2048
REFIT_ITERATIONS = 25
LOG_THETA_RANGE = (-15.0, 15.0)  # theta 3e-7 .. 3e6: genes without counts drift towards 0, Poisson-like ones up


def refit_dispersion(model, dataset, indices, seed, max_cells=REFIT_CELLS, max_iter=REFIT_ITERATIONS):
    """Maximum-likelihood per-gene log dispersion of the NB decoder for the cells ``indices`` (at most
    ``max_cells`` of them, drawn with ``seed``), every other weight frozen: the negative-binomial likelihood of
    their counts around the decoded means (eval mode) is separable by gene, so each gene's log dispersion is
    fitted on its own (:func:`fit_log_dispersion`); a gene without a count in these cells keeps the learned one.
    Returns (log_theta, record); ``record`` holds the likelihood before and after, the cells used and the
    learned log dispersion it replaces."""
    indices = np.asarray(indices)
    if len(indices) > max_cells:
        indices = np.sort(np.random.default_rng([seed, 11]).choice(indices, max_cells, replace=False))
    device = next(model.parameters()).device
    x, counts, totals = (torch.from_numpy(a).to(device) for a in dataset.rows_and_counts(indices))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(x, labels=decoder_labels(model, dataset, indices, device))[0]
            log_mean = F.log_softmax(output, dim=1) + torch.log(totals)[:, None]
    finally:
        model.train(was_training)
    del x
    learned = model.log_theta.detach().clone()
    fitted = fit_log_dispersion(lambda log_theta: negative_binomial_nll_per_gene(log_mean, log_theta, counts),
                                learned, max_iter)
    # a gene without a count in these cells has no finite maximum (theta -> 0): it keeps the learned dispersion
    fitted = torch.where((counts != 0).any(dim=0), fitted, learned)
    with torch.no_grad():
        before = float(negative_binomial_nll(log_mean, learned, counts))
        after = float(negative_binomial_nll(log_mean, fitted, counts))
    record = {"method": "per-gene maximum likelihood (Newton on log theta, each gene's likelihood never worse), "
                        "decoder frozen", "cells": int(len(indices)),
              "nll_before": before, "nll_after": after, "learned_log_theta": learned.cpu().tolist()}
    return fitted, record


def fit_log_dispersion(objective, start, max_iter=REFIT_ITERATIONS, max_step=2.0, tolerance=1e-4):
    """Minimize a separable objective (``objective(log_theta)``: one value per gene, each depending on its own
    gene's entry only) from ``start``, every gene on its own: each iteration proposes a Newton step on each
    gene's log theta (its own first and second derivative, from two backward passes; a gradient-sign step where
    the curvature is not positive), no longer than that gene's step limit (``max_step`` at first), within
    ``LOG_THETA_RANGE``, and keeps it only for the genes whose value does not increase: their limit doubles (up
    to ``max_step``), the others' is quartered. No gene ever ends worse than it started. Stops after
    ``max_iter`` iterations or once no gene moves by more than ``tolerance``."""
    low, high = LOG_THETA_RANGE
    log_theta = start.detach().clone().clamp(low, high)
    limit = torch.full_like(log_theta, max_step)
    with torch.no_grad():
        value = objective(log_theta)
    for _ in range(max_iter):
        point = log_theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(objective(point).sum(), point, create_graph=True)
        (curvature,) = torch.autograd.grad(gradient.sum(), point)  # separable: each gene's own second derivative
        gradient = gradient.detach()
        step = torch.where(curvature > 0, -gradient / curvature.clamp_min(1e-12), -torch.sign(gradient))
        with torch.no_grad():
            candidate = (log_theta + torch.maximum(torch.minimum(step, limit), -limit)).clamp(low, high)
            candidate_value = objective(candidate)
            accept = candidate_value <= value
            moved = float((candidate - log_theta).abs().masked_fill(~accept, 0.0).max())
            log_theta = torch.where(accept, candidate, log_theta)
            value = torch.where(accept, candidate_value, value)
            limit = torch.where(accept, (limit * 2).clamp(max=max_step), limit / 4)
        if moved < tolerance and bool(accept.all()):
            break
    return log_theta


def apply_dispersion_refit(path, dataset, indices, seed, device="cpu"):
    """Refit the dispersion of the autoencoder saved at ``path`` on the training cells ``indices`` and rewrite
    the file (atomically) with it, recording the fit and the learned dispersion in ``dispersion_fit`` (a file
    refitted before, e.g. a best file a resumed run did not replace, is refitted from its learned one)."""
    checkpoint = AutoencoderCheckpoint.load(path, with_training_state=True)
    model = VAE(**VAE.complete_config(checkpoint.model_config))
    model.load_state_dict(checkpoint.state_dict)
    if checkpoint.dispersion_fit is not None:
        with torch.no_grad():
            model.log_theta.copy_(torch.as_tensor(checkpoint.dispersion_fit["learned_log_theta"]))
    fitted, record = refit_dispersion(model.to(device), dataset, indices, seed)
    checkpoint.state_dict = {**checkpoint.state_dict, "log_theta": fitted.cpu()}
    checkpoint.dispersion_fit = record
    checkpoint.save(path)
    return record


def train_autoencoder(data, model_config, training):
    """Train (or resume) the autoencoder; returns (checkpoint path to use, validation report or None, seconds).

    The path to use is the last checkpoint, or with ``early_stopping_patience`` the best-weights file
    ``model_seed=S_best.pt`` (the report then also holds ``best_step``, ``best_val_loss``, ``best_path``
    and ``last_path``, and its figures are those of the best weights).

    ``data`` is a :class:`~guided_diffusion.training.config.DataConfig`, ``model_config`` an
    :class:`~guided_diffusion.training.config.AutoencoderModelConfig`, ``training`` an
    :class:`~guided_diffusion.training.config.AutoencoderTrainingConfig`. Under torchrun/mpiexec every
    rank trains a DistributedDataParallel replica on its slice of each global batch of ``batch_size``
    cells (BatchNorm statistics synchronized over ranks); rank 0 evaluates, logs and writes checkpoints,
    which hold only global state (any world size resumes).
    """
    validate(data, model_config, training)
    check_settings(training)
    context = setup_distributed(training.device)
    context.check_batch_size(training.batch_size)
    label_keys = decoder_label_keys(model_config.decoder_label_key, training)
    try:
        dataset = load_dataset(data.data_dir, label_keys=label_keys, layer=data.layer, input_is_log=data.input_is_log,
                               filters=data.filter, require_labels=False, backed=data.backed,
                               block_rows=data.block_rows, allow_count_like_log=data.allow_count_like_log)
    except UsageError as error:
        if label_keys is None and f"label key {DEFAULT_LABEL_KEY!r}" in str(error):  # the column auto chose
            raise UsageError(f"{error} (the decoder reads {DEFAULT_LABEL_KEY} by default, --decoder_label_key auto; "
                             f"--decoder_label_key none trains one that reads no labels)") from None
        raise
    try:
        task = AutoencoderTask(data, model_config, training, dataset, context)
        started = time.monotonic()
        settings = LoopSettings(max_steps=training.max_steps, save_interval=training.checkpoint_freq,
                                log_interval=training.log_interval, max_minutes=training.max_minutes,
                                description="autoencoder", resume_flag="--state_dict", learning_rate=training.lr)
        try:
            path = run_training(task, settings, context, progress=training.progress)
            if context.is_main and task.early_stopping is not None:
                task.save_best()  # a best carried over from a resumed run's folder and not saved since
        finally:
            task.folder.release()
        if training.refit_dispersion and task.model.models_counts and context.is_main:
            target = task.early_stopping.path if task.early_stopping is not None and \
                os.path.exists(task.early_stopping.path) else path
            fit = apply_dispersion_refit(target, dataset, task.train_index, training.seed, task.device)
            print(f"dispersion refitted on {fit['cells']} training cells: NB loss {fit['nll_before']:.5f} -> "
                  f"{fit['nll_after']:.5f} ({target})", flush=True)
        seconds = time.monotonic() - started
        report = None
        if task.early_stopping is not None and context.is_main and not os.path.exists(task.early_stopping.path):
            print(f"warning: the best weights (step {task.early_stopping.best_step}) of the resumed run were not "
                  f"found beside its checkpoint; {path}, the last checkpoint, is the one to use", flush=True)
        elif task.early_stopping is not None and context.is_main:
            best = AutoencoderCheckpoint.load(task.early_stopping.path)
            task.model.load_state_dict(best.state_dict)
            report = dict(evaluate_reconstruction(task.model, dataset, task.val_index,
                                                 kl_weight=model_config.kl_weight,
                                                 count_split=training.count_split), last_path=path,
                          best_path=best.path, best_step=best.step, best_val_loss=best.selection["val_loss"])
            path = best.path
        elif context.is_main and len(task.val_index):
            report = evaluate_reconstruction(task.used_model, dataset, task.val_index,
                                             kl_weight=model_config.kl_weight, count_split=training.count_split)
        return path, report, seconds
    finally:
        dataset.close()


def parameter_groups(model, training):
    """The optimizer's parameter groups: every weight at ``training.lr``, and with ``dispersion_lr`` set, the
    per-gene log dispersion of an NB decoder in a second group at that rate (None: one group).

    The dispersion is one number per gene: at the weights' rate AdamW moves it by about ``lr`` per step, so an
    autoencoder stopped early after a few hundred steps keeps it near its start (theta = 1)."""
    if training.dispersion_lr is None or not model.models_counts:
        return [{"params": list(model.parameters())}]
    rest = [p for name, p in model.named_parameters() if name != "log_theta"]
    return [{"params": rest}, {"params": [model.log_theta], "lr": training.dispersion_lr}]


def _group_order(model, n_groups):
    """The parameters in the order an optimizer of ``n_groups`` groups (see :func:`parameter_groups`) numbers them."""
    if n_groups == 1:
        return list(model.parameters())
    return [p for name, p in model.named_parameters() if name != "log_theta"] + [model.log_theta]


def regroup_optimizer_state(state, model, optimizer):
    """A saved AdamW state re-laid out for ``optimizer``'s parameter groups: a run resumed with or without
    ``dispersion_lr`` keeps every parameter's moments although the number of groups changed."""
    saved_groups, groups = state["param_groups"], optimizer.param_groups
    if len(saved_groups) == len(groups):
        return state
    saved_order, order = _group_order(model, len(saved_groups)), _group_order(model, len(groups))
    position = {id(p): i for i, p in enumerate(order)}
    moments = {position[id(saved_order[int(i)])]: v for i, v in state["state"].items()}
    layout, start = [], 0
    for group, saved in zip(groups, saved_groups * len(groups)):
        count = len(group["params"])
        layout.append({**saved, "lr": group["lr"], "params": list(range(start, start + count))})
        start += count
    return {"state": moments, "param_groups": layout}


def check_settings(training):
    if training.batch_size < 2:
        raise SettingError(f"{{batch_size}} {training.batch_size} is too small: the autoencoder's BatchNorm layers "
                           f"need at least 2 cells per batch; use {{batch_size}} 2 or more", "batch_size")
    if training.seed < 0:
        raise SettingError(f"{{seed}} must be zero or positive, got {training.seed}", "seed")
    if not 0 <= training.latent_noise < 1:
        raise SettingError(f"{{latent_noise}} is the noise's standard deviation per latent coordinate (latents have "
                           f"norm 1), between 0 and 1; got {training.latent_noise}", "latent_noise")
    if training.early_stopping_patience and not training.val_fraction:
        raise SettingError("{early_stopping_patience} needs validation cells, but {val_fraction} is 0; set "
                           "{val_fraction} (e.g. 0.1) or turn early stopping off ({early_stopping_patience} 0)",
                           "early_stopping_patience", "val_fraction")


def resolve_resume_path(training):
    """The checkpoint to resume from: ``state_dict`` itself, or the newest of this seed in that folder."""
    if not training.state_dict or not os.path.isdir(training.state_dict):
        return training.state_dict
    path = latest_model_path(training.state_dict, training.seed)
    if path is None:
        raise SettingError(f"{{state_dict}} {literal(training.state_dict)} holds no model_seed={training.seed}"
                           f"_step=*.pt; give a checkpoint file or start without {{state_dict}}", "state_dict")
    return path


def check_resumable(checkpoint, model, training, path):
    """Refuse a checkpoint whose model or run settings differ from this run's (one line, both values)."""
    if model.complete_config(checkpoint.model_config) != model.config():
        raise SettingError(f"{{state_dict}} {literal(path)} was trained with {literal(checkpoint.model_config)}, "
                           f"this run asks for {literal(model.config())}", "state_dict")
    if checkpoint.training_state is None:
        return  # weights only: a new run starting from them
    recorded = dict(checkpoint.train_config, seed=checkpoint.seed, val_fraction=checkpoint.val_fraction)
    for name in RESUME_MUST_MATCH:
        if name in recorded and recorded[name] != getattr(training, name):
            raise SettingError(f"{{state_dict}} {literal(path)} was trained with {{{name}}} {recorded[name]}, this "
                               f"run has {{{name}}} {getattr(training, name)}; resume with the same {{{name}}} "
                               f"(or start a new run in another {{save_dir}})", "state_dict", name, "save_dir")


def check_resume_data(checkpoint, fingerprint, training, data_dir, path, is_main=True):
    """Refuse to resume ``checkpoint`` on data other than its own (naming what differs) unless
    ``resume_on_new_data``; returns the data changes the next checkpoints record (the checkpoint's, plus
    this one when the run continues on new data). A checkpoint without a fingerprint resumes with a warning."""
    changes = list(checkpoint.data_changes)
    recorded = checkpoint.data_fingerprint
    if recorded is None:
        if is_main:
            print(f"warning: {path} records no fingerprint of its training data (written before cfDiffusion "
                  f"recorded one); the data cannot be checked against --data_dir {data_dir}", file=sys.stderr,
                  flush=True)
        if training.resume_on_new_data:
            changes.append(describe_change(None, fingerprint, checkpoint.step, data_dir))
        return changes
    differences = fingerprint_differences(recorded, fingerprint)
    if not differences:
        return changes
    if not training.resume_on_new_data:
        raise SettingError(f"{{state_dict}} {literal(path)} was trained on other data than {{data_dir}} "
                           f"{literal(data_dir)}: {literal('; '.join(differences))}; resume with the data it was "
                           f"trained on, or pass {{resume_on_new_data}} True to continue training on this data "
                           f"(recorded in the checkpoint)", "state_dict", "data_dir", "resume_on_new_data")
    if is_main:
        print(f"continuing {path} on new data ({'; '.join(differences)}); recorded in the checkpoints", flush=True)
    changes.append(describe_change(recorded, fingerprint, checkpoint.step, data_dir))
    return changes


class EarlyStopping:
    """The lowest validation loss so far, its step and (until written) its weights; the reason to stop.

    The weights of a new best are copied in memory and written to ``model_seed=S_best.pt`` at the next
    save (before the step's checkpoint), so a resumed run continues with the same best file, loss and step
    (they travel in the optimizer file) and stops where the straight run stops.
    """

    def __init__(self, path, patience):
        self.path, self.patience = path, patience
        self.best_loss, self.best_step, self.pending = math.inf, None, None

    def observe(self, step, val_loss, model):
        if val_loss < self.best_loss:
            self.best_loss, self.best_step = val_loss, step
            self.pending = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def stop_reason(self, step):
        if self.best_step is not None and step - self.best_step >= self.patience:
            return (f"the validation loss has not improved for {step - self.best_step} steps "
                    f"(best {self.best_loss:.5f} at step {self.best_step}; early stopping patience {self.patience})")
        return None

    def state(self):
        return {"best_loss": self.best_loss, "best_step": self.best_step, "patience": self.patience}

    def load_state(self, state):
        self.best_loss, self.best_step = float(state["best_loss"]), state["best_step"]


class AutoencoderTask(TrainingTask):
    """The autoencoder's step, log row, save and resume, for :func:`~guided_diffusion.training.loop.run_training`."""

    def __init__(self, data, model_config, training, dataset, context):
        if model_config.num_genes is not None and model_config.num_genes != dataset.n_genes:
            raise SettingError(f"{{num_genes}} {model_config.num_genes} contradicts the data, which has "
                               f"{dataset.n_genes} genes; omit {{num_genes}} or fix it", "num_genes")
        if context.is_main:
            check_writable_dir(training.save_dir, "--save_dir")
        self.data, self.training, self.dataset, self.context = data, training, dataset, context
        self.model_config = model_config
        self.device = context.device
        self.train_index, self.val_index = split_train_validation(dataset.n_cells, training.val_fraction,
                                                                  training.seed)
        torch.manual_seed(training.seed)
        decoder_keys = list(dataset.label_keys)  # the data is loaded with the decoder's keys only
        encoder_genes = self._encoder_genes(model_config)
        model = VAE(dataset.n_genes, latent_dim=model_config.latent_dim, hidden_dims=model_config.hidden_dims,
                    dropout=model_config.dropout, decoder_activation=model_config.decoder_activation,
                    loss_ae=resolve_loss(model_config.loss_ae, dataset),
                    target_sum=dataset.normalization.target_sum, variational=model_config.kl_weight > 0,
                    latent_norm=model_config.latent_norm, decoder_label_keys=decoder_keys,
                    decoder_labels=[dataset.vocabularies[key] for key in decoder_keys], encoder_genes=encoder_genes)
        if training.count_thinning and not model.models_counts:
            raise SettingError("{count_thinning} thins raw counts, which only the negative-binomial count model "
                               "trains on ({loss_ae} nb, raw-count input); set {count_thinning} 0",
                               "count_thinning", "loss_ae")
        if training.count_split and not model.models_counts:
            raise SettingError("{count_split} splits raw counts, which only the negative-binomial count model "
                               "trains on ({loss_ae} nb, raw-count input); set {count_split} 0",
                               "count_split", "loss_ae")
        if training.variable_gene_weight != 1 and not model.models_counts:
            raise SettingError("{variable_gene_weight} weights the negative-binomial likelihood's genes, which only "
                               "the count model trains on ({loss_ae} nb, raw-count input); set "
                               "{variable_gene_weight} 1", "variable_gene_weight", "loss_ae")
        self.gene_weights = variable_gene_weights(dataset, self.train_index, training.variable_gene_weight,
                                                  training.seed)
        if self.gene_weights is not None:
            self.gene_weights = self.gene_weights.to(self.device)
        self.model = context.synchronize_batchnorm(model).to(self.device)
        self.model.set_precision(training.precision, self.device)
        if not data.backed:  # the step's large buffers are reused instead of page-faulted in again every step
            reuse_freed_memory()
        self.optimizer = adamw(parameter_groups(self.model, training), lr=training.lr,
                               weight_decay=training.weight_decay)
        self.sampler = make_batch_sampler(dataset, self.train_index, training.batch_size, training.seed)
        self.early_stopping = None
        if training.early_stopping_patience:
            self.early_stopping = EarlyStopping(best_model_path(training.save_dir, training.seed),
                                                training.early_stopping_patience)
        self.train_config = plain_dict(data, model_config, training)
        self.data_changes = []  # resumes on new data, carried from checkpoint to checkpoint
        self.average = None  # with ema_rate: the weight average, which validation and checkpoints read
        resume_path = resolve_resume_path(training)
        self.step = self._start_from(resume_path) if resume_path else self._start_fresh()
        if training.ema_rate and self.average is None:
            self.average = copy.deepcopy(self.model).requires_grad_(False)
        if training.start_step is not None:
            self.step = training.start_step
        self.folder = claim_run_folder(training.save_dir, "save_dir", checkpoint_files,
                                       resuming=bool(resume_path), overwrite=training.overwrite,
                                       resume_setting="state_dict", is_main=context.is_main)
        self.replica = context.wrap(self.model)
        self.log = CsvLogger(os.path.join(training.save_dir, "train_log.csv"), LOG_FIELDS, start_step=self.step,
                             enabled=context.is_main)
        self.running, self.running_count = 0.0, 0
        self.model.train()

    def _encoder_genes(self, model_config):
        """The genes the encoder reads: a resumed run's own (recorded in its checkpoint), else the
        ``encoder_genes`` most variable of the training cells (validation cells excluded)."""
        if not model_config.encoder_genes:
            return []
        resume_path = resolve_resume_path(self.training)
        if resume_path:
            recorded = AutoencoderCheckpoint.load(resume_path).model_config.get("encoder_genes", [])
            if len(recorded) == model_config.encoder_genes:
                return recorded  # a count that differs is refused by check_resumable, naming both configs
        return encoder_gene_positions(self.dataset, self.train_index, model_config.encoder_genes, self.training.seed)

    def _start_fresh(self):
        self.model.init_output_bias(output_bias(self.dataset, self.train_index, self.model.models_counts,
                                                self.training.seed))
        if self.training.init_from:
            self._start_from_other(self.training.init_from)
        return 0

    def _start_from_other(self, path):
        """Start from another autoencoder's weights (genes and labels matched by name); the record of what was
        matched goes into this run's checkpoints."""
        if not os.path.isfile(path):
            raise SettingError(f"{{init_from}} {literal(path)} is not an autoencoder checkpoint file", "init_from")
        record = transfer_weights(path, self.model, self.dataset.genes, self.dataset.normalization.to_dict())
        self.train_config["init_from_transfer"] = record
        if self.context.is_main:
            print(f"starting from {path}: {record['shared_genes']} of {len(self.dataset.genes)} genes shared "
                  f"({record['source_genes']} in it), {record['encoder_genes_shared']} of the encoder's "
                  f"{record['encoder_genes']} input genes, {record['labels_shared']} decoder labels", flush=True)

    def _start_from(self, path):
        checkpoint = AutoencoderCheckpoint.load(path, with_training_state=True)
        check_genes(checkpoint.genes, self.dataset.genes, what=f"checkpoint {path}")
        check_resumable(checkpoint, self.model, self.training, path)
        if checkpoint.training_state is not None:  # a weights-only file starts a new run: any data will do
            self.data_changes = check_resume_data(checkpoint, self.dataset.fingerprint, self.training,
                                                  self.data.data_dir, path, self.context.is_main)
        self.model.load_state_dict(checkpoint.state_dict)
        if self.training.ema_rate:  # the checkpoint's weights are the average; the running ones travel beside them
            self.average = copy.deepcopy(self.model).requires_grad_(False)
            running = (checkpoint.training_state or {}).get("running_weights")
            if running is not None:
                self.model.load_state_dict(running)
        if checkpoint.training_state is not None:
            self.optimizer.load_state_dict(regroup_optimizer_state(checkpoint.training_state["optimizer"], self.model,
                                                                   self.optimizer))
            for group, fresh in zip(self.optimizer.param_groups, parameter_groups(self.model, self.training)):
                # this run's settings apply, as in the diffusion trainer
                group["lr"], group["weight_decay"] = fresh.get("lr", self.training.lr), self.training.weight_decay
            self.sampler.load_state_dict(checkpoint.training_state["sampler"])
            set_rng_state(checkpoint.training_state["rng"])
            if self.early_stopping is not None and "early_stopping" in checkpoint.training_state:
                self._resume_early_stopping(checkpoint.training_state["early_stopping"], path)
            self.last_saved_step, self.last_saved_path = checkpoint.step, path
        return checkpoint.step

    def _resume_early_stopping(self, state, path):
        """Continue the resumed run's best loss and step (so this run stops where it would have); when this
        run writes into another folder, the best weights come from the resumed run's ``_best.pt`` if that
        file still holds that step (it is written here at the first save)."""
        stopping = self.early_stopping
        stopping.load_state(state)
        source = best_model_path(os.path.dirname(path), self.training.seed)
        if os.path.abspath(source) == os.path.abspath(stopping.path) or stopping.best_step is None:
            return
        if os.path.exists(source):
            best = AutoencoderCheckpoint.load(source)
            if best.step == stopping.best_step:
                stopping.pending = best.state_dict
                if best.dispersion_fit is not None:  # refitted at the end of that run: carry the learned one
                    learned = torch.as_tensor(best.dispersion_fit["learned_log_theta"],
                                              dtype=best.state_dict["log_theta"].dtype)
                    stopping.pending = {**best.state_dict, "log_theta": learned}

    def train_step(self):
        batch_index = self.sampler.next_batch()
        local_index = batch_index[self.context.shard(len(batch_index))]
        local_loss, _, _ = batch_loss(self.model, self.replica, self.dataset, local_index, self.device,
                                      latent_noise=self.training.latent_noise,
                                      kl_weight=self.model_config.kl_weight,
                                      count_thinning=self.training.count_thinning,
                                      count_split=self.training.count_split, gene_weights=self.gene_weights)
        # the mean over this rank's cells, weighted so that DDP's average over ranks is the global mean
        share = len(local_index) / len(batch_index)
        self.optimizer.zero_grad(set_to_none=True)
        (local_loss * (share * self.context.world_size)).backward()
        self.optimizer.step()
        self.step += 1
        if self.average is not None:
            update_weight_average(self.average, self.model, ema_warmup_rate(self.training.ema_rate, self.step))
        loss = float(self.context.sum([local_loss.item() * share])[0])
        self.running += loss
        self.running_count += 1
        return loss

    @property
    def used_model(self):
        """The model validation, early stopping and checkpoints read: the weight average with ``ema_rate``."""
        return self.average if self.average is not None else self.model

    def progress_postfix(self):
        return {"loss": f"{self.running / max(self.running_count, 1):.4f}"}

    def write_log(self, seconds):
        train_loss = self.running / max(self.running_count, 1)
        self.running, self.running_count = 0.0, 0
        if not self.context.is_main:
            return
        val_loss = ""
        if len(self.val_index):
            val_loss = evaluate_reconstruction(self.used_model, self.dataset, self.val_index[:VALIDATION_CELLS],
                                               kl_weight=self.model_config.kl_weight,
                                               count_split=self.training.count_split,
                                               gene_weights=self.gene_weights)["loss"]
            if self.early_stopping is not None:
                self.early_stopping.observe(self.step, val_loss, self.used_model)
        self.log.write(step=self.step, train_loss=train_loss, val_loss=val_loss, seconds=seconds)

    def stop_reason(self):
        if self.early_stopping is None or not self.context.is_main:
            return None
        return self.early_stopping.stop_reason(self.step)

    def is_finite(self):
        return all_finite(self.model) and (self.average is None or all_finite(self.average))

    def save(self):
        path = checkpoint_path(self.training.save_dir, self.training.seed, self.step)
        if self.context.is_main:
            state = {"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(), "rng": rng_state()}
            if self.average is not None:
                state["running_weights"] = self.model.state_dict()
            if self.early_stopping is not None:
                self.save_best()
                state["early_stopping"] = self.early_stopping.state()
            self._checkpoint(self.used_model.state_dict(), self.step, training_state=state).save(path)
        self.context.barrier()
        return path

    def save_best(self):
        """Write the pending best weights (if a new best was found since the last save)."""
        stopping = self.early_stopping
        if stopping.pending is None:
            return
        selection = {"criterion": "validation loss", "val_loss": stopping.best_loss, "step": stopping.best_step,
                     "patience": stopping.patience, "saved_at_step": self.step,
                     "validation_cells": int(min(len(self.val_index), VALIDATION_CELLS))}
        self._checkpoint(stopping.pending, stopping.best_step, selection=selection).save(stopping.path)
        stopping.pending = None

    def _checkpoint(self, state_dict, step, training_state=None, selection=None):
        return AutoencoderCheckpoint(
            model_config=self.model.config(), state_dict=state_dict, genes=self.dataset.genes,
            normalization=self.dataset.normalization.to_dict(), step=step, seed=self.training.seed,
            val_fraction=self.training.val_fraction, train_config=self.train_config,
            training_state=training_state, selection=selection, data_fingerprint=self.dataset.fingerprint,
            data_changes=self.data_changes)
