"""Providers: how each webhook sender signs its requests, declared as data.

A provider is a ``Provider`` value: where the signature is (headers), what it covers (the
signed content, a small template), how it is made (algorithm, encoding, prefix, how several
signatures share one header), the timestamp rule, the delivery-id headers, the secret's form,
a challenge handshake and what to redact. One interpreter (``hub.signatures``) verifies any
declaration; code is needed only where a declaration cannot say it (asymmetric keys, JWT),
and then a provider names a ``KeyVerifier`` beside or instead of its HMAC.

Built-in providers (``hub.provider_catalog``) and third-party ones load through one path:
the entry point group ``hub.providers``, each entry naming a ``Provider`` (or a module of
them). A name already taken is refused with a log line, never a crash. The set is the same
for every app of a process (it is what is installed), so it is loaded once and kept here.

Kit level, like ``hub.signatures``: pydantic and the standard library only; no Flask, no
database. Nothing a sender sends can choose a provider, an algorithm or a rule: the route's
saved scheme picks the declaration, the declaration fixes the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import logging
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from functools import cache, cached_property
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hub.connectors import lookup_path

ENTRY_POINT_GROUP = "hub.providers"
DEFAULT_TOLERANCE = 300  # seconds
#: Longest tolerance accepted: beyond a day the timestamp no longer guards against replays.
MAX_TOLERANCE = 86400
ALGORITHMS = ("sha1", "sha256", "sha512")
#: Not an HMAC: the header carries the secret itself (GitLab's X-Gitlab-Token), compared in
#: constant time.
TOKEN = "token"
ENCODINGS = ("hex", "base64")
#: What a route's options may set on a configurable provider (the generic ``hmac``).
CONFIGURABLE = ("header", "algorithm", "encoding", "prefix")
#: The parts a signed-content template may name. ``{header:Name}`` is any request header,
#: ``{json:a.b}`` a field of the JSON body (Mailgun signs its body's signature.token).
TEMPLATE_FIELDS = ("body", "timestamp", "id", "url", "method", "form", "header", "json")
#: Template parts that take an argument after a colon.
_ARGUMENT_FIELDS = ("header", "json")
# A path into the JSON body: dotted names (``signature.token``), list indexes as digits.
_JSON_PATH = re.compile(r"^[A-Za-z0-9_$@-]+(\.[A-Za-z0-9_$@-]+){0,7}$")
WHSEC_PREFIX = "whsec_"

#: Built-in providers, loaded through the same path as third-party entry points.
BUILTIN_PROVIDERS = {
    name: f"hub.provider_catalog:{attr}"
    for name, attr in (
        ("standard-webhooks", "STANDARD_WEBHOOKS"),
        ("github", "GITHUB"),
        ("stripe", "STRIPE"),
        ("slack", "SLACK"),
        ("shopify", "SHOPIFY"),
        ("hmac", "HMAC"),
        # Providers that need code or a handshake.
        ("twilio", "TWILIO"),
        ("sendgrid", "SENDGRID"),
        ("discord", "DISCORD"),
        ("twitch", "TWITCH"),
        ("zoom", "ZOOM"),
        ("dropbox", "DROPBOX"),
        ("meta", "META"),
        ("postmark", "POSTMARK"),
        # HMAC-family senders.
        ("svix", "SVIX"),
        ("clerk", "CLERK"),
        ("resend", "RESEND"),
        ("gitlab", "GITLAB"),
        ("intercom", "INTERCOM"),
        ("typeform", "TYPEFORM"),
        ("linear", "LINEAR"),
        ("calendly", "CALENDLY"),
        ("pagerduty", "PAGERDUTY"),
        ("hubspot", "HUBSPOT"),
        ("paddle", "PADDLE"),
        ("square", "SQUARE"),
        ("mailgun", "MAILGUN"),
        ("sentry", "SENTRY"),
        ("vercel", "VERCEL"),
        ("lemon-squeezy", "LEMON_SQUEEZY"),
    )
}

#: Id header names too common to name a delivery on a route of another provider: proxies and
#: HTTP clients set them for their own reasons (Sentry's Request-ID counts on sentry routes).
GENERIC_ID_HEADERS = frozenset({"request-id", "x-request-id", "x-correlation-id"})
#: RFC 9110 token characters, the only ones allowed in a header name.
HEADER_NAME_CHARS = frozenset("!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits)
# Route rows keep the scheme in a String(32).
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def _json_path(value: str) -> str:
    if not _JSON_PATH.match(value or ""):
        raise ValueError(f"{value!r} is not a JSON path such as signature.token")
    return value


def body_field(payload: Any, path: str) -> Any:
    """The value at ``path`` (``a.b.0``) of a parsed JSON body, or None when it is not there:
    the connectors' own path rule (``lookup_path``), so a route's dedup path and a provider's
    body fields read a body alike."""
    try:
        return lookup_path(payload, path)
    except KeyError:
        return None


def _header_name(value: str) -> str:
    value = value.strip()
    if not value or not set(value) <= HEADER_NAME_CHARS:
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


class KeyVerifier:
    """Code for what a declaration cannot say: signatures checked with public keys.

    A provider names one (``code.verifier``, an import path) and the secrets that are its
    keys (``code.secret_prefix``, such as ``whpk_``). ``check_secret`` refuses a key that can
    never verify (when a route is saved); ``verify`` is given the signed content the
    declaration built, the signatures of ``code.versions`` (decoded by ``code.encoding``) and
    the route's keys of this kind, and says whether any key verifies any signature.

    Keys come from the route's secrets (``keys``) and, where the provider's code takes the
    ``jwks_url`` option, from a key set fetched from that URL (``jwk_keys``, cached by
    ``hub.signatures.JWKS``); ``verify`` is the same for both.
    """

    def check_secret(self, secret: str) -> None:  # pragma: no cover - contract
        raise NotImplementedError

    def keys(self, secrets: list[str]) -> list[Any]:
        """Key material for ``secrets``; an unusable secret is skipped (it signed nothing)."""
        return list(secrets)

    def jwk_keys(self, jwks: list[dict]) -> list[Any]:
        """Key material of this kind in a fetched JSON Web Key Set (a route's ``jwks_url``);
        keys of any other kind are ignored, so a key set cannot switch the algorithm."""
        return []

    def verify(self, content: bytes, signatures: list[bytes], keys: list[Any]) -> bool:
        raise NotImplementedError  # pragma: no cover - contract


class Timestamp(BaseModel):
    """Where the sender puts the time it signed, and how far from now it may be."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    header: str | None = Field(
        None, description="A header of its own, e.g. X-Slack-Request-Timestamp."
    )
    signature_key: str | None = Field(
        None, description="A key of the signature header's list, e.g. Stripe's t."
    )
    body_field: str | None = Field(
        None,
        description="A field of the JSON body (a dotted path), e.g. Linear's webhookTimestamp "
        "or Mailgun's signature.timestamp.",
    )
    unit: Literal["s", "ms", "rfc3339"] = Field(
        "s", description="Seconds or milliseconds since the epoch, or an RFC 3339 time (Twitch)."
    )
    tolerance: int = Field(DEFAULT_TOLERANCE, ge=1, le=MAX_TOLERANCE)

    @model_validator(mode="after")
    def _one_source(self) -> Timestamp:
        given = [x for x in (self.header, self.signature_key, self.body_field) if x]
        if len(given) != 1:
            raise ValueError(
                "a timestamp has exactly one source: header, signature_key or body_field"
            )
        if self.header:
            _header_name(self.header)
        if self.body_field:
            _json_path(self.body_field)
        return self


class SignatureList(BaseModel):
    """Several signatures in one header: ``t=..,v1=..,v1=..`` (separator ``,``, pair ``=``)
    or Standard Webhooks' ``v1,sig v1a,sig`` (separator space, pair ``,``). Only the listed
    ``versions`` are signatures; any other label is ignored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    separator: str = Field(",", min_length=1, max_length=1)
    pair: str = Field("=", min_length=1, max_length=1)
    versions: tuple[str, ...] = Field(("v1",), min_length=1)


class CodeRule(BaseModel):
    """A signature checked by code (``KeyVerifier``) instead of, or beside, the HMAC."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    verifier: str = Field(description="Import path of a KeyVerifier, module:attribute.")
    secret_prefix: str = Field(
        "", description="Secrets starting with this are its keys (all secrets when empty)."
    )
    versions: tuple[str, ...] = Field((), description="Labels of its signatures in a list.")
    encoding: Literal["hex", "base64"] = "base64"
    secret_text: str = Field(description="What its key is, for the docs' table.")
    options: tuple[Literal["jwks_url"], ...] = Field(
        (), description="Route options its verifier reads (jwks_url: keys fetched from a URL)."
    )


class Provider(BaseModel):
    """One sender's signature scheme, as data. See docs/providers.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="What a route's verify.scheme says: lower case, digits, -.")
    title: str
    docs_url: str = Field(description="The provider's own page on verifying its webhooks.")
    setup: str = Field(description="What to paste where in the provider's settings.")
    signature_headers: tuple[str, ...] = Field(
        (), description="Where the signature is, tried in order (or signature_field)."
    )
    signature_field: str | None = Field(
        None, description="Or a field of the JSON body (a dotted path): Mailgun's."
    )
    signed_content: str = Field(
        "{body}",
        description="What is signed: literal text and {body} {timestamp} {id} {url} {method} "
        "{form} {header:Name}.",
    )
    algorithm: Literal["sha1", "sha256", "sha512", "token"] | None = Field(
        "sha256",
        description="The HMAC's hash; token: the header is the secret itself (compared in "
        "constant time); None for a provider verified by code alone.",
    )
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = Field("", description="Text before a lone signature, e.g. sha256=.")
    signature_list: SignatureList | None = None
    timestamp: Timestamp | None = None
    id_headers: tuple[str, ...] = Field((), description="The delivery id, for deduplication.")
    id_field: str | None = Field(
        None,
        description="Or a field of the signed JSON body that names the delivery (a dotted "
        "path), e.g. Paddle's event_id; it comes before any header.",
    )
    secret: Literal["plain", "whsec"] = Field(
        "plain", description="plain: the bytes of the string; whsec: base64 after whsec_."
    )
    secret_text: str = Field("the signing secret, as shown", description="For the docs' table.")
    challenge: str | None = Field(None, description="A handshake kind of CHALLENGES.")
    redact: tuple[str, ...] = Field(
        (), description="Headers redacted in what is stored, beside the signature headers."
    )
    code: CodeRule | None = None
    body_hash_param: str | None = Field(
        None,
        description="A query parameter of the signed URL holding the body's SHA-256 (hex): "
        "when the URL has it, the body is covered by that hash, not by {form} (Twilio's JSON).",
    )
    options: tuple[Literal["header", "algorithm", "encoding", "prefix"], ...] = Field(
        (), description="What a route's verify.options may set (the generic hmac)."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("a provider's name is 1-32 lower-case letters, digits or '-'")
        return value

    @field_validator("signature_headers", "id_headers", "redact")
    @classmethod
    def _headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_header_name(v) for v in value)

    @field_validator("signature_field", "id_field")
    @classmethod
    def _paths(cls, value: str | None) -> str | None:
        return None if value is None else _json_path(value)

    @model_validator(mode="after")
    def _coherent(self) -> Provider:
        if bool(self.signature_headers) == bool(self.signature_field):
            raise ValueError(
                "a signature is in signature_headers or in signature_field, one of them"
            )
        if self.algorithm == TOKEN and (
            self.signature_list or self.timestamp or self.signed_content != "{body}" or self.code
        ):
            raise ValueError(
                "a token provider compares the header with the secret: no signed "
                "content, list, timestamp or code"
            )
        fields = template_fields(self.signed_content)
        if "timestamp" in fields and self.timestamp is None:
            raise ValueError("signed_content names {timestamp} but the provider has no timestamp")
        if "id" in fields and not self.id_headers:
            raise ValueError("signed_content names {id} but the provider has no id_headers")
        if self.algorithm is None and self.code is None:
            raise ValueError("a provider without an HMAC algorithm needs code (a KeyVerifier)")
        if self.timestamp and self.timestamp.signature_key and self.signature_list is None:
            raise ValueError("timestamp.signature_key needs a signature_list to find it in")
        if self.challenge is not None and self.challenge not in CHALLENGES:
            raise ValueError(
                f"unknown challenge {self.challenge!r}; known: {', '.join(sorted(CHALLENGES))}"
            )
        return self

    # ---- what the faces and the intake read

    @property
    def redacted(self) -> frozenset[str]:
        """Lower-cased names of the headers never stored or logged in the clear."""
        return frozenset(h.lower() for h in (*self.signature_headers, *self.redact))

    @cached_property
    def signs_id(self) -> bool:
        """Whether the signature covers the delivery id ({id} in the signed content)."""
        return "id" in template_fields(self.signed_content)

    @cached_property
    def signs_url(self) -> bool:
        """Whether the signature covers the URL the sender called ({url}: Twilio, Square,
        HubSpot): a route then gives that URL (its ``url`` option) or HUB_PUBLIC_URL does."""
        return "url" in template_fields(self.signed_content)

    @property
    def route_options(self) -> tuple[str, ...]:
        """Every option a route's ``verify.options`` may set for this provider: the generic
        hmac's, ``tolerance`` where there is a timestamp, ``url`` where the URL is signed,
        and what its challenge and its code read."""
        names = [*self.options, *(["tolerance"] if self.timestamp else [])]
        if self.signs_url:
            names.append("url")
        if self.challenge is not None:
            names += CHALLENGES[self.challenge].options
        if self.code is not None:
            names += self.code.options
        return tuple(names)

    @property
    def signed_id_headers(self) -> tuple[str, ...]:
        """The id headers the signature covers: they name a delivery before any other."""
        return self.id_headers if self.signs_id else ()

    @property
    def secret_description(self) -> str:
        text = self.secret_text
        if self.code is not None:
            text = (
                f"{text}; or {self.code.secret_text}" if self.algorithm else self.code.secret_text
            )
        return text


def template_fields(template: str) -> frozenset[str]:
    """The parts a signed-content template names; ValueError for an unknown one."""
    return _parse_template(template)[1]


@cache
def _parse_template(template: str) -> tuple[tuple[tuple[str, str], ...], frozenset[str]]:
    parts: list[tuple[str, str]] = []
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"signed_content {template!r} does not parse: {exc}") from None
    for literal, field, spec, conversion in parsed:
        if literal:
            parts.append(("", literal))
        if field is None:
            continue
        if conversion or (spec and field not in _ARGUMENT_FIELDS) or field not in TEMPLATE_FIELDS:
            raise ValueError(
                f"signed_content names {{{field}}}; known: "
                + " ".join("{" + f + "}" for f in TEMPLATE_FIELDS[:-2])
                + " {header:Name} {json:path}"
            )
        if field == "header":
            parts.append(("header", _header_name(spec or "")))
        elif field == "json":
            parts.append(("json", _json_path(spec or "")))
        else:
            parts.append((field, ""))
        names.add(field)
    return tuple(parts), frozenset(names)


def compiled_template(template: str) -> tuple[tuple[str, str], ...]:
    """The template as (part, argument) pairs; a literal is ("", text)."""
    return _parse_template(template)[0]


# --------------------------------------------------------------------------- challenges


class ChallengeRefused(Exception):
    """A handshake that must not be answered: its status and the sentence the sender hears
    (Meta's GET with a verify token that is not the route's)."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True)
class Handshake:
    """What a challenge may read: the decoded payload (a POST's body; a GET's query
    parameters), the headers, the route's verify options, and the secret that verified the
    request's signature (None when none did)."""

    payload: Any
    headers: Any = ()
    options: Mapping[str, Any] = dataclass_field(default_factory=dict)
    secret: str | None = None


@dataclass(frozen=True)
class Challenge:
    """A handshake kind: a request that proves the URL (or the receiver's knowledge of the
    secret), answered with what ``answer`` returns (a dict is JSON, a str is text/plain)
    and never run as an event. ``method`` POST: a signed request, answered once its
    signature verified; GET: an unsigned request, answered only on a route whose provider
    declares it, when it carries ``parameter``. ``options`` are route options it reads."""

    method: Literal["POST", "GET"]
    text: str
    answer: Callable[[Handshake], dict[str, Any] | str | None]
    parameter: str | None = None
    options: tuple[str, ...] = ()
    #: Whether its answer echoes text the sender chose (bounded by HUB_MAX_CHALLENGE_BYTES).
    echoes: bool = True


def _header_value(headers: Any, name: str) -> str | None:
    wanted = name.lower()
    items = headers.items() if hasattr(headers, "items") else headers
    for key, value in items:
        if isinstance(key, str) and key.lower() == wanted:
            return value
    return None


def _slack_url_verification(shake: Handshake) -> dict[str, str] | None:
    payload = shake.payload
    if (
        isinstance(payload, dict)
        and payload.get("type") == "url_verification"
        and isinstance(payload.get("challenge"), str)
    ):
        return {"challenge": payload["challenge"]}
    return None


def _discord_ping(shake: Handshake) -> dict[str, int] | None:
    payload = shake.payload
    if isinstance(payload, dict) and payload.get("type") == 1 and payload.get("type") is not True:
        return {"type": 1}  # PONG
    return None


def _twitch_verification(shake: Handshake) -> str | None:
    kind = _header_value(shake.headers, "Twitch-Eventsub-Message-Type")
    payload = shake.payload
    if (
        kind == "webhook_callback_verification"
        and isinstance(payload, dict)
        and isinstance(payload.get("challenge"), str)
    ):
        return payload["challenge"]
    return None


def _zoom_url_validation(shake: Handshake) -> dict[str, str] | None:
    payload = shake.payload
    if not (isinstance(payload, dict) and payload.get("event") == "endpoint.url_validation"):
        return None
    inner = payload.get("payload")
    token = inner.get("plainToken") if isinstance(inner, dict) else None
    if not isinstance(token, str) or shake.secret is None:
        return None
    encrypted = hmac.new(shake.secret.encode(), token.encode(), hashlib.sha256).hexdigest()
    return {"plainToken": token, "encryptedToken": encrypted}


def _dropbox_challenge(shake: Handshake) -> str | None:
    value = shake.payload.get("challenge") if isinstance(shake.payload, Mapping) else None
    return value if isinstance(value, str) and value else None


def _meta_verify_token(shake: Handshake) -> str | None:
    args = shake.payload if isinstance(shake.payload, Mapping) else {}
    if args.get("hub.mode") != "subscribe":
        return None
    expected = shake.options.get("verify_token")
    given = args.get("hub.verify_token")
    challenge = args.get("hub.challenge")
    if not isinstance(expected, str) or not expected:
        raise ChallengeRefused(
            403,
            "This route has no verify token: set its verify option verify_token",
            "no_verify_token",
        )
    if not isinstance(given, str) or not hmac.compare_digest(
        given.encode("utf-8", "replace"), expected.encode("utf-8")
    ):
        raise ChallengeRefused(
            403, "hub.verify_token is not this route's verify token", "bad_verify_token"
        )
    if not isinstance(challenge, str) or not challenge:
        raise ChallengeRefused(400, "hub.challenge is missing", "bad_challenge")
    return challenge


#: Handshakes by kind. None from ``answer``: an ordinary event (or, for a GET, the hub's
#: usual 405).
CHALLENGES: dict[str, Challenge] = {
    "slack-url-verification": Challenge(
        "POST", "url_verification: its challenge is answered", _slack_url_verification
    ),
    "discord-ping": Challenge(
        "POST", 'PING {"type": 1}: answered {"type": 1} once verified', _discord_ping, echoes=False
    ),
    "twitch-verification": Challenge(
        "POST",
        "webhook_callback_verification: its challenge is answered as text once verified",
        _twitch_verification,
    ),
    "zoom-url-validation": Challenge(
        "POST",
        "endpoint.url_validation: plainToken and its HMAC (encryptedToken) once verified",
        _zoom_url_validation,
    ),
    "dropbox-challenge": Challenge(
        "GET", "GET ?challenge=X: X is answered as text", _dropbox_challenge, "challenge"
    ),
    "meta-verify-token": Challenge(
        "GET",
        "GET ?hub.mode=subscribe&hub.verify_token=T&hub.challenge=C: C, when T is the route's "
        "verify_token",
        _meta_verify_token,
        "hub.mode",
        ("verify_token",),
    ),
}
CHALLENGE_TEXT = {kind: challenge.text for kind, challenge in CHALLENGES.items()}


def challenge_of(provider: Provider | None, method: str = "POST") -> Challenge | None:
    """The provider's handshake if it is one for requests of ``method``."""
    if provider is None or provider.challenge is None:
        return None
    found = CHALLENGES[provider.challenge]
    return found if found.method == method.upper() else None


def answer_challenge(
    provider: Provider | None,
    payload: Any,
    headers: Any = (),
    *,
    options: Mapping[str, Any] | None = None,
    secret: str | None = None,
    method: str = "POST",
) -> dict[str, Any] | str | None:
    """The answer to the provider's handshake if this request is one, else None;
    ChallengeRefused for a handshake that must be refused."""
    found = challenge_of(provider, method)
    if found is None:
        return None
    return found.answer(Handshake(payload, headers, options or {}, secret))


# --------------------------------------------------------------------------- the registry


class ProviderRegistry:
    """The providers known to this process, by name, in the order they loaded."""

    def __init__(self) -> None:
        self._providers: dict[str, Provider] = {}
        self._sources: dict[str, str] = {}
        self._configured: dict[tuple[str, tuple], Provider] = {}
        self._id_headers: tuple[str, ...] | None = None  # id_headers(), until a register

    def register(self, provider: Provider, source: str = "code") -> bool:
        """Add ``provider``; False (and nothing changes) if its name is taken."""
        if not isinstance(provider, Provider):
            raise TypeError(f"{provider!r} is not a Provider")
        if provider.name in self._providers:
            return False
        self._providers[provider.name] = provider
        self._sources[provider.name] = source
        self._id_headers = None
        return True

    def source(self, name: str) -> str:
        return self._sources[name]

    def get(self, name: str) -> Provider | None:
        return self._providers.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(self._providers)

    def __contains__(self, name: object) -> bool:
        return name in self._providers

    def __iter__(self) -> Iterator[Provider]:
        return iter(tuple(self._providers.values()))

    def id_headers(self) -> tuple[str, ...]:
        """Every provider's delivery-id headers, once each, in load order: a key route that
        relays a provider's webhooks still dedups by its id. Worked out once per set of
        providers: every webhook of a route with a dedup window asks."""
        if self._id_headers is None:
            seen: dict[str, None] = {}
            for provider in self._providers.values():
                for header in provider.id_headers:
                    if header.lower() not in GENERIC_ID_HEADERS:
                        seen.setdefault(header, None)
            self._id_headers = tuple(seen)
        return self._id_headers

    def configured(
        self, name: str, options: dict[str, Any], validated: Callable[[], dict[str, Any]]
    ) -> Provider:
        """The provider with a route's options applied, kept per options as saved, so a
        request pays for a dict lookup; ``validated()`` (ValueError for bad options) runs
        once per distinct options."""
        try:
            key: tuple | None = (name, tuple(sorted(options.items())))
            hash(key)
        except TypeError:  # unhashable values: not options any provider takes
            key = None
        found = self._configured.get(key) if key is not None else None
        if found is None:
            found = apply_options(self._providers[name], validated())
            if key is not None and len(self._configured) < 4096:
                self._configured[key] = found
        return found


def apply_options(provider: Provider, options: dict[str, Any]) -> Provider:
    update: dict[str, Any] = {}
    if "header" in options:
        update["signature_headers"] = (options["header"],)
    for field in ("algorithm", "encoding", "prefix"):
        if field in options:
            update[field] = options[field]
    # ``url`` is not the declaration's: ``hub.signatures.verify`` reads it from the options.
    if "tolerance" in options and provider.timestamp is not None:
        update["timestamp"] = provider.timestamp.model_copy(
            update={"tolerance": options["tolerance"]}
        )
    return provider.model_copy(update=update) if update else provider


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _declared(obj: Any) -> list[Provider]:
    if isinstance(obj, Provider):
        return [obj]
    if isinstance(obj, list | tuple):
        return [p for p in obj if isinstance(p, Provider)]
    return [v for v in vars(obj).values() if isinstance(v, Provider)]


def load_providers(
    logger: logging.Logger | None = None, *, plugins: bool = True
) -> ProviderRegistry:
    """A registry of the built-ins and the ``hub.providers`` entry points.

    A provider that fails to import or to validate is logged and skipped; one whose name is
    taken (a built-in's, or an earlier package's) is refused with a sentence saying by whom.
    """
    log = logger or logging.getLogger("hub.providers")
    sources: list[tuple[str, str]] = list(BUILTIN_PROVIDERS.items())
    if plugins:
        sources += [(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    registry = ProviderRegistry()
    for name, spec in sources:
        try:
            declared = _declared(_load_object(spec))
        except Exception as exc:  # a broken plugin is reported, not fatal
            log.error("provider %s (%s) failed to load: %s", name, spec, exc)
            continue
        if not declared:
            log.error("provider %s (%s) declares no Provider", name, spec)
        for provider in declared:
            if provider.code is not None and not _verifier_loads(provider.code.verifier):
                log.error(
                    "provider %r (%s) is not loaded: its verifier %s is not a KeyVerifier "
                    "that imports",
                    provider.name,
                    spec,
                    provider.code.verifier,
                )
                continue
            if not registry.register(provider, spec):
                log.error(
                    "provider %r from %s is not loaded: the name is taken by %s",
                    provider.name,
                    spec,
                    registry.source(provider.name),
                )
    return registry


def _verifier_loads(spec: str) -> bool:
    try:
        obj = _load_object(spec)
    except Exception:
        return False
    return isinstance(obj, KeyVerifier) or (isinstance(obj, type) and issubclass(obj, KeyVerifier))


@cache
def registry() -> ProviderRegistry:
    """The providers of this process, loaded once (``reload`` after installing one)."""
    return load_providers()


def reload() -> ProviderRegistry:
    registry.cache_clear()
    return registry()


def get(name: str) -> Provider | None:
    return registry().get(name)


# --------------------------------------------------------------------------- what faces show


def describe(provider: Provider) -> dict[str, Any]:
    """A provider as the CLI, the admin API and the docs show it (one shape for all)."""
    rule = provider.timestamp
    where = None
    if rule is not None:
        where = rule.header or (rule.signature_key and f"{rule.signature_key}= in the signature")
        where = where or f"body field {rule.body_field}"
    return {
        "name": provider.name,
        "title": provider.title,
        "docs_url": provider.docs_url,
        "setup": provider.setup,
        # The generic hmac's header is the route's own option; Mailgun's is in the body.
        "signature_headers": []
        if "header" in provider.options
        else list(provider.signature_headers) or [f"body field {provider.signature_field}"],
        "secret": provider.secret_description,
        "id_headers": [
            *([f"body field {provider.id_field}"] if provider.id_field else []),
            *provider.id_headers,
        ],
        "timestamp": where,
        "tolerance": rule.tolerance if rule is not None else None,
        "challenge": provider.challenge,
        "options": list(provider.route_options),
    }


# --------------------------------------------------------------------------- the docs table

README_START = "<!-- providers table: generated by `python -m hub.providers --readme` -->"
README_END = "<!-- end of providers table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(providers: Iterable[Provider]) -> str:
    """The Markdown table of docs/providers.md, one row per provider."""
    rows = [
        "| provider | what to paste where | signature header(s) | secret | dedup id | challenge |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in providers:
        headers = ", ".join(f"`{h}`" for h in p.signature_headers)
        if p.signature_field:
            headers = f"body field `{p.signature_field}`"
        if p.options:
            headers = "the route's `header` option"
        rows.append(
            "| "
            + " | ".join(
                _cell(x)
                for x in (
                    f"[`{p.name}`]({p.docs_url}) {p.title}",
                    p.setup,
                    headers,
                    p.secret_description,
                    ", ".join(
                        [
                            *([f"body field `{p.id_field}`"] if p.id_field else []),
                            *(f"`{h}`" for h in p.id_headers),
                        ]
                    )
                    or "none (use `dedup_path`)",
                    CHALLENGE_TEXT.get(p.challenge or "", "none"),
                )
            )
            + " |"
        )
    return "\n".join(rows)


def readme_section(providers: Iterable[Provider]) -> str:
    return f"{README_START}\n\n{table(providers)}\n\n{README_END}"


def write_readme(path: str, providers: Iterable[Provider]) -> bool:
    """Replace the table between the markers of ``path``; True when the file changed."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: the providers table markers are missing")
    new = text[:start] + readme_section(providers) + text[end + len(README_END) :]
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(new)
    return True


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hub.providers")
    parser.add_argument("--readme", metavar="PATH", help="rewrite the providers table in PATH")
    args = parser.parse_args(argv)
    if args.readme:  # the built-ins only: the docs do not depend on what is installed
        changed = write_readme(args.readme, load_providers(plugins=False))
        print(f"{args.readme}: {'updated' if changed else 'already up to date'}")
    else:
        print(table(registry()))
    return 0


if __name__ == "__main__":
    # Run as a script this file is __main__, a second copy whose Provider class is not the
    # catalog's: the real module does the work.
    from hub.providers import main as _main

    raise SystemExit(_main())
