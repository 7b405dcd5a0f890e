"""Atomic outputs: a file with its final name is always complete.

Everything the project writes for users (checkpoints, latents, generated h5ad, evaluation results) goes
through :func:`atomic_output`: the content is written to a hidden temporary file in the same folder
(``.NAME.tmp-XXXX``, the random part unique to the write), fsynced and renamed. A failed write removes
its own temporary and leaves no file with the final name. A write never removes another's temporary
(another run may be writing it): the temporaries of a killed run are removed by
:func:`remove_stale_temporaries`, called by a run that holds its folder's lock (:func:`lock_folder`).

A full disk (ENOSPC, EDQUOT) or the file size limit (EFBIG), however it surfaces (an OSError, h5py's
OSError/RuntimeError naming ``errno = 28``, torch.save's ``RuntimeError: [enforce fail at
inline_container.cc] unexpected pos``), becomes :class:`DiskFull`: one line naming the path and the space
needed.
"""
import contextlib
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile

from guided_diffusion.core.errors import UsageError

NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def _size(count):
    count = float(max(count, 0))
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000.0


def free_space(path):
    """Bytes free to this user on ``path``'s filesystem (its nearest existing folder), or None."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


class DiskFull(OSError):
    """No room for a write: a full disk or quota (ENOSPC, EDQUOT) or the file size limit (EFBIG).
    ``needed``: the bytes the output needs (an estimate), or None when only ``written`` (what fit) is known."""

    def __init__(self, path, code=errno.ENOSPC, needed=None, written=0):
        self.needed, self.written = needed, written
        super().__init__(code, os.strerror(code), path)

    def __str__(self):
        path = self.filename
        if self.needed and self.needed > self.written:
            space = f"needs about {_size(self.needed)}"
        else:
            space = f"needs more than the {_size(self.written)} written when it failed"
        if self.errno == errno.EFBIG:
            return (f"File too large: {path} {space}, over this process's file size limit (ulimit -f); "
                    f"raise the limit or write less")
        free = free_space(path)
        free = f", {_size(free)} free" if free is not None else ""
        return f"No space left on device: {path} {space}{free}; free some space or choose another folder"


def disk_error(error):
    """The errno (ENOSPC, EDQUOT or EFBIG) when ``error`` or an exception it was raised from is a full disk,
    else None. h5py reports HDF5's errno in its message (``errno = 28``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return error.errno
        code = getattr(error, "errno", None) if isinstance(error, OSError) else None
        if code in NO_ROOM:
            return code
        if isinstance(error, (OSError, RuntimeError)):
            for match in _ERRNO_IN_TEXT.finditer(str(error)):
                if int(match.group(1)) in NO_ROOM:
                    return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def as_disk_full(error, path, needed=None, written=0):
    """``error`` as :class:`DiskFull` naming ``path`` when it is a full disk, else None."""
    if isinstance(error, DiskFull):
        return error
    code = disk_error(error)
    return None if code is None else DiskFull(path, code, needed=needed, written=written)


class GuardedStream:
    """A binary file for writers that hide the OSError of a failed write (torch.save, h5py's file-object
    driver): the first error is kept in :attr:`error` (and raised, unless ``raise_errors`` is False: h5py
    prints errors raised inside its callbacks; its caller checks :meth:`check` between writes instead); that
    write and later ones are kept in memory instead
    (reads see them), so that closing the writer after the failure (HDF5 flushes and re-reads its metadata
    at close) succeeds instead of failing again or crashing at exit. The file is removed afterwards."""

    def __init__(self, path, raise_errors=True):
        self.path, self.raise_errors = path, raise_errors
        self.raw = open(path, "w+b", buffering=0)
        self.error = None
        self._kept = []  # (offset, bytes) written after the failure, in order

    def write(self, data):
        data = bytes(memoryview(data).cast("B"))
        position = self.raw.tell()
        if self.error is None:
            done = 0
            try:
                while done < len(data):
                    done += self.raw.write(data[done:])
                return len(data)
            except OSError as error:
                self.error = error
                self._keep(position, data)
                if self.raise_errors:
                    raise
                return len(data)
        self._keep(position, data)
        return len(data)

    def _keep(self, position, data):
        self._kept.append((position, data))
        self.raw.seek(position + len(data))

    def read(self, size=-1):
        position = self.raw.tell()
        data = self.raw.read(size)
        if not self._kept:
            return data
        end = max([position + len(data)] + [offset + len(kept) for offset, kept in self._kept])
        if size is not None and size >= 0:
            end = position + size
        buffer = bytearray(data.ljust(end - position, b"\0"))
        for offset, kept in self._kept:
            low, high = max(offset, position), min(offset + len(kept), end)
            if low < high:
                buffer[low - position:high - position] = kept[low - offset:high - offset]
        self.raw.seek(end)
        return bytes(buffer)

    def readinto(self, buffer):
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def seek(self, offset, whence=os.SEEK_SET):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def truncate(self, size=None):
        if self.error is not None:
            return self.raw.tell() if size is None else size
        return self.raw.truncate(size)

    def flush(self):
        if self.error is None:
            self.raw.flush()

    def seekable(self):
        return True

    def readable(self):
        return True

    def writable(self):
        return True

    @property
    def closed(self):
        return self.raw.closed

    def close(self):
        self._kept = []
        self.raw.close()

    def check(self):
        """Raise the kept error, if a write failed."""
        if self.error is not None:
            raise self.error


def _close_hdf5_files_on(path):
    """Close HDF5 handles still open on ``path`` (h5py leaves a file open when its close failed; HDF5 would
    flush it again at exit and may crash). The file's blocks are freed first so that the flush fits."""
    h5py = sys.modules.get("h5py")
    if h5py is None:
        return
    try:
        os.truncate(path, 0)
    except OSError:
        pass
    try:
        files = [fid for fid in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)
                 if os.path.abspath(os.fsdecode(fid.name)) == os.path.abspath(path)]
    except Exception:  # noqa: BLE001 (best effort: h5py's internals)
        return
    for fid in files:
        for types in (~h5py.h5f.OBJ_FILE, h5py.h5f.OBJ_FILE):
            try:
                ids = h5py.h5f.get_obj_ids(fid, types)
            except Exception:  # noqa: BLE001
                continue
            for object_id in ids:
                for _ in range(16):
                    try:
                        if not object_id.valid:
                            break
                        h5py.h5i.dec_ref(object_id)
                    except Exception:  # noqa: BLE001
                        continue


def remove_quietly(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def lock_folder(folder):
    """An exclusive ``flock`` on ``folder`` (created if needed): its descriptor, or None when another process
    holds it. The lock lasts until the descriptor is closed or the process ends (a kill frees it)."""
    os.makedirs(folder, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        return None
    return descriptor


def remove_stale_temporaries(folder, pattern=r"\..+\.tmp-[^/]+"):
    """Remove the hidden temporaries (``.NAME.tmp-XXXX``) of killed runs in ``folder``. Only a run that holds
    the folder's lock (:func:`lock_folder`) may call this: no other run can be writing them then."""
    regex = re.compile(pattern)
    for name in os.listdir(folder):
        if regex.fullmatch(name):
            remove_quietly(os.path.join(folder, name))


def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def temporary_path(path):
    """A new, empty hidden file beside ``path`` (``.NAME.tmp-XXXX``, unique to this call)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    os.close(handle)
    return temp_path


def publish(temp_path, path):
    """fsync ``temp_path``, give it the usual permissions and rename it to ``path``."""
    _fsync(temp_path)
    os.chmod(temp_path, 0o666 & ~_current_umask())
    os.replace(temp_path, path)


def discard(temp_path):
    """Remove a failed write's temporary (closing HDF5 handles h5py left open on it first)."""
    if os.path.exists(temp_path):
        _close_hdf5_files_on(temp_path)
        remove_quietly(temp_path)


def _written(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@contextlib.contextmanager
def atomic_output(path, needed=None):
    """Yield a temporary path beside ``path``; when the block succeeds it becomes ``path``, else it is removed.
    A full disk is raised as :class:`DiskFull` naming ``path`` (``needed``: the bytes it needs, if known)."""
    temp_path = temporary_path(path)
    try:
        yield temp_path
        publish(temp_path, path)
    except BaseException as error:
        written = _written(temp_path)
        discard(temp_path)
        full = as_disk_full(error, path, needed=needed, written=written) if isinstance(error, Exception) else None
        if full is not None:
            raise full from None
        raise
    _fsync(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


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
