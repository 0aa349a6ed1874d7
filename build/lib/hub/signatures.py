"""Verify the signatures webhook providers put on the requests they send.

Many senders (GitHub, Stripe, Slack, Shopify, anything following Standard Webhooks) cannot
send an API key, but they sign each request with a shared secret. This module checks those
signatures so the hub can authenticate such senders. It is pure: standard library only, no
Flask, no database, so it can be tested with plain bytes and dicts.

Every failure raises ``SignatureError`` (or ``StaleSignatureError``), whose ``str()`` is always
"Invalid signature" so nothing useful leaks to the sender; the admin-facing cause is in
``reason`` and never contains a secret or a computed signature.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets as _random
import string
import time
from collections.abc import Callable
from typing import Any

SCHEMES = ("standard-webhooks", "github", "stripe", "slack", "shopify", "hmac")
DEFAULT_TOLERANCE = 300  # seconds
#: Longest tolerance accepted: beyond a day the timestamp no longer guards against replays.
MAX_TOLERANCE = 86400

TIMESTAMPED_SCHEMES = ("standard-webhooks", "stripe", "slack")
HMAC_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
HMAC_ENCODINGS = ("hex", "base64")

# Header names as the providers document them (lookups are case-insensitive).
SW_ID = "webhook-id"
SW_TIMESTAMP = "webhook-timestamp"
SW_SIGNATURE = "webhook-signature"
GITHUB_SIGNATURE = "X-Hub-Signature-256"
STRIPE_SIGNATURE = "Stripe-Signature"
SLACK_SIGNATURE = "X-Slack-Signature"
SLACK_TIMESTAMP = "X-Slack-Request-Timestamp"
SHOPIFY_SIGNATURE = "X-Shopify-Hmac-Sha256"

WHSEC_PREFIX = "whsec_"
#: RFC 9110 token characters, the only ones allowed in a header name.
_HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)


class SignatureError(Exception):
    """The request's signature did not verify.

    ``str()`` is always "Invalid signature" (what the sender is told); ``reason`` is a short
    cause for the admin, such as "missing header X-Hub-Signature-256".
    """

    code = "bad_signature"

    def __init__(self, reason: str = "invalid signature") -> None:
        super().__init__("Invalid signature")
        self.reason = reason


class StaleSignatureError(SignatureError):
    """The signed timestamp is outside the tolerance window (a possible replay)."""

    code = "stale_signature"


# --------------------------------------------------------------------------- configuration


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(
            f"Unknown signature scheme {scheme!r}; expected one of: {', '.join(SCHEMES)}."
        )


def validate_options(scheme: str, options: dict | None) -> dict:
    """Normalise and check a route's verifier options, so bad config fails when it is saved.

    Returns a new dict with defaults filled in; raises ValueError with a sentence an admin can
    act on.
    """
    _check_scheme(scheme)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(
            f"Options for scheme {scheme!r} must be a JSON object, not {type(options).__name__}."
        )
    if scheme == "hmac":
        return _validate_hmac_options(options)
    if scheme in TIMESTAMPED_SCHEMES:
        unknown = sorted(set(options) - {"tolerance"})
        if unknown:
            raise ValueError(
                f"Unknown option(s) {', '.join(map(repr, unknown))} for scheme {scheme!r}; "
                "the only option is 'tolerance' (seconds)."
            )
        tolerance = options.get("tolerance", DEFAULT_TOLERANCE)
        if isinstance(tolerance, bool) or not isinstance(tolerance, int):
            raise ValueError(
                f"Option 'tolerance' must be a whole number of seconds, got {tolerance!r}."
            )
        if not 1 <= tolerance <= MAX_TOLERANCE:
            raise ValueError(
                f"Option 'tolerance' must be between 1 and {MAX_TOLERANCE} seconds, "
                f"got {tolerance}."
            )
        return {"tolerance": tolerance}
    if options:
        raise ValueError(
            f"Scheme {scheme!r} takes no options (it has no timestamp), "
            f"got {', '.join(map(repr, sorted(options)))}."
        )
    return {}


def _validate_hmac_options(options: dict) -> dict:
    unknown = sorted(set(options) - {"header", "algorithm", "encoding", "prefix"})
    if unknown:
        raise ValueError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for scheme 'hmac'; "
            "allowed: 'header', 'algorithm', 'encoding', 'prefix'."
        )
    header = options.get("header")
    if not isinstance(header, str) or not header.strip():
        raise ValueError(
            "Scheme 'hmac' needs option 'header': the name of the request header that "
            "carries the signature."
        )
    header = header.strip()
    if not set(header) <= _HEADER_NAME_CHARS:
        raise ValueError(f"Option 'header' is not a valid HTTP header name: {header!r}.")
    algorithm = options.get("algorithm", "sha256")
    if algorithm not in HMAC_ALGORITHMS:
        raise ValueError(
            f"Option 'algorithm' must be one of {', '.join(HMAC_ALGORITHMS)}, got {algorithm!r}."
        )
    encoding = options.get("encoding", "hex")
    if encoding not in HMAC_ENCODINGS:
        raise ValueError(
            f"Option 'encoding' must be one of {', '.join(HMAC_ENCODINGS)}, got {encoding!r}."
        )
    prefix = options.get("prefix", "")
    if not isinstance(prefix, str):
        raise ValueError(f"Option 'prefix' must be a string such as 'sha256=', got {prefix!r}.")
    return {"header": header, "algorithm": algorithm, "encoding": encoding, "prefix": prefix}


def _decode_whsec(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional ``whsec_``."""
    encoded = secret[len(WHSEC_PREFIX) :] if secret.startswith(WHSEC_PREFIX) else secret
    encoded = encoded.strip()
    # The reference libraries accept unpadded base64, so pad before a strict decode.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            "A Standard Webhooks secret must be 'whsec_' followed by base64 (or bare base64); "
            "this one is not valid base64."
        ) from exc
    if not key:
        raise ValueError("A Standard Webhooks secret must not be empty after 'whsec_'.")
    return key


def validate_secret(scheme: str, secret: str) -> str:
    """Check one secret is usable for the scheme, so a typo is refused before traffic arrives."""
    _check_scheme(scheme)
    if not isinstance(secret, str):
        raise ValueError(f"A secret must be a string, not {type(secret).__name__}.")
    if not secret:
        raise ValueError("A secret must not be empty.")
    if scheme == "standard-webhooks":
        _decode_whsec(secret)
    return secret


def _key(scheme: str, secret: str) -> bytes:
    if scheme == "standard-webhooks":
        return _decode_whsec(secret)
    if not secret:
        raise ValueError("A secret must not be empty.")
    return secret.encode("utf-8")


def signature_headers(scheme: str, options: dict | None = None) -> set[str]:
    """Lower-cased names of the headers carrying the signature, so logs can redact them."""
    options = validate_options(scheme, options)
    names = {
        "standard-webhooks": {SW_SIGNATURE},
        "github": {GITHUB_SIGNATURE},
        "stripe": {STRIPE_SIGNATURE},
        "slack": {SLACK_SIGNATURE},
        "shopify": {SHOPIFY_SIGNATURE},
    }.get(scheme)
    if names is None:  # hmac
        names = {options["header"]}
    return {name.lower() for name in names}


# --------------------------------------------------------------------------- helpers


def _header(headers: Any, name: str) -> str:
    """Find a header case-insensitively in any mapping; missing or blank -> SignatureError."""
    wanted = name.lower()
    value: Any = None
    items = headers.items() if hasattr(headers, "items") else ()
    for key, val in items:
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, str) and key.lower() == wanted:
            value = val
            break
    if value is None:
        raise SignatureError(f"missing header {name}")
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        raise SignatureError(f"malformed header {name}")
    value = value.strip()
    if not value:
        raise SignatureError(f"empty header {name}")
    return value


def _parse_timestamp(value: str) -> int:
    # Digits only: rejects floats, signs, whitespace and absurd lengths before int().
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        raise SignatureError("malformed timestamp")
    return int(value)


def _check_window(ts: int, now: float | None, tolerance: int) -> None:
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise StaleSignatureError(
            f"timestamp {ts} is {int(current - ts)} s from now, outside the {tolerance} s tolerance"
        )


def _mac(key: bytes, message: bytes, algorithm: str = "sha256") -> bytes:
    return hmac.new(key, message, HMAC_ALGORITHMS[algorithm]).digest()


def _b64decode(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


def _hex_bytes(value: str) -> bytes:
    """Lower-cased ASCII bytes of a hex string, for constant-time comparison with our hex."""
    return value.lower().encode("utf-8", "replace")


def _keys(scheme: str, secrets: list[str]) -> list[bytes]:
    if isinstance(secrets, str | bytes):
        raise TypeError("secrets must be a list of strings, not a single string")
    if not secrets:
        raise SignatureError("no secret configured")
    keys = []
    for secret in secrets:
        try:
            keys.append(_key(scheme, secret))
        except (ValueError, TypeError, AttributeError):
            continue  # an unusable secret cannot have signed anything
    if not keys:
        raise SignatureError("no usable secret configured")
    return keys


def _any_match(candidates: list[bytes], expected: list[bytes]) -> bool:
    # Every pair is compared (no early exit) so timing does not reveal which secret matched.
    matched = False
    for want in expected:
        for got in candidates:
            matched |= hmac.compare_digest(want, got)
    return matched


# --------------------------------------------------------------------------- verify


def verify(
    scheme: str,
    *,
    body: bytes,
    headers: Any,
    secrets: list[str],
    options: dict | None = None,
    now: float | None = None,
) -> None:
    """Raise SignatureError/StaleSignatureError unless one of ``secrets`` signed ``body``.

    Several secrets allow rotation. ``headers`` is any mapping; names are matched without
    regard to case. Checks run in order: required headers present, parse, timestamp window
    (timestamped schemes), then HMAC over the raw body bytes in constant time. Bad ``options``
    or an unknown scheme are configuration errors and raise ValueError.
    """
    options = validate_options(scheme, options)
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be the raw request bytes")
    body = bytes(body)
    if scheme == "standard-webhooks":
        _verify_standard(body, headers, secrets, options, now)
    elif scheme == "github":
        _verify_github(body, headers, secrets)
    elif scheme == "stripe":
        _verify_stripe(body, headers, secrets, options, now)
    elif scheme == "slack":
        _verify_slack(body, headers, secrets, options, now)
    elif scheme == "shopify":
        _verify_shopify(body, headers, secrets)
    else:
        _verify_hmac(body, headers, secrets, options)


def _verify_standard(body, headers, secrets, options, now) -> None:
    msg_id = _header(headers, SW_ID)
    ts_raw = _header(headers, SW_TIMESTAMP)
    sig_raw = _header(headers, SW_SIGNATURE)
    ts = _parse_timestamp(ts_raw)
    candidates = []
    saw_v1 = False
    for entry in sig_raw.split():
        version, sep, value = entry.partition(",")
        if not sep or version != "v1":
            continue  # other versions (v1a, ...) are for other verifiers
        saw_v1 = True
        decoded = _b64decode(value)
        if decoded is not None:
            candidates.append(decoded)
    if not saw_v1:
        raise SignatureError(f"no v1 signature in {SW_SIGNATURE} header")
    _check_window(ts, now, options["tolerance"])
    content = f"{msg_id}.{ts_raw}.".encode() + body
    expected = [_mac(key, content) for key in _keys("standard-webhooks", secrets)]
    if not _any_match(candidates, expected):
        raise SignatureError("no signature matched")


def _verify_github(body, headers, secrets) -> None:
    value = _header(headers, GITHUB_SIGNATURE)
    algo, sep, digest = value.partition("=")
    if not sep or algo.lower() != "sha256" or not digest:
        raise SignatureError(f"malformed {GITHUB_SIGNATURE} header")
    expected = [_mac(key, body).hex().encode() for key in _keys("github", secrets)]
    if not _any_match([_hex_bytes(digest)], expected):
        raise SignatureError("no signature matched")


def _verify_stripe(body, headers, secrets, options, now) -> None:
    value = _header(headers, STRIPE_SIGNATURE)
    timestamps: list[str] = []
    candidates: list[bytes] = []
    for item in value.split(","):
        key, sep, val = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            timestamps.append(val.strip())
        elif key == "v1" and val.strip():
            candidates.append(_hex_bytes(val.strip()))
    if len(timestamps) != 1 or not candidates:
        raise SignatureError(f"malformed {STRIPE_SIGNATURE} header")
    ts = _parse_timestamp(timestamps[0])
    _check_window(ts, now, options["tolerance"])
    content = f"{timestamps[0]}.".encode() + body
    expected = [_mac(key, content).hex().encode() for key in _keys("stripe", secrets)]
    if not _any_match(candidates, expected):
        raise SignatureError("no signature matched")


def _verify_slack(body, headers, secrets, options, now) -> None:
    ts_raw = _header(headers, SLACK_TIMESTAMP)
    value = _header(headers, SLACK_SIGNATURE)
    ts = _parse_timestamp(ts_raw)
    version, sep, digest = value.partition("=")
    if not sep or version != "v0" or not digest:
        raise SignatureError(f"malformed {SLACK_SIGNATURE} header")
    _check_window(ts, now, options["tolerance"])
    content = f"v0:{ts_raw}:".encode() + body
    expected = [_mac(key, content).hex().encode() for key in _keys("slack", secrets)]
    if not _any_match([_hex_bytes(digest)], expected):
        raise SignatureError("no signature matched")


def _verify_shopify(body, headers, secrets) -> None:
    value = _header(headers, SHOPIFY_SIGNATURE)
    decoded = _b64decode(value)
    if decoded is None:
        raise SignatureError(f"malformed {SHOPIFY_SIGNATURE} header (not base64)")
    expected = [_mac(key, body) for key in _keys("shopify", secrets)]
    if not _any_match([decoded], expected):
        raise SignatureError("no signature matched")


def _verify_hmac(body, headers, secrets, options) -> None:
    name = options["header"]
    value = _header(headers, name)
    prefix = options["prefix"]
    if prefix:
        if not value.startswith(prefix):
            raise SignatureError(f"header {name} lacks the configured prefix")
        value = value[len(prefix) :].strip()
        if not value:
            raise SignatureError(f"empty signature in header {name}")
    keys = _keys("hmac", secrets)
    macs = [_mac(key, body, options["algorithm"]) for key in keys]
    if options["encoding"] == "hex":
        candidates = [_hex_bytes(value)]
        expected = [mac.hex().encode() for mac in macs]
    else:
        decoded = _b64decode(value)
        if decoded is None:
            raise SignatureError(f"malformed header {name} (not base64)")
        candidates, expected = [decoded], macs
    if not _any_match(candidates, expected):
        raise SignatureError("no signature matched")


# --------------------------------------------------------------------------- sign


def sign(
    scheme: str,
    *,
    body: bytes,
    secret: str,
    timestamp: int | None = None,
    msg_id: str | None = None,
    options: dict | None = None,
) -> dict[str, str]:
    """The headers a sender of this scheme would send.

    Used by tests and by the outbound forward connector (Standard Webhooks). ``timestamp``
    defaults to now and ``msg_id`` to a random ``msg_...`` id; both are ignored by schemes
    that do not sign them. Raises ValueError for a bad secret or options.
    """
    options = validate_options(scheme, options)
    validate_secret(scheme, secret)
    key = _key(scheme, secret)
    body = bytes(body)
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    if scheme == "standard-webhooks":
        msg_id = msg_id or f"msg_{_random.token_hex(12)}"
        mac = _mac(key, f"{msg_id}.{ts}.".encode() + body)
        return {
            SW_ID: msg_id,
            SW_TIMESTAMP: ts,
            SW_SIGNATURE: "v1," + base64.b64encode(mac).decode("ascii"),
        }
    if scheme == "github":
        return {GITHUB_SIGNATURE: "sha256=" + _mac(key, body).hex()}
    if scheme == "stripe":
        mac = _mac(key, f"{ts}.".encode() + body)
        return {STRIPE_SIGNATURE: f"t={ts},v1={mac.hex()}"}
    if scheme == "slack":
        mac = _mac(key, f"v0:{ts}:".encode() + body)
        return {SLACK_TIMESTAMP: ts, SLACK_SIGNATURE: "v0=" + mac.hex()}
    if scheme == "shopify":
        return {SHOPIFY_SIGNATURE: base64.b64encode(_mac(key, body)).decode("ascii")}
    mac = _mac(key, body, options["algorithm"])
    encoded = mac.hex() if options["encoding"] == "hex" else base64.b64encode(mac).decode("ascii")
    return {options["header"]: options["prefix"] + encoded}
