"""Inbound: what happens to a request for /hooks/<route>, /api/process or /api/chat.

The web face (hub/web/hooks.py, hub/web/seed.py) reads Flask's request into an ``Incoming``
value and answers with what comes back: ``accept`` gives an ``Accepted`` event or an
``Answer`` (a refusal, or a repeated delivery's reply); ``enqueue`` and ``run_sync`` take
an accepted event on. Nothing here reads Flask's request globals; what log lines and
metrics need to know (the event being written, the route found) is bound with
``hub.ops.logs.bind`` in the caller's scope, which the web face opens per request.

Every request that reaches these URLs becomes an ``events`` row, accepted or turned away,
so an admin can always see who knocked and why they were refused. A refusal costs little:
the route and an API key are checked before the body is read, a refused request keeps its
body's size and a short prefix, not the body, and its headers are capped. A remote address
whose requests keep being refused is answered 429 before any other work, unlogged, until
its window ends; a request carrying a valid key still passes.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flask import current_app
from sqlalchemy import (
    Connection,
    Row,
    bindparam,
    delete,
    null,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.orm import Session
from werkzeug.datastructures import Headers

from hub import providers, rates, signatures
from hub.connectors import lookup_path
from hub.ops import logs, metrics, redact
from hub.services import (
    breaker,
    delivery,
    keys,
    ordering,
    payload_schema,
    pipeline,
    ratelimit,
    writer,
)
from hub.services import routes as route_store
from hub.services.delivery import sync_lease
from hub.services.templating import TemplateLimits
from hub.store import crypto
from hub.store.db import get_db, get_session
from hub.store.groupcommit import row_of, update_by_id
from hub.store.models import (
    Attempt,
    DedupKey,
    Delivery,
    Event,
    EventStatus,
    Route,
    first_delivery_id,
    fresh,
    lane_of,
    may_be_original,
    new_delivery_id,
    new_event_id,
    utcnow,
)

log = logging.getLogger("hub.ingest")

# Auth modes whose key is checked before the body is read: a stranger costs no body read.
KEY_FIRST = ("key", "key+signature")
# Name of the entry that says a refused or accepted request's headers were cut.
HEADERS_CUT = redact.HEADERS_CUT
# Seconds a sender is told to wait while the first copy of its delivery is still running.
IN_PROGRESS_RETRY_AFTER = 2
# Seconds a sender is told to wait when its sync route already runs its most requests.
SYNC_BUSY_RETRY_AFTER = 2
# Seconds a sender is told to wait when its keys (a route's jwks_url) could not be fetched.
KEYS_RETRY_AFTER = 30
# The remote address of a test event an admin sent from the dashboard, before the key's
# prefix: no socket address looks like it, so a sender cannot pass for a test.
TEST_SENDER = "dashboard:"

# HTTP status of a sync run that did not deliver, by the failure's code; any other is 502.
FAILURE_STATUS = {
    "timeout": 504,
    "bad_input": 422,  # the sender's payload doesn't fit the step
    # The sender's payload made a step's template too slow or too large.
    "template_limit": 422,
    "not_configured": 500,
    "connector_bug": 500,
    "bad_config": 500,
    "internal_error": 500,
}


class Rejected(Exception):
    """A request turned away: its answer, and the cause kept on its event row."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        detail: str | None = None,
        fields: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.code = code or reason
        self.headers = headers or {}
        self.detail = detail or message
        # More of the answer's JSON beside "error" and "code" (a schema mismatch's path).
        self.fields = fields or {}


class AddressThrottled(Exception):
    """The remote address spent its refusals for this window: 429, unread and unlogged."""

    def __init__(self, retry_after: int):
        super().__init__(retry_after)
        self.retry_after = retry_after


def _no_body(_size: int) -> bytes:
    return b""


@dataclass(frozen=True)
class Incoming:
    """A request as intake sees it, its parts as values: what the web face read from Flask's
    request, or what a caller without one (a test, a tool) writes itself.

    ``headers`` is kept as a case-insensitive ``Headers``; ``query_string`` is the raw query
    (latin-1 decoded); ``read(n)`` returns at most ``n`` bytes of the body (the request's
    stream: intake never asks it for more than HUB_MAX_BODY_BYTES + 1).
    """

    method: str
    route_name: str
    path: str
    headers: Headers | Mapping[str, str] | Iterable[tuple[str, str]] = ()
    args: Mapping[str, str] = field(default_factory=dict)
    query_string: str = ""
    remote_addr: str | None = None
    request_id: str | None = None
    content_type: str | None = None
    content_length: int | None = None
    read: Callable[[int], bytes] = _no_body
    # A test event sent by this signed-in admin (the dashboard's form): accepted as their
    # key, without the route's key or signature; every other check and limit applies.
    admin: keys.KeyInfo | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.headers, Headers):
            object.__setattr__(self, "headers", Headers(self.headers))

    @property
    def key(self) -> str | None:
        return key_from(self.headers, self.args)


@dataclass
class Reception:
    """What intake learns about one request while it checks it."""

    incoming: Incoming
    event: Event
    # The presented key as read from the database (or why it was refused), read once; or as
    # this process remembered it (``key_unconfirmed``), read before anything that can't wait
    # for the event's commit (``confirm_key``), or checked by that commit.
    verified: keys.KeyInfo | keys.KeyRefused | None = None
    key_unconfirmed: bool = False
    # A valid key or signature: its refusals are not counted against the address.
    sender_known: bool = False
    # Headers the route's signature scheme signs with: redacted wherever they are kept.
    signature_headers: set[str] = field(default_factory=set)
    # Whether a signature verified, and which of the route's secrets made it (Zoom's
    # handshake answers with an HMAC of that secret); None for a key from a jwks_url.
    signed: bool = False
    signer: str | None = None


@dataclass
class Accepted:
    event: Event
    route: Route
    key: keys.KeyInfo | None
    payload: Any
    reception: Reception
    # The route whose sync slot this request holds; ``give_sync_slot`` gives it back.
    sync_slot: str | None = None


@dataclass(frozen=True)
class Answer:
    """What a request that goes no further is answered: an error (``message`` and ``code``,
    a JSON error body) or, for a repeated delivery or a handshake, ``body`` (JSON) or
    ``text`` (text/plain); ``headers`` go with any."""

    status: int
    message: str | None = None
    code: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    text: str | None = None
    # An error's JSON beyond "error" and "code".
    fields: Mapping[str, Any] = field(default_factory=dict)


def key_from(headers: Headers, args: Mapping[str, str]) -> str | None:
    """The API key from X-API-Key, ``Authorization: Bearer``, or ``?api_key=`` (in that order)."""
    key = headers.get("X-API-Key")
    if key:
        return key
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return args.get("api_key")


def new_event(incoming: Incoming) -> Event:
    """The request's row; headers and body are set once the hub knows whether it accepts it."""
    return fresh(
        Event,
        id=new_event_id(),
        # a key typed as the route's name
        route=redact.keys_in_text(incoming.route_name[:200]),
        method=incoming.method,
        path=redact.keys_in_text(incoming.path[:2000]),
        query=(redact.query_string(incoming.query_string) or "")[:2000] or None,
        remote_addr=(
            f"{TEST_SENDER}{incoming.admin.prefix}"
            if incoming.admin is not None
            else (incoming.remote_addr or "")[:64] or None
        ),
        request_id=incoming.request_id,
        received_at=utcnow(),
        headers={},
        content_type=(incoming.content_type or "")[:200] or None,
        body_size=min(incoming.content_length, 2**62) if incoming.content_length else None,
        status=EventStatus.PENDING,
        attempts=0,
    )


def kept_headers(rx: Reception, refused: bool) -> dict[str, str]:
    """The request's headers, redacted and capped: tightly for a refused request, generously
    for an accepted one. What does not fit is dropped (or a value cut short) and an entry
    named ``(cut)``, which no real header can be called, says how much there was."""
    config = current_app.config
    most = int(config["REFUSED_HEADERS" if refused else "STORED_HEADERS"])
    budget = int(config["REFUSED_HEADER_BYTES" if refused else "STORED_HEADER_BYTES"])
    redacted = redact.headers(rx.incoming.headers.items(), extra=rx.signature_headers)
    kept: dict[str, str] = {}
    used = 0
    for name, value in redacted.items():
        room = budget - used - len(name)
        if len(kept) >= most or room <= 0:
            break
        kept[name] = value[:room]
        used += len(name) + len(kept[name])
    total = sum(len(name) + len(value) for name, value in redacted.items())
    if used < total:
        kept[HEADERS_CUT] = f"kept {len(kept)} of {len(redacted)} headers, {used} of {total} bytes"
    return kept


# Headers that carry the hub's own credentials: never sealed, whatever a route's verifier reads.
OWN_KEY_HEADERS = frozenset({"x-api-key", "authorization"})


def sealed_signature_headers(rx: Reception) -> str | None:
    """The headers the route's verifier read (redacted in ``headers``), sealed with the
    SecretBox for `hub listen` to forward (hub.services.listen), or None. Only those: the
    hub's own keys and any other credential stay redacted, and are never forwarded."""
    names = rx.signature_headers and {h.lower() for h in rx.signature_headers}
    if not names:
        return None
    kept = {
        name.lower(): value
        for name, value in rx.incoming.headers.items()
        if name.lower() in names and name.lower() not in OWN_KEY_HEADERS
    }
    if not kept:
        return None
    return crypto.get_box().seal([json.dumps(kept)])


def read_body(rx: Reception, limit: int) -> bytes:
    """At most ``limit`` bytes of the body; Rejected(413) without reading further."""
    event = rx.event
    declared = rx.incoming.content_length
    if declared is not None and declared > limit:
        raise Rejected(413, "too_large", f"Request body is larger than {limit} bytes")
    try:
        body = rx.incoming.read(limit + 1)
    # Whatever the server raises while reading is the client's doing: gunicorn's
    # InvalidChunkSize (a chunk size such as `zz`), NoMoreData, an OSError on a hang-up.
    except Exception as exc:
        raise Rejected(
            400,
            "bad_body",
            "Request body could not be read (malformed chunked encoding, or cut short)",
            detail=f"body unreadable: {type(exc).__name__}",
        ) from None
    event.body = body  # cut to a short prefix if the request is refused
    event.body_size = max(len(body), declared or 0)
    if len(body) > limit:
        raise Rejected(413, "too_large", f"Request body is larger than {limit} bytes")
    return body


def authenticate(
    session: Session, rx: Reception, route: Route, body: bytes, key: keys.KeyInfo | None
) -> tuple[keys.KeyInfo | None, bool]:
    """Finish what the route's ``auth`` asks of the sender, with the body in hand:
    (the key used, if any; whether a signature was verified).

    ``key``: an API key (checked before the body, ``key`` is it); ``signature``: a valid
    signature over the raw body; ``key+signature``: both; ``key|signature``: either (a
    presented key that fails may be rescued by a valid signature; the refusal then names
    the key's problem).
    """
    mode = route.auth or "key"
    if mode == "key":
        return key, False
    if mode in ("signature", "key+signature"):
        check_signature(rx, route, body)
        return key, True
    if not rx.incoming.key:
        check_signature(rx, route, body)
        return None, True
    try:
        return check_key(session, rx, route), False
    except Rejected as key_refused:
        try:
            check_signature(rx, route, body)
        except Rejected as signature_refused:
            if signature_refused.status >= 500:
                raise
            raise key_refused from None
        return None, True


def verified_key(rx: Reception) -> keys.KeyInfo:
    """The presented key, judged once per request (the refusal budget and the route's key
    check both ask), or KeyRefused.

    A key this process verified before is taken from its memory (``keys.remembered``) and
    marked unconfirmed: ``confirm_key`` reads it before anything but an async event's
    commit, which checks it itself. Any other key is read in a read session of its own: on
    SQLite it takes no write lock (the request must not hold one while it reads the body),
    on PostgreSQL it is one autocommit round trip (``keys.key_row``)."""
    known = rx.verified
    if known is None:
        presented = rx.incoming.key
        known = keys.remembered(presented)
        if known is not None:
            rx.key_unconfirmed = True
        else:
            known = read_key(presented)
        rx.verified = known
    if isinstance(known, keys.KeyRefused):
        raise known
    return known


def read_key(presented: str | None) -> keys.KeyInfo | keys.KeyRefused:
    """The presented key as the database has it now (remembered if accepted), or why not."""
    with get_db().read_session() as reading:
        try:
            info = keys.authenticate(reading, presented)
        except keys.KeyRefused as exc:
            keys.forget(presented)
            return exc
    keys.remember(presented or "", info)
    return info


def confirm_key(rx: Reception) -> None:
    """Read a remembered key again before the request does what its commit could not undo
    (a sync run, a dedup answer, a handshake, a refusal's status): Rejected(401) if it was
    revoked meanwhile. A key read from the database in this request needs nothing more."""
    if not rx.key_unconfirmed:
        return
    rx.key_unconfirmed = False
    known = rx.verified = read_key(rx.incoming.key)
    if isinstance(known, keys.KeyRefused):
        rx.sender_known = False
        raise key_rejection(rx, known)


def key_rejection(rx: Reception, refused: keys.KeyRefused) -> Rejected:
    """The 401 for a refused key, with the real key's prefix on the event when it was one."""
    if refused.info is not None:  # the real key, revoked or expired
        rx.event.key_prefix = refused.info.prefix
    detail = "no API key" if not rx.incoming.key else refused.sentence
    return Rejected(401, "unauthorized", refused.sentence, detail=detail)


def check_key(session: Session, rx: Reception, route: Route) -> keys.KeyInfo:
    presented = rx.incoming.key
    event = rx.event
    match = keys.KEY_RE.match((presented or "").strip())
    if match:  # who claimed to knock; whose key it really was is known only once verified
        event.presented_prefix = match.group(1)
    try:
        info = verified_key(rx)
    except keys.KeyRefused as exc:
        raise key_rejection(rx, exc) from None
    event.key_prefix = info.prefix
    rx.sender_known = True
    if not info.allows_route(route.name):
        raise Rejected(
            403,
            "forbidden",
            f"This API key may not post to route '{route.name}'",
            detail=f"key {info.prefix} lacks scope {route.name}",
        )
    keys.touch(session, info)
    return info


def check_signature(rx: Reception, route: Route, body: bytes) -> None:
    """Rejected(401) unless one of the route's secrets signed the raw ``body``.

    The sender hears only "Invalid signature"; the event keeps the admin-facing cause.
    """
    box: crypto.SecretBox = current_app.extensions["hub.secrets"]
    try:
        secrets = box.open(route.secrets_encrypted)
    except crypto.SecretsUnreadable:
        log.error(
            "route %s: its signing secrets do not decrypt; was HUB_SECRET_KEY changed? "
            "Re-add them with `routes secret add` or `routes apply`",
            route.name[:64],
        )
        raise Rejected(
            500,
            "secrets_unreadable",
            "Server error",
            code="internal_error",
            detail="route secrets do not decrypt with this HUB_SECRET_KEY",
        ) from None
    try:
        rx.signer = signatures.verify(
            route.verify_scheme or "",
            body=body,
            headers=rx.incoming.headers,
            secrets=secrets,
            options=route.verify_options,
            method=rx.incoming.method,
            url=signed_url(route, rx.incoming),
        )
    except signatures.SignatureError as exc:
        raise Rejected(401, exc.code, "Invalid signature", detail=exc.reason) from None
    except signatures.KeysUnavailable as exc:
        log.warning("route %s: %s", route.name[:64], exc.reason)
        raise Rejected(
            503,
            "keys_unavailable",
            "The sender's signing keys could not be fetched; try again later",
            headers={"Retry-After": str(KEYS_RETRY_AFTER)},
            detail=exc.reason,
        ) from None
    except UnknownPublicUrl:
        log.error(
            "route %s: its provider signs the URL it called; set the route's verify option "
            "url or HUB_PUBLIC_URL",
            route.name[:64],
        )
        raise Rejected(
            500,
            "bad_verifier",
            "Server error",
            code="internal_error",
            detail="the provider signs the URL: set the route's verify option url or "
            "HUB_PUBLIC_URL",
        ) from None
    except (ValueError, TypeError):  # a verifier saved before its checks existed
        log.error("route %s: its signature verifier is misconfigured", route.name[:64])
        raise Rejected(
            500,
            "bad_verifier",
            "Server error",
            code="internal_error",
            detail="the route's signature verifier is misconfigured",
        ) from None
    rx.sender_known = True
    rx.signed = True


class UnknownPublicUrl(Exception):
    """A provider that signs the URL, on a route whose public URL the hub was not told."""


def signed_url(route: Route, incoming: Incoming) -> str:
    """The URL a provider that signs it (Twilio) called, as the operator told the hub: the
    route's verify option ``url``, else HUB_PUBLIC_URL and the request's path; then the
    request's query string as it arrived. Never the Host or X-Forwarded-* headers: they are
    the sender's to write. "" for a provider that does not sign the URL."""
    provider = providers.get(route.verify_scheme or "")
    if provider is None or not provider.signs_url:
        return ""
    base = (route.verify_options or {}).get("url")
    if not base:
        public = current_app.config.get("PUBLIC_URL")
        if not public:
            raise UnknownPublicUrl()
        base = public.rstrip("/") + incoming.path
    return f"{base}?{incoming.query_string}" if incoming.query_string else base


def signed_headers(route: Route) -> set[str]:
    try:
        return signatures.signature_headers(route.verify_scheme or "", route.verify_options)
    except ValueError:  # check_signature turns the request away and logs why
        return set()


def enforce_rate_limits(session: Session, route: Route, key: keys.KeyInfo | None) -> None:
    """Rejected(429) with Retry-After when the key's or the route's limit is spent."""
    limits = []
    if key is not None and key.rate_limit:
        limits.append((f"key:{key.prefix}", rates.parse(key.rate_limit)))
    if route.rate_limit:
        limits.append((f"route:{route.name}", rates.parse(route.rate_limit)))
    if not limits:
        return
    refused = ratelimit.check(current_app.extensions["hub.ratelimit"], session, limits)
    if refused is not None:
        raise Rejected(
            429,
            "rate_limited",
            "Too many requests; try again later",
            headers={"Retry-After": str(refused.retry_after)},
            detail=f"over {refused.limit} requests in the window (request {refused.count})",
        )


def receive(incoming: Incoming) -> Accepted:
    """Check a request and write its event row; Rejected (already logged) if it fails.

    The order keeps refusals cheap: the address's refusal budget, the method, the route and
    (for routes that take a key) the key come before the body is read; signature routes
    need the body, read no further than HUB_MAX_BODY_BYTES. On success the event is added
    to the request's session, not yet committed: sync routes commit it with its attempts,
    async routes commit it before answering.
    """
    session = get_session()
    event = new_event(incoming)
    rx = Reception(incoming, event)
    logs.bind(event=event)  # its lines name the event, its route and (once known) its key
    # An admin's test event spends no address's refusals (nor is turned away for them).
    throttled_for = None if incoming.admin is not None else check_refusal_budget(session, rx)
    try:
        if incoming.method == "POST":
            route, key, payload = receive_post(session, rx)
        else:
            route, key, payload = receive_handshake(session, rx)
        # A POST with no dedup key, no signature (no handshake) and no admin behind it:
        # nothing but the group commit writes its event (enqueue, or run_sync before its
        # run), and that commit checks its key; nothing acts before it.
        group_committed = incoming.method == "POST" and not (
            event.dedup_key or rx.signed or incoming.admin
        )
        if not group_committed:
            confirm_key(rx)  # a dedup answer or a handshake acts before any commit
    except Rejected as rejection:
        if 400 <= rejection.status < 500 and rejection.status != 401:
            try:  # a revoked key hears that, not what else was wrong with its request
                confirm_key(rx)
            except Rejected as refused:
                rejection = refused
        if throttled_for is not None and 400 <= rejection.status < 500:
            session.rollback()
            raise AddressThrottled(throttled_for) from None
        record_rejection(session, rx, rejection)
        raise rejection from None
    event.headers = kept_headers(rx, refused=False)
    event.sealed_headers = sealed_signature_headers(rx)
    if not group_committed:  # the group commit writes its own row, outside the session
        session.add(event)
    return Accepted(event=event, route=route, key=key, payload=payload, reception=rx)


def receive_handshake(session: Session, rx: Reception) -> tuple[Route, None, dict[str, Any]]:
    """A GET that is its route's provider's handshake (Dropbox's, Meta's): the route's rate
    limit applies, its challenge is bounded, its query is the payload; no key, no body, no
    signature (the handshake is its own check). Any other method, or a GET that is no
    handshake, is answered 405 whatever the route, as before handshakes existed."""
    route = handshake_route(session, rx.incoming)
    if route is None:
        raise Rejected(
            405,
            "method_not_allowed",
            "Webhooks must be sent with POST",
            headers={"Allow": "POST"},
        )
    logs.bind(known_route=route.name)
    enforce_rate_limits(session, route, None)
    args = rx.incoming.args
    payload = {name: args.get(name) for name in list(args)[:20]}
    check_challenge_size(payload)
    return route, None, payload


def handshake_route(session: Session, incoming: Incoming) -> Route | None:
    """The route a GET handshake is for: enabled, its provider declares a GET challenge,
    and the request carries that challenge's parameter; else None, and the GET is answered
    405 like any other (a route of another provider, or none, looks the same)."""
    if incoming.method != "GET":
        return None
    route = route_store.lookup(session, incoming.route_name, current_app.extensions["hub.routes"])
    if route is None or not route.enabled or not route.verify_scheme:
        return None
    challenge = providers.challenge_of(providers.get(route.verify_scheme), "GET")
    if challenge is None or not incoming.args.get(challenge.parameter or ""):
        return None
    return route


def check_challenge_size(values: Any) -> None:
    """Rejected(400) when a handshake would echo more than HUB_MAX_CHALLENGE_BYTES."""
    most = int(current_app.config["MAX_CHALLENGE_BYTES"])
    if isinstance(values, Mapping):
        values = [v for v in values.values() if isinstance(v, str)]
    elif isinstance(values, str):
        values = [values]
    else:
        return
    if any(len(v.encode("utf-8", "replace")) > most for v in values):
        raise Rejected(
            400,
            "challenge_too_long",
            f"The challenge is longer than {most} bytes (HUB_MAX_CHALLENGE_BYTES)",
        )


def receive_post(session: Session, rx: Reception) -> tuple[Route, keys.KeyInfo | None, Any]:
    """A POST's route, key and payload, checked in the order ``receive`` describes."""
    incoming, event, route_name = rx.incoming, rx.event, rx.incoming.route_name
    route = route_store.lookup(session, route_name, current_app.extensions["hub.routes"])
    if route is not None:  # a bounded metrics label
        logs.bind(known_route=route.name)
    if route is None or not route.enabled:
        raise Rejected(404, "unknown_route", f"No route named '{route_name[:100]}'")
    if route.verify_scheme:  # whatever the scheme calls its signature header
        rx.signature_headers = signed_headers(route)
    mode = route.auth or "key"
    limit = int(current_app.config["MAX_BODY_BYTES"])
    if incoming.admin is not None:  # a test event: the admin's key stands for the sender's
        key, signed = incoming.admin, False
        rx.sender_known = True
        enforce_rate_limits(session, route, key)
        body = read_body(rx, limit)
    else:
        key = check_key(session, rx, route) if mode in KEY_FIRST else None
        if mode == "key":
            enforce_rate_limits(session, route, key)
            body, signed = read_body(rx, limit), False
        else:
            body = read_body(rx, limit)
            key, signed = authenticate(session, rx, route, body, key)
            enforce_rate_limits(session, route, key)
    event.key_prefix = key.prefix if key else None
    try:
        payload = pipeline.decode_payload(
            body, incoming.content_type, pipeline.max_json_depth(current_app.config)
        )
    except pipeline.PayloadError as exc:
        status = 415 if exc.code == "unsupported_media_type" else 400
        raise Rejected(status, exc.code, exc.message) from None
    if route.payload_schema is not None:  # a route without a schema pays this test alone
        check_schema(route, payload)
    event.dedup_key = dedup_key(incoming.headers, route, payload, signed)
    if event.dedup_key:
        confirm_key(rx)  # a repeat is answered with its original's id
        check_duplicate(session, rx, route)
    return route, key, payload


def check_schema(route: Route, payload: Any) -> None:
    """Rejected(422 ``schema_mismatch``) unless ``payload`` matches the route's JSON Schema;
    the answer names where and which rule (``payload_schema.Mismatch``), never a value."""
    try:
        found = payload_schema.mismatch(route, payload)
    except payload_schema.SchemaBroken as exc:
        log.error("route %s: its schema does not compile: %s", route.name[:64], exc)
        raise Rejected(
            500,
            "bad_schema",
            "Server error",
            code="internal_error",
            detail=f"the route's schema does not compile: {exc}",
        ) from None
    if found is not None:
        raise Rejected(
            422,
            "schema_mismatch",
            found.sentence,
            fields={"path": found.path, "rule": found.rule},
        )


class SyncSlots:
    """How many requests of each sync route run their steps in this process now; at most
    ``most`` each (HUB_SYNC_RUNS_PER_ROUTE, by default half of HUB_WEB_THREADS). One
    more waits up to HUB_SYNC_BUSY_WAIT for a run to end: a burst to a fast route queues
    (its runs take milliseconds), a burst to a slow one is turned away after that wait.

    Per process, because what it guards is this process's own request threads: 8 requests
    to a 5 s sync receiver held all 2 x 4 of gunicorn's threads, and other senders' async
    requests waited up to 4.9 s. A count shared through the database would cost a round
    trip per request and stay wrong after a process dies mid-run; this one dies with the
    threads it counts. N web processes run at most N x ``most`` requests of one route.
    """

    def __init__(self):
        self._freed = threading.Condition()
        self._running: dict[str, int] = {}

    def take(self, route: str, most: int, wait: float) -> bool:
        """One of ``route``'s ``most`` slots, waiting up to ``wait`` seconds for one; False
        if none freed."""
        deadline = time.monotonic() + wait
        with self._freed:
            while self._running.get(route, 0) >= most:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._freed.wait(left)
            self._running[route] = self._running.get(route, 0) + 1
            return True

    def give(self, route: str) -> None:
        with self._freed:
            left = self._running.get(route, 0) - 1
            if left > 0:
                self._running[route] = left
            else:
                self._running.pop(route, None)
            self._freed.notify_all()


def sync_runs_per_route(config) -> int:
    return int(config.get("SYNC_RUNS_PER_ROUTE") or max(1, int(config["WEB_THREADS"]) // 2))


def init_app(app) -> None:
    """The process's sync slots (see SyncSlots); the limits of key sets fetched for
    routes' ``jwks_url`` (signatures.JWKS, one per process like the providers)."""
    app.extensions["hub.sync_slots"] = SyncSlots()
    signatures.JWKS.configure(
        ttl=app.config["JWKS_CACHE_SECONDS"], max_bytes=app.config["JWKS_MAX_BYTES"]
    )


class SyncBusy(Exception):
    """A sync request turned away because its route runs its most requests: answered 503."""

    def __init__(self, route: str, most: int):
        super().__init__(route)
        self.message = (
            f"Route '{route[:100]}' is already running {most} requests at once, its most; "
            f"try again in {SYNC_BUSY_RETRY_AFTER} seconds"
        )
        self.detail = (
            f"{most} requests of this sync route were already running in this process "
            "(HUB_SYNC_RUNS_PER_ROUTE)"
        )


def take_sync_slot(event: Event, route: str) -> None:
    """Hold one of the route's sync slots (``give_sync_slot`` gives it back), waiting up to
    HUB_SYNC_BUSY_WAIT; else end the (committed) event ``rejected``, reason ``sync_busy``,
    and raise SyncBusy. Called with no transaction open: on SQLite a wait inside one would
    hold the write lock the running requests need to record their outcome."""
    config = current_app.config
    most = sync_runs_per_route(config)
    if current_app.extensions["hub.sync_slots"].take(route, most, float(config["SYNC_BUSY_WAIT"])):
        return
    busy = SyncBusy(route, most)
    ending = {
        "status": EventStatus.REJECTED,
        "reason": "sync_busy",
        "attempts": 0,
        "response_status": 503,
        "last_error": busy.detail,
        "completed_at": utcnow(),
        "lease_owner": None,
        "lease_until": None,
    }
    for column, value in ending.items():
        setattr(event, column, value)
    ended = update(Event.__table__).where(Event.id == event.id).values(**ending)
    undelivered = delete(Delivery.__table__).where(Delivery.event_id == event.id)

    def write(shared: Connection) -> None:
        shared.execute(undelivered)  # a refused request has no deliveries
        shared.execute(ended)

    current_app.extensions["hub.commits"].run(write)
    metrics.refused("sync_busy", EventStatus.REJECTED)
    log.info("rejected %s %s: sync_busy (503)", event.id, route[:64])
    raise busy


def give_sync_slot(accepted: Accepted) -> None:
    """Give back the sync slot ``run_sync`` took for ``accepted``, if it holds one."""
    route, accepted.sync_slot = accepted.sync_slot, None
    if route is not None:
        current_app.extensions["hub.sync_slots"].give(route)


def busy_answer(busy: SyncBusy) -> Answer:
    return Answer(
        503, busy.message, "sync_busy", headers={"Retry-After": str(SYNC_BUSY_RETRY_AFTER)}
    )


def refusal_bucket(remote_addr: str | None) -> str:
    """Refusals are counted per remote address: the socket peer, or what the nearest
    trusted proxy saw (HUB_TRUSTED_PROXIES)."""
    return f"refusals:{(remote_addr or '-')[:64]}"


def refusal_rate(config: Mapping[str, Any]) -> rates.Rate | None:
    """HUB_REFUSAL_LIMIT (checked at start-up) in the app's ``config``, or None when it is off."""
    return ratelimit.optional_rate(config.get("REFUSAL_LIMIT"), "REFUSAL_LIMIT")


def check_refusal_budget(session: Session, rx: Reception) -> int | None:
    """Whether this address spent HUB_REFUSAL_LIMIT: None, or the seconds until it frees.

    A valid key passes first (a sender behind the same NAT as a flood is not locked out,
    and a known sender's request costs no read of the counter); otherwise one read of the
    counter. Over the limit, a request to a route that takes a key is AddressThrottled at
    once: no body read, no row. A route a signature may open still hears the request out,
    body read within HUB_MAX_BODY_BYTES, since GitHub or Stripe proving itself must not be
    locked out by a flood from an address it shares; receive() answers any refusal then
    with the same 429 and no row.
    """
    rate = refusal_rate(current_app.config)
    if rate is None:
        return None
    if rx.incoming.key:  # a valid key always passes (read once; check_key reuses it)
        try:
            verified_key(rx)
            return None
        except keys.KeyRefused:
            pass
    bucket = refusal_bucket(rx.incoming.remote_addr)
    decision = current_app.extensions["hub.ratelimit"].peek(session, bucket, rate)
    if decision.allowed:
        return None
    lookup = current_app.extensions["hub.routes"]
    route = route_store.lookup(session, rx.incoming.route_name, lookup)
    if route is None or (route.auth or "key") in KEY_FIRST:
        raise AddressThrottled(decision.retry_after)
    return decision.retry_after


def count_refusal(session: Session, rx: Reception, rejection: Rejected) -> None:
    """Count a refusal of a sender the hub could not identify against its address.

    Refusals of a verified sender (a valid key without the scope, a bad body behind a good
    signature, its own rate limit) are not counted: that sender is known and has its own
    limits. The refusal that spends the budget says so on its event.
    """
    rate = refusal_rate(current_app.config)
    if rate is None or rx.sender_known or not 400 <= rejection.status < 500:
        return
    bucket = refusal_bucket(rx.incoming.remote_addr)
    decision = current_app.extensions["hub.ratelimit"].hit(session, bucket, rate)
    event = rx.event
    if decision.count == decision.limit:
        event.last_error = (
            f"{event.last_error}; refusal limit reached ({rate}): this address's requests "
            f"without a valid key are answered 429, unlogged, for {decision.retry_after} s"
        )[:500]
        log.warning("refusal limit %s reached by an address (event %s)", rate, event.id)


# The header any sender may use to name a delivery; a retry of the same delivery repeats it.
# Beside it, every loaded provider's declared delivery-id headers (providers.id_headers).
IDEMPOTENCY_HEADER = "Idempotency-Key"


class Duplicate(Exception):
    def __init__(self, original: str):
        super().__init__(original)
        self.original = original


def dedup_key(headers: Headers, route: Route, payload: Any, signed: bool) -> str | None:
    """The sender's name for this delivery: a known header, or the route's JSON path.

    When a signature was verified, what it covers comes first (the body field its provider
    names the delivery by, such as Mailgun's signed token; the id header it signs; then the
    route's path): an unsigned header can't rename a captured request. Then Idempotency-Key,
    the route's provider's delivery-id headers, and any provider's.
    """
    if not route.dedup_window:
        return None
    provider = providers.get(route.verify_scheme) if route.verify_scheme else None
    if signed and provider is not None and provider.id_field:
        value = providers.body_field(payload, provider.id_field)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)[:300]
    sources: list[str | None] = []  # a header name, or None for the body's path
    if signed and provider is not None:
        sources += [*provider.signed_id_headers, None]
    sources.append(IDEMPOTENCY_HEADER)
    if provider is not None:
        sources += provider.id_headers
    sources += [*providers.registry().id_headers(), None]
    # The request's few headers by lowercase name, read once: asking the WSGI environ for
    # each of a dozen names cost more than the rest of the choice.
    present: dict[str, str] = {}
    for name, value in headers.items():
        present.setdefault(name.lower(), value)
    for header in sources:
        value = header_id(present, header) if header else path_id(route, payload)
        if value:
            return value
    return None


def header_id(present: Mapping[str, str], header: str) -> str | None:
    """The header ``header`` of a request's headers ``present`` by lowercase name, stripped
    and cut to 300 characters, or None when missing or blank."""
    value = (present.get(header.lower()) or "").strip()
    return value[:300] or None


def path_id(route: Route, payload: Any) -> str | None:
    if not route.dedup_path:
        return None
    try:
        value = lookup_path(payload, route.dedup_path)
    except KeyError:
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)[:300] or None
    return None


def check_duplicate(session: Session, rx: Reception, route: Route) -> None:
    """Duplicate (recorded, answered with the original's id) when this sender's delivery
    was accepted before; Rejected(409) while the first copy still runs in a sync request
    (it may yet fail, and then this copy must be processed)."""
    event = rx.event
    original = find_original(session, route, event.key_prefix, event.dedup_key or "")
    if original is None:
        return
    if original.status == EventStatus.PROCESSING and original.response_status is None:
        raise Rejected(
            409,
            "in_progress",
            "A delivery with this id is still being processed; retry later",
            headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER)},
            detail=f"the first copy, {original.id}, is still running",
        )
    event.status = EventStatus.DUPLICATE
    event.duplicate_of = original.id
    event.response_status = 200
    event.completed_at = utcnow()
    event.headers = kept_headers(rx, refused=False)
    session.add(event)
    session.commit()
    metrics.event_ended(route.name, EventStatus.DUPLICATE)
    raise Duplicate(original.id)


def find_original(session: Session, route: Route, sender: str | None, key: str) -> Row | None:
    """The first event with this dedup key from this sender inside the route's window that
    the sender was told was accepted (or whose sync run is still going): its id, status and
    response_status.

    The sender is the verified key's prefix, or None for a request that only a signature
    vouched for. A sync run that failed is no original: the sender heard an error, and its
    retry must run. Concurrent copies of one delivery are serialised: PostgreSQL by an
    advisory lock on (route, sender, key) held to the end of the transaction, SQLite by its
    write lock (BEGIN IMMEDIATE).

    An original purged inside its window left its key in ``dedup_keys``
    (hub.services.retention), read in the same statement: one more index probe of a small
    table, no more round trip; the one statement sees the events and the kept keys as of
    one moment, so an original purged meanwhile is found in one or the other.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"{route.name}\x1f{sender or '(signature)'}\x1f{key}"},
        )
    query = FIRST_ORIGINAL[sender is None]
    values = {"route": route.name, "key": key, "sender": sender}
    values["since"] = utcnow() - timedelta(seconds=route.dedup_window)
    return session.connection().execute(query, values).first()


def first_original_query(signature_only: bool):
    """``find_original``'s statement, built once (the sender as a key's prefix, or none):
    each request only binds its values."""
    since = bindparam("since", type_=Event.__table__.c.received_at.type)
    if signature_only:
        same_sender, kept_sender = Event.key_prefix.is_(None), DedupKey.key_prefix.is_(None)
    else:
        same_sender = Event.key_prefix == bindparam("sender")
        kept_sender = DedupKey.key_prefix == bindparam("sender")
    stored = select(Event.id, Event.status, Event.response_status, Event.received_at).where(
        Event.route == bindparam("route"),
        Event.dedup_key == bindparam("key"),
        same_sender,
        Event.received_at >= since,
        may_be_original(),
    )
    purged = select(DedupKey.event_id, null(), null(), DedupKey.received_at).where(
        DedupKey.route == bindparam("route"),
        DedupKey.dedup_key == bindparam("key"),
        kept_sender,
        DedupKey.received_at >= since,
    )
    first = union_all(stored, purged)
    return first.order_by(first.selected_columns.received_at).limit(1)


FIRST_ORIGINAL = {False: first_original_query(False), True: first_original_query(True)}


def record_rejection(session: Session, rx: Reception, rejection: Rejected) -> None:
    """Keep a refusal small: its headers capped, its body's size and a short prefix."""
    event = rx.event
    session.rollback()
    keep = int(current_app.config["REFUSED_BODY_BYTES"])
    event.body = redact.kept_body(event.body, keep)
    event.headers = kept_headers(rx, refused=True)
    event.status = EventStatus.REJECTED
    event.reason = rejection.reason
    event.response_status = rejection.status
    event.last_error = redact.keys_in_text(rejection.detail[:500])  # it may quote the URL
    event.completed_at = utcnow()
    count_refusal(session, rx, rejection)
    session.add(event)
    session.commit()
    metrics.refused(rejection.reason, EventStatus.REJECTED)
    log.info(
        "rejected %s %s: %s (%d)", event.id, event.route[:64], rejection.reason, rejection.status
    )


def run_sync(accepted: Accepted, status_of=None) -> pipeline.Outcome:
    """Run a sync route inside the request and commit the event with its attempts.

    ``status_of(outcome)`` is the HTTP status the view will answer a failure with (default
    ``failure_status``); it is kept on the event, so dedup knows the sender heard an error.
    The run holds one of the route's sync slots (SyncBusy if none frees in time): the caller
    gives it back with ``give_sync_slot`` once the sender is answered.
    """
    session = get_session()
    config = current_app.config
    event, route = accepted.event, accepted.route
    timeout = float(config["SYNC_TIMEOUT"])
    event.status = EventStatus.PROCESSING
    event.attempts = 1
    # A sync lease: if this process dies, a worker's reaper marks the event failed once the
    # lease has run out (it is never redelivered: the sender got no answer and will retry).
    event.lease_owner, event.lease_until = sync_lease(timeout + float(config["SYNC_LEASE_MARGIN"]))
    # The first destination runs here, under the same lease; the others go to the workers.
    deliveries = new_deliveries(event, route, accepted.payload)
    first = deliveries[0]
    # It runs here, now: a sync route's first destination is never ordered (routes refuse
    # it), whatever an older route row says.
    first.order_key = None
    first.status, first.attempts, first.next_attempt_at = EventStatus.PROCESSING, 1, None
    first.lease_owner, first.lease_until = event.lease_owner, event.lease_until
    # Commit before running: the request is on record even if the process dies, and no
    # database lock is held while connectors talk to the outside world (nor while waiting
    # for one of the route's slots). A remembered key is checked by that commit.
    try:
        commit_new_event(session, event, deliveries, key_id=unconfirmed_key(accepted))
    except keys.KeyRefused:
        raise RefusedAtCommit(refuse_revoked(accepted)) from None
    take_sync_slot(event, route.name)
    accepted.sync_slot = route.name
    if len(deliveries) > 1:
        delivery.wake(current_app, soon=True)
    attempts: list[Attempt] = []
    try:
        outcome = pipeline.run(
            event,
            route,
            pipeline.RunOptions.of_app(current_app),
            destination=route_store.destinations_of(route)[0],
            delivery=first,
            payload=accepted.payload,
            record=attempts.append,
            deadline=time.monotonic() + timeout,
        )
    except Exception as exc:  # a hub bug: the event still ends, with its cause
        log.error("event %s: pipeline error %s", event.id, type(exc).__name__)
        outcome = pipeline.Outcome(
            pipeline.FAILED, error=f"hub error: {type(exc).__name__}", code="internal_error"
        )
    ending = finish(event, outcome)
    delivered = outcome.status in (pipeline.DELIVERED, pipeline.FILTERED)
    event.response_status = ending["response_status"] = (
        200 if delivered else (status_of or failure_status)(outcome)
    )
    event_id = event.id
    rows = [row_of(attempt) for attempt in attempts]
    first_values = {k: v for k, v in ending.items() if k != "response_status"}
    fan_out = len(deliveries) > 1

    def write(shared: Connection) -> None:
        update_by_id(shared, Delivery.__table__, first.id, first_values)
        update_by_id(shared, Event.__table__, event_id, ending)
        if fan_out:  # the others may still be on their way: the event is their roll-up
            delivery.rollup(shared, event_id, first.id)

    attempt_rows = [(Attempt.__table__, row) for row in rows]
    commits = current_app.extensions["hub.commits"]
    inserts = current_app.extensions["hub.inserts"]
    try:
        if not fan_out and isinstance(inserts, writer.WriterClient):
            # Through the writer process with the new events (one process writes, no web
            # thread holds a transaction while it waits for the GIL); here if it can't.
            inserts.write_ending(
                attempt_rows,
                [(Delivery.__table__, first.id, first_values), (Event.__table__, event_id, ending)],
                only_if=(Event.__table__, event_id, "status", EventStatus.PROCESSING),
                here=commits,
            )
        else:
            # The attempts are written with the batch's other rows, before ``write``.
            commits.run(write, inserts=attempt_rows)
    except Exception as exc:
        session.rollback()
        session.close()  # its connection back to the pool: SQLite's write lock with it
        record_unrecorded(event_id, exc)
        raise
    if not fan_out:  # else the event ends with its last delivery, counted by the worker
        metrics.event_ended(event.route, event.status)
    return outcome


def record_unrecorded(event_id: str, exc: Exception) -> None:
    """A sync outcome that could not be written: end the event ``failed`` with the cause, in a
    transaction of its own (if even that fails, the reaper does it when the lease runs out)."""
    failed = {
        "status": EventStatus.FAILED,
        "last_error": f"the outcome could not be recorded ({type(exc).__name__})",
        "completed_at": utcnow(),
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_until": None,
    }
    try:
        with get_db().session() as session:
            session.execute(
                update(Delivery.__table__)
                .where(
                    Delivery.event_id == event_id,
                    Delivery.status == EventStatus.PROCESSING,
                    Delivery.lease_owner.startswith(delivery.SYNC_LEASE_PREFIX, autoescape=True),
                )
                .values(**failed)
            )
            session.execute(
                update(Event.__table__)
                .where(Event.id == event_id, Event.status == EventStatus.PROCESSING)
                .values(**failed)
            )
    except Exception as again:
        log.error("event %s: outcome not recorded (%s)", event_id, type(again).__name__)


def finish(event: Event, outcome: pipeline.Outcome) -> dict[str, Any]:
    """The event's end state after a sync run (the sender was told, so nothing is retried),
    set on ``event``; the values, to write."""
    values = {**pipeline.end_state(outcome, utcnow()), "lease_owner": None, "lease_until": None}
    for column, value in values.items():
        setattr(event, column, value)
    return values


def failure_status(outcome: pipeline.Outcome) -> int:
    return FAILURE_STATUS.get(outcome.code or "", 502)


def accept(incoming: Incoming) -> Accepted | Answer:
    """The request's event accepted (added to the session, not yet committed), or what the
    sender is told instead: its refusal (recorded, unless its address spent its refusals),
    or the original's id for a repeated delivery. Binds the event and the route found for
    log lines and metrics (``hub.ops.logs.bind``) in the caller's scope."""
    try:
        return receive(incoming)
    except Rejected as rejection:
        return Answer(
            rejection.status,
            rejection.message,
            rejection.code,
            rejection.headers,
            fields=rejection.fields,
        )
    except Duplicate as dup:
        return Answer(200, body={"id": dup.original, "duplicate": True})
    except AddressThrottled as throttled:
        metrics.refused("too_many_refusals", None)
        return Answer(
            429,
            "Too many refused requests from this address; try again later",
            "too_many_refusals",
            headers={"Retry-After": str(throttled.retry_after)},
        )


def new_deliveries(event: Event, route: Route, payload: Any = None) -> list[Delivery]:
    """One delivery of ``event`` for each destination of ``route``, pending and due now
    (``held`` for a paused destination, or one whose circuit is open or half-open: it waits
    for the resume or the circuit's close, in its order). An ordered destination's delivery
    gets its key rendered over ``payload`` and the headers and is ``queued``, promoted after
    the commit (``commit_new_event``; hub.services.ordering); held back, it is queued too
    and its key's head is held once promoted."""
    rows = []
    context = None
    for position, destination in enumerate(route_store.destinations_of(route)):
        key = None
        if ordering.is_ordered(destination):
            if context is None:
                context = pipeline.template_context(event, payload, [])
            limits = TemplateLimits.from_config(current_app.config)
            key = ordering.key_for(destination, context, limits)
        if key is not None:
            status = EventStatus.QUEUED
        elif destination.state in breaker.HOLDING:
            status = EventStatus.HELD
        else:
            status = EventStatus.PENDING
        rows.append(
            fresh(
                Delivery,
                id=first_delivery_id(event.id) if position == 0 else new_delivery_id(),
                event_id=event.id,
                route=event.route,
                destination=destination.name,
                lane=lane_of(event.route, destination.name),
                order_key=key,
                position=position,
                status=status,
                attempts=0,
                retries=0,
                next_attempt_at=event.received_at,
                created_at=event.received_at,
            )
        )
    return rows


def commit_new_event(
    session: Session, event: Event, deliveries: list[Delivery], key_id: int | None = None
) -> bool:
    """Commit the request's new event with its deliveries; the event then leaves the
    session (later writes to it are statements of their own). Its commit is shared with the
    other requests of this process committing at the same moment (hub.store.groupcommit);
    an event with a dedup key is committed in the request's own transaction instead, which
    holds its dedup lock until then.

    ``key_id``: the remembered key the event was accepted with; the shared transaction
    reads whether it is still valid before writing, and if it was revoked meanwhile writes
    nothing of this event and raises KeyRefused.

    With HUB_OTEL=true the commit is a span of the request's trace, whose context the event
    keeps (``traceparent``) for the worker's spans to join (hub.ops.tracing)."""
    tracing = current_app.extensions["hub.tracing"]
    if tracing is not None:
        with tracing.committing(event.id, event.route) as parent:
            event.traceparent = parent
            return _commit_new_event(session, event, deliveries, key_id)
    return _commit_new_event(session, event, deliveries, key_id)


def _commit_new_event(
    session: Session, event: Event, deliveries: list[Delivery], key_id: int | None
) -> bool:
    """``commit_new_event``'s work: True when the writer process committed the event and
    tells the workers of it (no ordered delivery waits for its turn here)."""
    announced = False
    if event.dedup_key:
        session.add(event)
        session.flush()  # the event's row before its deliveries'
        session.add_all(deliveries)
        session.commit()
        session.expunge(event)
        for row in deliveries:
            session.expunge(row)
    else:
        if event in session:
            session.expunge(event)
        if session.in_transaction():  # what else this request wrote (a key's last use)
            session.commit()
        # True only from the writer process's client: the writer announces them.
        announced = True is current_app.extensions["hub.inserts"].insert_rows(
            [(Event.__table__, row_of(event))]
            + [(Delivery.__table__, row_of(d)) for d in deliveries],
            guard=(keys.commit_guard, key_id) if key_id is not None else None,
        )
    # Ordered deliveries were written queued: each that heads its key goes now, in a short
    # transaction of its own (its lock is never held across other requests' writes).
    # If the database fails here, the event is stored all the same: the workers' periodic
    # pass promotes it (the sender must not retry what was accepted).
    if all(row.order_key is None for row in deliveries):
        return announced
    try:
        promoted = set(ordering.promote_new(current_app.extensions["hub.db"], deliveries))
    except Exception as exc:
        log.warning(
            "event %s: ordering promotion left to the workers (%s)", event.id, type(exc).__name__
        )
        promoted = set()
    for row in deliveries:
        if row.id in promoted:
            row.status = EventStatus.PENDING
    return False  # the promotions were committed here, after the writer's NOTIFY


def writes_only_new_rows(route: Route, header_names: Collection[str]) -> bool:
    """Whether a webhook to ``route`` whose headers are named ``header_names`` (lowercase)
    writes nothing but its new rows once accepted, which the writer process commits: an
    enabled async route with no rate limit of its own, no handshake, no ordered
    destination, and nothing to deduplicate the request by (no JSON path, none of the id
    headers present). A web process's event loop answers such webhooks itself
    (hub.web.loop); any other write (a refusal, a duplicate, a rate counter, an ordered
    delivery's turn) is made in the web process, where it waits for the database."""
    if route.mode != "async" or not route.enabled or route.rate_limit:
        return False
    provider = providers.get(route.verify_scheme) if route.verify_scheme else None
    if provider is not None and (provider.challenge or provider.id_field):
        return False
    if route.dedup_window:
        if route.dedup_path:
            return False
        ids = (IDEMPOTENCY_HEADER, *providers.registry().id_headers())
        if provider is not None:
            ids += provider.id_headers
        if any(header.lower() in header_names for header in ids):
            return False
    return not any(ordering.is_ordered(d) for d in route_store.destinations_of(route))


def waits_for_resume(accepted: Accepted) -> bool:
    """A sync route whose first destination is paused (or its circuit open) cannot answer
    with its result: its event is stored and answered as an async one (202, ``held``),
    delivered on resume."""
    first = route_store.destinations_of(accepted.route)[0]
    return first.state in breaker.HOLDING


def enqueue(accepted: Accepted) -> Answer | None:
    """Commit an async event as due now with one delivery per destination of its route (the
    sender is answered 202) and wake the workers. An event accepted with a remembered key
    that the commit finds revoked is recorded as refused instead: its Answer is returned."""
    session = get_session()
    event = accepted.event
    event.status = EventStatus.PENDING
    event.response_status = 202
    event.next_attempt_at = event.received_at
    deliveries = new_deliveries(event, accepted.route, accepted.payload)
    event.status = delivery.rolled_up_status([row.status for row in deliveries])
    if event.status in (EventStatus.HELD, EventStatus.QUEUED):
        event.next_attempt_at = None
    try:
        # the 202 leaves once the event is durable
        announced = commit_new_event(session, event, deliveries, key_id=unconfirmed_key(accepted))
    except keys.KeyRefused:
        return refuse_revoked(accepted)
    # What the sender is told: pending once its ordered deliveries were promoted.
    event.status = delivery.rolled_up_status([row.status for row in deliveries])
    delivery.wake(current_app, soon=True, announced=announced)
    return None


def unconfirmed_key(accepted: Accepted) -> int | None:
    """The id of the remembered key ``accepted`` came with, for its commit to check; None
    when the request read its key (or had none)."""
    if accepted.reception.key_unconfirmed and accepted.key is not None:
        return accepted.key.id
    return None


class RefusedAtCommit(Exception):
    """A sync event's first commit found its key revoked: nothing ran; ``answer`` is its 401."""

    def __init__(self, answer: Answer):
        super().__init__(answer.code)
        self.answer = answer


def refuse_revoked(accepted: Accepted) -> Answer:
    """Record an async event whose key its commit found revoked as the 401 it is answered."""
    rx = accepted.reception
    event = accepted.event
    # Nothing of it ran nor waits: no schedule, no sync lease, no attempt.
    event.next_attempt_at = event.lease_owner = event.lease_until = None
    event.attempts = 0
    try:
        confirm_key(rx)  # the key as it is now, for the refusal's sentence
        rejection = key_rejection(rx, keys.KeyRefused("revoked"))
    except Rejected as refused:
        rejection = refused
    rx.sender_known = False
    record_rejection(get_session(), rx, rejection)
    return Answer(rejection.status, rejection.message, rejection.code, rejection.headers)


def challenge_answer(accepted: Accepted) -> dict[str, Any] | str | None:
    """What the route's provider's handshake asks to hear back, or None: a request that
    proves the URL is not an event for the pipeline. The kind is the provider's declared
    ``challenge``; a POST one is answered only once the request's signature verified (or
    for an admin's test event), a GET one (Dropbox's, Meta's) by its own check.
    ChallengeRefused for a handshake that must be refused, Rejected for one too long."""
    route = accepted.route
    rx = accepted.reception
    method = rx.incoming.method
    provider = providers.get(route.verify_scheme) if route.verify_scheme else None
    if method == "POST" and not (rx.signed or rx.incoming.admin is not None):
        return None
    answer = providers.answer_challenge(
        provider,
        accepted.payload,
        rx.incoming.headers,
        options=route.verify_options or {},
        secret=rx.signer,
        method=method,
    )
    if answer is not None:
        check_challenge_size(answer)
    return answer


def answer_challenge(accepted: Accepted) -> Answer | None:
    """The answer to the provider's handshake (its event ended delivered, with the answer
    as its result; no delivery is made), or None for an event to run. A refused handshake
    is recorded as a refusal and answered with its status."""
    method = accepted.reception.incoming.method
    try:
        answer = challenge_answer(accepted)
    except providers.ChallengeRefused as refused:
        return refuse_accepted(accepted, refused.status, refused.message, refused.code)
    except Rejected as rejection:
        return refuse_accepted(accepted, rejection.status, rejection.message, rejection.code)
    if answer is None:
        if method == "POST":
            return None
        # A GET on a handshake route that is not its handshake (hub.mode=unsubscribe).
        refused = refuse_accepted(
            accepted, 405, "Webhooks must be sent with POST", "method_not_allowed"
        )
        return Answer(refused.status, refused.message, refused.code, headers={"Allow": "POST"})
    finish(accepted.event, pipeline.Outcome(pipeline.DELIVERED, result=answer))
    accepted.event.response_status = 200
    get_session().commit()
    metrics.event_ended(accepted.route.name, EventStatus.DELIVERED)
    if isinstance(answer, str):
        return Answer(200, text=answer, headers=TEXT_ANSWER_HEADERS)
    return Answer(200, body=answer)


# A handshake's text echoes what the sender sent: never to be read as HTML by a browser.
TEXT_ANSWER_HEADERS = {"X-Content-Type-Options": "nosniff"}


def refuse_accepted(accepted: Accepted, status: int, message: str, code: str) -> Answer:
    """Turn an accepted request away after all (the seed's missing field) and keep the cause."""
    session = get_session()
    if accepted.event in session:
        session.expunge(accepted.event)
    record_rejection(session, accepted.reception, Rejected(status, code, message))
    return Answer(status, message, code)
