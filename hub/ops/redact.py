"""What never leaves the hub in a stored row or a log line: keys, tokens, signatures.

Two rules, used by every writer of a row or a line (ingest, attempt copies, the log
formatters): a value is a secret by its *name* (a credential header, a sensitive query or
JSON field), or by its *shape*: anything in the hub's own key format (``hk_<prefix>_<secret>``,
see hub.services.keys) is cut to ``hk_<prefix>_[redacted]`` wherever it appears, named or not. The
shape check costs a substring search when no ``hk_`` is present (about 0.1 µs per header
value, 1 µs per log line; see SECURITY.md for the per-request figure).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

REDACTED = "[redacted]"

SENSITIVE_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "set-cookie",
        "x-hub-signature",
        "x-hub-signature-256",
        "stripe-signature",
        "x-slack-signature",
        "x-shopify-hmac-sha256",
        "webhook-signature",
        "x-webhook-signature",
    }
)
SENSITIVE_WORDS = ("secret", "token", "password", "signature", "api_key", "apikey", "api-key")
SENSITIVE_QUERY = frozenset(
    {"api_key", "apikey", "key", "token", "access_token", "secret", "auth", "sig", "signature"}
)
# The hub's key format (hub.services.keys.KEY_RE, unanchored): the prefix is public (events keep
# it), the 43 characters after it are the secret. A key cut short at the end of a kept prefix
# (a refused body) still matches with what is left of its secret.
KEY_SHAPE = re.compile(r"(hk_[0-9a-f]{8}_)[A-Za-z0-9_-]{1,43}")
KEY_SHAPE_BYTES = re.compile(rb"(hk_[0-9a-f]{8}_)[A-Za-z0-9_-]{1,43}")
# A header name is free-form, and senders invent their own (X-Auth, X-Access-Key, X-Session):
# any of these words, or a name ending in "key", marks a credential.
CREDENTIAL_HEADER_WORDS = SENSITIVE_WORDS + (
    "auth",
    "credential",
    "session",
    "private",
    "passwd",
    "cookie",
    "hmac",
)
# The entry a capped set of headers ends with, saying how much there was: no header can be
# called that (parentheses are not allowed in a header name).
HEADERS_CUT = "(cut)"
# What a value cut short ends with (``...[N more bytes]``) is at most this long.
VALUE_MARK_ROOM = 24
# Headers that end in "key" but name a delivery, not a credential: kept for dedup and search.
HARMLESS_KEY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})


def is_sensitive(name: str) -> bool:
    """A field or query name that holds a secret (in a JSON body, a query string, a header)."""
    lowered = name.lower()
    return lowered in SENSITIVE_HEADERS or any(word in lowered for word in SENSITIVE_WORDS)


@functools.lru_cache(maxsize=4096)
def is_credential_header(name: str) -> bool:
    """A header that looks like it carries a credential, by its name.

    Wider than ``is_sensitive`` (which also judges JSON field names, where "author" or
    "session_count" are ordinary data): a header called X-Auth or X-Access-Key is a secret.
    Remembered by name (names repeat on every call): 0.1 µs a header instead of 4, on
    each header of every attempt and event.
    """
    lowered = name.lower().strip()
    if lowered in HARMLESS_KEY_HEADERS:
        return False
    return (
        lowered in SENSITIVE_HEADERS
        or any(word in lowered for word in CREDENTIAL_HEADER_WORDS)
        or lowered.endswith("key")
    )


def keys_in_text(text: str) -> str:
    """``text`` with every hub API key in it cut to ``hk_<prefix>_[redacted]``."""
    if "hk_" not in text:  # the common case: one substring search, no regex
        return text
    return KEY_SHAPE.sub(r"\1" + REDACTED, text)


def keys_in_bytes(data: bytes) -> bytes:
    """As ``keys_in_text``, for a body kept as bytes."""
    if b"hk_" not in data:
        return data
    return KEY_SHAPE_BYTES.sub(rb"\1" + REDACTED.encode(), data)


def headers(items: Iterable[tuple[str, str]], extra: Iterable[str] = ()) -> dict[str, str]:
    """Headers as a dict with lower-case names, credential values replaced, and any hub key
    in another header's value cut."""
    also = {h.lower() for h in extra}
    out: dict[str, str] = {}
    for name, value in items:
        key = keys_in_text(name.lower())
        out[key] = REDACTED if (is_credential_header(key) or key in also) else keys_in_text(value)
    return out


def header_pairs(
    items: Iterable[tuple[str, str]],
    most: int,
    budget: int,
    also: Iterable[str] = (),
    secrets: Iterable[str] = (),
) -> list[list[str]]:
    """Headers as ``[name, value]`` pairs, in order and with repeats, redacted and bounded:
    at most ``most`` of them and ``budget`` bytes of names and values.

    Credential headers (by name, or named in ``also``) read ``[redacted]``; hub keys and
    ``secrets`` (a step's secret values) are cut from every other value. A value that does
    not fit ends in ``...[N more bytes]``; the headers after it are dropped, and a last pair
    named ``(cut)``, which no real header can be called, says how much there was.
    """
    extra = {name.lower() for name in also}
    hidden = [secret for secret in secrets if secret]
    kept: list[list[str]] = []
    seen = used = total = 0
    full = False
    for raw_name, raw_value in items:
        name = keys_in_text(str(raw_name))
        if is_credential_header(name) or name.lower() in extra:
            value = REDACTED
        else:
            value = str(raw_value)
            if hidden:
                value = values_in_text(value, hidden)
            value = keys_in_text(value)
        seen += 1
        total += len(name) + len(value)
        if full or len(kept) >= most:
            continue
        room = budget - used - len(name)
        if len(value) > room:
            full = True  # the budget ends here: later headers are dropped, not squeezed in
            keep = room - VALUE_MARK_ROOM
            if keep <= 0:
                continue
            value = value[:keep] + f"...[{len(value) - keep} more bytes]"
        kept.append([name, value])
        used += len(name) + len(value)
    if full or len(kept) < seen:
        kept.append([HEADERS_CUT, f"kept {len(kept)} of {seen} headers, {used} of {total} bytes"])
    return kept


def is_sensitive_query(name: str) -> bool:
    """A query parameter that holds a credential: ``?api_key=``, ``?auth=``, ``?sig=`` ..."""
    return name.lower() in SENSITIVE_QUERY or is_credential_header(name)


def query_string(raw: str) -> str:
    """A query string with credential parameters replaced and hub keys cut, named or not
    (``?hk_...`` alone is a parameter whose name is the key)."""
    if not raw:
        return ""
    pairs = parse_qsl(raw, keep_blank_values=True)
    return keys_in_text(
        urlencode([(k, REDACTED if is_sensitive_query(k) else v) for k, v in pairs])
    )


def kept_body(body: bytes | None, keep: int) -> bytes | None:
    """The first ``keep`` bytes of a refused request's body, with hub keys cut (a key that
    straddles the cut is cut too: the redaction runs before the truncation)."""
    if not body or keep <= 0:
        return None
    return keys_in_bytes(body[: keep + 64])[:keep]


def mapping(value: Any) -> Any:
    """A JSON-like value with the values of sensitive keys replaced, recursively."""
    if isinstance(value, Mapping):
        return {k: REDACTED if is_sensitive(str(k)) else mapping(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mapping(v) for v in value]
    return value


def values_in_text(text: str, secrets: Iterable[str]) -> str:
    """``text`` with each of ``secrets`` (a step's secret config values) replaced."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    return text


def copy_for_log(value: Any, limit: int, secrets: Iterable[str] = ()) -> str | None:
    """A redacted, truncated text copy of a request or response, for an attempt row:
    credentials by name, hub keys by shape, and ``secrets`` (the step's secret config
    values) wherever they appear, before the cut so that no part of one is left."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value[: limit + 256].decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(mapping(value), default=str, ensure_ascii=False)
    text = keys_in_text(values_in_text(text, secrets))
    if len(text) > limit:
        text = text[:limit] + f"... [{len(text) - limit}+ more]"
    return text
