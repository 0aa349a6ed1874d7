"""`hub listen`: a route's accepted events, as their senders sent them, for a local app.

The listen stream is a long poll: ``events_after`` reads the route's accepted events after a
cursor (an event id: ids sort by time), at most ``limit`` of them, and the web face waits for
the first one up to HUB_LISTEN_WAIT. Each event is handed out as the sender sent it
(``forwardable``): method, path suffix, body byte for byte, and its headers, the provider's
signature headers opened from their sealed copy (``Event.sealed_headers``), so the local app's
own signature check passes. Never the hub's credentials: X-API-Key, ``Authorization``, any
header the hub redacted, ``?api_key=`` and other credential query parameters are left out.

What the local app answered comes back as an attempt of the event with connector ``listen``
and no delivery (``record_answer``): the event page and GET /admin/api/events/<id> show it
beside the destinations' attempts; no worker ever claims it, and it changes no status.

The cursor is safe because an event is handed out only once it is HUB_LISTEN_SETTLE seconds
old: rows committed by concurrent requests (group commit) are all visible by then, so a
cursor that passed an id never skips an event with a smaller id committed later. This module
never reads Flask's request globals; the caller passes what it needs.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote_plus

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.ops import redact
from hub.store import crypto
from hub.store.models import (
    Attempt,
    AttemptOutcome,
    Event,
    EventStatus,
    iso_time,
    utcnow,
)

# The connector name of a listener's attempt: no connector of a destination can be named so
# by accident (a third-party connector registering "listen" would be shown beside them).
LISTEN_CONNECTOR = "listen"
# Statuses of events that were not accepted: never handed to a listener.
NOT_ACCEPTED = (EventStatus.REJECTED, EventStatus.DUPLICATE)
# Headers that describe one hop, not the sender's request: the local call makes its own.
HOP_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "expect",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-real-ip",
    }
)
# An event id's characters after ``evt_``: 48 bits of milliseconds, then 80 random bits.
_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


class BadCursor(ValueError):
    """``after`` is not an event id of this hub."""


def id_at(when: datetime) -> str:
    """The smallest event id of the millisecond ``when``: every event received then or later
    sorts after it (a listener that starts now begins there)."""
    value = int(when.timestamp() * 1000) << 80
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return "evt_" + "".join(reversed(chars))


def time_of(event_id: str) -> datetime:
    """When the event ``event_id`` was received, to the millisecond, from its id."""
    digits = event_id[4:]
    if not event_id.startswith("evt_") or len(digits) != 26:
        raise BadCursor(event_id)
    value = 0
    for char in digits:
        position = _CROCKFORD.find(char)
        if position < 0:
            raise BadCursor(event_id)
        value = value * 32 + position
    try:
        return datetime.fromtimestamp((value >> 80) / 1000, tz=utcnow().tzinfo)
    except (OverflowError, OSError, ValueError):
        raise BadCursor(event_id) from None


def start_cursor(settle: float) -> str:
    """Where a listener without a cursor starts: events not yet handed out to anyone (those
    younger than the settle time) and every later one."""
    return id_at(utcnow() - timedelta(seconds=settle))


def events_after(
    session: Session, route: str, after: str, limit: int, settle: float
) -> list[Event]:
    """The route's accepted events after ``after``, oldest first, at most ``limit``, none
    younger than ``settle`` seconds. One range of ix_events_route_received_at_id: from a
    second before the cursor's own time (an id's time and its received_at may straddle a
    millisecond) to now less the settle time."""
    since = time_of(after) - timedelta(seconds=1)
    until = utcnow() - timedelta(seconds=settle)
    return list(
        session.scalars(
            select(Event)
            .where(
                Event.route == route,
                Event.received_at >= since,
                Event.received_at <= until,
                Event.id > after,
                Event.status.not_in(NOT_ACCEPTED),
            )
            .order_by(Event.id)
            .limit(limit)
        )
    )


def is_forwardable(event: Event) -> bool:
    return event.status not in NOT_ACCEPTED


def path_suffix(event: Event) -> str:
    """What followed /hooks/<route> in the request's path ("" for the route itself)."""
    base = f"/hooks/{event.route}"
    return event.path[len(base) :] if event.path.startswith(base) else ""


def forward_query(event: Event) -> str:
    """The request's query without the parameters the hub redacted (credentials)."""
    if not event.query:
        return ""
    kept = [part for part in event.query.split("&") if redact.REDACTED not in unquote_plus(part)]
    return "&".join(kept)


def forward_headers(event: Event, box: crypto.SecretBox) -> dict[str, str]:
    """The headers to send the local app: the stored ones but hop-by-hop headers and any
    value the hub redacted (a credential, a hub key), plus the sealed signature headers.

    Sealed headers that no longer open (HUB_SECRET_KEY changed) are left out: the local
    app's signature check then fails, as it would for a forged request."""
    headers = {
        name: value
        for name, value in (event.headers or {}).items()
        if name.lower() not in HOP_HEADERS and name != "(cut)" and redact.REDACTED not in str(value)
    }
    if event.sealed_headers:
        try:
            opened = box.open(event.sealed_headers)
        except crypto.SecretsUnreadable:
            opened = []
        for text in opened:
            try:
                headers.update({str(k): str(v) for k, v in json.loads(text).items()})
            except (ValueError, AttributeError):
                continue
    return headers


def forwardable(event: Event, box: crypto.SecretBox) -> dict[str, Any]:
    """The event as the listen stream hands it out."""
    return {
        "id": event.id,
        "route": event.route,
        "received_at": iso_time(event.received_at),
        "method": event.method,
        "path": path_suffix(event),
        "query": forward_query(event),
        "headers": forward_headers(event, box),
        "body_base64": base64.b64encode(event.body or b"").decode("ascii"),
    }


@dataclass(frozen=True)
class LocalAnswer:
    """What the local app answered one forwarded event (or why it could not be reached)."""

    status: int | None
    duration_ms: int
    error: str | None = None


def record_answer(session: Session, event: Event, answer: LocalAnswer) -> Attempt:
    """The local answer as an attempt of ``event`` with connector ``listen`` and no
    delivery; added to ``session`` (the caller commits). A 2xx is ``ok``; anything else, or
    no answer, is ``permanent``: a listener is told once, it is not retried."""
    ok = answer.status is not None and 200 <= answer.status < 300
    duration = max(0, answer.duration_ms)
    previous = session.scalar(
        select(Attempt.run)
        .where(Attempt.event_id == event.id, Attempt.connector == LISTEN_CONNECTOR)
        .order_by(Attempt.id.desc())
        .limit(1)
    )
    attempt = Attempt(
        event_id=event.id,
        delivery_id=None,
        run=(previous or 0) + 1,
        step_index=0,
        connector=LISTEN_CONNECTOR,
        try_number=1,
        started_at=utcnow() - timedelta(milliseconds=duration),
        duration_ms=duration,
        outcome=AttemptOutcome.OK if ok else AttemptOutcome.PERMANENT,
        http_status=answer.status,
        error=redact.keys_in_text(answer.error[:500]) if answer.error else None,
    )
    session.add(attempt)
    return attempt


def is_listener_attempt(attempt: Attempt) -> bool:
    """An attempt ``record_answer`` wrote (no delivery's: a destination's never lacks one)."""
    return attempt.delivery_id is None and attempt.connector == LISTEN_CONNECTOR


class ListenSlots:
    """How many listen polls each key holds open in this process: at most ``per_key``
    (HUB_LISTEN_STREAMS_PER_KEY) each, and at most ``total`` in all (half of the process's
    threads, so listeners never take every thread from the senders). Per process, like the
    sync slots (hub.services.intake.SyncSlots): what it guards is this process's threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def take(self, key: str, per_key: int, total: int) -> bool:
        with self._lock:
            if self._open.get(key, 0) >= per_key or sum(self._open.values()) >= total:
                return False
            self._open[key] = self._open.get(key, 0) + 1
            return True

    def give(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)


def init_app(app) -> None:
    app.extensions["hub.listen_slots"] = ListenSlots()
