"""POST /hooks/<route> and GET /events/<id>: the webhook intake's HTTP face.

A view reads Flask's request into an ``Incoming`` value (``incoming``), hands it to
hub.services.intake, and turns what comes back into the JSON answer: an accepted async event
is answered 202 with its status URL, a sync one with its run's result or error, a refusal
with its status, sentence, code and headers (``answer``). A sync run holds one of its route's
slots to the end of the request.
"""

from __future__ import annotations

from urllib.parse import quote

from flask import Blueprint, Request, Response, g, request
from werkzeug.datastructures import ImmutableMultiDict

from hub.services import intake, keys, pipeline
from hub.store import storable
from hub.store.db import get_read_session
from hub.store.models import Event
from hub.web.auth import presented_key
from hub.web.context import request_id
from hub.web.errors import error_response

bp = Blueprint("hooks", __name__)

ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]


NO_ARGS = ImmutableMultiDict()


def incoming(
    route_name: str, req: Request | None = None, rid: str | None = None
) -> intake.Incoming:
    """The request being answered (Flask's, or the one the lane read), as intake takes it."""
    if req is None:
        req, rid = request, request_id()
    return intake.Incoming(
        method=req.method,
        route_name=route_name,
        path=req.path,
        headers=req.headers,
        # No query string (a webhook's usual case): no parse of one.
        args=req.args if req.query_string else NO_ARGS,
        query_string=req.query_string.decode("latin-1"),
        remote_addr=req.remote_addr,
        request_id=rid,
        content_type=req.content_type,
        content_length=req.content_length,
        read=req.stream.read,
    )


def answer(told: intake.Answer):
    """The response for what intake told the sender: JSON, or a handshake's text."""
    if told.text is not None:
        return Response(told.text, told.status, headers=dict(told.headers), mimetype="text/plain")
    if told.body is not None:
        response, status = told.body, told.status
        return response, status, dict(told.headers)
    response, status = error_response(told.status, told.message, told.code, **told.fields)
    for name, value in told.headers.items():
        response.headers[name] = value
    return response, status


def status_url(event: Event, req: Request | None = None) -> str:
    """Where the sender follows its event: ``event_status``'s URL on the host it posted to,
    under the path the hub is mounted at (what ``url_for(..., _external=True)`` gives, built
    without matching the URL map again, nor turning the URL into an IRI: 5 % of an accepted
    webhook's CPU; an event id is URL-safe)."""
    req = request if req is None else req
    environ = req.environ
    seen = (
        environ.get("wsgi.url_scheme"),
        environ.get("HTTP_HOST"),
        environ.get("SERVER_NAME"),
        environ.get("SERVER_PORT"),
        environ.get("SCRIPT_NAME"),
    )
    base = _BASES.get(seen)
    if base is None:  # Werkzeug's host check and port rules, once per way of addressing
        base = f"{req.scheme}://{req.host}{quote(req.root_path, safe='/')}"
        if len(_BASES) >= BASES_KEPT:
            _BASES.clear()
        _BASES[seen] = base
    return f"{base}/events/{event.id}"


# The start of a status URL, by the request's scheme, Host, server and mount point: senders
# use one or two; a stranger varying its Host can only make it start again.
BASES_KEPT = 256
_BASES: dict[tuple, str] = {}


def enqueue(accepted: intake.Accepted, req: Request | None = None, **extra):
    """Commit the async event and answer 202 with where to follow it (or the 401 of a key
    revoked before its commit)."""
    refused = intake.enqueue(accepted)
    if refused is not None:
        return answer(refused)
    event = accepted.event
    url = status_url(event, req)
    return {"id": event.id, **extra, "status": event.status, "status_url": url}, 202


def run_sync(accepted: intake.Accepted, status_of=None):
    """Run a sync event; the route's slot it holds is given back when the request ends."""
    g.hub_sync_held = accepted
    if status_of is None:
        return intake.run_sync(accepted)
    return intake.run_sync(accepted, status_of=status_of)


def give_back_sync_slot(_exc: BaseException | None) -> None:
    accepted = g.pop("hub_sync_held", None)
    if accepted is not None:
        intake.give_sync_slot(accepted)


def sync_busy_response(busy: intake.SyncBusy):
    return answer(intake.busy_answer(busy))


def refused_at_commit_response(refused: intake.RefusedAtCommit):
    return answer(refused.answer)


bp.teardown_request(give_back_sync_slot)
bp.register_error_handler(intake.SyncBusy, sync_busy_response)
bp.register_error_handler(intake.RefusedAtCommit, refused_at_commit_response)


@bp.route("/hooks/<route_name>", methods=ANY_METHOD)
def hook(route_name: str):
    return handle(incoming(route_name))


def handle(came: intake.Incoming, req: Request | None = None):
    """A request for /hooks/<route>, answered as a Flask view answers (hub/web/lane.py
    answers a POST the same way without Flask's request context: ``req`` is its request)."""
    accepted = intake.accept(came)
    if isinstance(accepted, intake.Answer):
        return answer(accepted)
    challenge = intake.answer_challenge(accepted)
    if challenge is not None:
        return answer(challenge)
    if accepted.route.mode == "async" or intake.waits_for_resume(accepted):
        return enqueue(accepted, req)
    outcome = run_sync(accepted)
    event = accepted.event
    if outcome.status == pipeline.DELIVERED:
        result = storable.json_answer(outcome.result)
        return {"id": event.id, "status": event.status, "result": result}, 200
    if outcome.status == pipeline.FILTERED:
        return {"id": event.id, "status": event.status}, 200
    return error_response(
        intake.failure_status(outcome), outcome.error, outcome.code or "step_failed", id=event.id
    )


@bp.get("/events/<event_id>")
def event_status(event_id: str):
    """An event's status: for the key that sent it, its acceptance, status, times and
    counts; for an admin key, everything (its result, error and attempt log)."""
    session = get_read_session()
    presented = presented_key()
    try:
        info = keys.authenticate(session, presented)
    except keys.KeyRefused:
        return error_response(401)
    # No event id holds NUL, and PostgreSQL can't even compare one that does.
    event = session.get(Event, event_id[:32]) if "\x00" not in event_id else None
    if event is None or not (info.is_admin or event.key_prefix == info.prefix):
        return error_response(404, "No such event", "not_found")
    if info.is_admin:  # the sender's fields and all the rest
        return {**event.sender_dict(), **event.to_dict(with_attempts=True)}, 200
    return event.sender_dict(), 200
