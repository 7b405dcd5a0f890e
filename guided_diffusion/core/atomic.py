"""Atomic outputs: a file with its final name is always complete.

Everything the project writes for users (checkpoints, latents, generated h5ad, evaluation results) goes
through :func:`atomic_output`: the content is written to a hidden temporary file in the same folder
(``.NAME.tmp-XXXX``), fsynced and renamed. A killed or failed write leaves no file with the final name;
a temporary left by a killed process is removed by the next write of the same name.
"""
import contextlib
import os
import tempfile

from guided_diffusion.core.errors import UsageError


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_temporaries(folder, prefix):
    for name in os.listdir(folder):
        if name.startswith(prefix):
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _fsync(path, flags=os.O_RDONLY):
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path``, else it is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f".{os.path.basename(path)}.tmp-"
    _remove_stale_temporaries(folder, prefix)
    handle, temp_path = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(handle)
    try:
        yield temp_path
        _fsync(temp_path)
        os.chmod(temp_path, 0o666 & ~_current_umask())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    _fsync(folder)  # make the rename itself durable


def check_writable_dir(path, flag):
    """Refuse, before any work is done, an output folder that cannot be created or written.

    Nothing is left behind: the folder is not created here (the writer creates it later); a probe
    file is made and removed in the folder, or in its nearest existing parent. ``os.access`` is not
    used because it says yes to root even where writing fails (read-only mounts, /proc).
    """
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        where = "it is a file" if existing == path else f"{existing} is a file"
        raise UsageError(f"cannot write to {flag} {path}: {where}, not a folder; choose a folder you can write to")
    try:
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write to {flag} {path} ({error.strerror or error}); "
                         f"choose a folder you can write to") from error
