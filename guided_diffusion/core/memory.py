"""The process's allocator policy (glibc malloc), in one place: two modes and the rule for which wins.

* ``REUSE_FREED`` (:func:`reuse_freed_memory`; the autoencoder's and the diffusion model's training steps and
  the sampler): freed memory stays in the process heap for reuse. A training step allocates and frees the
  same large buffers every step (the 20,125 x 1024 weight gradients, bf16 copies of weights, 128 x 20,125
  activations). glibc serves blocks above its mmap threshold (at most 32 MB) with fresh ``mmap`` pages and
  unmaps them on free, so every step pays the kernel's page faults again (measured: a fresh 80 MB float32
  matmul output costs 66 ms where writing into a reused one costs 35 ms). With ``mmap`` disabled for
  ``malloc`` and the heap never trimmed, the freed blocks are reused by the next step: the resident memory
  stays at the step's high-water mark, which it reaches every step anyway.
* ``BOUNDED`` (:func:`hold_memory_bound`; the streaming loader, while a streamed file is open): glibc's mmap
  threshold pinned at ``MMAP_THRESHOLD_BYTES``. glibc otherwise raises the threshold to the size of the
  largest freed buffer, after which the ~10 MB batch and block buffers come from the heap and fragment it:
  resident memory then creeps up with the number of batches read. Above the fixed threshold buffers are
  mmapped and returned to the OS when freed, so memory stays bounded however many cells are streamed.

Which wins (:func:`decide`): the streaming loader's bound. While any holder holds it (a streamed source,
from opening its file until closing it), the process runs ``BOUNDED`` whatever was requested; a request for
heap reuse made meanwhile is recorded and takes effect when the last holder releases the bound. Without
either, glibc's defaults apply (once pinned, the mmap threshold stays at ``MMAP_THRESHOLD_BYTES``: glibc
cannot return to its moving threshold). The decision depends only on these two inputs, never on the order
of the calls. No effect without glibc.
"""
import ctypes
import ctypes.util
import weakref

REUSE_FREED = "reuse freed memory"
BOUNDED = "bounded (streaming)"
GLIBC_DEFAULTS = "glibc defaults"

GLIBC_M_TRIM_THRESHOLD = -1
GLIBC_M_MMAP_THRESHOLD = -3
GLIBC_M_MMAP_MAX = -4
GLIBC_DEFAULT_MMAP_MAX = 65536
GLIBC_DEFAULT_TRIM_THRESHOLD = 128 * 1024
NEVER_TRIM = 2 ** 31 - 1  # mallopt takes an int: 2 GB of free heap top before trimming
MMAP_THRESHOLD_BYTES = 1 << 20

_reuse_requested = False
_bound_holders = weakref.WeakSet()  # a holder garbage-collected without releasing no longer holds the bound


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def decide(reuse_requested, bound_held):
    """The mode the process runs: ``BOUNDED`` while the streaming loader's bound is held, else
    ``REUSE_FREED`` when heap reuse is requested, else ``GLIBC_DEFAULTS``."""
    if bound_held:
        return BOUNDED
    return REUSE_FREED if reuse_requested else GLIBC_DEFAULTS


def current_mode():
    """The mode :func:`decide` gives for the requests and holders now."""
    return decide(_reuse_requested, len(_bound_holders) > 0)


def _apply():
    """Set glibc's parameters for :func:`current_mode`; True when they took effect (glibc present)."""
    libc = _libc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mode = current_mode()
    if mode == REUSE_FREED:
        return bool(libc.mallopt(GLIBC_M_MMAP_MAX, 0)) and bool(libc.mallopt(GLIBC_M_TRIM_THRESHOLD, NEVER_TRIM))
    applied = (bool(libc.mallopt(GLIBC_M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX))
               and bool(libc.mallopt(GLIBC_M_TRIM_THRESHOLD, GLIBC_DEFAULT_TRIM_THRESHOLD)))
    if mode == BOUNDED:
        applied = bool(libc.mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and applied
    return applied


def reuse_freed_memory(enabled=True):
    """Request heap reuse (``enabled``: serve every allocation from the heap and never trim it) or withdraw the
    request (glibc's defaults); it takes effect unless the streaming loader's bound is held (:func:`decide`).
    Returns True when the policy was applied (glibc present)."""
    global _reuse_requested
    _reuse_requested = bool(enabled)
    return _apply()


def hold_memory_bound(holder):
    """The streaming loader's bound, held by ``holder`` (e.g. an open streamed file) until
    :func:`release_memory_bound`; it takes precedence over heap reuse. Returns True when applied."""
    _bound_holders.add(holder)
    return _apply()


def release_memory_bound(holder):
    """Release ``holder``'s bound; the last release lets a recorded heap-reuse request take effect."""
    _bound_holders.discard(holder)
    return _apply()
