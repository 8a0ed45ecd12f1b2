"""Wording shared by the course's error messages (hand-written; no notebook builds it)."""

from __future__ import annotations

import difflib

__all__ = ["unknown_name"]


def unknown_name(kind: str, name: str, known) -> str:
    """The message for a `name` that is not among `known` (a model, an asset, ...):
    "Unknown KIND 'name'. Did you mean 'closest'? Choose one of: a, b, c." """
    known = list(known)
    close = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Choose one of: {', '.join(known)}."
