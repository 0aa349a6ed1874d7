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
import secrets as _random
import time
from collections.abc import Callable
from functools import cache
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

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
__all__ = ["DEFAULT_TOLERANCE", "MAX_TOLERANCE", "SCHEMES", "SignatureError", "verify"]

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
    act on. What a provider takes follows from its declaration: ``tolerance`` when it has a
    timestamp, ``header``/``algorithm``/``encoding``/``prefix`` when it is configurable.
    """
    provider = provider_of(scheme)
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(
            f"Options for scheme {scheme!r} must be a JSON object, not {type(options).__name__}."
        )
    allowed = providers.route_options(provider)
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
    if provider.signs_url and options.get("url") is not None:
        result["url"] = _signed_url(options["url"])
    return result


def _signed_url(url: Any) -> str:
    """The route's ``url`` option: the URL the sender was given (and signs), exactly."""
    if not isinstance(url, str) or not url.startswith(("https://", "http://")) or len(url) > 2000:
        raise ValueError(
            "Option 'url' must be the URL the provider was given for this route, "
            f"starting with https:// (at most 2000 characters), got {str(url)[:80]!r}."
        )
    if any(c.isspace() for c in url):
        raise ValueError("Option 'url' must not contain spaces.")
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
    """The route's declaration with its options applied (validated, cached per options)."""
    provider = provider_of(scheme)
    if not options and not provider.options:
        if provider.timestamp is None:
            return provider
        return providers.registry().configured(scheme, {"tolerance": provider.timestamp.tolerance})
    return providers.registry().configured(scheme, validate_options(scheme, options))


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
    # hmac.digest is OpenSSL's one-shot HMAC: a third of the cost of hmac.new(...).digest().
    return hmac.digest(key, message, algorithm)


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
) -> None:
    """Raise SignatureError/StaleSignatureError unless one of ``secrets`` signed the request.

    Several secrets allow rotation. ``headers`` is any mapping; names are matched without
    regard to case. Bad ``options`` or an unknown scheme are configuration errors and raise
    ValueError.
    """
    if type(body) is not bytes:
        if not isinstance(body, bytearray | memoryview):
            raise TypeError("body must be the raw request bytes")
        body = bytes(body)
    provider = configured(scheme, options)
    if provider.signs_url and options and options.get("url"):
        url = options["url"]  # what the sender was told, not what a proxy may have rewritten
    check(provider, SignedRequest(body, headers, method, url), secrets, now=now)


def check(
    provider: Provider, request: SignedRequest, secrets: list[str], *, now: float | None = None
) -> None:
    """The interpreter: verify ``request`` against any declaration.

    In order: the headers it needs are present, its signatures parse, the timestamp is in
    the window (only where the provider has one), then each secret's signature is computed
    over the signed content and compared with every signature sent, in constant time.
    """
    if isinstance(secrets, (str, bytes)):  # noqa: UP038 - the tuple form is the faster
        raise TypeError("secrets must be a list of strings, not a single string")
    headers = request.headers
    body = _JsonBody(request.body)
    if provider.signature_field:
        sig_name = f"body field {provider.signature_field}"
        sig_value = body.text(provider.signature_field, "signature")
    else:
        sig_name, sig_value = _first_header(headers, provider.signature_headers)
    if provider.algorithm == providers.TOKEN:
        _check_token(provider, sig_value, secrets)
        return
    rule = provider.timestamp
    ts_raw = _header(headers, rule.header) if rule is not None and rule.header else None
    id_value = _first_header(headers, provider.id_headers)[1] if provider.signs_id else None
    if provider.code is None:
        code_wanted, hmac_wanted = False, True
    else:  # which kinds of signature to look for follows from the kinds of secret given
        kinds = {_is_code_secret(provider, s) for s in secrets if isinstance(s, str)}
        code_wanted = True in kinds
        hmac_wanted = provider.algorithm is not None and (not secrets or False in kinds)
    sent_hmac, sent_code, listed_ts = _signatures(
        provider, sig_name, sig_value, hmac_wanted, code_wanted
    )
    if rule is not None:
        if rule.signature_key:
            if len(listed_ts) != 1:
                raise SignatureError(f"malformed {sig_name} header")
            ts_raw = listed_ts[0]
        elif rule.body_field:
            ts_raw = body.text(rule.body_field, "timestamp")
        assert ts_raw is not None
        ts = _parse_timestamp(ts_raw)
        _check_window(ts / 1000 if rule.unit == "ms" else ts, now, rule.tolerance)
    if not secrets:
        raise SignatureError("no secret configured")
    content = _content(provider, request, ts_raw, id_value, body)
    matched = False
    usable = False
    if hmac_wanted:
        keys = []
        code = provider.code
        for secret in secrets:
            if code is not None and isinstance(secret, str) and _is_code_secret(provider, secret):
                continue
            try:
                keys.append(_hmac_key(provider, secret))
            except (ValueError, TypeError, AttributeError):
                continue  # an unusable secret cannot have signed anything
        if keys:
            usable = True
            algorithm = provider.algorithm or "sha256"
            macs = [_mac(key, content, algorithm) for key in keys]
            expected = [m.hex().encode() for m in macs] if provider.encoding == "hex" else macs
            matched |= _any_match(sent_hmac, expected)
    if code_wanted:
        verifier = key_verifier(provider.code.verifier)  # type: ignore[union-attr]
        keys = verifier.keys(
            [s for s in secrets if isinstance(s, str) and _is_code_secret(provider, s)]
        )
        if keys:
            usable = True
            matched |= bool(sent_code) and verifier.verify(content, sent_code, keys)
    if not usable:
        raise SignatureError("no usable secret configured")
    if not matched:
        raise SignatureError("no signature matched")


def _signatures(
    provider: Provider, name: str, value: str, hmac_wanted: bool, code_wanted: bool
) -> tuple[list[bytes], list[bytes], list[str]]:
    """The signatures a header carries for the HMAC and for the code, and any timestamps
    listed beside them (Stripe's ``t=``)."""
    listing = provider.signature_list
    code = provider.code
    configured_hint = bool(provider.options)  # the generic hmac: the admin set the prefix
    if listing is None:
        if provider.prefix:
            if value[: len(provider.prefix)].lower() != provider.prefix.lower():
                if configured_hint:
                    raise SignatureError(f"header {name} lacks the configured prefix")
                raise SignatureError(f"malformed {name} header")
            value = value[len(provider.prefix) :].strip()
            if not value:
                if configured_hint:
                    raise SignatureError(f"empty signature in header {name}")
                raise SignatureError(f"malformed {name} header")
        sent_hmac: list[bytes] = []
        sent_code: list[bytes] = []
        if hmac_wanted or not code_wanted:
            decoded = _decoded(value, provider.encoding)
            if decoded is None:
                if configured_hint:
                    raise SignatureError(f"malformed header {name} (not base64)")
                raise SignatureError(f"malformed {name} header (not base64)")
            sent_hmac.append(decoded)
        if code_wanted and code is not None:
            decoded = _decoded(value, code.encoding)
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
            decoded = _decoded(item, code.encoding)  # type: ignore[union-attr]
            if decoded is not None:
                sent_code.append(decoded)
    if ts_key is not None and len(stamps) != 1:
        raise SignatureError(f"malformed {name} header")
    if not seen:
        wanted = [*(hmac_versions if hmac_wanted else ()), *(code_versions if code_wanted else ())]
        raise SignatureError(f"no {' or '.join(wanted) or 'known'} signature in {name} header")
    return sent_hmac, sent_code, stamps


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


def _check_token(provider: Provider, sent: str, secrets: list[str]) -> None:
    """A static token (GitLab's): the header is the secret. Digests of both are compared, so
    the time taken says nothing about the secret, not even its length."""
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
    expected = [hashlib.sha256(s.encode("utf-8")).digest() for s in usable]
    if not _any_match([got], expected):
        raise SignatureError("no signature matched")


def _form(body: bytes) -> bytes:
    """Twilio's form part: each field name and value, sorted by name, run together."""
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    return "".join(k + v for k, v in sorted(pairs, key=lambda kv: kv[0])).encode()


def _content(
    provider: Provider,
    request: SignedRequest,
    timestamp: str | None,
    msg_id: str | None,
    body: _JsonBody | None = None,
) -> bytes:
    """The bytes the sender signed, built from the declaration's template."""
    template = provider.signed_content
    if template == "{body}":
        return request.body
    out = bytearray()
    for part, arg in providers.compiled_template(template):
        if part == "":
            out += arg.encode()
        elif part == "body":
            out += request.body
        elif part == "timestamp":
            out += (timestamp or "").encode()
        elif part == "id":
            out += (msg_id or "").encode()
        elif part == "url":
            out += request.url.encode()
        elif part == "method":
            out += request.method.upper().encode()
        elif part == "form":
            out += _form(request.body)
        elif part == "header":
            out += _header(request.headers, arg).encode("latin-1", "replace")
        elif part == "json":
            out += (body or _JsonBody(request.body)).text(arg, "signed field").encode()
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
    content = _content(provider, SignedRequest(body, headers, method, url), ts, msg_id)
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
