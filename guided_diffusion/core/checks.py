"""Typed checks of settings, shared by the command-line tools and the Python API.

The CLIs parse flags into the settings dataclasses (training config, sampler settings, sampling request)
and the API fills them from keyword arguments; the library checks every field here before it runs, so both
paths give the same one-line :class:`SettingError` naming the field (the CLI words it as the flag). A
string is never taken as a number or a boolean, nor a boolean as a number.
"""
import math
import numbers
import os

from guided_diffusion.core.errors import SettingError, literal

INTEGER = "an integer"
POSITIVE = "a positive integer"
NON_NEGATIVE = "zero or a positive integer"


def _shown(value):
    return literal(repr(value) if isinstance(value, str) else value)


def _refuse(name, requirement, value):
    raise SettingError(f"{{{name}}} must be {requirement}, got {_shown(value)}", name)


def is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(value, name, low=None, high=None, optional=False, requirement=None):
    """An integer (not a bool, not a string) in [low, high]; None only when ``optional``."""
    if value is None and optional:
        return
    if requirement is None:
        requirement = {None: INTEGER, 1: POSITIVE, 0: NON_NEGATIVE}.get(low, f"an integer >= {low}")
        if high is not None:
            requirement = f"an integer in [{low}, {high}]"
    if not is_integer(value) or (low is not None and value < low) or (high is not None and value > high):
        _refuse(name, requirement, value)


def check_float(value, name, low=None, high=None, low_open=False, high_open=False, optional=False,
                requirement=None):
    """A finite real number (not a bool, not a string) within the bounds; None only when ``optional``."""
    if value is None and optional:
        return
    if requirement is None:
        if low is None and high is None:
            requirement = "a finite number"
        elif high is None:
            requirement = "a positive number" if (low == 0 and low_open) else f"a finite number >= {low:g}"
        else:
            requirement = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    ok = is_number(value) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        _refuse(name, requirement, value)


def check_real(value, name, requirement="a number", optional=False):
    """A real number (not a bool, not a string), its range left to the caller's checks."""
    if value is None and optional:
        return
    if not is_number(value):
        _refuse(name, requirement, value)


def check_bool(value, name, optional=False):
    """True or False (numpy bools too), not the strings "True"/"False"."""
    if value is None and optional:
        return
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        _refuse(name, "True or False", value)


def check_str(value, name, choices=None, optional=False):
    """A string, one of ``choices`` if given."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        _refuse(name, "a string" if choices is None else f"one of {', '.join(map(repr, choices))}", value)
    if choices is not None and value not in choices:
        _refuse(name, f"one of {', '.join(map(repr, choices))}", value)


def check_path(value, name, optional=False):
    """A path (string or os.PathLike); empty allowed."""
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)):
        _refuse(name, "a path", value)


def check_int_list(value, name, low=1, optional=False):
    """A non-empty list (or tuple) of integers >= ``low``."""
    if value is None and optional:
        return
    if not isinstance(value, (list, tuple)) or not value or not all(is_integer(item) and item >= low
                                                                    for item in value):
        _refuse(name, f"a non-empty list of {'positive integers' if low == 1 else f'integers >= {low}'}", value)


def check_str_list(value, name, optional=False):
    """A list (or tuple) of strings."""
    if value is None and optional:
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        _refuse(name, "a list of strings", value)
