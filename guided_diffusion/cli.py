"""Shared command-line plumbing: boolean flags, devices, and one-line errors.

Every script's ``main(argv)`` is wrapped by :func:`command`, so a :class:`UsageError` raised
anywhere below it reaches the user as one line on stderr and exit code 2, never a traceback
(``--debug`` shows the traceback instead).
"""
import argparse
import functools
import sys

import torch


class UsageError(Exception):
    """A problem with the user's input or files, reported as one line (what is wrong, what to do)."""


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


def positive_int(value):
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value):
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value}")
    return number


def fraction(value):
    number = float(value)
    if not 0.0 <= number < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return number


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


def command(main):
    """Wrap ``main(argv)`` so that UsageError (and a few I/O errors) become one line and exit 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        debug = "--debug" in (sys.argv[1:] if argv is None else argv)
        try:
            return main(argv)
        except UsageError as error:
            if debug:
                raise
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except (OSError, MemoryError) as error:
            if debug:
                raise
            print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
