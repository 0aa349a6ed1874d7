"""Who is signed in to the dashboard: a signed session cookie, CSRF tokens, and the
security headers every dashboard answer carries.

The cookie holds a random session id, the admin key's prefix and SHA-256 digest (never its
secret), when the admin signed in, a CSRF token and any messages for the next page, signed
with the app's secret key. Each sign-in is a row of dashboard_sessions (keyed by the id's
digest), and every request checks both the row and the key (through the key cache): signing
out ends the row, so a copy of the cookie kept from before opens nothing; revoking the key
ends its rows too, so its sessions end at once in every process; a session also ends
HUB_DASHBOARD_SESSION_SECONDS after sign-in.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from flask import current_app, g, request
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select

from hub.services import audit
from hub.services import keys as key_store
from hub.store.db import get_session
from hub.store.models import DashboardSession, utcnow

COOKIE = "hub_dashboard"
SALT = "hub.dashboard.session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# No inline script or style anywhere: every script and stylesheet is a file the hub serves.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def lifetime() -> int:
    return int(current_app.config["DASHBOARD_SESSION_SECONDS"])


def _serializer() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(current_app.secret_key, salt=SALT)


def load() -> None:
    """Read the cookie into ``g.dash`` and the signed-in key into ``g.admin`` (or None)."""
    data: Any = None
    raw = request.cookies.get(COOKIE)
    if raw:
        try:
            data = _serializer().loads(raw, max_age=lifetime())
        except BadSignature:  # also an expired signature
            data = None
    g.dash = data if isinstance(data, dict) else {}
    g.dash_changed = False
    g.admin = None
    if not isinstance(g.dash.get("csrf"), str):
        g.dash["csrf"] = secrets.token_urlsafe(32)
        g.dash_changed = True
    prefix, digest, since = g.dash.get("prefix"), g.dash.get("digest"), g.dash.get("since")
    sid = g.dash.get("sid")
    if not all(isinstance(v, str) for v in (prefix, digest, sid)) or not isinstance(since, int):
        return
    if time.time() - since > lifetime():
        sign_out("Your session expired; sign in again.")
        return
    session = get_session()
    try:
        info = key_store.authenticate_digest(session, prefix, digest)
        row = session.get(DashboardSession, sid_digest(sid))
        if row is None or row.ended_at is not None or row.key_prefix != prefix:
            sign_out("Your session has ended; sign in again.")
            return
    except key_store.KeyRefused as exc:
        why = {"revoked": "was revoked", "expired": "has expired"}.get(exc.code, "is unknown")
        sign_out(f"Your admin key {why}: you were signed out.")
        return
    finally:
        # End the lookup's transaction: on SQLite it would hold the lock the views need.
        session.commit()
    if not info.is_admin:
        sign_out("Your key is no longer an admin key: you were signed out.")
        return
    g.admin = info


def sid_digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def sign_in(info: key_store.KeyInfo, presented: str, actor: audit.Actor) -> None:
    """A fresh session (a new CSRF token too: nothing from before sign-in carries over),
    recorded as a row and in the audit log; rows of sessions past their lifetime are
    cleared on the way."""
    end_row(g.dash.get("sid"))  # a sign-in over a session replaces it
    sid = secrets.token_urlsafe(32)
    session = get_session()
    key_store.open_dashboard_session(session, info.prefix, sid_digest(sid), lifetime(), actor)
    session.commit()
    g.dash = {
        "csrf": secrets.token_urlsafe(32),
        "sid": sid,
        "prefix": info.prefix,
        "digest": key_store.digest(presented.strip()),
        "since": int(time.time()),
    }
    g.dash_changed = True
    g.admin = info


def end_row(sid: Any, actor: audit.Actor | None = None) -> None:
    """End the session row ``sid`` names; ``actor``: the admin signing out (recorded)."""
    if not isinstance(sid, str):
        return
    session = get_session()
    key_store.close_dashboard_session(session, sid_digest(sid), actor)
    session.commit()


def open_sessions(prefix: str) -> int:
    """Sessions of the key ``prefix`` still open (this one among them)."""
    return int(
        get_session().scalar(
            select(func.count()).where(
                DashboardSession.key_prefix == prefix,
                DashboardSession.ended_at.is_(None),
                DashboardSession.expires_at > utcnow(),
            )
        )
        or 0
    )


def end_every_session(prefix: str, actor: audit.Actor) -> int:
    """End every open session of the key ``prefix``, in every browser; how many."""
    session = get_session()
    ended = key_store.end_dashboard_sessions(session, prefix, actor)
    session.commit()
    return ended


def sign_out(message: str | None = None, actor: audit.Actor | None = None) -> None:
    """End this session: its row first (every copy of the cookie with it), then the cookie.
    ``actor``: the admin who signed out (recorded); none when the session ended on its
    own (expired, its key refused)."""
    end_row(g.dash.get("sid"), actor)
    g.dash = {"csrf": secrets.token_urlsafe(32)}
    g.dash_changed = True
    g.admin = None
    if message:
        flash(message, "info")


def flash(message: str, kind: str = "ok") -> None:
    """A message shown on the next page rendered (kept in the cookie until then)."""
    g.dash.setdefault("flash", []).append([kind, message[:300]])
    g.dash_changed = True


def take_flashes() -> list[list[str]]:
    messages = g.dash.pop("flash", [])
    if messages:
        g.dash_changed = True
    return messages if isinstance(messages, list) else []


def csrf_token() -> str:
    return g.dash["csrf"]


def csrf_ok() -> bool:
    """The form field or the header carries this session's token."""
    sent = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    return hmac.compare_digest(sent.encode(), csrf_token().encode())


def save(response, path: str):
    """Write the cookie when the session changed, and the security headers on everything."""
    if g.get("dash_changed"):
        response.set_cookie(
            COOKIE,
            _serializer().dumps(g.dash),
            max_age=lifetime(),
            path=path,
            secure=request.is_secure,
            httponly=True,
            samesite="Lax",
        )
        response.vary.add("Cookie")
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.endpoint != "dashboard.static":
        response.headers["Cache-Control"] = "no-store"
    return response
