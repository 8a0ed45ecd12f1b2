"""Reading the course's switches from environment variables (hand-written; no notebook
builds it): one rule for yes/no switches and one for numbers, so every switch reads alike.
"""

from __future__ import annotations

import os

__all__ = ["env_flag", "env_number"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def env_flag(name: str) -> bool:
    """True when the variable `name` is 1/true/yes/on (any case), False when it is unset,
    empty or 0/false/no/off; anything else is an error that names the variable."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"${name}={os.environ[name]!r} is neither on (1, true, yes, on) nor off "
                     f"(0, false, no, off, or unset)")


def env_number(name: str) -> float | None:
    """The variable `name` as a number, or None when it is unset or empty; anything else is
    an error that names the variable."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"${name}={value!r} is not a number") from None
