"""Units written in the config: durations ("90s", "15m", "1h", "5d"), sizes ("25MiB", "100kB") and
fractions of a whole (0.25 or "25%").

Pure parsing and spelling, no I/O: relay/config.py converts TOML values through these; the user
store spells a reset's grace with them in its audit detail; ``user reset-password --grace`` parses.
"""

from __future__ import annotations

import math
import re


class Duration(float):
    """Seconds, written in TOML as "90s", "15m", "1h", "5d" (or a bare number of seconds)."""


class Size(int):
    """Bytes, written in TOML as "25MiB", "512KiB", "1GiB", "100kB" (or a bare integer)."""


class Fraction(float):
    """A share of a whole, more than none and at most all: 0.25 or "25%" in TOML."""

    @classmethod
    def parse(cls, value: object) -> Fraction:
        """Parse 0.25 / 1 / "25%" into a fraction in (0, 1]."""
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError("expected a fraction such as 0.25 or 25%")
        if isinstance(value, str):
            m = _PERCENT_RE.match(value)
            if not m:
                raise ValueError(f"{value!r} is not a fraction (use e.g. 0.25 or 25%)")
            value = float(m.group(1)) / 100
        share = float(value)
        if not 0 < share <= 1:  # NaN fails this too
            raise ValueError(f"{share:g} is not a share of the whole: more than 0, at most 1")
        return cls(share)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "kB": 1000,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> Duration:
    """Parse "90s" / "15m" / "1h" / "5d" / "0" into seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 90s, 15m, 1h or 5d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration (use e.g. 90s, 15m, 1h, 5d)")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 90s, 15m, 1h or 5d")
    if not math.isfinite(seconds):  # TOML has nan and inf: neither is a duration
        raise ValueError("a duration must be a finite number of seconds")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds)


def parse_size(value: object) -> Size:
    """Parse "25MiB" / "100kB" / 1024 into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 25MiB")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size (use e.g. 512KiB, 25MiB)")
        n = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError("expected a size such as 25MiB")
    if n < 0:
        raise ValueError("a size cannot be negative")
    return Size(n)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling: 3600 -> "1h", 90 -> "90s"."""
    for unit, mult in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= mult and seconds % mult == 0:
            return f"{int(seconds // mult)}{unit}"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds}s"
