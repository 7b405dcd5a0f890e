"""CPU threads: a ``--threads`` flag whose default is the cores this process may actually use.

``os.cpu_count()`` counts the machine's cores, not the ones a process may run on: a CPU affinity mask
(taskset, Slurm, ``docker --cpuset-cpus``) or a cgroup v2 CPU quota (``cpu.max``; ``docker --cpus``,
Kubernetes limits) can allow far fewer. PyTorch's default of one thread per machine core then
oversubscribes, and OpenMP threads that spin-wait for each other on a busy machine make every step many
times slower. :func:`available_cores` honours both limits; :func:`apply_threads` sets torch's pool and the
native pools numpy, scipy and scikit-learn compute in (BLAS, OpenMP: :func:`limit_native_threads`, so that the
evaluation's PCA and classifiers follow ``--threads`` too and score the same whatever the environment), and
:func:`prefer_passive_waiting` (called when the ``guided_diffusion`` package is imported, before torch
loads its OpenMP runtime, which reads the variable once) makes idle OpenMP threads sleep instead of spinning, unless the user set ``OMP_WAIT_POLICY``.
"""
import math
import os

CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def prefer_passive_waiting():
    """Idle OpenMP threads sleep rather than spin (only read when the OpenMP pool starts)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cgroup_cpu_limit(path=CGROUP_CPU_MAX):
    """Cores allowed by the cgroup v2 quota (``"QUOTA PERIOD"``, rounded up), or None without a quota."""
    try:
        with open(path) as stream:
            quota, period = stream.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores(cpu_max_path=CGROUP_CPU_MAX):
    """The cores this process may use: its affinity mask, capped by the cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cpu_max_path)
    return max(1, min(cores, limit) if limit else cores)


def default_threads(processes_per_node=1):
    """Threads per process: ``OMP_NUM_THREADS`` when the user set it, else the available cores shared by
    the processes on this node (at least 1)."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, available_cores() // max(1, processes_per_node))


_explicit = {"threads": None}


def apply_threads(threads=None, processes_per_node=None):
    """Set torch's intra-op threads to ``threads`` (None: :func:`default_threads` for the processes on this
    node, from ``LOCAL_WORLD_SIZE`` unless given); returns the count. An explicit count is remembered and
    kept by :func:`apply_default_threads`."""
    import torch

    if threads:
        _explicit["threads"] = threads
    if processes_per_node is None:
        processes_per_node = _env_int("LOCAL_WORLD_SIZE", 1)
    count = threads or _explicit["threads"] or default_threads(processes_per_node)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    limit_native_threads(count)
    return count


def limit_native_threads(count):
    """Hold the BLAS and OpenMP pools of numpy, scipy and scikit-learn to ``count`` threads (threadpoolctl, a
    scikit-learn dependency). scipy's BLAS is loaded first so that the limit reaches it; a BLAS thread count other
    than the one asked for changes the evaluation's PCA in the last bits and, through it, its AUCs."""
    import scipy.linalg  # noqa: F401  (loads scipy's own BLAS)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=count)


def apply_default_threads(processes_per_node):
    """The default for ``processes_per_node`` processes, unless the user asked for a count."""
    return apply_threads(None, processes_per_node)


def _env_int(name, default):
    try:
        return max(1, int(os.environ[name]))
    except (KeyError, ValueError):
        return default
