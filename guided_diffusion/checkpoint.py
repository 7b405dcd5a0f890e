"""Checkpoint files: plain tensors and containers, written atomically, read with weights_only.

Every file is a dict with ``format_version`` and ``kind`` (``autoencoder``, ``diffusion_model``,
``diffusion_ema`` or ``diffusion_optimizer``) so a file given in the wrong place is refused with a
clear message instead of failing deep inside the model.
"""
import hashlib
import os
import tempfile

import blobfile as bf
import torch

from .cli import UsageError

FORMAT_VERSION = 1

KIND_DESCRIPTIONS = {
    "autoencoder": "an autoencoder checkpoint (VAE/VAE_train.py)",
    "diffusion_model": "a diffusion model checkpoint (cell_train.py model*.pt)",
    "diffusion_ema": "a diffusion EMA checkpoint (cell_train.py ema_*.pt)",
    "diffusion_optimizer": "a diffusion optimizer state (cell_train.py opt*.pt)",
}


def save_checkpoint(payload, path, kind):
    """Write ``payload`` (a dict) to ``path`` atomically: temp file in the same folder, fsync, rename."""
    payload = dict(payload, format_version=FORMAT_VERSION, kind=kind)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_path, 0o666 & ~_current_umask())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return path


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_checkpoint(path, kinds=None):
    """Load a checkpoint safely (no code execution) and check its format and kind."""
    if not bf.exists(path):
        raise UsageError(f"checkpoint not found: {path}")
    if bf.isdir(path):
        raise UsageError(f"{path} is a directory, not a checkpoint file")
    try:
        with bf.BlobFile(path, "rb") as stream:
            payload = torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path} (truncated, corrupt or not a cfDiffusion "
                         f"checkpoint): {type(error).__name__}") from error
    if not isinstance(payload, dict) or "format_version" not in payload or "kind" not in payload:
        raise UsageError(f"{path} is not a cfDiffusion checkpoint (no format_version/kind)")
    if int(payload["format_version"]) > FORMAT_VERSION:
        raise UsageError(f"{path} has checkpoint format version {payload['format_version']}, newer than "
                         f"this code reads ({FORMAT_VERSION}); update cfDiffusion")
    if kinds is not None and payload["kind"] not in kinds:
        wanted = " or ".join(KIND_DESCRIPTIONS[k] for k in kinds)
        found = KIND_DESCRIPTIONS.get(payload["kind"], payload["kind"])
        raise UsageError(f"{path} is {found}, but {wanted} is expected here")
    return payload


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
