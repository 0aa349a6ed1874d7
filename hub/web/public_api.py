"""The public endpoints in the OpenAPI document: /health, /ready, /hooks, /events, /api.

Their views (``system``, ``hooks``, ``seed``) answer with plain dicts; these declarations give
their shapes as models, and the document test checks every real answer against them.
"""

from __future__ import annotations

from hub.web import schemas as m
from hub.web.openapi import api

SENDER_ERRORS = {
    400: ("The body is not valid JSON, or a required field is missing", None),
    401: ("No valid API key, or a bad signature", None),
    403: ("The key may not post to this route", None),
    404: ("No such route (or it is disabled)", None),
    405: ("Webhooks must be sent with POST", None),
    413: ("The body is larger than HUB_MAX_BODY_BYTES", None),
    415: ("The body's content type is not supported", None),
    429: ("A rate limit is spent; Retry-After says when to come back", None),
    500: ("The route or its connector is misconfigured on the hub", None),
    502: ("A step failed upstream", None),
    503: ("The database is unreachable; try again after Retry-After", None),
    504: ("A sync step ran past HUB_SYNC_TIMEOUT", None),
}
ANY_JSON: dict = {"description": "Any JSON the route's steps read"}

api.describe(
    "GET",
    "/health",
    summary="Liveness: the process answers",
    tag="public",
    secured=False,
    responses={200: ("Alive", m.HealthOut)},
)
api.describe(
    "GET",
    "/ready",
    summary="Readiness: the database answers and its schema is current",
    tag="public",
    secured=False,
    responses={200: ("Ready", m.ReadyOut), 503: ("Not ready, and why", None)},
)
api.describe(
    "POST",
    "/hooks/{route}",
    summary="Send a webhook to a route (an API key, a provider signature, or both)",
    tag="public",
    secured=False,
    path_params={"route": "The route's name"},
    body_schema=ANY_JSON,
    responses={
        200: ("Delivered (sync) with its result, filtered, or a duplicate", m.HookOut),
        202: ("Stored and queued (async): status_url tells what became of it", m.HookOut),
        **SENDER_ERRORS,
    },
)
api.describe(
    "GET",
    "/hooks/{route}",
    summary="A provider's GET handshake (Dropbox's ?challenge=, Meta's ?hub.mode=subscribe)",
    description="Answered only on a route whose provider declares a GET handshake, when the "
    "request carries its parameter: the challenge, as text/plain. Any other GET is answered "
    "405, whatever the route.",
    tag="public",
    secured=False,
    path_params={"route": "The route's name"},
    responses={
        200: ("The challenge, echoed as text/plain", None),
        400: ("The challenge is longer than HUB_MAX_CHALLENGE_BYTES", None),
        403: ("Meta's hub.verify_token is not the route's verify_token", None),
        405: ("Not a handshake of this route's provider: webhooks must be sent with POST", None),
        429: ("A rate limit is spent; Retry-After says when to come back", None),
    },
    text_responses=frozenset({200}),
)
api.describe(
    "GET",
    "/events/{event_id}",
    summary="What became of an event: for the key that sent it, or an admin key",
    description="The key that sent the event sees whether it was accepted, its status, "
    "times and counts (EventStatusOut), never where it was delivered, what was sent there "
    "or answered. An admin key sees the whole event: also its result, last_error and "
    "attempt_log, as `GET /admin/api/events/{event_id}` gives them.",
    tag="public",
    path_params={"event_id": "The id a webhook's answer gave"},
    responses={
        200: ("The event, as its sender or an admin may see it", m.EventStatusOut),
        401: ("No valid API key", None),
        404: ("No such event for this key", None),
    },
)
api.describe(
    "POST",
    "/api/process",
    summary="The seed's text processing: upper-case, length and words of input",
    tag="public",
    secured=False,
    body_schema=m.ProcessIn.model_json_schema(),
    responses={200: ("Processed", m.ProcessOut), 202: ("Queued", m.ProcessOut), **SENDER_ERRORS},
)
api.describe(
    "POST",
    "/api/chat",
    summary="The seed's chat: one message to an OpenAI-compatible model",
    tag="public",
    secured=False,
    body_schema=m.ChatIn.model_json_schema(),
    responses={200: ("Answered", m.ChatOut), 202: ("Queued", m.ChatOut), **SENDER_ERRORS},
)
