"""Hydra command-line overrides (``key=value``) from plain values, in Hydra's grammar."""

from __future__ import annotations

import re
from typing import Any

_BARE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")


def override_value(value: Any) -> str:
    """``value`` as Hydra's override grammar reads it back: null, true/false, numbers, bare
    words, and quoted strings for anything with grammar characters (a layout's ``*|(),``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _BARE.fullmatch(text) and text.lower() not in ("null", "true", "false", "nan", "inf"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def hydra_override(key: str, value: Any, *, add: bool = False) -> str:
    """``key=value``, or ``++key=value`` (add the key or override it) where the target config
    may not hold ``key`` yet."""
    return f"{'++' if add else ''}{key}={override_value(value)}"
