"""Diffusion training loop: AdamW, linear LR anneal, EMA with warm-up, microbatches, exact resume.

Files under ``save_dir`` (the original project's names):
``model{step:06d}.pt`` (raw weights + everything the sampler needs), ``ema_{rate}_{step:06d}.pt``
(EMA weights + the same metadata) and ``opt{step:06d}.pt`` (optimizer, data order, RNG state).

Distributed (a :class:`~guided_diffusion.dist_util.DistributedContext` with several ranks): every rank
draws the same global batch, label dropout, timesteps and noise from the shared generator and trains a
DistributedDataParallel replica on its contiguous slice, the loss weighted so that the averaged
gradient is the one of the whole batch; rank 0 logs and writes the files (global state only, so any
world size resumes them) while the others wait at a barrier.
"""
import copy
import csv
import os
import re
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .cli import StopAtStepBoundary, UsageError
from .data import BatchSampler
from .dist_util import DistributedContext, gradient_sync
from .guidance import drop_conditions

LOG_FIELDS = ["step", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "lr", "seconds"]



def adamw(parameters, lr, weight_decay):
    """AdamW with the fused kernel where the parameters' device has one (CPU and CUDA): on CPU it is
    ~6x faster than the default per-tensor loop (measured: 0.03 s vs 0.17 s per step for the
    autoencoder's 45M parameters), which matters for the autoencoder's 20,125-gene layers."""
    parameters = list(parameters)
    fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)

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
        raise UsageError(f"--resume_checkpoint {folder} holds no complete checkpoint (model*.pt with its opt*.pt); "
                         f"give a model*.pt file or start without --resume_checkpoint")
    return path


def step_from_filename(path):
    match = re.search(r"(\d+)\.pt$", os.path.basename(path))
    if not match:
        raise UsageError(f"cannot read the step from checkpoint name {path} (expected model000100.pt)")
    return int(match.group(1))


def ema_warmup_rate(ema_rate, step):
    """EMA decay at ``step``: grows from 0.1 towards ``ema_rate`` so short runs average sensibly."""
    return min(ema_rate, (1.0 + step) / (10.0 + step))


class DiffusionTrainer:
    """Trains ``model`` to predict the noise added to ``latents`` under ``diffusion``.

    ``labels`` (N, K) hold class codes per label key; ``metadata`` is stored in every model/EMA file
    (label vocabularies, autoencoder path and hash, genes, normalization) so the sampler needs nothing else.
    """

    def __init__(self, model, diffusion, latents, labels, metadata, save_dir, batch_size=128, microbatch=-1,
                 lr=1e-4, weight_decay=1e-4, ema_rate=0.9999, lr_anneal_steps=0, p_uncond=0.1,
                 save_interval=10000, log_interval=100, seed=0, device="cpu", max_minutes=None, context=None):
        self.context = context or DistributedContext(device=torch.device(device))
        self.context.check_batch_size(batch_size)
        self.model = model.to(device)
        self.replica = self.context.wrap(self.model)
        self.diffusion = diffusion
        self.device = torch.device(device)
        self.latents = torch.as_tensor(latents, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.metadata = metadata
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

    # ---- checkpoints -------------------------------------------------------------------------
    def _model_payload(self, state_dict):
        return {"state_dict": state_dict, "model_config": self.model.config(), "step": self.step,
                "ema_rate": self.ema_rate, **self.metadata}

    def save(self, wait=True):
        """Rank 0 writes the three files; with ``wait`` the other ranks wait for it at a barrier."""
        step = self.step
        if self.context.is_main:
            save_checkpoint(self._model_payload(self.ema_model.state_dict()),
                            ema_file(self.save_dir, self.ema_rate, step), kind="diffusion_ema")
            save_checkpoint({"optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                             "generator": self.generator.get_state(), "rng": rng_state(), "step": step},
                            optimizer_file(self.save_dir, step), kind="diffusion_optimizer")
            # the model file is written last: its presence marks a complete set for resuming
            save_checkpoint(self._model_payload(self.model.state_dict()), model_file(self.save_dir, step),
                            kind="diffusion_model")
        if wait:
            self.context.barrier()
        self.last_saved_step = step
        return model_file(self.save_dir, step)

    def resume(self, path):
        """Restore model, EMA, optimizer, data order, RNG and step from ``model{step}.pt`` and its siblings
        (``path`` may be their folder: the newest complete set there is used)."""
        if os.path.isdir(path):
            path = latest_model_file(path)
        payload = load_checkpoint(path, kinds=("diffusion_model",))
        if payload["model_config"] != self.model.config():
            raise UsageError(f"--resume_checkpoint {path} has model config {payload['model_config']}, "
                             f"this run builds {self.model.config()}")
        for key in ("label_keys", "vocabularies", "genes"):
            if payload.get(key) != self.metadata.get(key):
                raise UsageError(f"--resume_checkpoint {path} was trained with other {key.replace('_', ' ')} "
                                 f"than this data has")
        step = int(payload["step"])
        folder = os.path.dirname(path)
        ema_path = ema_file(folder, payload["ema_rate"], step)
        opt_path = optimizer_file(folder, step)
        for sibling in (ema_path, opt_path):
            if not os.path.exists(sibling):
                raise UsageError(f"cannot resume from {path}: {sibling} is missing")
        ema = load_checkpoint(ema_path, kinds=("diffusion_ema",))
        optimizer = load_checkpoint(opt_path, kinds=("diffusion_optimizer",))
        self.model.load_state_dict(payload["state_dict"])
        self.ema_model.load_state_dict(ema["state_dict"])
        self.optimizer.load_state_dict(optimizer["optimizer"])
        self.sampler.load_state_dict(optimizer["sampler"])
        self.generator.set_state(optimizer["generator"])
        set_rng_state(optimizer["rng"])
        self.step = step
        self.last_saved_step = step

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
        x0, cond, t, noise = self.latents[index[local]], cond[local], t[local], noise[local]
        for group in self.optimizer.param_groups:
            group["lr"] = self._current_lr()
        self.optimizer.zero_grad(set_to_none=True)
        losses = []
        for start in range(0, len(x0), self.microbatch):
            part = slice(start, start + self.microbatch)
            with gradient_sync(self.replica, sync=start + self.microbatch >= len(x0)):
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

    @torch.no_grad()
    def _update_ema(self):
        rate = ema_warmup_rate(self.ema_rate, self.step)
        for ema_param, param in zip(self.ema_model.parameters(), self.model.parameters()):
            ema_param.mul_(rate).add_(param.detach(), alpha=1.0 - rate)
        for ema_buffer, buffer in zip(self.ema_model.buffers(), self.model.buffers()):
            ema_buffer.copy_(buffer)

    # ---- the loop ----------------------------------------------------------------------------
    def run_loop(self, progress=True):
        main = self.context.is_main
        progress = progress and main
        log_path = os.path.join(self.save_dir, "train_log.csv")
        if main:
            os.makedirs(self.save_dir, exist_ok=True)
            if not os.path.exists(log_path):
                with open(log_path, "w", newline="") as stream:
                    csv.writer(stream).writerow(LOG_FIELDS)
        quartile_edges = np.linspace(0, self.diffusion.num_timesteps, 5)
        sums, counts = np.zeros(5), np.zeros(5)
        started = time.monotonic()
        deadline = started + 60 * self.max_minutes if self.max_minutes else None
        total = self.lr_anneal_steps or None
        bar = tqdm(total=total, initial=self.step, desc="diffusion", unit="step", disable=not progress)
        self.model.train()
        with StopAtStepBoundary() as stop:  # Ctrl-C/SIGTERM: finish the step, save, exit 130/143
            while not self.lr_anneal_steps or self.step < self.lr_anneal_steps:
                losses, t = self.run_step()
                quartile = np.clip(np.searchsorted(quartile_edges, t.numpy(), side="right") - 1, 0, 3)
                np.add.at(sums, quartile, losses.numpy())
                np.add.at(counts, quartile, 1)
                sums[4] += float(losses.sum())
                counts[4] += len(losses)
                bar.update(1)
                if self.step % self.log_interval == 0:
                    bar.set_postfix(loss=f"{sums[4] / counts[4]:.4f}")
                    self._write_log(log_path, sums, counts, started)
                    sums[:], counts[:] = 0, 0
                if self.step % self.save_interval == 0:
                    self.save()
                if self.context.any(stop.requested):
                    bar.close()
                    path = self.save() if self.last_saved_step != self.step else model_file(self.save_dir, self.step)
                    if main:
                        print(f"interrupted: saved {path}; resume with --resume_checkpoint {path}", flush=True)
                    raise SystemExit(stop.exit_code if stop.requested else 130)
                if deadline is not None and self.context.any(time.monotonic() >= deadline):
                    if main:
                        bar.write(f"--max_minutes {self.max_minutes} reached at step {self.step}")
                    break
        bar.close()
        if counts[4]:
            self._write_log(log_path, sums, counts, started)
        if self.last_saved_step != self.step:
            self.save()
        return model_file(self.save_dir, self.step)

    def _write_log(self, path, sums, counts, started):
        """Append the mean losses since the last row (summed over ranks; rank 0 writes)."""
        sums, counts = self.context.sum(sums), self.context.sum(counts)
        if not self.context.is_main:
            return
        means = [sums[i] / counts[i] if counts[i] else "" for i in range(5)]
        with open(path, "a", newline="") as stream:
            csv.writer(stream).writerow([self.step, means[4], *means[:4], self._current_lr(),
                                         round(time.monotonic() - started, 2)])
