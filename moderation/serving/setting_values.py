"""Setting values from text (the environment or the command line): one parser per kind.

Each raises ValueError with a message for the operator; `moderation.serving.settings` adds which
option and environment variable the text came from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_int(text: str) -> int:
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None


def parse_batch_size(text: str) -> int | str:
    """A positive number of sequences, or "auto" (sized from the memory budget on CUDA)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text.strip(), 10)
    except ValueError:
        raise ValueError(f"expected a positive integer or auto, got {text!r}") from None


def parse_float(text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true/false (or 1/0, yes/no, on/off), got {text!r}")


_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BYTES_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?$")


def parse_bytes(text: str) -> int:
    """A size in bytes: a plain number, or with a binary unit (512MiB, 4GiB, 4G)."""
    match = _BYTES_RE.match(text.strip().lower())
    if match is None:
        raise ValueError(f"expected a size in bytes such as 4294967296 or 4GiB, got {text!r}")
    return int(float(match.group(1)) * _BYTE_UNITS[match.group(2)])


def parse_str(text: str) -> str:
    return text.strip()


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}; got {text!r}")
        return value

    return parse


def parse_device(text: str) -> str:
    value = text.strip().lower()
    if not DEVICE_RE.match(value):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N; got {text!r}")
    return value
