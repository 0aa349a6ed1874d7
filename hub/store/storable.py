"""Values both databases can hold, and how deep a JSON value nests.

PostgreSQL refuses some values that JSON and Python allow: NUL (U+0000) in TEXT and in JSONB
strings, lone UTF-16 surrogates (``\\ud800``: not Unicode characters, so not UTF-8), and NaN
or ±Infinity in JSONB. SQLite takes them all, but the hub stores the same thing on both. The
column types in ``hub.store.models`` pass what they write through ``text`` and ``json_value``, so a
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
import re
from typing import Any

# Deepest value the hub's JSON encoders (recursive) are handed; HUB_MAX_JSON_DEPTH stays below.
DEPTH_CAP = 500
JSON_TEXT_KEY = "json_text"

_UNSTORABLE_CHARS = re.compile("[\x00\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# A \u0000 escape in JSON text: after an even number of backslashes (an odd one is escaped).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


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


def depth(value: Any, limit: int) -> int:
    """How many levels of objects and arrays ``value`` nests, counted up to ``limit + 1``:
    level by level over the containers only, without recursion."""
    level = 0
    frontier = [value] if isinstance(value, dict | list | tuple) else []
    while frontier:
        level += 1
        if level > limit:
            return level
        children: list[Any] = []
        for item in frontier:
            children.extend(item.values() if isinstance(item, dict) else item)
        frontier = [child for child in children if isinstance(child, dict | list | tuple)]
    return level


def _json_text(value: Any, **options: Any) -> str | None:
    """``value`` as JSON text, or None when it can't be written (NaN with allow_nan=False,
    a type JSON lacks, nesting deeper than the encoder goes)."""
    try:
        return json.dumps(value, **options)
    except (TypeError, ValueError, RecursionError):
        return None


def has_lone_surrogate(value: Any) -> bool:
    """True when a string in ``value`` (a key or a value) holds a lone UTF-16 surrogate."""
    written = _json_text(value, ensure_ascii=False, default=str)
    return written is not None and not written.isascii() and bool(_LONE_SURROGATE.search(written))


def is_storable(value: Any) -> bool:
    """True when both databases hold ``value`` as JSON exactly as it is.

    Checked on the JSON text (C speed): the encoder writes NUL as the escape ``\\u0000``
    and, with ensure_ascii off, a lone surrogate as itself.
    """
    written = _json_text(value, ensure_ascii=False, allow_nan=False)
    if written is None or ("\\u0000" in written and _NUL_ESCAPE.search(written)):
        return False
    return written.isascii() or not _LONE_SURROGATE.search(written)


def json_answer(value: Any) -> Any:
    """``value`` for an HTTP answer: as it is, unless it holds NaN or ±Infinity, which JSON
    can't carry; then ``{"json_text": ...}``, as ``json_value`` stores it."""
    if _json_text(value, allow_nan=False, default=str) is not None:
        return value
    return json_value(value)


def json_value(value: Any) -> Any:
    """``value`` if both databases hold it as JSON, else ``{"json_text": <its JSON text>}``."""
    if is_storable(value):
        return value
    written = _json_text(value, default=str)  # ASCII: NUL and surrogates as \\u escapes
    if written is None:
        return {JSON_TEXT_KEY: None, "error": "too deeply nested to keep"}
    return {JSON_TEXT_KEY: written}
