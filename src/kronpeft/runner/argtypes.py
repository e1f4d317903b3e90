"""Types and help formatting of the `kronpeft` command line's flags (argparse): each type turns the text of a
flag into its value or refuses it with an `argparse.ArgumentTypeError` naming what it expected; `Parser` turns
argparse's own errors into the CLI's one-line `UsageError`."""
from __future__ import annotations

import argparse
import math

from .errors import UsageError


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help only when the help does not state its default already and X
    means something (not None or an unset switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def a_shape(text: str) -> tuple[int, int]:
    """`32,32` or `32x32` -> (32, 32): the shape of KronA's factor A."""
    try:
        a1, a2 = (int(v) for v in text.replace("x", ",").split(","))
        if a1 <= 0 or a2 <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two positive ints like 32,32, got {text!r}") from None
    return a1, a2


def targets(text: str) -> list[str] | str:
    """`query,value` -> ["query", "value"]; `all-linear` stays the string."""
    from ..injection import ALL_LINEAR  # here: torch only once a command runs, not for --help

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected module names like query,value, or all-linear")
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def name_list(text: str) -> list[str]:
    """`tensorboard,wandb` -> ["tensorboard", "wandb"]."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names like tensorboard,wandb")
    return names


MAX_INT = 2**31 - 1


def nonempty_path(text: str) -> str:
    """argparse type of a path kronpeft writes or reads: an empty one (an unset shell variable) is refused,
    never read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string (an unset variable?); "
                                         "use '.' for the current folder")
    return text


def number(kind, low, high, low_open=False):
    """argparse type: a finite `kind` (int or float) in `[low, high]` (`(low, high]` with `low_open`)."""
    what = f"{'a whole number' if kind is int else 'a finite number'} in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


seed = number(int, 0, 2**32 - 1)  # argparse type of a seed: numpy's and torch's range


def positive(kind):
    """argparse type: a count in [1, MAX_INT] (`int`) or a finite float in (0, 1e6]."""
    return number(int, 1, MAX_INT) if kind is int else number(float, 0, 1e6, low_open=True)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s: main prints them as one line and exits 2."""

    def error(self, message):  # argparse's own errors: same one-line form, same status, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")
