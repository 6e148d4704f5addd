"""argparse `type=` validators: a bad value ends the command with one sentence and exit status 2.

The messages say only what is wrong with the value; the parser (`cli_parser`) prefixes the flag:
`hilomoe: error: --workers: must be a positive integer, got 0`.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from hilomoe.errors import HilomoeError


def _int_at_least(low: int, rule: str, name: str) -> Callable[[str], int]:
    """A validator of integers >= `low`; `rule` says so in the refusal."""
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{rule}, got {value}")
        return value

    convert.__name__ = name  # argparse's fallback message names the type
    return convert


positive_int = _int_at_least(1, "must be a positive integer", "positive_int")
"""An integer of at least 1 (rows, batch sizes, workers, trials, ...)."""
non_negative_int = _int_at_least(0, "must be zero or more", "non_negative_int")
"""An integer of at least 0 (restarts allowed)."""


def positive_float(text: str) -> float:
    """A finite number above 0 (a FLOPs budget)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


def _from_parser(parse: Callable[[str], float], name: str) -> Callable[[str], float]:
    """A validator from a parser that raises HilomoeError('--flag: sentence')."""
    def convert(text: str) -> float:
        try:
            return parse(text)
        except HilomoeError as err:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(err).partition(": ")[2]) from None

    convert.__name__ = name  # argparse's fallback message names the type
    return convert


def _duration(text: str) -> float:
    from hilomoe.study.cache import parse_duration

    return parse_duration(text)


def _size(text: str) -> float:
    from hilomoe.study.cache import parse_size

    return parse_size(text)


duration = _from_parser(_duration, "duration")
"""'90m', '12h', '30d', '2w' -> seconds."""
size = _from_parser(_size, "size")
"""'500M', '20G' -> bytes (binary units)."""

VALIDATORS = frozenset({positive_int, non_negative_int, positive_float, duration, size})
"""The types whose refusals the parser prints as one sentence."""
