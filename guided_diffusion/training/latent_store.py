"""The encoded latents of a run kept on disk, read a batch at a time, so memory does not grow with the cells.

``latents.npy`` (float32, N x latent_dim, as the autoencoder encodes them: unscaled) and its sidecar
``latents.json`` live in the run folder (``save_dir/model_name``). The sidecar ties the file to the data
(its fingerprint), the autoencoder (its SHA-256) and the normalization; a later run in that folder (a
resumed one) reuses the file when all three match and encodes again when one does not.

Writing (:func:`encode_to_store`): the main process creates a temporary file of the full size; every
process encodes its own contiguous share of the cells in chunks and writes each chunk at its offset;
the main process then renames the file into place and writes the sidecar last (its presence marks a
complete file). Nothing is gathered across processes.

Reading (:class:`LatentStore`): one file descriptor and positional reads (``os.pread``) of the rows asked
for; no mapping of the file, so the process's resident memory holds only the rows of the current read.
"""
import json
import os

import numpy as np
from tqdm.auto import tqdm

from guided_diffusion.core.atomic import atomic_output

LATENTS_FILE = "latents.npy"
SIDECAR_FILE = "latents.json"
ENCODE_CHUNK_ROWS = 16384  # a multiple of the encoder's batch: the batches are those of an in-memory encoding
ENCODE_BATCH_ROWS = 1024
RANGE_SAMPLE_ROWS = 20000  # rows (a strided subset) the latent range's quantiles are computed from


def store_key(fingerprint, vae_sha256, normalization):
    """What the latents depend on: the data, the autoencoder and the normalization (a JSON-able dict)."""
    return {"data_fingerprint": fingerprint, "vae_sha256": vae_sha256, "normalization": dict(normalization)}


def _plain(value):
    return json.loads(json.dumps(value))


def key_differences(recorded, key):
    """Names of the entries of ``key`` that ``recorded`` (a sidecar's) lacks or holds with another value."""
    recorded = recorded or {}
    return [name for name in key if _plain(recorded.get(name)) != _plain(key[name])]


def read_sidecar(folder):
    try:
        with open(os.path.join(folder, SIDECAR_FILE)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _header(path):
    """(data offset, shape) of an .npy file of float32 rows."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(file)
        offset = file.tell()
    if fortran_order or np.dtype(dtype) != np.float32 or len(shape) != 2:
        raise ValueError(f"{path} is not a C-ordered float32 matrix")
    return offset, shape


class LatentStore:
    """N x dim float32 latents in an .npy file, read by positional reads and multiplied by ``scale``.

    ``len(store)``, ``store.shape``, ``store.size`` and ``store[a:b]`` (contiguous rows) make it usable
    where an array of the latents is read in row chunks (e.g. ``latent_std``); :meth:`rows` reads any rows.
    """

    def __init__(self, path, scale=1.0):
        self.path = path
        self.offset, self.shape = _header(path)
        self.row_bytes = self.shape[1] * 4
        self.scale = scale
        self._fd = os.open(path, os.O_RDONLY)

    def __len__(self):
        return self.shape[0]

    @property
    def size(self):
        return self.shape[0] * self.shape[1]

    def _scaled(self, rows):
        if self.scale != 1.0:
            np.multiply(rows, self.scale, out=rows)
        return rows

    def _read(self, start, stop):
        length = (stop - start) * self.row_bytes
        data = os.pread(self._fd, length, self.offset + start * self.row_bytes)
        if len(data) != length:
            raise OSError(f"{self.path} is shorter than its header says")
        return np.frombuffer(bytearray(data), dtype=np.float32).reshape(stop - start, self.shape[1])

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("LatentStore[...] takes a contiguous slice; use rows() for other rows")
        start, stop, _ = key.indices(len(self))
        return self._scaled(self._read(start, max(start, stop)))

    def rows(self, index):
        """The rows ``index`` (any order, repeats allowed) as a float32 array, multiplied by ``scale``."""
        index = np.asarray(index, dtype=np.int64).ravel()
        out = np.empty((len(index), self.shape[1]), dtype=np.float32)
        for position, row in enumerate(index):
            out[position] = self._read(int(row), int(row) + 1)[0]
        return self._scaled(out)

    def subsample(self, max_rows=RANGE_SAMPLE_ROWS):
        """At most ``max_rows`` rows, every ``ceil(N / max_rows)``-th (all of them for small stores)."""
        return self.rows(np.arange(0, len(self), max(1, -(-len(self) // max_rows))))

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _write_header(path, shape):
    """A float32 .npy of ``shape`` with zeroed rows (a sparse file where the filesystem allows)."""
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "<f4", "fortran_order": False, "shape": tuple(shape)})
        offset = file.tell()
        file.truncate(offset + shape[0] * shape[1] * 4)
    return offset


def encode_to_store(folder, dataset, autoencoder, key, context, cell_range, progress=True):
    """The latents of every cell of ``dataset`` in ``folder/latents.npy``: reused when its sidecar records
    ``key``, else encoded (each process its share, ``context.shard``, in chunks written at their offsets).
    ``cell_range(dataset, start, stop)`` views cells ``[start, stop)`` as a dataset. Returns the path."""
    path, sidecar = os.path.join(folder, LATENTS_FILE), os.path.join(folder, SIDECAR_FILE)
    shape = (dataset.n_cells, autoencoder.model.latent_dim)
    recorded = read_sidecar(folder) if context.is_main else None
    reuse = False
    if context.is_main and recorded is not None and os.path.exists(path):
        differences = key_differences(recorded, key)
        if not differences and list(recorded.get("shape", [])) == list(shape):
            reuse = True
            print(f"reusing the latents in {path} (same data, autoencoder and normalization)", flush=True)
        else:
            what = ", ".join(name.replace("_", " ") for name in differences) or "shape"
            print(f"encoding the latents again: {path} was encoded with another {what}", flush=True)
    if context.any(reuse):
        return path
    # the main process names the temporary (its process id, the same on every rank) and creates it
    token = int(context.sum([os.getpid() if context.is_main else 0])[0])
    temp_path = os.path.join(folder, f".{LATENTS_FILE}.tmp-{token}")
    if context.is_main:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(sidecar):
            os.remove(sidecar)  # the old file is no longer this run's
        _write_header(temp_path, shape)
    context.barrier()
    share = context.shard(dataset.n_cells)
    offset, _ = _header(temp_path)
    descriptor = os.open(temp_path, os.O_WRONLY)
    try:
        starts = range(share.start, share.stop, ENCODE_CHUNK_ROWS)
        for start in tqdm(starts, desc="encode", disable=not (progress and context.is_main), unit="chunk"):
            stop = min(start + ENCODE_CHUNK_ROWS, share.stop)
            chunk = autoencoder.encode_dataset(cell_range(dataset, start, stop), batch_size=ENCODE_BATCH_ROWS,
                                               progress=False)
            data = np.ascontiguousarray(chunk, dtype=np.float32).tobytes()
            written = 0
            while written < len(data):
                written += os.pwrite(descriptor, data[written:], offset + start * shape[1] * 4 + written)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    context.barrier()
    if context.is_main:
        os.replace(temp_path, path)
        with atomic_output(sidecar) as temp_sidecar:
            with open(temp_sidecar, "w") as file:
                json.dump({"shape": list(shape), "dtype": "float32", **_plain(key)}, file)
    context.barrier()
    return path
