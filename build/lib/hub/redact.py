"""What never leaves the hub in a stored row or a log line: keys, tokens, signatures."""

from __future__ import annotations

import json
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
SENSITIVE_QUERY = frozenset({"api_key", "apikey", "key", "token", "access_token", "secret"})
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
# Headers that end in "key" but name a delivery, not a credential: kept for dedup and search.
HARMLESS_KEY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})


def is_sensitive(name: str) -> bool:
    """A field or query name that holds a secret (in a JSON body, a query string, a header)."""
    lowered = name.lower()
    return lowered in SENSITIVE_HEADERS or any(word in lowered for word in SENSITIVE_WORDS)


def is_credential_header(name: str) -> bool:
    """A header that looks like it carries a credential, by its name.

    Wider than ``is_sensitive`` (which also judges JSON field names, where "author" or
    "session_count" are ordinary data): a header called X-Auth or X-Access-Key is a secret.
    """
    lowered = name.lower().strip()
    if lowered in HARMLESS_KEY_HEADERS:
        return False
    return (
        lowered in SENSITIVE_HEADERS
        or any(word in lowered for word in CREDENTIAL_HEADER_WORDS)
        or lowered.endswith("key")
    )


def headers(items: Iterable[tuple[str, str]], extra: Iterable[str] = ()) -> dict[str, str]:
    """Headers as a dict with lower-case names and credential values replaced."""
    also = {h.lower() for h in extra}
    out: dict[str, str] = {}
    for name, value in items:
        key = name.lower()
        out[key] = REDACTED if (is_credential_header(key) or key in also) else value
    return out


def query_string(raw: str) -> str:
    if not raw:
        return ""
    pairs = parse_qsl(raw, keep_blank_values=True)
    return urlencode(
        [(k, REDACTED if k.lower() in SENSITIVE_QUERY or is_sensitive(k) else v) for k, v in pairs]
    )


def mapping(value: Any) -> Any:
    """A JSON-like value with the values of sensitive keys replaced, recursively."""
    if isinstance(value, Mapping):
        return {k: REDACTED if is_sensitive(str(k)) else mapping(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mapping(v) for v in value]
    return value


def copy_for_log(value: Any, limit: int) -> str | None:
    """A redacted, truncated text copy of a request or response, for an attempt row."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value[: limit + 1].decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        text = json.dumps(mapping(value), default=str, ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit] + f"... [{len(text) - limit}+ more]"
    return text
