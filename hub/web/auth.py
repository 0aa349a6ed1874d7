"""Who is asking: the API key a request presents, and the one admin-key check.

``presented_key`` reads the key from the request (X-API-Key, ``Authorization: Bearer`` or
``?api_key=``). ``check_admin_key`` decides whether it opens the admin surfaces (the admin
API, /metrics, the dashboard's sign-in): the key's info, or a ``Refusal`` from ``REFUSALS``,
the one table of what a refused admin key is told, so each refusal reads the same on every
face. The key's lookup and verification are ``hub.services.keys``'s. ``log_admin_change``
logs what an admin key changed (logger ``hub.admin``), through the API or the dashboard;
``request_actor`` is who the audit log records for such a change (hub.services.audit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flask import current_app, g, request

from hub.services import audit, keys
from hub.services.intake import key_from
from hub.store.db import get_session
from hub.web.context import request_id
from hub.web.errors import error_response

log = logging.getLogger("hub.admin")

ADMIN_KEY_COMMAND = "hub keys create --admin NAME"
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Refusal:
    """Why a request was not let in: ``reason`` (a key of REFUSALS, for the logs), the HTTP
    ``status``, the answer's ``code`` and its ``sentence``."""

    reason: str
    status: int
    code: str
    sentence: str

    def response(self):
        """The JSON answer: ``{"error": sentence, "code": code}`` with the status."""
        return error_response(self.status, self.sentence, self.code)


# reason -> the refusal; ``unauthorized``, ``revoked`` and ``expired`` are KeyRefused's codes.
REFUSALS: dict[str, Refusal] = {
    refusal.reason: refusal
    for refusal in (
        Refusal("missing", 401, "unauthorized", "No API key was given: this needs an admin key"),
        *(
            Refusal(code, 401, "unauthorized", sentence)
            for code, sentence in keys.KeyRefused.SENTENCES.items()
        ),
        Refusal(
            "not_admin",
            403,
            "forbidden",
            f"This API key is not an admin key; make one with `{ADMIN_KEY_COMMAND}`",
        ),
    )
}


def presented_key() -> str | None:
    """The API key of the request being answered, where a sender or an admin may put it
    (``intake.key_from``: X-API-Key, ``Authorization: Bearer``, or ``?api_key=``)."""
    return key_from(request.headers, request.args)


def check_admin_key(presented: str | None) -> keys.KeyInfo | Refusal:
    """The admin key's info when ``presented`` is a usable admin key, else its Refusal.

    Read in the request's session; the caller commits (on SQLite the read's transaction
    holds the write lock until then)."""
    if not presented or not presented.strip():
        return REFUSALS["missing"]
    try:
        info = keys.authenticate(get_session(), presented)
    except keys.KeyRefused as exc:
        return REFUSALS[exc.code]
    if not info.is_admin:
        return REFUSALS["not_admin"]
    return info


def request_actor(face: str, prefix: str | None = None) -> audit.Actor:
    """The admin behind this request, for the audit log: the admin key's prefix (``prefix``,
    or the one the request was let in with), the face, the client's address (the proxy's
    client with HUB_TRUSTED_PROXIES) and the request id."""
    return audit.Actor(
        who=prefix or g.admin_prefix,
        face=face,
        origin=request.remote_addr,
        request_id=request_id() or None,
    )


def log_admin_change(response):
    """After a request made with an admin key (``g.admin_prefix``: the admin API's, the
    dashboard's): every change is logged with the key's prefix (the hub's log format escapes
    control characters), and this process forgets the routes it had cached: the change
    reaches its ingest at once, other processes within their cache's seconds (keys are
    never cached: a revoked key is refused at once everywhere)."""
    if request.method in CHANGES and "admin_prefix" in g:
        current_app.extensions["hub.routes"].clear()
        log.info(
            "admin key %s: %s %s -> %d",
            g.admin_prefix,
            request.method,
            request.path[:200],
            response.status_code,
        )
    return response
