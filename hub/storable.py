"""Values both databases can hold, and how deep a JSON value nests.

PostgreSQL refuses some values that JSON and Python allow: NUL (U+0000) in TEXT and in JSONB
strings, lone UTF-16 surrogates (``\\ud800``: not Unicode characters, so not UTF-8), and NaN
or ±Infinity in JSONB. SQLite takes them all, but the hub stores the same thing on both. The
column types in ``hub.models`` pass what they write through ``text`` and ``json_value``, so a
receiver's answer, a header or an error message can never make a write fail and strand an
event.

- In text, NUL and lone surrogates are escaped as the six characters ``\\u0000``, ``\\ud800``.
- A JSON value JSONB can't hold is kept as its JSON text: ``{"json_text": "..."}``, ASCII
  with ``\\u`` escapes and ``NaN``/``Infinity`` as Python writes them, so ``json.loads`` gives
  the same value back.
- Nesting is measured without recursion: a value thousands of levels deep is a clear refusal,
  never a RecursionError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

# Deepest value json.dumps (recursive) may be handed; HUB_MAX_JSON_DEPTH can't go past it.
DEPTH_CAP = 500
JSON_TEXT_KEY = "json_text"

_UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def text(value: str | None) -> str | None:
    """``value`` with NUL and lone surrogates escaped (``\\u0000``); anything else unchanged."""
    if value is None or not isinstance(value, str) or not _has_unstorable(value):
        return value
    return _UNSTORABLE_CHARS.sub(_escape, value)


def _has_unstorable(value: str) -> bool:
    if value.isascii():
        return "\x00" in value
    return _UNSTORABLE_CHARS.search(value) is not None


def _walk(value: Any, limit: int) -> Iterator[tuple[Any, int]]:
    """Every item of ``value`` with its level (1 for the top), dict keys included, without
    recursion; containers deeper than ``limit`` are yielded but not opened."""
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        yield item, level
        if level > limit:
            continue
        if isinstance(item, dict):
            stack.extend((key, level + 1) for key in item)
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((child, level + 1) for child in item)


def depth(value: Any, limit: int) -> int:
    """How many levels of objects and arrays ``value`` nests, counted up to ``limit + 1``."""
    deepest = 0
    for item, level in _walk(value, limit):
        if isinstance(item, dict | list | tuple) and level > deepest:
            deepest = level
            if deepest > limit:
                break
    return deepest


def has_lone_surrogate(value: Any) -> bool:
    """True when a string in ``value`` (a key or a value) holds a lone UTF-16 surrogate."""
    for item, _ in _walk(value, DEPTH_CAP):
        if isinstance(item, str) and not item.isascii() and _LONE_SURROGATE.search(item):
            return True
    return False


def is_storable(value: Any) -> bool:
    """True when both databases hold ``value`` as JSON exactly as it is."""
    for item, level in _walk(value, DEPTH_CAP):
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, str):
            if _has_unstorable(item):
                return False
        elif isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict | list | tuple):
            if level > DEPTH_CAP:
                return False
        else:
            return False  # not a JSON type
    return True


def json_answer(value: Any) -> Any:
    """``value`` for an HTTP answer: as it is, unless it holds NaN or ±Infinity, which JSON
    can't carry; then ``{"json_text": ...}``, as ``json_value`` stores it."""
    for item, _ in _walk(value, DEPTH_CAP):
        if isinstance(item, float) and not math.isfinite(item):
            return {JSON_TEXT_KEY: json.dumps(value, default=str)}
    return value


def json_value(value: Any) -> Any:
    """``value`` if both databases hold it as JSON, else ``{"json_text": <its JSON text>}``."""
    if is_storable(value):
        return value
    if depth(value, DEPTH_CAP) > DEPTH_CAP:
        return {JSON_TEXT_KEY: None, "error": f"nests deeper than {DEPTH_CAP} levels; not kept"}
    return {JSON_TEXT_KEY: json.dumps(value, default=str)}
