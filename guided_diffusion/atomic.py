"""Atomic outputs: a file with its final name is always complete.

Everything the project writes for users (checkpoints, latents, generated h5ad, evaluation results) goes
through :func:`atomic_output`: the content is written to a hidden temporary file in the same folder
(``.NAME.tmp-XXXX``), fsynced and renamed. A killed or failed write leaves no file with the final name;
a temporary left by a killed process is removed by the next write of the same name.
"""
import contextlib
import os
import tempfile


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
