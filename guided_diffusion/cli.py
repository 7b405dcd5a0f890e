"""Shared command-line plumbing: argument types, devices, one-line errors and graceful interrupts.

Every script's ``main(argv)`` is wrapped by :func:`command`, so a :class:`UsageError` raised
anywhere below it reaches the user as one line on stderr and exit code 2, never a traceback
(``--debug`` shows the traceback instead). Parsers are built with :class:`ArgumentParser`, whose
errors (a junk boolean, an integer that must be positive, a missing flag) are one line as well.
The catalogue of messages is docs/errors.md.
"""
import argparse
import contextlib
import functools
import os
import re
import signal
import sys
import tempfile
import threading

import torch


OUT_OF_MEMORY_ERRORS = (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))


class UsageError(Exception):
    """A problem with the user's input or files, reported as one line (what is wrong, what to do)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: …; see SCRIPT --help``) instead of usage + error; exit 2."""

    def error(self, message):
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's layout and shows every flag's default."""


def one_line(text):
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# ---- argument types ------------------------------------------------------------------------------
def str2bool(value):
    """Parse the ``True``/``False`` strings the original scripts take (also yes/no, 1/0)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1"):
        return True
    if text in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _number(value, kind):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {value!r}") from None


def positive_int(value):
    number = _number(value, int)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value):
    number = _number(value, int)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return number


def positive_float(value):
    number = _number(value, float)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def non_negative_float(value):
    number = _number(value, float)
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return number


def fraction(value):
    number = _number(value, float)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


def probability(value):
    number = _number(value, float)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


# ---- devices and folders -------------------------------------------------------------------------
def add_device_arg(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto picks CUDA when available, else CPU")


def add_debug_arg(parser):
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def resolve_device(name):
    """Turn ``auto|cpu|cuda`` (or ``cuda:N``) into a torch.device, refusing CUDA where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was requested but no CUDA device is available; use --device cpu")
    return torch.device(name)


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


# ---- interrupts ----------------------------------------------------------------------------------
class StopAtStepBoundary:
    """While active, Ctrl-C (SIGINT) or SIGTERM only sets :attr:`requested`; the training loop checks it
    between steps, saves a consistent checkpoint and exits with :attr:`exit_code` (130 or 143).

    A KeyboardInterrupt in the middle of a step would save weights of step N+1 with the counters of
    step N, so the resumed run would differ. A second signal stops at once (nothing more is saved;
    the last periodic checkpoint stays valid). Outside the main thread this is a no-op.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name} received: saving a checkpoint after the current step "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None

    @property
    def exit_code(self):
        return 128 + int(self.signum)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by :func:`terminate_as_exception` so that cleanups run (a script
    exits with 143, as the default action would)."""

    exit_code = 128 + int(signal.SIGTERM)


@contextlib.contextmanager
def terminate_as_exception():
    """While active (main thread only), SIGTERM raises :class:`Terminated` where the program is, so that
    ``finally`` blocks and context managers remove temporaries as they do for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- the wrapper of every script's main ------------------------------------------------------------
_FILENAME_IN_TEXT = re.compile(r"filename = '([^']+)'")
_TEMPORARY_NAME = re.compile(r"\.(.+)\.tmp-[^/]+")


def _path_in(error):
    """The file an OSError (or h5py's message, ``filename = '…'``) names, a temporary as its final name."""
    path = getattr(error, "filename", None)
    if path is None:
        match = _FILENAME_IN_TEXT.search(str(error))
        path = match.group(1) if match else None
    if path is None:
        return None
    folder, name = os.path.split(os.fsdecode(path))
    match = _TEMPORARY_NAME.fullmatch(name)
    return os.path.join(folder, match.group(1)) if match else os.fsdecode(path)


def _disk_full(error):
    """``error`` as one :class:`~guided_diffusion.atomic.DiskFull` line when it is a full disk, else None."""
    from .atomic import DiskFull, as_disk_full

    if isinstance(error, DiskFull):
        return str(error)
    full = as_disk_full(error, _path_in(error))
    if full is None:
        return None
    return str(full) if full.filename else f"{full.strerror} (free some space or choose another folder)"


def _describe_os_error(error):
    full = _disk_full(error)
    if full is not None:
        return full
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None:
        return f"{reason}: {error.filename} (check the path, its permissions and free disk space)"
    return f"{reason} (check the paths, their permissions and free disk space)"


def command(main):
    """Wrap ``main(argv)``: every error becomes one line on stderr and a non-zero exit, no traceback.

    UsageError -> exit 2; OSError (disk full, I/O error) and out-of-memory -> exit 1; anything
    unexpected -> exit 1 with a hint to rerun with ``--debug``, which re-raises so the traceback is shown.
    Ctrl-C outside a training loop -> exit 130 when run as a script (``argv`` None); a Python caller
    (a notebook, a test) gets the KeyboardInterrupt itself. A script run that created a process group
    (torchrun, mpiexec) ends in :func:`guided_diffusion.dist_util.end_process`, with the same exit status.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        if argv is not None:
            return guarded(argv)
        from . import dist_util  # (it imports this module)

        try:  # a script run: a process that joined a process group ends here (dist_util.end_process)
            result = guarded(None)
        except SystemExit as stop:
            if dist_util.in_process_group():
                dist_util.end_process(_exit_status(stop.code))
            raise
        except BaseException:  # --debug re-raises: the traceback as Python prints it, then the same ending
            if dist_util.in_process_group():
                sys.excepthook(*sys.exc_info())
                dist_util.end_process(1)
            raise
        dist_util.end_process(0)
        return result

    def guarded(argv):
        debug = "--debug" in (sys.argv[1:] if argv is None else argv)
        try:
            return main(argv)
        except UsageError as error:
            if debug:
                raise
            _fail(one_line(error), 2)
        except KeyboardInterrupt:
            if debug or argv is not None:
                raise
            _fail("interrupted", 130)
        except OUT_OF_MEMORY_ERRORS:
            if debug:
                raise
            _fail("out of memory; lower --batch_size or use a machine (or device) with more memory", 1)
        except OSError as error:
            if debug:
                raise
            _fail(one_line(_describe_os_error(error)), 1)
        except Terminated as stop:
            if debug or argv is not None:
                raise
            _fail("terminated (SIGTERM)", stop.exit_code)
        except Exception as error:  # a bug or an input nobody foresaw: still one line, traceback on --debug
            if debug:
                raise
            full = _disk_full(error)  # torch.save's and h5py's RuntimeErrors of a full disk
            if full is not None:
                _fail(one_line(full), 1)
            _fail(one_line(f"unexpected {type(error).__name__}: {error}; rerun with --debug for the traceback "
                           f"and please report it"), 1)

    return wrapper


def _exit_status(code):
    """The process exit status Python gives ``SystemExit(code)`` (a message is printed and gives 1)."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr, flush=True)
    return 1


def _fail(message, code):
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)
