"""Verify the signatures webhook providers put on the requests they send.

Many senders (GitHub, Stripe, Slack, Shopify, anything following Standard Webhooks) cannot
send an API key, but they sign each request with a shared secret (or a private key). Each
provider is a declaration (``hub.providers``); this module is the one interpreter that checks
any of them, plus the code a declaration cannot be (Ed25519 for Standard Webhooks' v1a). It
is pure: no Flask, no database, so it can be tested with plain bytes and dicts.

Every failure raises ``SignatureError`` (or ``StaleSignatureError``), whose ``str()`` is always
"Invalid signature" so nothing useful leaks to the sender; the admin-facing cause is in
``reason`` and never contains a secret or a computed signature.

What the sender controls is only what the declaration reads: the route's saved scheme picks
the declaration, and no header can name another algorithm, version or rule, nor turn the
timestamp off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets as _random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from hub import providers
from hub.providers import (
    DEFAULT_TOLERANCE,
    HEADER_NAME_CHARS,
    MAX_TOLERANCE,
    WHSEC_PREFIX,
    KeyVerifier,
    Provider,
)

#: The built-in schemes; ``providers.registry()`` also holds third-party ones.
SCHEMES = tuple(providers.BUILTIN_PROVIDERS)
__all__ = [
    "DEFAULT_TOLERANCE",
    "MAX_TOLERANCE",
    "SCHEMES",
    "KeysUnavailable",
    "SignatureError",
    "verify",
]

HMAC_ALGORITHMS: dict[str, Callable[..., Any]] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
HMAC_ENCODINGS = providers.ENCODINGS
WHPK_PREFIX = "whpk_"
_HEADER_NAME_CHARS = HEADER_NAME_CHARS


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


def provider_of(scheme: str) -> Provider:
    """The declaration a route's scheme names; ValueError (a sentence) when none is loaded."""
    found = providers.get(scheme) if isinstance(scheme, str) else None
    if found is None:
        names = ", ".join(providers.registry().names())
        raise ValueError(f"Unknown signature scheme {scheme!r}; expected one of: {names}.")
    return found


def validate_options(scheme: str, options: dict | None) -> dict:
    """Normalise and check a route's verifier options, so bad config fails when it is saved.

    Returns a new dict with defaults filled in; raises ValueError with a sentence an admin can
    act on. What a provider takes follows from its declaration (``Provider.route_options``):
    ``tolerance`` when it has a timestamp, ``header``/``algorithm``/``encoding``/``prefix``
    when it is configurable, ``url`` when it signs the URL, ``verify_token`` for Meta's GET
    handshake, ``jwks_url`` where its keys may come from a URL.
    """
    provider = provider_of(scheme)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(
            f"Options for scheme {scheme!r} must be a JSON object, not {type(options).__name__}."
        )
    allowed = list(provider.route_options)
    unknown = sorted(set(options) - set(allowed))
    if not allowed and options:
        raise ValueError(
            f"Scheme {scheme!r} takes no options (it has no timestamp), "
            f"got {', '.join(map(repr, sorted(options)))}."
        )
    if unknown:
        if allowed == ["tolerance"]:
            hint = "the only option is 'tolerance' (seconds)."
        else:
            hint = "allowed: " + ", ".join(map(repr, allowed)) + "."
        raise ValueError(
            f"Unknown option(s) {', '.join(map(repr, unknown))} for scheme {scheme!r}; {hint}"
        )
    result: dict[str, Any] = {}
    if provider.options:
        result.update(_validate_hmac_options(scheme, options, provider))
    if provider.timestamp:
        result["tolerance"] = _tolerance(options.get("tolerance", provider.timestamp.tolerance))
    if "url" in options:
        result["url"] = _public_url(options["url"])
    if "verify_token" in options:
        token = options["verify_token"]
        if isinstance(token, int) and not isinstance(token, bool):
            token = str(token)  # `--verify-option verify_token=12345` reads a number
        if not isinstance(token, str) or not token.strip() or len(token) > 200:
            raise ValueError(
                "Option 'verify_token' must be the Verify Token typed into Meta's webhook "
                "settings: 1 to 200 characters."
            )
        result["verify_token"] = token
    if "jwks_url" in options:
        result["jwks_url"] = _http_url(options["jwks_url"], "jwks_url")
    return result


def _http_url(value: Any, name: str) -> str:
    if not isinstance(value, str) or len(value) > 2000 or any(c.isspace() for c in value.strip()):
        raise ValueError(f"Option {name!r} must be an http(s) URL, without spaces.")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Option {name!r} must be an http(s) URL with a host, got {value!r}.")
    return value.strip()


def _public_url(value: Any) -> str:
    url = _http_url(value, "url")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(
            "Option 'url' is the route's public URL without a query (the request's own "
            f"query string is appended), got {value!r}."
        )
    return url


def _tolerance(tolerance: Any) -> int:
    if isinstance(tolerance, bool) or not isinstance(tolerance, int):
        raise ValueError(
            f"Option 'tolerance' must be a whole number of seconds, got {tolerance!r}."
        )
    if not 1 <= tolerance <= MAX_TOLERANCE:
        raise ValueError(
            f"Option 'tolerance' must be between 1 and {MAX_TOLERANCE} seconds, got {tolerance}."
        )
    return tolerance


def _validate_hmac_options(scheme: str, options: dict, provider: Provider) -> dict:
    result: dict[str, Any] = {}
    if "header" in provider.options:
        header = options.get("header")
        if not isinstance(header, str) or not header.strip():
            raise ValueError(
                f"Scheme {scheme!r} needs option 'header': the name of the request header "
                "that carries the signature."
            )
        header = header.strip()
        if not set(header) <= HEADER_NAME_CHARS:
            raise ValueError(f"Option 'header' is not a valid HTTP header name: {header!r}.")
        result["header"] = header
    if "algorithm" in provider.options:
        algorithm = options.get("algorithm", provider.algorithm or "sha256")
        if algorithm not in HMAC_ALGORITHMS:
            raise ValueError(
                f"Option 'algorithm' must be one of {', '.join(HMAC_ALGORITHMS)}, "
                f"got {algorithm!r}."
            )
        result["algorithm"] = algorithm
    if "encoding" in provider.options:
        encoding = options.get("encoding", provider.encoding)
        if encoding not in HMAC_ENCODINGS:
            raise ValueError(
                f"Option 'encoding' must be one of {', '.join(HMAC_ENCODINGS)}, got {encoding!r}."
            )
        result["encoding"] = encoding
    if "prefix" in provider.options:
        prefix = options.get("prefix", provider.prefix)
        if not isinstance(prefix, str):
            raise ValueError(f"Option 'prefix' must be a string such as 'sha256=', got {prefix!r}.")
        result["prefix"] = prefix
    return result


def _decode_whsec(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret: base64 after an optional ``whsec_``."""
    return _decode_prefixed(secret, WHSEC_PREFIX, "A Standard Webhooks secret")


def _decode_prefixed(secret: str, prefix: str, what: str) -> bytes:
    encoded = secret[len(prefix) :] if secret.startswith(prefix) else secret
    encoded = encoded.strip()
    # The reference libraries accept unpadded base64, so pad before a strict decode.
    encoded += "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(
            f"{what} must be '{prefix}' followed by base64 (or bare base64); "
            "this one is not valid base64."
        ) from exc
    if not key:
        raise ValueError(f"{what} must not be empty after '{prefix}'.")
    return key


@cache
def key_verifier(spec: str) -> KeyVerifier:
    """The KeyVerifier a declaration names (imported once)."""
    obj = providers._load_object(spec)
    if isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, KeyVerifier):
        raise ValueError(f"{spec} is not a KeyVerifier")
    return obj


def _is_code_secret(provider: Provider, secret: str) -> bool:
    code = provider.code
    return code is not None and (
        provider.algorithm is None or secret.startswith(code.secret_prefix or "\0")
    )


def validate_secret(scheme: str, secret: str) -> str:
    """Check one secret is usable for the scheme, so a typo is refused before traffic arrives."""
    provider = provider_of(scheme)
    if not isinstance(secret, str):
        raise ValueError(f"A secret must be a string, not {type(secret).__name__}.")
    if not secret:
        raise ValueError("A secret must not be empty.")
    if _is_code_secret(provider, secret):
        key_verifier(provider.code.verifier).check_secret(secret)  # type: ignore[union-attr]
    elif provider.secret == "whsec":
        _decode_whsec(secret)
    return secret


def _hmac_key(provider: Provider, secret: str) -> bytes:
    if provider.secret == "whsec":
        return _decode_whsec(secret)
    if not secret:
        raise ValueError("A secret must not be empty.")
    return secret.encode("utf-8")


def signature_headers(scheme: str, options: dict | None = None) -> set[str]:
    """Lower-cased names of the headers carrying the signature, so logs can redact them."""
    provider = configured(scheme, options)
    return set(provider.redacted)


def configured(scheme: str, options: dict | None) -> Provider:
    """The route's declaration with its options applied: validated once per distinct
    options, then a dict lookup (a request pays no model copy and no validation)."""
    registry = providers.registry()
    provider = registry.get(scheme) if isinstance(scheme, str) else None
    if provider is None:
        provider_of(scheme)  # raises the sentence naming the known schemes
    assert provider is not None
    if not options and not provider.options and provider.timestamp is None:
        return provider
    return registry.configured(scheme, options or {}, lambda: validate_options(scheme, options))


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
    if type(value) is str:
        value = value.strip()
        if value:
            return value
    return _usable(value, name)


def _find_header(headers: Any, name: str) -> Any:
    wanted = name.lower()
    items = headers.items() if hasattr(headers, "items") else ()
    for key, val in items:
        if isinstance(key, bytes):
            key = key.decode("latin-1")
        if isinstance(key, str) and key.lower() == wanted:
            return val
    return None


def _usable(value: Any, name: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        raise SignatureError(f"malformed header {name}")
    value = value.strip()
    if not value:
        raise SignatureError(f"empty header {name}")
    return value


def _first_header(headers: Any, names: tuple[str, ...]) -> tuple[str, str]:
    """The first of ``names`` the request carries, as (name, value)."""
    if not names:
        raise SignatureError("the provider declares no header here")
    if len(names) == 1:
        return names[0], _header(headers, names[0])
    for name in names:
        value = _find_header(headers, name)
        if value is not None:
            return name, _usable(value, name)
    shown = names[0] + "".join(f" (or {n})" for n in names[1:])
    raise SignatureError(f"missing header {shown}")


_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)


def _timestamp_seconds(value: str, unit: str) -> float:
    """A signed time as seconds since the epoch: digits (s or ms), or RFC 3339 (Twitch's,
    with up to nanoseconds)."""
    if unit != "rfc3339":
        ts = _parse_timestamp(value)
        return ts / 1000 if unit == "ms" else ts
    found = _RFC3339.match(value) if len(value) <= 40 else None
    if found is None:
        raise SignatureError("malformed timestamp")
    day, clock, fraction, zone = found.groups()
    zone = "+00:00" if zone in ("Z", "z") else zone
    try:
        when = datetime.fromisoformat(f"{day}T{clock}{zone}")
    except ValueError:
        raise SignatureError("malformed timestamp") from None
    return when.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def _parse_timestamp(value: str) -> int:
    # Digits only: rejects floats, signs, whitespace and absurd lengths before int().
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        raise SignatureError("malformed timestamp")
    return int(value)


def _check_window(ts: float, now: float | None, tolerance: int) -> None:
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        raise StaleSignatureError(
            f"timestamp {int(ts)} is {int(current - ts)} s from now, "
            f"outside the {tolerance} s tolerance"
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


def _decoded(value: str, encoding: str) -> bytes | None:
    """A signature as compared: hex as its lower-cased text, base64 as its bytes."""
    return _hex_bytes(value) if encoding == "hex" else _b64decode(value)


def _key_signature(value: str, encoding: str) -> bytes | None:
    """A public-key signature as its bytes (hex decoded, unlike an HMAC's, which is compared
    as text)."""
    if encoding == "base64":
        return _b64decode(value)
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


def _any_match(candidates: list[bytes], expected: list[bytes]) -> bool:
    # Every pair is compared (no early exit) so timing does not reveal which secret matched.
    matched = False
    for want in expected:
        for got in candidates:
            matched |= hmac.compare_digest(want, got)
    return matched


# --------------------------------------------------------------------------- verify


class SignedRequest(NamedTuple):
    """What a signature may cover: the raw body, the headers, and for providers that sign
    them (Twilio, HubSpot) the method and the URL as the sender called it."""

    body: bytes
    headers: Any
    method: str = "POST"
    url: str = ""


def verify(
    scheme: str,
    *,
    body: bytes,
    headers: Any,
    secrets: list[str],
    options: dict | None = None,
    now: float | None = None,
    method: str = "POST",
    url: str = "",
) -> str | None:
    """Raise SignatureError/StaleSignatureError unless one of ``secrets`` signed the request;
    return the secret that did (None when a key fetched from the route's ``jwks_url`` did).

    Several secrets allow rotation. ``headers`` is any mapping; names are matched without
    regard to case. Bad ``options`` or an unknown scheme are configuration errors and raise
    ValueError; keys that cannot be fetched raise KeysUnavailable.
    """
    if type(body) is not bytes:
        if not isinstance(body, bytearray | memoryview):
            raise TypeError("body must be the raw request bytes")
        body = bytes(body)
    return _check(configured(scheme, options), body, headers, method, url, secrets, now, options)


def check(
    provider: Provider,
    request: SignedRequest,
    secrets: list[str],
    *,
    now: float | None = None,
    options: dict | None = None,
) -> str | None:
    """The interpreter: verify ``request`` against any declaration (see ``_check``); the
    secret that signed it."""
    return _check(
        provider,
        request.body,
        request.headers,
        request.method,
        request.url,
        secrets,
        now,
        options,
    )


def _check(
    provider: Provider,
    body: bytes,
    headers: Any,
    method: str,
    url: str,
    secrets: list[str],
    now: float | None,
    options: dict | None = None,
) -> str | None:
    """The interpreter, its request as parts (a request costs no object of its own); the
    secret that signed (None for a key of the route's ``jwks_url``).

    In order: the headers it needs are present, its signatures parse, the timestamp is in
    the window (only where the provider has one), then each secret's signature is computed
    over the signed content and compared with every signature sent, in constant time.
    """
    if isinstance(secrets, (str, bytes)):  # noqa: UP038 - the tuple form is the faster
        raise TypeError("secrets must be a list of strings, not a single string")
    jwks_url = options.get("jwks_url") if options and provider.code is not None else None
    names = provider.signature_headers
    json_body: _JsonBody | None = None
    if provider.signature_field:
        json_body = _JsonBody(body)
        sig_name = f"body field {provider.signature_field}"
        sig_value = json_body.text(provider.signature_field, "signature")
    elif len(names) == 1:
        sig_name, sig_value = names[0], _header(headers, names[0])
    else:
        sig_name, sig_value = _first_header(headers, names)
    if provider.algorithm == providers.TOKEN:
        return _check_token(provider, sig_value, secrets)
    rule = provider.timestamp
    ts_raw = _header(headers, rule.header) if rule is not None and rule.header else None
    id_value = _first_header(headers, provider.id_headers)[1] if provider.signs_id else None
    if provider.code is None:
        code_wanted, hmac_wanted = False, True
    else:  # which kinds of signature to look for follows from the kinds of secret given
        kinds = {_is_code_secret(provider, s) for s in secrets if isinstance(s, str)}
        code_wanted = True in kinds or bool(jwks_url)
        hmac_wanted = provider.algorithm is not None and (
            (not secrets and not jwks_url) or False in kinds
        )
    if provider.signature_list is None and not code_wanted:  # one HMAC signature
        sent_hmac, sent_code, listed_ts = [_lone_signature(provider, sig_name, sig_value)], [], ()
    else:
        sent_hmac, sent_code, listed_ts = _signatures(
            provider, sig_name, sig_value, hmac_wanted, code_wanted
        )
    if rule is not None:
        if rule.signature_key:
            if len(listed_ts) != 1:
                raise SignatureError(f"malformed {sig_name} header")
            ts_raw = listed_ts[0]
        elif rule.body_field:
            json_body = json_body or _JsonBody(body)
            ts_raw = json_body.text(rule.body_field, "timestamp")
        assert ts_raw is not None
        _check_window(_timestamp_seconds(ts_raw, rule.unit), now, rule.tolerance)
    if not secrets and not jwks_url:
        raise SignatureError("no secret configured")
    content = (
        body
        if provider.signed_content == "{body}"
        else _content(provider, body, headers, method, url, ts_raw, id_value, json_body)
    )
    signer: str | None = None
    matched = False
    usable = False
    if hmac_wanted:
        code = provider.code
        if code is None and provider.secret == "plain":  # the common case, in one pass
            keys = [
                (secret, secret.encode()) for secret in secrets if type(secret) is str and secret
            ]
        else:
            keys = []
            for secret in secrets:
                if (
                    code is not None
                    and isinstance(secret, str)
                    and _is_code_secret(provider, secret)
                ):
                    continue
                try:
                    keys.append((secret, _hmac_key(provider, secret)))
                except (ValueError, TypeError, AttributeError):
                    continue  # an unusable secret cannot have signed anything
        if keys:
            usable = True
            algorithm = provider.algorithm or "sha256"
            hexed = provider.encoding == "hex"
            # Every secret is compared (no early exit): timing says nothing of which matched.
            for secret, key in keys:
                mac = _mac(key, content, algorithm)
                if _any_match(sent_hmac, [mac.hex().encode() if hexed else mac]) and not matched:
                    matched, signer = True, secret
    if code_wanted:
        verifier = key_verifier(provider.code.verifier)  # type: ignore[union-attr]
        for secret in secrets:
            if not (isinstance(secret, str) and _is_code_secret(provider, secret)):
                continue
            keys = verifier.keys([secret])
            if keys:
                usable = True
                if sent_code and verifier.verify(content, sent_code, keys) and not matched:
                    matched, signer = True, secret
        if jwks_url and not matched:
            usable = True
            matched = bool(sent_code) and JWKS.verify(verifier, jwks_url, content, sent_code)
    if not usable:
        raise SignatureError("no usable secret configured")
    if not matched:
        raise SignatureError("no signature matched")
    return signer


def _signatures(
    provider: Provider, name: str, value: str, hmac_wanted: bool, code_wanted: bool
) -> tuple[list[bytes], list[bytes], list[str]]:
    """The signatures a header carries for the HMAC and for the code, and any timestamps
    listed beside them (Stripe's ``t=``)."""
    listing = provider.signature_list
    code = provider.code
    if listing is None:
        sent_hmac: list[bytes] = []
        sent_code: list[bytes] = []
        if hmac_wanted or not code_wanted:
            sent_hmac.append(_lone_signature(provider, name, value))
        if code_wanted and code is not None:
            raw: str | None = value
            if provider.prefix:  # the prefix is required, in any case (Basic, basic)
                size = len(provider.prefix)
                raw = (
                    value[size:].strip()
                    if value[:size].lower() == provider.prefix.lower()
                    else None
                )
            decoded = _key_signature(raw, code.encoding) if raw else None
            if decoded is not None:
                sent_code.append(decoded)
        return sent_hmac, sent_code, []
    hmac_versions = listing.versions if provider.algorithm is not None else ()
    code_versions = code.versions if code is not None else ()
    ts_key = provider.timestamp.signature_key if provider.timestamp else None
    sent_hmac, sent_code, stamps = [], [], []
    seen = False
    for entry in value.split(None if listing.separator == " " else listing.separator):
        label, sep, item = entry.strip().partition(listing.pair)
        if not sep:
            continue
        item = item.strip()
        if ts_key is not None and label == ts_key:
            stamps.append(item)
        elif hmac_wanted and label in hmac_versions:
            seen = True
            decoded = _decoded(item, provider.encoding)
            if decoded is not None:
                sent_hmac.append(decoded)
        elif code_wanted and label in code_versions:
            seen = True
            decoded = _key_signature(item, code.encoding)  # type: ignore[union-attr]
            if decoded is not None:
                sent_code.append(decoded)
    if ts_key is not None and len(stamps) != 1:
        raise SignatureError(f"malformed {name} header")
    if not seen:
        wanted = [*(hmac_versions if hmac_wanted else ()), *(code_versions if code_wanted else ())]
        raise SignatureError(f"no {' or '.join(wanted) or 'known'} signature in {name} header")
    return sent_hmac, sent_code, stamps


def _lone_signature(provider: Provider, name: str, value: str) -> bytes:
    """The one signature of a header that carries one (GitHub, Slack, Shopify, ...), as
    compared: hex as lower-cased text, base64 decoded."""
    prefix = provider.prefix
    if prefix:
        size = len(prefix)
        head = value[:size]
        if head != prefix and head.lower() != prefix.lower():
            raise SignatureError(_prefix_problem(provider, name, "lacks the configured prefix"))
        value = value[size:].strip()
        if not value:
            raise SignatureError(_prefix_problem(provider, name, "empty"))
    if provider.encoding == "hex":
        return value.lower().encode("utf-8", "replace")
    decoded = _b64decode(value)
    if decoded is None:
        raise SignatureError(_prefix_problem(provider, name, "not base64"))
    return decoded


def _prefix_problem(provider: Provider, name: str, problem: str) -> str:
    """The admin's sentence for a lone signature that does not parse. The generic hmac's
    prefix and encoding are the route's own options, and its sentences say so."""
    if provider.options:  # the generic hmac
        return {
            "lacks the configured prefix": f"header {name} lacks the configured prefix",
            "empty": f"empty signature in header {name}",
            "not base64": f"malformed header {name} (not base64)",
        }[problem]
    return f"malformed {name} header" + (" (not base64)" if problem == "not base64" else "")


class _JsonBody:
    """The request's JSON body, parsed once and only if the declaration reads a field of it
    (a timestamp, a signature, a signed part)."""

    __slots__ = ("_parsed", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parsed: Any = _UNPARSED

    def field(self, path: str) -> Any:
        if self._parsed is _UNPARSED:
            try:
                self._parsed = json.loads(self.raw)
            except (ValueError, RecursionError):
                self._parsed = None
        return providers.body_field(self._parsed, path)

    def text(self, path: str, what: str) -> str:
        """A string or whole number at ``path``, as text; SignatureError when absent."""
        value = self.field(path)
        if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
            raise SignatureError(f"missing {what} {path} in the body")
        return str(value)


_UNPARSED = object()


def _check_token(provider: Provider, sent: str, secrets: list[str]) -> str:
    """A static token (GitLab's): the header is the secret. Digests of both are compared, so
    the time taken says nothing about the secret, not even its length. The secret that
    matched."""
    if not secrets:
        raise SignatureError("no secret configured")
    if provider.prefix:
        if sent[: len(provider.prefix)].lower() != provider.prefix.lower():
            raise SignatureError(f"malformed {provider.signature_headers[0]} header")
        sent = sent[len(provider.prefix) :].strip()
    got = hashlib.sha256(sent.encode("utf-8", "replace")).digest()
    usable = [s for s in secrets if isinstance(s, str) and s]
    if not usable:
        raise SignatureError("no usable secret configured")
    signer = None
    for secret in usable:  # every secret is compared: the time says nothing of which matched
        if hmac.compare_digest(got, hashlib.sha256(secret.encode("utf-8")).digest()):
            signer = signer or secret
    if signer is None:
        raise SignatureError("no signature matched")
    return signer


def _form(body: bytes) -> bytes:
    """Twilio's form part: each field name, sorted, followed by each of its values, sorted,
    run together (as Twilio's own RequestValidator builds it)."""
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return "".join(
        name + value for name in sorted(fields) for value in sorted(set(fields[name]))
    ).encode()


def _body_hash_covers(provider: Provider, body: bytes, url: str) -> bool:
    """Whether the signed URL carries the body's hash (Twilio's JSON bodies): then that
    hash must be the body's, and the form part is empty."""
    name = provider.body_hash_param
    if not name:
        return False
    sent = parse_qs(urlsplit(url).query, keep_blank_values=True).get(name)
    if not sent:
        return False
    if len(sent) != 1:
        raise SignatureError(f"malformed {name} parameter")
    digest = hashlib.sha256(body).hexdigest().encode()
    if not hmac.compare_digest(digest, sent[0].strip().lower().encode("utf-8", "replace")):
        raise SignatureError(f"the body's SHA-256 is not the URL's {name}")
    return True


def _content(
    provider: Provider,
    body: bytes,
    headers: Any,
    method: str,
    url: str,
    timestamp: str | None,
    msg_id: str | None,
    json_body: _JsonBody | None = None,
) -> bytes:
    """The bytes the sender signed, built from the declaration's template."""
    template = provider.signed_content
    if template == "{body}":
        return body
    out = bytearray()
    for part, arg in providers.compiled_template(template):
        if part == "":
            out += arg.encode()
        elif part == "body":
            out += body
        elif part == "timestamp":
            out += (timestamp or "").encode()
        elif part == "id":
            out += (msg_id or "").encode()
        elif part == "url":
            out += url.encode()
        elif part == "method":
            out += method.upper().encode()
        elif part == "form":
            if not _body_hash_covers(provider, body, url):
                out += _form(body)
        elif part == "header":
            out += _header(headers, arg).encode("latin-1", "replace")
        elif part == "json":
            json_body = json_body or _JsonBody(body)
            out += json_body.text(arg, "signed field").encode()
    return bytes(out)


# --------------------------------------------------------------------------- Ed25519


class Ed25519Verifier(KeyVerifier):
    """Standard Webhooks' v1a: an Ed25519 signature over the signed content, checked with
    the sender's public key (``whpk_`` + base64 of its 32 bytes)."""

    prefix = WHPK_PREFIX

    def check_secret(self, secret: str) -> None:
        key = _decode_prefixed(secret, self.prefix, "A Standard Webhooks public key")
        if len(key) != 32:
            raise ValueError(
                f"A Standard Webhooks public key is 32 bytes after '{self.prefix}', "
                f"this one is {len(key)}."
            )

    def keys(self, secrets: list[str]) -> list[Any]:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        found = []
        for secret in secrets:
            try:
                self.check_secret(secret)
                raw = _decode_prefixed(secret, self.prefix, "key")
                found.append(Ed25519PublicKey.from_public_bytes(raw))
            except ValueError:
                continue  # an unusable key signed nothing
        return found

    def jwk_keys(self, jwks: list[dict]) -> list[Any]:
        return _ed25519_jwk_keys(jwks)

    def verify(self, content: bytes, signatures: list[bytes], keys: list[Any]) -> bool:
        from cryptography.exceptions import InvalidSignature

        matched = False
        for key in keys:
            for signature in signatures:
                try:
                    key.verify(signature, content)
                    matched = True
                except InvalidSignature:
                    pass
        return matched


ED25519_V1A = Ed25519Verifier()


class Ed25519HexVerifier(Ed25519Verifier):
    """Discord's interactions: Ed25519 over the signed content, hex encoded, checked with the
    application's public key as 64 hex digits."""

    def check_secret(self, secret: str) -> None:
        self._raw(secret)

    @staticmethod
    def _raw(secret: str) -> bytes:
        try:
            raw = bytes.fromhex(secret.strip())
        except ValueError:
            raise ValueError(
                "An Ed25519 public key here is 64 hex digits; this is not hex."
            ) from None
        if len(raw) != 32:
            raise ValueError(
                f"An Ed25519 public key is 32 bytes (64 hex digits), this one is {len(raw)}."
            )
        return raw

    def keys(self, secrets: list[str]) -> list[Any]:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        found = []
        for secret in secrets:
            try:
                found.append(Ed25519PublicKey.from_public_bytes(self._raw(secret)))
            except ValueError:
                continue
        return found


ED25519_HEX = Ed25519HexVerifier()


class EcdsaP256Verifier(KeyVerifier):
    """SendGrid's signed Event Webhook: ECDSA P-256 with SHA-256, the signature base64 DER,
    the key the Verification Key SendGrid shows (base64 DER SubjectPublicKeyInfo)."""

    def _load(self, secret: str) -> Any:
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_der_public_key

        der = _b64decode("".join(secret.split()))
        if not der:
            raise ValueError("A verification key must be base64 (SendGrid's Verification Key).")
        try:
            key = load_der_public_key(der)
        except (ValueError, TypeError):
            raise ValueError(
                "A verification key must be a base64 DER public key (SendGrid's Verification "
                "Key); this one does not load."
            ) from None
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise ValueError("A verification key must be an ECDSA P-256 public key.")
        return key

    def check_secret(self, secret: str) -> None:
        self._load(secret)

    def keys(self, secrets: list[str]) -> list[Any]:
        found = []
        for secret in secrets:
            try:
                found.append(self._load(secret))
            except ValueError:
                continue
        return found

    def verify(self, content: bytes, signatures: list[bytes], keys: list[Any]) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        matched = False
        for key in keys:
            for signature in signatures:
                try:
                    key.verify(signature, content, ec.ECDSA(hashes.SHA256()))
                    matched = True
                except (InvalidSignature, ValueError):
                    pass
        return matched


ECDSA_P256 = EcdsaP256Verifier()


class BasicAuthVerifier(KeyVerifier):
    """Postmark's webhooks carry no signature: the credentials written in the webhook URL
    arrive as ``Authorization: Basic``; they are compared with the route's USER:PASSWORD in
    constant time."""

    def check_secret(self, secret: str) -> None:
        user, colon, password = secret.partition(":")
        if not colon or not user or not password:
            raise ValueError("A basic-auth secret is USER:PASSWORD, both parts not empty.")

    def keys(self, secrets: list[str]) -> list[Any]:
        return [s.encode("utf-8") for s in secrets if ":" in s]

    def verify(self, content: bytes, signatures: list[bytes], keys: list[Any]) -> bool:
        matched = False
        for key in keys:
            for sent in signatures:
                matched |= hmac.compare_digest(key, sent)
        return matched


BASIC_AUTH = BasicAuthVerifier()


# --------------------------------------------------------------------------- keys from a URL


class KeysUnavailable(Exception):
    """A route's keys could not be fetched from its ``jwks_url``: the sender hears 503 and
    retries; ``reason`` is for the admin (no URL credentials, no stack trace)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class JwksCache:
    """Key sets fetched from routes' ``jwks_url``, per process: each kept ``ttl`` seconds
    (HUB_JWKS_CACHE_SECONDS), at most ``max_sets`` URLs (the oldest dropped first), each
    answer read no further than ``max_bytes`` (HUB_JWKS_MAX_BYTES). A signature no cached
    key verifies (a key the sender rotated in) fetches the set again, at most once per
    ``min_refresh`` seconds per URL, so forged requests cannot make the hub fetch at will.
    Fetches go through hub.http: the private-address guard, a timeout, no redirects."""

    def __init__(self) -> None:
        self.ttl = 3600.0
        self.max_bytes = 64 * 1024
        self.max_sets = 256
        self.min_refresh = 30.0
        self.timeout = 5.0
        self.fetches = 0  # how many fetches this process made (tests and metrics read it)
        self._sets: dict[str, tuple[float, list[dict]]] = {}
        self._lock = threading.Lock()

    def configure(self, *, ttl: float | None = None, max_bytes: int | None = None) -> None:
        if ttl is not None:
            self.ttl = float(ttl)
        if max_bytes is not None:
            self.max_bytes = int(max_bytes)

    def clear(self) -> None:
        with self._lock:
            self._sets.clear()

    def verify(self, verifier: KeyVerifier, url: str, content: bytes, sent: list[bytes]) -> bool:
        fetched_at, jwks = self._get(url, refresh=False)
        if verifier.verify(content, sent, verifier.jwk_keys(jwks)):
            return True
        if time.monotonic() - fetched_at < self.min_refresh:
            return False
        _, jwks = self._get(url, refresh=True)
        return verifier.verify(content, sent, verifier.jwk_keys(jwks))

    def _get(self, url: str, refresh: bool) -> tuple[float, list[dict]]:
        now = time.monotonic()
        with self._lock:
            found = self._sets.get(url)
        if found is not None and not refresh and now - found[0] < self.ttl:
            return found
        keys = self._fetch(url)
        entry = (time.monotonic(), keys)
        with self._lock:
            self._sets.pop(url, None)
            while len(self._sets) >= self.max_sets:
                self._sets.pop(next(iter(self._sets)))
            self._sets[url] = entry
        return entry

    def _fetch(self, url: str) -> list[dict]:
        import logging

        from hub import http
        from hub.connectors import ConnectorError, StepContext

        host = urlsplit(url).hostname or "?"
        ctx = StepContext(
            event_id="",
            route="(jwks)",
            step_index=0,
            payload=None,
            outputs=[],
            logger=logging.getLogger("hub.signatures"),
            deadline=time.monotonic() + self.timeout,
            max_response_bytes=self.max_bytes,
        )
        self.fetches += 1
        try:
            response = http.request(ctx, "GET", url, timeout=self.timeout)
            document = response.json()
        except ConnectorError as exc:
            raise KeysUnavailable(f"the key set at {host} could not be fetched: {exc}") from None
        except ValueError:
            raise KeysUnavailable(f"the key set at {host} is not JSON") from None
        keys = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(keys, list):
            raise KeysUnavailable(f"the key set at {host} has no keys list")
        return [k for k in keys if isinstance(k, dict)]


JWKS = JwksCache()


def _b64url(value: Any) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


def _ed25519_jwk_keys(jwks: list[dict]) -> list[Any]:
    """The Ed25519 public keys of a JWKS (kty OKP, crv Ed25519, x); any other key is
    ignored: a key set cannot switch the algorithm."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    found = []
    for jwk in jwks:
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue
        if jwk.get("use", "sig") != "sig":
            continue
        raw = _b64url(jwk.get("x"))
        if raw is None or len(raw) != 32:
            continue
        found.append(Ed25519PublicKey.from_public_bytes(raw))
    return found


# --------------------------------------------------------------------------- sign


def sign(
    scheme: str,
    *,
    body: bytes,
    secret: str,
    timestamp: int | None = None,
    msg_id: str | None = None,
    options: dict | None = None,
    method: str = "POST",
    url: str = "",
) -> dict[str, str]:
    """The headers a sender of this scheme would send (its HMAC signature).

    Used by tests and by the outbound forward connector (Standard Webhooks). ``timestamp``
    defaults to now and ``msg_id`` to a random ``msg_...`` id; both are ignored by schemes
    that do not sign them. Raises ValueError for a bad secret or options.
    """
    provider = configured(scheme, options)
    validate_secret(scheme, secret)
    return sign_with(
        provider,
        body=body,
        secret=secret,
        timestamp=timestamp,
        msg_id=msg_id,
        method=method,
        url=url,
    )


def sign_with(
    provider: Provider,
    *,
    body: bytes,
    secret: str,
    timestamp: int | None = None,
    msg_id: str | None = None,
    method: str = "POST",
    url: str = "",
) -> dict[str, str]:
    """The headers any declaration's sender would send: its HMAC over the signed content."""
    if provider.algorithm is None:
        raise ValueError(f"{provider.name!r} is verified with public keys; the hub cannot sign it.")
    if provider.signature_field:
        raise ValueError(f"{provider.name!r} signs inside its JSON body; the hub cannot add it.")
    if provider.algorithm == providers.TOKEN:
        return {provider.signature_headers[0]: provider.prefix + secret}
    key = _hmac_key(provider, secret)
    body = bytes(body)
    ts = str(int(time.time()) if timestamp is None else int(timestamp))
    headers: dict[str, str] = {}
    if provider.signed_id_headers:
        msg_id = msg_id or f"msg_{_random.token_hex(12)}"
        headers[provider.id_headers[0]] = msg_id
    rule = provider.timestamp
    if rule is not None and rule.header:
        headers[rule.header] = ts
    content = _content(provider, body, headers, method, url, ts, msg_id)
    mac = _mac(key, content, provider.algorithm)
    encoded = mac.hex() if provider.encoding == "hex" else base64.b64encode(mac).decode("ascii")
    listing = provider.signature_list
    if listing is None:
        value = provider.prefix + encoded
    else:
        value = f"{listing.versions[0]}{listing.pair}{encoded}"
        if rule is not None and rule.signature_key:
            value = f"{rule.signature_key}{listing.pair}{ts}{listing.separator}{value}"
    headers[provider.signature_headers[0]] = value
    return headers
