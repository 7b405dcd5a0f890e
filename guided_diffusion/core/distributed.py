"""Several processes on torch.distributed: launcher detection, process group, sharding, collectives.

Launchers (detected from the environment, nothing to pass on the command line):

* ``torchrun`` (one or several nodes): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``MASTER_ADDR`` and ``MASTER_PORT`` come from the environment (``init_method="env://"``).
* ``mpiexec``/``mpirun`` (MPICH, Intel MPI, Open MPI, MVAPICH): rank and world size come from
  mpi4py's ``COMM_WORLD``, the local rank from its shared-memory split; rank 0 picks the rendezvous
  address (``MASTER_ADDR`` if set, 127.0.0.1 when every rank is on its node, else its host name) and
  a free port (``MASTER_PORT`` if set) and broadcasts them over MPI (``init_method="tcp://..."``).
* neither (or a world of one process): no process group at all; the scripts behave as before.

Backend: ``nccl`` when the device is CUDA (each process takes the GPU of its local rank), ``gloo``
on CPU. The process group is created once per process and destroyed at exit; a script that created
one ends through :func:`end_process` (see there why it skips interpreter finalization).
"""
import atexit
import contextlib
import os
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from guided_diffusion.core.errors import UsageError
from guided_diffusion.core.device import resolve_device
from guided_diffusion.core.threads import apply_default_threads

MPI_WORLD_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK")

_active_context = None


@dataclass
class DistributedContext:
    """Where this process stands in the job; a world of one makes every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def backend(self):
        if not self.is_distributed:
            return None
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def _communication_device(self):
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def shard(self, n_items):
        """This rank's contiguous slice of ``n_items`` (the first ``n_items % world_size`` ranks get one more)."""
        base, extra = divmod(n_items, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def check_batch_size(self, batch_size):
        if batch_size < self.world_size:
            raise UsageError(f"--batch_size {batch_size} is the global batch and must be at least the number of "
                             f"processes ({self.world_size})")

    def barrier(self):
        if self.is_distributed:
            dist.barrier()

    def sum(self, values):
        """Element-wise sum over ranks of a float array (returned as float64 numpy)."""
        values = np.asarray(values, dtype=np.float64)
        if not self.is_distributed:
            return values.copy()
        tensor = torch.from_numpy(values.copy()).to(self._communication_device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def any(self, flag):
        """True on every rank when ``flag`` is true on at least one (e.g. a time limit reached on rank 0)."""
        if not self.is_distributed:
            return bool(flag)
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def all_gather_rows(self, rows):
        """Concatenate every rank's (n_r, ...) array in rank order; every rank receives the whole array."""
        rows = np.ascontiguousarray(rows)
        if not self.is_distributed:
            return rows
        device = self._communication_device
        counts = torch.tensor([len(rows)], dtype=torch.long, device=device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        dist.all_gather(all_counts, counts)
        all_counts = [int(c.item()) for c in all_counts]
        longest = max(all_counts)
        padded = torch.zeros((longest,) + rows.shape[1:], dtype=torch.from_numpy(rows[:0]).dtype, device=device)
        padded[:len(rows)] = torch.from_numpy(rows).to(device)
        received = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(received, padded)
        return np.concatenate([part[:count].cpu().numpy() for part, count in zip(received, all_counts)])

    def wrap(self, model):
        """DistributedDataParallel around ``model`` (already on ``self.device``) when distributed, else ``model``."""
        if not self.is_distributed:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def synchronize_batchnorm(self, model):
        """Make BatchNorm layers use the statistics of the global batch (all ranks) when distributed.

        CUDA uses ``torch.nn.SyncBatchNorm``; it refuses CPU tensors, so on CPU (gloo) the layers become
        :class:`CrossRankBatchNorm1d`, which computes the same global statistics with two all-reduces.
        Both keep the parameter and buffer names of BatchNorm1d, so checkpoints are unchanged.
        """
        if not self.is_distributed:
            return model
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return convert_to_cross_rank_batchnorm(model)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the incoming gradients over ranks as well."""

    @staticmethod
    def forward(ctx, tensor):
        total = tensor.contiguous().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        total = grad_output.contiguous().clone()
        dist.all_reduce(total)
        return total


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are those of the union of every rank's batch.

    Mean and (biased) variance are computed in two passes over all ranks (sum, then centred sum of
    squares), differentiably, so the gradients equal those of one process holding the whole batch.
    Eval mode, or a single process, is plain BatchNorm1d.
    """

    def forward(self, x):
        if not (self.training and dist.is_available() and dist.is_initialized()) or x.dim() != 2:
            return super().forward(x)
        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        totals = _SumOverRanks.apply(torch.cat([x.sum(dim=0), count]))
        n_total = totals[-1].detach()
        mean = totals[:-1] / n_total
        centred = x - mean
        variance = _SumOverRanks.apply((centred * centred).sum(dim=0)) / n_total
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), n_total)
        out = centred * torch.rsqrt(variance + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean, variance, n_total):
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = variance * (n_total / (n_total - 1).clamp_min(1))
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)


def convert_to_cross_rank_batchnorm(module):
    """Replace every BatchNorm1d below ``module`` by a :class:`CrossRankBatchNorm1d` sharing its tensors."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm1d) and not isinstance(child, CrossRankBatchNorm1d):
            replacement = CrossRankBatchNorm1d(child.num_features, eps=child.eps, momentum=child.momentum,
                                               affine=child.affine, track_running_stats=child.track_running_stats)
            if child.affine:
                replacement.weight, replacement.bias = child.weight, child.bias
            if child.track_running_stats:
                replacement.running_mean = child.running_mean
                replacement.running_var = child.running_var
                replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_to_cross_rank_batchnorm(child)
    return module


def gradient_sync(model, sync):
    """``model.no_sync()`` while accumulating microbatches under DDP (sync only on the last one)."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


# ---- launcher detection and process group ----------------------------------------------------------
def _env_int(name, default=None):
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def launched_by_mpi():
    return any(name in os.environ for name in MPI_WORLD_VARIABLES)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _mpi_rendezvous():
    """Rank, world, local rank/size from MPI; rank 0's address and a free port broadcast to all."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise UsageError("started by mpiexec but mpi4py is not installed; pip install mpi4py mpich "
                         "(or launch with torchrun)") from None
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    endpoint = None
    if world.Get_rank() == 0:
        address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if local_size == world.Get_size()
                                                    else socket.getfqdn())
        endpoint = (address, int(os.environ.get("MASTER_PORT") or _free_port()))
    address, port = world.bcast(endpoint, root=0)
    return world.Get_rank(), world.Get_size(), local_rank, local_size, address, port


def _select_device(name, local_rank, local_world_size, distributed):
    device = resolve_device(name)
    if device.type != "cuda" or not distributed:
        return device
    if device.index is not None:
        raise UsageError(f"--device {name} names one GPU, but this is a multi-process launch; use --device cuda "
                         f"(each process takes the GPU of its local rank)")
    available = torch.cuda.device_count()
    if local_world_size > available:
        raise UsageError(f"{local_world_size} processes on this node but only {available} GPUs; start at most "
                         f"{available} per node or use --device cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def setup_distributed(device_name="auto"):
    """The :class:`DistributedContext` of this process, creating the process group on the first call.

    A process started without a launcher gets a single-process context on ``resolve_device(device_name)``.
    """
    global _active_context
    if _active_context is not None:
        return _active_context
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size > 1:
        rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
        local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT"):
            raise UsageError("WORLD_SIZE is set but MASTER_ADDR/MASTER_PORT are not; launch with torchrun "
                             "(or mpiexec), or unset WORLD_SIZE")
        init_method = "env://"
    elif launched_by_mpi():
        rank, world_size, local_rank, local_world_size, address, port = _mpi_rendezvous()
        init_method = f"tcp://{address}:{port}"
    else:
        return DistributedContext(device=resolve_device(device_name))
    if world_size == 1:
        return DistributedContext(device=resolve_device(device_name))

    device = _select_device(device_name, local_rank, local_world_size, distributed=True)
    if device.type == "cpu":
        apply_default_threads(local_world_size)  # the usable cores shared by this node's processes
    context = DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank,
                                 local_world_size=local_world_size, device=device)
    dist.init_process_group(context.backend, init_method=init_method, rank=rank, world_size=world_size)
    atexit.register(_destroy_process_group)
    _active_context = context
    return context


def _destroy_process_group():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_process_group():
    """True when this process created a process group of several processes (torchrun, mpiexec)."""
    return _active_context is not None and _active_context.is_distributed


def end_process(exit_code):
    """End this process with ``exit_code`` when it created a process group; return at once otherwise.

    A gloo process group's worker threads release each finished collective's tensors themselves. When
    Python already dropped such a tensor, the release needs the GIL; if the interpreter is finalizing
    by then, CPython ends the thread inside a C++ destructor and the process aborts ("terminate called
    without an active exception", exit -6) after a run that finished and saved everything. The threads
    cannot be joined first: ``destroy_process_group`` does not free a group that a
    DistributedDataParallel reducer has used (torch 2.13), so its threads live until the process ends.
    Measured on a loaded 2-core machine: 1 in 10 to 1 in 25 two-process ``cell_train.py`` runs aborted so.

    So a script that created a group finishes as the interpreter would, minus the finalization: the
    atexit handlers run (they destroy the process group, close files, remove temporary folders), MPI
    is finalized under mpiexec, the standard streams are flushed, and ``os._exit`` ends the process,
    and the threads with it.
    """
    if not in_process_group():
        return
    atexit._run_exitfuncs()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(exit_code)
