"""The output set of a sampling run in ``--sample_dir``: the folder's lock (one run at a time), the staging
folder the new set is written into, and the swap that replaces the earlier set only once the new one is
complete and verified (``manifest.json`` last: a folder without it holds no complete run)."""
import contextlib
import errno
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time

import h5py

from guided_diffusion.core.atomic import (DiskFull, _fsync as fsync_folder, atomic_output, disk_error, lock_folder,
                                          remove_quietly, remove_stale_temporaries)
from guided_diffusion.core.errors import UsageError


MANIFEST = "manifest.json"
GENERATED = "generated.h5ad"


_LATENT_FILE = re.compile(r"cell[0-9x_]+_cache[0-9]+_(non_)?uniform\.npy")


STAGING_PREFIX = ".cell_sample-"


RUN_RECORD = "run.json"


class SampleDirClaim:
    """``--sample_dir`` locked by this run (``flock`` on the folder, as the trainers lock theirs) and this
    run's staging folder in it (``.cell_sample-PID-XXXX``, with ``run.json`` naming the run)."""

    def __init__(self, sample_dir, descriptor, staging, created=False):
        self.sample_dir, self._descriptor, self.staging, self.created = sample_dir, descriptor, staging, created

    def release(self):
        """Remove this run's staging folder (nothing else) and unlock the folder."""
        if self.staging is not None:
            remove_quietly(self.staging)
            self.staging = None
        if self._descriptor is not None:
            if self.created:  # a run refused or failed before writing leaves no folder it made
                with contextlib.suppress(OSError):
                    os.rmdir(self.sample_dir)
            os.close(self._descriptor)
            self._descriptor = None


def claim_sample_dir(sample_dir, flag="--sample_dir"):
    """Lock ``sample_dir`` for this run and make its staging folder; refuse a folder another run holds,
    naming that run. With the lock held, the staging folders and temporaries of killed runs are removed
    (no other run can be writing them)."""
    created = not os.path.exists(sample_dir)
    descriptor = lock_folder(sample_dir)
    if descriptor is None:
        raise UsageError(f"{flag} {sample_dir} is in use by another {_holder(sample_dir)}; wait for it to finish "
                         f"or choose another folder")
    try:
        for name in os.listdir(sample_dir):
            if name.startswith(STAGING_PREFIX):
                remove_quietly(os.path.join(sample_dir, name))
        remove_stale_temporaries(sample_dir)
        staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=sample_dir)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        with open(os.path.join(staging, RUN_RECORD), "w") as stream:
            json.dump(record, stream)
    except BaseException:
        os.close(descriptor)
        raise
    return SampleDirClaim(sample_dir, descriptor, staging, created)


def _holder(sample_dir):
    """The run that holds ``sample_dir``, in words (from its staging folder's run.json)."""
    for name in sorted(os.listdir(sample_dir)):
        try:
            with open(os.path.join(sample_dir, name, RUN_RECORD)) as stream:
                record = json.load(stream)
            return (f"cell_sample.py run (pid {record['pid']} on {record['host']}, started {record['started']}: "
                    f"{record['command']})")
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "run (a sampler or a trainer)"


def _naming_the_sample_dir(error, sample_dir, staging, n_cells, latent_dim, n_genes, observation):
    """A full disk while staging, reported for the final file and the space the whole set needs."""
    code = disk_error(error)
    if code is None:
        return error
    name = os.path.basename(getattr(error, "filename", "") or GENERATED)
    written = sum(os.path.getsize(os.path.join(base, file)) for base, _, files in os.walk(staging) for file in files)
    needed = n_cells * latent_dim * 4 + (n_cells * n_genes * 4 if observation == "mean" else 0) + (1 << 20)
    return DiskFull(os.path.join(sample_dir, name), code, needed=needed if observation == "mean" else None,
                    written=written)


def commit_output_set(sample_dir, staging):
    """Verify the staged set against its manifest, then swap it in: the earlier manifest goes first (a folder
    never looks complete with a mixed set), the new files replace the old ones, the earlier run's other
    output files are removed and the new manifest is renamed last. SIGINT/SIGTERM wait until it is done."""
    with open(os.path.join(staging, MANIFEST)) as stream:
        files = json.load(stream)["files"]
    for name, size in files.items():
        if os.path.getsize(os.path.join(staging, name)) != size:
            raise OSError(errno.EIO, f"{name} is {os.path.getsize(os.path.join(staging, name))} bytes, its "
                                     f"manifest says {size}", os.path.join(sample_dir, name))
    with h5py.File(os.path.join(staging, GENERATED), "r") as store:
        if "X" not in store or "obs" not in store:
            raise OSError(errno.EIO, "the written file is not a complete h5ad", os.path.join(sample_dir, GENERATED))
    with _signals_deferred():
        old = [name for name in os.listdir(sample_dir)
               if name in (MANIFEST, GENERATED) or _LATENT_FILE.fullmatch(name)]
        if MANIFEST in old:
            os.remove(os.path.join(sample_dir, MANIFEST))
        for name in files:
            os.replace(os.path.join(staging, name), os.path.join(sample_dir, name))
        for name in old:
            if name not in files and name != MANIFEST:
                os.remove(os.path.join(sample_dir, name))
        os.replace(os.path.join(staging, MANIFEST), os.path.join(sample_dir, MANIFEST))
        fsync_folder(sample_dir)
    replaced = [name for name in old if name != MANIFEST]
    if replaced:
        print(f"removed {len(replaced)} output files of an earlier run in {sample_dir}", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT and SIGTERM arriving inside the block take effect when it ends (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {signum: signal.signal(signum, lambda number, frame: pending.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending[:1]:
            signal.raise_signal(signum)


def write_manifest(sample_dir, files, record):
    manifest = {"complete": True, "files": {name: os.path.getsize(os.path.join(sample_dir, name)) for name in files},
                "run": record}
    with atomic_output(os.path.join(sample_dir, MANIFEST)) as temp_path, open(temp_path, "w") as stream:
        json.dump(manifest, stream, indent=1, default=str)


