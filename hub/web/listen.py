"""/listen/...: what `hub listen` reads and writes (hub.services.listen says what is handed out).

- ``GET /listen/routes/<name>?after=<event id>&wait=<s>``: a long poll. It answers as soon
  as the route has accepted events after the cursor (or when ``wait`` runs out, with none),
  so no gunicorn thread is held past HUB_LISTEN_WAIT and nginx's buffering and timeouts
  need no exception for it.
- ``GET /listen/events/<id>``: one stored event, as the stream hands it out (``--replay``).
- ``POST /listen/events/<id>/answers``: what the local app answered, kept as an attempt.

Who may: an admin key, or a key whose scopes include the route (a key made for listening,
`hub keys create NAME --scope ROUTE`). Another key is refused 403 for a route and told 404
for an event of a route it may not see: it learns nothing of what it may not read. Each key
holds at most HUB_LISTEN_STREAMS_PER_KEY polls at once in each process (429 past it).
"""

from __future__ import annotations

import select
import socket
import time

from flask import Blueprint, current_app, g, request

from hub.services import keys
from hub.services import listen as listening
from hub.services import routes as route_store
from hub.store.crypto import get_box
from hub.store.db import get_db, get_session
from hub.store.models import Event
from hub.web import schemas as m
from hub.web.auth import REFUSALS, presented_key
from hub.web.errors import error_response
from hub.web.openapi import ApiError, api

bp = Blueprint("listen", __name__, url_prefix="/listen")

# Seconds between two reads of the database while a poll waits: an event reaches the
# listener at most this long after it settled (HUB_LISTEN_SETTLE).
POLL_INTERVAL = 0.25
# Seconds a listener turned away for its number of polls is told to wait.
BUSY_RETRY_AFTER = 2
NAME = {"name": "The route's name"}
EVENT_ID = {"event_id": "The event's id (evt_...)"}


@bp.before_request
def require_key():
    """A valid key (any scope: each view checks the route's), or the admin API's refusals."""
    presented = presented_key()
    if not presented or not presented.strip():
        return REFUSALS["missing"].response()
    with get_db().read_session() as reading:
        try:
            g.listen_key = keys.authenticate(reading, presented)
        except keys.KeyRefused as exc:
            return REFUSALS[exc.code].response()
    return None


def may_see(route: str) -> bool:
    return g.listen_key.allows_route(route)


def visible_event(event_id: str) -> Event:
    """The accepted event ``event_id`` if this key may read its route, else 404 (a key
    out of scope is told nothing more than a key asking for an unknown id)."""
    event = get_session().get(Event, event_id[:32])
    if event is None or not may_see(event.route) or not listening.is_forwardable(event):
        raise ApiError(404, "No such event", "not_found")
    return event


@api.route(
    bp,
    "GET",
    "/listen/routes/{name}",
    summary="The route's accepted events after a cursor, as their senders sent them",
    tag="listen",
    path_params=NAME,
    query=m.ListenQuery,
    description="A long poll: answered as soon as there are events after `after` (or when "
    "`wait`, at most HUB_LISTEN_WAIT, runs out, with none). Each event's headers include "
    "the provider's signature headers, never the hub's credentials. An admin key, or a key "
    "whose scopes include the route.",
    responses={
        200: ("Events after the cursor, and the cursor to send next", m.ListenPage),
        400: ("The cursor is not an event id", None),
        403: ("The key may not read this route", None),
        404: ("No such route", None),
        429: ("This key already holds its most polls (HUB_LISTEN_STREAMS_PER_KEY)", None),
    },
)
def listen_route(name: str, query: m.ListenQuery):
    if not may_see(name):
        raise ApiError(403, f"This API key may not listen to route '{name[:100]}'", "forbidden")
    with get_db().read_session() as reading:
        if route_store.get(reading, name) is None:  # told only to a key that may see it
            raise ApiError(404, f"No route named '{name[:100]}'", "unknown_route")
    config = current_app.config
    settle = float(config["LISTEN_SETTLE"])
    after = query.after or listening.start_cursor(settle)
    try:
        listening.time_of(after)
    except listening.BadCursor:
        raise ApiError(400, "after: not an event id of this hub", "bad_cursor") from None
    slots: listening.ListenSlots = current_app.extensions["hub.listen_slots"]
    prefix = g.listen_key.prefix
    total = max(1, int(config["WEB_THREADS"]) // 2)
    if not slots.take(prefix, int(config["LISTEN_STREAMS_PER_KEY"]), total):
        return listeners_busy()
    try:
        deadline = time.monotonic() + min(query.wait, float(config["LISTEN_WAIT"]))
        box = get_box()
        while True:
            # A read session per look, closed before the pause: a waiting listener holds
            # no database connection (PostgreSQL's are few) and no SQLite lock.
            with get_db().read_session() as reading:
                found = listening.events_after(reading, name, after, query.limit, settle)
                events = [listening.forwardable(event, box) for event in found]
            if events or time.monotonic() >= deadline or caller_left(request.environ):
                break
            time.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
    finally:
        slots.give(prefix)
    cursor = events[-1]["id"] if events else after
    return m.ListenPage(events=[m.ListenedEvent(**e) for e in events], cursor=cursor)


def caller_left(environ) -> bool:
    """Whether the listener (or nginx, on its behalf) closed the connection while its poll
    waits: the poll ends then, giving back its thread and its slot at once rather than when
    its wait runs out. Read from gunicorn's socket without taking anything from it; under
    another server (the tests' werkzeug one) it is never known, and the wait runs out."""
    sock = environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False  # open, nothing sent: the caller is still waiting
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except ConnectionError:
        return True
    except (OSError, ValueError):  # a socket that cannot be peeked at (TLS in gunicorn)
        return False


def listeners_busy():
    response, status = error_response(
        429,
        "This API key already holds its most `hub listen` polls at once "
        f"(HUB_LISTEN_STREAMS_PER_KEY); try again in {BUSY_RETRY_AFTER} seconds",
        "too_many_listeners",
    )
    response.headers["Retry-After"] = str(BUSY_RETRY_AFTER)
    return response, status


@api.route(
    bp,
    "GET",
    "/listen/events/{event_id}",
    summary="One stored event, as `hub listen --replay` forwards it",
    tag="listen",
    path_params=EVENT_ID,
    responses={200: ("The event", m.ListenedEvent), 404: ("No such event for this key", None)},
)
def listen_event(event_id: str):
    return m.ListenedEvent(**listening.forwardable(visible_event(event_id), get_box()))


@api.route(
    bp,
    "POST",
    "/listen/events/{event_id}/answers",
    summary="What the local app answered a forwarded event: kept as a `listen` attempt",
    tag="listen",
    path_params=EVENT_ID,
    body=m.LocalAnswerIn,
    responses={
        201: ("Recorded", m.LocalAnswerOut),
        404: ("No such event for this key", None),
        422: ("The body is not an answer", None),
    },
)
def record_answer(event_id: str, body: m.LocalAnswerIn):
    session = get_session()
    event = visible_event(event_id)
    answer = listening.LocalAnswer(body.status, body.duration_ms, body.error)
    attempt = listening.record_answer(session, event, answer)
    session.commit()
    return m.LocalAnswerOut(event_id=event.id, run=attempt.run, outcome=attempt.outcome), 201
