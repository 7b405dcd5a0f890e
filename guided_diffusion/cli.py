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
import threading

import torch

from guided_diffusion.core import distributed
from guided_diffusion.core.device import OUT_OF_MEMORY_ERRORS
from guided_diffusion.core.errors import UsageError, one_line
from guided_diffusion.core.threads import apply_threads


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``error: …; see SCRIPT --help``) instead of usage + error; exit 2."""

    def error(self, message):
        self.exit(2, f"error: {one_line(message)}; see {self.prog} --help\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the description's layout and shows every flag's default."""


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


# ---- threads ---------------------------------------------------------------------------------------
def apply_thread_flags(args):
    """``--threads`` (and ``--deterministic`` where the parser has it); returns the thread count."""
    if getattr(args, "deterministic", False):
        if args.threads not in (None, 1):
            raise UsageError(f"--deterministic True runs on one thread; drop --threads {args.threads} or set it to 1")
        torch.use_deterministic_algorithms(True)
        return apply_threads(1)
    return apply_threads(args.threads)


def add_threads_arg(parser, deterministic=False):
    if deterministic:
        parser.add_argument("--deterministic", type=str2bool, default=False,
                            help="bit-identical results, also after an interrupted run is resumed: one CPU thread "
                                 "and torch.use_deterministic_algorithms (two threads can differ in the last bit)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch (default: OMP_NUM_THREADS if set, else the cores this "
                             "process may use, from its affinity mask and cgroup quota; on a shared machine give fewer, e.g. 1)")


# ---- devices and folders -------------------------------------------------------------------------
def add_device_arg(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto picks CUDA when available, else CPU")


def add_debug_arg(parser):
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


# ---- interrupts ----------------------------------------------------------------------------------


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
    """``error`` as one :class:`~guided_diffusion.core.atomic.DiskFull` line when it is a full disk, else None."""
    from guided_diffusion.core.atomic import DiskFull, as_disk_full

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
    (torchrun, mpiexec) ends in :func:`guided_diffusion.core.distributed.end_process`, with the same exit status.
    """

    @functools.wraps(main)
    def wrapper(argv=None):
        if argv is not None:
            return guarded(argv)
        try:  # a script run: a process that joined a process group ends here (distributed.end_process)
            result = guarded(None)
        except SystemExit as stop:
            if distributed.in_process_group():
                distributed.end_process(_exit_status(stop.code))
            raise
        except BaseException:  # --debug re-raises: the traceback as Python prints it, then the same ending
            if distributed.in_process_group():
                sys.excepthook(*sys.exc_info())
                distributed.end_process(1)
            raise
        distributed.end_process(0)
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
