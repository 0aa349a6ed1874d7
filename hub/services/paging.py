"""Keyset pages for the admin listings: an opaque cursor names the last row a page showed,
and the next page reads the rows after it along an index, never with OFFSET.

Events page by (received_at, id) (``hub.services.events``); keys by id and routes by name, with
the cursors made here. A cursor says which listing it belongs to, so one from the keys
listing is refused by the routes listing (a 400 naming the cursor), like an altered one.
A page is ``limit`` rows (default 50, at most 500, the same for every listing) and
``next_cursor`` is null on the last page.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

PAGE_DEFAULT = 50
PAGE_MAX = 500


class BadCursor(ValueError):
    """A cursor this hub did not hand out (or one that was altered)."""


def encode(listing: str, position: str) -> str:
    raw = f"{listing}|{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(listing: str, text: str) -> str:
    """The position a cursor of ``listing`` names; BadCursor for anything else."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("not a cursor from this hub") from None
    kind, _, position = raw.partition("|")
    if kind != listing or not position:
        raise BadCursor("not a cursor from this hub")
    return position


def one_page(
    listing: str, rows: Sequence[T], limit: int, position: Callable[[T], str]
) -> tuple[list[T], str | None]:
    """The first ``limit`` of ``rows`` (read as ``limit + 1``, the extra one telling that more
    follow) and the cursor of the next page, naming the last row shown; None at the end."""
    shown = list(rows[:limit])
    return shown, encode(listing, position(shown[-1])) if len(rows) > limit else None
