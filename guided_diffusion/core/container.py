"""Checkpoint files: plain tensors and containers, written atomically, read with weights_only.

Every file is a dict with ``format_version`` and ``kind`` (``autoencoder``, ``diffusion_model``,
``diffusion_ema`` or ``diffusion_optimizer``) so a file given in the wrong place is refused with a
clear message instead of failing deep inside the model.

Writes go to a hidden temporary file in the same folder (``.NAME.tmp-XXXX``), are fsynced and then
renamed, so a file with the final name is always complete, even if the process is killed mid-write;
a killed write leaves only the temporary file, which is safe to delete (a trainer removes those of its
folder when it claims it). Files that form one set (a model and its optimizer state) are written with
:func:`save_checkpoint_set`: every file to its temporary first, renamed only when all were written, so a
full disk never leaves one without the other. Reads use
``torch.load(weights_only=True)``, so a file holding arbitrary Python objects is refused, never executed.
"""
import collections
import hashlib
import os
import pickle
import re

import blobfile as bf
import torch

from guided_diffusion.core.atomic import GuardedStream, as_disk_full, discard, publish, temporary_path, _fsync
from guided_diffusion.core.errors import UsageError

FORMAT_VERSION = 1

KIND_DESCRIPTIONS = {
    "autoencoder": "an autoencoder checkpoint (VAE/VAE_train.py)",
    "autoencoder_optimizer": "an autoencoder optimizer state (VAE/VAE_train.py opt_seed=*_step=*.pt)",
    "diffusion_model": "a diffusion model checkpoint (cell_train.py model*.pt)",
    "diffusion_ema": "a diffusion EMA checkpoint (cell_train.py ema_*.pt)",
    "diffusion_optimizer": "a diffusion optimizer state (cell_train.py opt*.pt)",
}

# what a checkpoint may contain: exactly what torch.load(weights_only=True) reads back
_PLAIN_TYPES = (str, bytes, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)
_CONTAINERS = (dict, collections.OrderedDict, list, tuple)


def check_plain(value, where="payload"):
    """Raise TypeError naming the first entry that is not a tensor, a plain value or a plain container.

    Exact types are required: a numpy float is a ``float`` subclass but would make the file
    unreadable with ``weights_only=True``.
    """
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN_TYPES:
        return
    if type(value) not in _CONTAINERS:
        raise TypeError(f"checkpoint entry {where} is a {type(value).__module__}.{type(value).__name__}; "
                        f"only tensors, str/int/float/bool/None and dict/list/tuple can be saved")
    if isinstance(value, dict):
        for key, item in value.items():
            check_plain(key, f"{where} key {key!r}")
            check_plain(item, f"{where}[{key!r}]")
    else:
        for index, item in enumerate(value):
            check_plain(item, f"{where}[{index}]")


def save_checkpoint(payload, path, kind):
    """Write ``payload`` (a dict) to ``path`` atomically: temp file in the same folder, fsync, rename."""
    save_checkpoint_set([(payload, path, kind)])
    return path


def estimated_size(payload):
    """About the bytes torch.save writes for ``payload``: its tensors' storage plus a margin."""
    storages, total = set(), 64 * 1024
    stack = [payload]
    while stack:
        value = stack.pop()
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in storages:
                storages.add(key)
                total += storage.nbytes() + 512
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)
    return total


def save_checkpoint_set(entries):
    """Write ``entries`` ((payload, path, kind), ...) as one set: each to a temporary beside its path, then,
    once all were written, renamed in order (the last one marks the set complete). A failure (a full disk:
    :class:`DiskFull` naming the file and the space the whole set needs) removes every temporary and leaves
    the files of earlier sets as they were."""
    prepared = []
    for payload, path, kind in entries:
        if kind not in KIND_DESCRIPTIONS:
            raise ValueError(f"unknown checkpoint kind {kind!r}")
        payload = dict(payload, format_version=FORMAT_VERSION, kind=kind)
        check_plain(payload)
        prepared.append((payload, path))
    temporaries, current = [], None
    try:
        for payload, path in prepared:
            current = path
            temporaries.append(temporary_path(path))
            stream = GuardedStream(temporaries[-1])
            try:
                torch.save(payload, stream)
                stream.check()
            finally:
                stream.close()
        for temp_path, (_, path) in zip(temporaries, prepared):
            current = path
            publish(temp_path, path)
    except Exception as error:
        written = sum(os.path.getsize(t) for t in temporaries if os.path.exists(t))
        for temp_path in temporaries:
            discard(temp_path)
        full = as_disk_full(error, current, needed=sum(estimated_size(p) for p, _ in prepared), written=written)
        if full is not None:
            raise full from None
        raise
    except BaseException:
        for temp_path in temporaries:
            discard(temp_path)
        raise
    for folder in {os.path.dirname(os.path.abspath(path)) for _, path in prepared}:
        _fsync(folder)


def load_checkpoint(path, kinds=None):
    """Load a checkpoint safely (no code execution) and check its format and kind."""
    if not bf.exists(path):
        raise UsageError(f"checkpoint not found: {path}")
    if bf.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    try:
        with bf.BlobFile(path, "rb") as stream:
            payload = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "global" in str(error).lower():  # a class or function reference: what code execution needs
            raise UsageError(f"refusing to load {path}: it holds Python objects other than tensors and plain "
                             f"containers, which could run code; it was not loaded. Use a checkpoint written "
                             f"by cfDiffusion") from error
        raise UsageError(_unreadable(path, error)) from error
    except Exception as error:
        raise UsageError(_unreadable(path, error)) from error
    if not isinstance(payload, dict) or "format_version" not in payload or "kind" not in payload:
        raise UsageError(f"{path} is not a cfDiffusion checkpoint (no format_version/kind); "
                         f"pass a file written by VAE/VAE_train.py or cell_train.py")
    version = payload["format_version"]
    if type(version) is not int or version < 1:
        raise UsageError(f"{path} has an invalid checkpoint format_version {version!r}; it is not a "
                         f"cfDiffusion checkpoint or is corrupt")
    if version > FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {version}, newer than this code reads "
                         f"({FORMAT_VERSION}); update cfDiffusion")
    if kinds is not None and payload["kind"] not in kinds:
        wanted = " or ".join(KIND_DESCRIPTIONS[k] for k in kinds)
        found = KIND_DESCRIPTIONS.get(payload["kind"], f"a checkpoint of unknown kind {payload['kind']!r}")
        raise UsageError(f"{path} is {found}, but {wanted} is expected here")
    return payload


def _unreadable(path, error):
    return (f"cannot read checkpoint {path}: it is truncated, corrupt or not a cfDiffusion checkpoint "
            f"({type(error).__name__}); use an earlier checkpoint or re-create it")


def latest_checkpoint(folder, pattern, required_siblings=lambda step: ()):
    """The file in ``folder`` whose name matches ``pattern`` (one group: the step) with the highest step
    whose ``required_siblings(step)`` (file names in the same folder) all exist; None if there is none.

    Temporary files of interrupted writes never match: they start with a dot and end in ``.tmp-XXXX``.
    """
    best = None
    regex = re.compile(pattern)
    for name in os.listdir(folder):
        match = regex.fullmatch(name)
        if not match:
            continue
        step = int(match.group(1))
        if all(os.path.exists(os.path.join(folder, sibling)) for sibling in required_siblings(step)):
            if best is None or step > best[0]:
                best = (step, os.path.join(folder, name))
    return None if best is None else best[1]


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with bf.BlobFile(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state():
    """The RNG states that a resumed run must restore (torch CPU and, where present, CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
