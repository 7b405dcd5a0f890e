"""Diffusion training: AdamW, linear LR anneal, EMA with warm-up, microbatches, exact resume.

Files under ``save_dir`` (the original project's names):
``model{step:06d}.pt`` (raw weights + everything the sampler needs), ``ema_{rate}_{step:06d}.pt``
(EMA weights + the same metadata) and ``opt{step:06d}.pt`` (optimizer, data order, RNG state and the
run settings a resumed run must share).

The loop itself (stop, deadline, signals, logging and saving points) is
:func:`~guided_diffusion.training.loop.run_training`; :class:`DiffusionTrainer` supplies the step, the
log row and the files.

Distributed (a :class:`~guided_diffusion.core.distributed.DistributedContext` with several ranks): every rank
draws the same global batch, label dropout, timesteps and noise from the shared generator and trains a
DistributedDataParallel replica on its contiguous slice, the loss weighted so that the averaged
gradient is the one of the whole batch; rank 0 logs and writes the files (global state only, so any
world size resumes them) while the others wait at a barrier.
"""
import copy
import os
import sys

import numpy as np
import torch

from guided_diffusion.checkpoints import ema_file, latest_model_file, model_file, optimizer_file
from guided_diffusion.core.container import load_checkpoint, rng_state, save_checkpoint_set, set_rng_state
from guided_diffusion.data import BatchSampler, describe_change, fingerprint_differences
from guided_diffusion.core.distributed import DistributedContext, gradient_sync
from guided_diffusion.diffusion.guidance import drop_conditions
from guided_diffusion.core.memory import reuse_freed_memory
from guided_diffusion.training.latent_store import LatentStore
from guided_diffusion.training.optim import adamw, all_finite, ema_warmup_rate, update_weight_average
from guided_diffusion.core.device import matmul_precision, resolve_precision
from guided_diffusion.core.errors import SettingError, literal
from guided_diffusion.training.loop import CsvLogger, LoopSettings, TrainingTask, run_training

LOG_FIELDS = ["step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "seconds"]
# metadata entries a resumed run must share with its checkpoint, and the setting that decides each
RESUME_METADATA = (("label_keys", "label_key"), ("vocabularies", "data_dir"), ("genes", "data_dir"),
                   ("normalization", "input_is_log"), ("condition_counts", "data_dir"),
                   ("library_size_quantiles", "data_dir"), ("vae_sha256", "vae_path"),
                   ("latent_scale", "latent_scale"), ("p_uncond", "p_uncond"), ("seed", "seed"))
RESUME_SETTINGS = ("batch_size", "ema_rate")  # recorded in opt*.pt
# metadata derived from the cells themselves: a run continued on new data (--resume_on_new_data) records its own
DATA_RECORD = ("condition_counts", "library_size_quantiles")


def same_value(first, second, rtol=1e-6):
    """Equality of plain values, floats within ``rtol`` (a recomputed latent scale may differ in the last bit)."""
    if isinstance(first, float) or isinstance(second, float):
        try:
            return abs(float(first) - float(second)) <= rtol * max(abs(float(first)), abs(float(second)))
        except (TypeError, ValueError):
            return False
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(same_value(a, b, rtol) for a, b in zip(first, second))
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_value(first[k], second[k], rtol) for k in first)
    return first == second


def _shown(value):
    return literal(value) if isinstance(value, (int, float, str, bool)) or value is None else "other values"


class DiffusionTrainer(TrainingTask):
    """Trains ``model`` to predict the noise added to ``latents`` under ``diffusion``.

    ``latents`` is an (N, latent_dim) array, or a :class:`~guided_diffusion.training.latent_store.LatentStore`
    whose rows are read from disk batch by batch. ``labels`` (N, K) hold class codes per label key; ``metadata`` (a dict: label vocabularies,
    autoencoder path and hash, genes, normalization, ...) is stored in every model/EMA file so the
    sampler needs nothing else, and compared with the checkpoint's on resume.
    """

    def __init__(self, model, diffusion, latents, labels, metadata, save_dir, batch_size=128, microbatch=-1,
                 lr=1e-4, weight_decay=1e-4, ema_rate=0.9999, lr_anneal_steps=0, p_uncond=0.1,
                 save_interval=10000, log_interval=100, seed=0, device="cpu", max_minutes=None, context=None,
                 precision="fp32", resume_on_new_data=False, data_dir=""):
        self.context = context or DistributedContext(device=torch.device(device))
        self.context.check_batch_size(batch_size)
        self.model = model.to(device)
        self.replica = self.context.wrap(self.model)
        self.precision = resolve_precision(precision, device)
        self.diffusion = diffusion
        self.device = torch.device(device)
        # a store on disk is read per batch (its rows already scaled); an array is held as a tensor
        self.latents = latents if isinstance(latents, LatentStore) else torch.as_tensor(latents, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.metadata = metadata
        self.resume_on_new_data = resume_on_new_data
        self.data_dir = data_dir
        self.save_dir = save_dir
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch and microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = ema_rate
        self.lr_anneal_steps = lr_anneal_steps
        self.p_uncond = p_uncond
        self.save_interval = save_interval
        self.log_interval = log_interval
        self.max_minutes = max_minutes
        self.optimizer = adamw(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
        self.sampler = BatchSampler(np.arange(len(self.latents)), batch_size, seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0
        self.last_saved_step = None
        self.last_saved_path = None
        self.log = None
        self._quartile_edges = np.linspace(0, self.diffusion.num_timesteps, 5)
        self._sums, self._counts = np.zeros(5), np.zeros(5)

    def run_settings(self):
        return {"batch_size": self.batch_size, "ema_rate": self.ema_rate}

    # ---- checkpoints -------------------------------------------------------------------------
    def _model_payload(self, state_dict):
        return {"state_dict": state_dict, "model_config": self.model.config(), "step": self.step,
                "ema_rate": self.ema_rate, **self.metadata}

    def save(self, wait=True):
        """Rank 0 writes the three files; with ``wait`` the other ranks wait for it at a barrier."""
        step = self.step
        if self.context.is_main:
            # one set: all three written to temporaries, then renamed with the model file last (its presence
            # marks a complete set for resuming); a failure (a full disk) leaves none of them
            save_checkpoint_set([
                (self._model_payload(self.ema_model.state_dict()), ema_file(self.save_dir, self.ema_rate, step),
                 "diffusion_ema"),
                ({"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                  "generator": self.generator.get_state(), "rng": rng_state(), "step": step,
                  "run_settings": self.run_settings()}, optimizer_file(self.save_dir, step), "diffusion_optimizer"),
                (self._model_payload(self.model.state_dict()), model_file(self.save_dir, step), "diffusion_model")])
        if wait:
            self.context.barrier()
        self.last_saved_step = step
        self.last_saved_path = model_file(self.save_dir, step)
        return self.last_saved_path

    def resume(self, path):
        """Restore model, EMA, optimizer, data order, RNG and step from ``model{step}.pt`` and its siblings
        (``path`` may be their folder: the newest complete set there is used)."""
        if os.path.isdir(path):
            path = latest_model_file(path)
        payload = load_checkpoint(path, kinds=("diffusion_model",))
        self._check_resumable(path, payload)
        step = int(payload["step"])
        folder = os.path.dirname(path)
        ema_path = ema_file(folder, payload["ema_rate"], step)
        opt_path = optimizer_file(folder, step)
        for sibling in (ema_path, opt_path):
            if not os.path.exists(sibling):
                raise SettingError(f"cannot resume from {literal(path)}: {literal(sibling)} is missing")
        ema = load_checkpoint(ema_path, kinds=("diffusion_ema",))
        optimizer = load_checkpoint(opt_path, kinds=("diffusion_optimizer",))
        self._check_run_settings(path, optimizer.get("run_settings", {}))
        self.model.load_state_dict(payload["state_dict"])
        self.ema_model.load_state_dict(ema["state_dict"])
        self.optimizer.load_state_dict(optimizer["optimizer"])
        self.sampler.load_state_dict(optimizer["sampler"])
        self.generator.set_state(optimizer["generator"])
        set_rng_state(optimizer["rng"])
        self.step = step
        self.last_saved_step = step
        self.last_saved_path = path

    def _check_resumable(self, path, payload):
        """Refuse a checkpoint whose model or record (labels, genes, data, scale, ...) this run would change."""
        if payload["model_config"] != self.model.config():
            raise SettingError(f"{{resume_checkpoint}} {literal(path)} has model config "
                               f"{literal(payload['model_config'])}, this run builds {literal(self.model.config())}",
                               "resume_checkpoint")
        first_data_key = min(i for i, (key, _) in enumerate(RESUME_METADATA) if key in DATA_RECORD)
        self._check_record(path, payload, RESUME_METADATA[:first_data_key])  # labels, genes, normalization
        new_data = self._check_data(path, payload)
        self._check_record(path, payload, [(key, setting) for key, setting in RESUME_METADATA[first_data_key:]
                                           if not (new_data and key in DATA_RECORD)])

    def _check_data(self, path, payload):
        """Refuse data other than the checkpoint's (naming what differs) unless ``resume_on_new_data``; sets the
        data changes this run records. Returns whether the run continues on new data."""
        recorded, current = payload.get("data_fingerprint"), self.metadata.get("data_fingerprint")
        changes = list(payload.get("data_changes") or [])
        self.metadata["data_changes"] = changes
        if current is None:
            return False
        if recorded is None:
            if self.context.is_main:
                print(f"warning: {path} records no fingerprint of its training data (written before cfDiffusion "
                      f"recorded one); the data cannot be checked against --data_dir {self.data_dir}",
                      file=sys.stderr, flush=True)
            if self.resume_on_new_data:
                changes.append(describe_change(None, current, payload["step"], self.data_dir))
            return self.resume_on_new_data
        differences = fingerprint_differences(recorded, current)
        if not differences:
            return False
        if not self.resume_on_new_data:
            raise SettingError(f"{{resume_checkpoint}} {literal(path)} was trained on other data than {{data_dir}} "
                               f"{literal(self.data_dir)}: {literal('; '.join(differences))}; resume with the data "
                               f"it was trained on, or pass {{resume_on_new_data}} True to continue training on "
                               f"this data (recorded in the checkpoint)", "resume_checkpoint", "data_dir",
                               "resume_on_new_data")
        if self.context.is_main:
            print(f"continuing {path} on new data ({'; '.join(differences)}); recorded in the checkpoints",
                  flush=True)
        changes.append(describe_change(recorded, current, payload["step"], self.data_dir))
        return True

    def _check_record(self, path, payload, entries):
        for key, setting in entries:
            if key not in payload or key not in self.metadata or same_value(payload[key], self.metadata[key]):
                continue
            raise SettingError(f"{{resume_checkpoint}} {literal(path)} records {key.replace('_', ' ')} "
                               f"{_shown(payload[key])}, this run ({{{setting}}}) gives {_shown(self.metadata[key])};"
                               f" resume with the same {{{setting}}} and data, or start a new run in another "
                               f"{{model_name}}", "resume_checkpoint", setting, "model_name")

    def _check_run_settings(self, path, recorded):
        for name in RESUME_SETTINGS:
            if name in recorded and not same_value(recorded[name], self.run_settings()[name]):
                raise SettingError(f"{{resume_checkpoint}} {literal(path)} was trained with {{{name}}} "
                                   f"{recorded[name]}, this run has {{{name}}} {self.run_settings()[name]}; resume "
                                   f"with the same {{{name}}}", "resume_checkpoint", name)

    # ---- one step ----------------------------------------------------------------------------
    def _current_lr(self):
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * max(0.0, 1.0 - self.step / self.lr_anneal_steps)

    def run_step(self):
        """One optimizer step over a batch (in microbatches).

        Returns the per-sample losses and timesteps of this rank's slice of the batch (all of it in a
        single process).
        """
        index = torch.from_numpy(self.sampler.next_batch())
        cond = drop_conditions(self.labels[index], self.model.condition_sizes, self.p_uncond, self.generator)
        t = self.diffusion.sample_timesteps(len(index), "cpu", generator=self.generator)
        noise = torch.randn((len(index), self.latents.shape[1]), generator=self.generator)
        local = self.context.shard(len(index))
        x0, cond, t, noise = self._latent_rows(index[local]), cond[local], t[local], noise[local]
        for group in self.optimizer.param_groups:
            group["lr"] = self._current_lr()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for start in range(0, len(x0), self.microbatch):
            part = slice(start, start + self.microbatch)
            with gradient_sync(self.replica, sync=start + self.microbatch >= len(x0)), \
                    matmul_precision(self.precision, self.device):
                loss = self.diffusion.training_losses(
                    self.replica, x0[part].to(self.device), t[part].to(self.device),
                    model_kwargs={"cond": cond[part].to(self.device)}, noise=noise[part].to(self.device))
                # DDP averages gradients over ranks: scaling by the world size makes that the batch mean
                (loss.sum() / len(index) * self.context.world_size).backward()
            losses.append(loss.detach().cpu())
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        return torch.cat(losses), t

    def _latent_rows(self, index):
        if isinstance(self.latents, LatentStore):
            return torch.from_numpy(self.latents.rows(index.numpy()))
        return self.latents[index]

    def _update_ema(self):
        update_weight_average(self.ema_model, self.model, ema_warmup_rate(self.ema_rate, self.step))

    # ---- the loop (guided_diffusion.training.loop) ---------------------------------------------
    def train_step(self):
        losses, t = self.run_step()
        quartile = np.clip(np.searchsorted(self._quartile_edges, t.numpy(), side="right") - 1, 0, 3)
        np.add.at(self._sums, quartile, losses.numpy())
        np.add.at(self._counts, quartile, 1)
        self._sums[4] += float(losses.sum())
        self._counts[4] += len(losses)
        total, count = self.context.sum([float(losses.sum()), len(losses)])
        return total / max(count, 1)

    def progress_postfix(self):
        return {"loss": f"{self._sums[4] / max(self._counts[4], 1):.4f}"}

    def write_log(self, seconds):
        """Append the mean losses since the last row (summed over ranks; rank 0 writes)."""
        sums, counts = self.context.sum(self._sums), self.context.sum(self._counts)
        self._sums[:], self._counts[:] = 0, 0
        if not counts[4]:
            return
        means = [sums[i] / counts[i] if counts[i] else "" for i in range(5)]
        self.log.write(**dict(zip(LOG_FIELDS, [self.step, means[4], *means[:4], self._current_lr(), seconds])))

    def is_finite(self):
        return all_finite(self.model) and all_finite(self.ema_model)

    def run_loop(self, progress=True):
        """Train until ``lr_anneal_steps`` (or the deadline, or a signal); returns the last model file."""
        if self.context.is_main:
            os.makedirs(self.save_dir, exist_ok=True)
        self.log = CsvLogger(os.path.join(self.save_dir, "train_log.csv"), LOG_FIELDS, start_step=self.step,
                             enabled=self.context.is_main)
        self.model.train()
        # the latents are in memory (a streamed h5ad was closed after encoding): the step's buffers are
        # reused instead of page-faulted in again every step (measured 1.14x wall time with bf16)
        reuse_freed_memory()
        settings = LoopSettings(max_steps=self.lr_anneal_steps or None, save_interval=self.save_interval,
                                log_interval=self.log_interval, max_minutes=self.max_minutes,
                                description="diffusion", resume_flag="--resume_checkpoint", learning_rate=self.lr)
        return run_training(self, settings, self.context, progress=progress)
