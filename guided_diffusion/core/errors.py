"""The project's errors: a :class:`UsageError` is a problem with the user's input or files, reported as
one line. The library raises them naming its parameters (:class:`SettingError` carries the setting's
name); the command-line layer (guided_diffusion/cli.py) words the same message as flags.

No argparse and no torch here: every layer may import this module.
"""
import contextlib


class UsageError(Exception):
    """A problem with the user's input or files, reported as one line (what is wrong, what to do)."""


def one_line(text):
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


class SettingError(UsageError):
    """A bad setting. ``template`` names settings as ``{name}`` placeholders: a library caller reads the
    field names, :meth:`as_flag` (the CLI) the flags that set them."""

    def __init__(self, template, *settings):
        self.template, self.settings = template, settings
        super().__init__(template.format(**{name: name for name in settings}))

    def as_flag(self, flags=None):
        return UsageError(self.template.format(**{name: flag_of(name, flags) for name in self.settings}))


def literal(value):
    """``value`` as text to put into a :class:`SettingError` template verbatim (braces escaped)."""
    return str(value).replace("{", "{{").replace("}", "}}")


def flag_of(setting, flags=None):
    """The command-line flag of a setting: ``--name`` unless ``flags`` maps it to another."""
    return (flags or {}).get(setting, f"--{setting}")


@contextlib.contextmanager
def settings_worded_as_flags(flags=None):
    """Re-raise a :class:`SettingError` from the library with the settings worded as flags (CLI layer)."""
    try:
        yield
    except SettingError as error:
        raise error.as_flag(flags) from None


