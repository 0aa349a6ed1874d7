"""The audit log: every admin action, whatever face it came through, recorded once, by the
service function that performs it, in the transaction of the change it records.

A face hands the service who is acting as an ``Actor`` value (services never read Flask's
request): the admin API and the dashboard give the admin key's prefix, the client's address
and the request id; the CLI gives ``cli:<os user>`` from ``cli@<host>``. A service function
called without an actor (the hub's own setup, a test's fixture) is no admin's action and
writes no entry.

An action is a dotted name, one of ``ACTIONS`` (``key.create``, ``route.update``,
``events.replay`` ...). Its change is JSON built from what the faces show: route secrets
masked as ``routes show`` masks them, alert channels as their listing does, a key without
its secret; then scrubbed of any hub API key by its shape and of every secret value the
caller names (``secrets``), and cut to CHANGE_MAX_BYTES. A bulk action is one entry with its
filter and its count, never one per event.

The hub only adds entries. Nothing updates one (migration 0017's trigger refuses an UPDATE
on both databases), and the one DELETE is ``purge_expired``, the retention the workers run
(HUB_AUDIT_RETENTION_DAYS); it records itself as ``audit.purge``. Errors: ``record`` raises
ValueError for an action not in ACTIONS (a programming error, caught by the tests), and
whatever the database raises, which fails the change with it.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, delete, insert, select
from sqlalchemy.orm import Session

from hub.ops.redact import keys_in_text, values_in_text
from hub.services import paging
from hub.store.db import Database
from hub.store.models import AuditEntry, utcnow

log = logging.getLogger("hub.audit")

# The faces an action comes through; HUB is the hub itself (the log's own retention).
API = "api"
DASHBOARD = "dashboard"
CLI = "cli"
HUB = "hub"

# Every action the log records, with what it means (docs/audit.md lists the same).
ACTIONS: dict[str, str] = {
    "key.create": "an API key was created (its secret is never recorded)",
    "key.revoke": "an API key was revoked, and its dashboard sessions ended",
    "route.create": "a route was created",
    "route.update": "a route was changed: each field changed, from and to",
    "route.remove": "a route was removed (its events stay)",
    "route.secret_add": "a signing secret was added to a route (rotation)",
    "route.secret_remove": "a signing secret was removed from a route",
    "route.secrets_sealed": "step secrets a route kept in clear were encrypted (db upgrade)",
    "destination.pause": "a destination was paused",
    "destination.resume": "a paused destination was resumed",
    "destination.open": "a destination's circuit was opened by hand",
    "destination.close": "a destination's circuit was closed by hand",
    "events.replay": "events were replayed: named ones, or every one a filter matched",
    "deliveries.replay": "deliveries were replayed: named ones, or a destination's by filter",
    "delivery.skip": "a delivery was skipped (ended failed; the next of its key went)",
    "events.purge": "finished events past their retention or an age were deleted",
    "alert_channel.add": "an alert channel was added",
    "alert_channel.remove": "an alert channel was removed",
    "alert_channel.test": "a test alert was sent through a channel",
    "alert_rule.add": "an alert rule was added",
    "alert_rule.remove": "an alert rule was removed (a built-in one turned off)",
    "alert_rule.enable": "an alert rule was turned on",
    "alert_rule.disable": "an alert rule was turned off",
    "dashboard.sign_in": "an admin key signed in to the dashboard",
    "dashboard.sign_out": "a dashboard session was signed out",
    "dashboard.sign_out_everywhere": "every dashboard session of a key was ended",
    "audit.purge": "the log's retention deleted entries older than HUB_AUDIT_RETENTION_DAYS",
}
# A change longer than this (as JSON) keeps only the names of its fields.
CHANGE_MAX_BYTES = 16 * 1024
# Ids a replay of named events lists in its change (the count is always whole).
IDS_LISTED = 100
# Entries one retention transaction deletes; and how often a worker process looks.
PURGE_BATCH = 1000
PURGE_EVERY_SECONDS = 3600.0


@dataclass(frozen=True)
class Actor:
    """Who is acting: ``who`` is an admin key's prefix, ``cli:<os user>`` or ``hub``;
    ``face`` is API, DASHBOARD, CLI or HUB; ``origin`` the client's address or
    ``cli@<host>``; ``request_id`` the HTTP request's, to find its log lines."""

    who: str
    face: str
    origin: str | None = None
    request_id: str | None = None

    @property
    def label(self) -> str:
        """The actor as a destination's recorded changes name it: the key's prefix (the
        API), ``dashboard:<prefix>``, ``cli:<user>``."""
        return f"{DASHBOARD}:{self.who}" if self.face == DASHBOARD else self.who


def cli_actor() -> Actor:
    """The terminal's actor: ``cli:<os user>`` (``cli:uid-N`` where the user has no name,
    as in a container) from ``cli@<host>``."""
    try:
        import getpass

        who = f"cli:{getpass.getuser()}"
    except Exception:  # no user name for this uid
        import os

        who = f"cli:uid-{os.getuid()}" if hasattr(os, "getuid") else "cli:unknown"
    return Actor(who=who[:100], face=CLI, origin=f"cli@{socket.gethostname()}"[:200])


RETENTION_ACTOR = Actor(who="hub", face=HUB, origin=None)


def record(
    where: Session | Connection,
    actor: Actor | None,
    action: str,
    target: str | None = None,
    change: Mapping[str, Any] | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Add one entry in ``where``'s transaction (it commits with the change); nothing when
    ``actor`` is None. ``secrets``: values to cut from the change wherever they appear."""
    if action not in ACTIONS:
        raise ValueError(f"not an audit action: {action!r}")
    if actor is None:
        return
    conn = where.connection() if isinstance(where, Session) else where
    conn.execute(
        insert(AuditEntry.__table__).values(
            at=utcnow(),
            actor=actor.who,
            face=actor.face,
            origin=actor.origin,
            request_id=actor.request_id,
            action=action,
            target=None if target is None else str(target)[:200],
            change=scrubbed(change, secrets),
        )
    )


def scrubbed(change: Mapping[str, Any] | None, secrets: Iterable[str] = ()) -> Any:
    """``change`` as stored: JSON values, every string in it (keys too) with hub API keys
    (by shape) and ``secrets`` (by value) replaced, cut to CHANGE_MAX_BYTES."""
    if change is None:
        return None
    hidden = sorted({s for s in secrets if s}, key=len, reverse=True)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return keys_in_text(values_in_text(value, hidden) if hidden else value)
        if isinstance(value, Mapping):
            return {clean(str(k)): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [clean(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return clean(value.isoformat() if isinstance(value, datetime) else str(value))

    cleaned = clean(change)
    size = len(json.dumps(cleaned, ensure_ascii=False).encode())
    if size > CHANGE_MAX_BYTES:
        return {"cut": f"{size} bytes", "fields": sorted(cleaned)[:50]}
    return cleaned


def changed(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that differ between two shown forms of a thing: ``{field: {"from", "to"}}``."""
    return {
        name: {"from": before.get(name), "to": after.get(name)}
        for name in sorted(set(before) | set(after))
        if before.get(name) != after.get(name)
    }


def ids_change(ids: list[str], count: int | None = None) -> dict[str, Any]:
    """A replay of named things: how many, and the first IDS_LISTED of them."""
    listed = {"count": len(ids) if count is None else count, "ids": ids[:IDS_LISTED]}
    if len(ids) > IDS_LISTED:
        listed["ids_not_listed"] = len(ids) - IDS_LISTED
    return listed


def one_or_count(ids: list[str], noun: str) -> str:
    """A replay's target: the one id, or ``12 events``."""
    return ids[0] if len(ids) == 1 else f"{len(ids)} {noun}"


def filter_text(filters: Mapping[str, Any]) -> str:
    """A bulk action's target: its filter as ``route=orders status=dead``."""
    shown = " ".join(f"{k}={v}" for k, v in filters.items() if v is not None)
    return shown or "all"


# --- reading it ---


def _named(column, value: str, sep: str):
    """``column`` is ``value``; or, for a family (a value without ``sep``: actor ``cli``,
    action ``route``), any member of it (``cli:<user>``, ``route.*``). Both read along the
    column's (column, id) index: a single value in id order, a family as a range."""
    if sep in value or (sep == ":" and value != CLI):
        return column == value
    return and_(column > value + sep, column < value + chr(ord(sep) + 1))


def listing(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    cursor: str | None = None,
    limit: int = paging.PAGE_DEFAULT,
) -> tuple[list[AuditEntry], str | None]:
    """The newest entries first, filtered, one keyset page (by id) at a time: the entries
    and the next page's cursor (None on the last). Raises paging.BadCursor.

    With 200,000 entries, a page took 1-5 ms p50 on both databases unfiltered, by an actor,
    by an action or by time, matching or not; a family (actor ``cli``, action ``route``)
    5 ms on PostgreSQL and 39-60 ms on SQLite, which sorts the family's range; an actor and
    an action together that match nothing 23-39 ms (one index walked, the other checked)."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc())
    if cursor is not None:
        position = paging.decode("audit", cursor)
        if not position.isdigit():
            raise paging.BadCursor("not a cursor from this hub")
        query = query.where(AuditEntry.id < int(position))
    if actor:
        query = query.where(_named(AuditEntry.actor, actor, ":"))
    if action:
        query = query.where(_named(AuditEntry.action, action, "."))
    if since is not None:
        query = query.where(AuditEntry.at >= since)
    rows = list(session.scalars(query.limit(limit + 1)))
    return paging.one_page("audit", rows, limit, lambda e: str(e.id))


# --- its retention ---


def purge_expired(db: Database, days: int, now: datetime | None = None) -> int:
    """Delete the entries older than ``days`` (none when 0), PURGE_BATCH per transaction;
    how many. A purge that deleted any records itself (``audit.purge``, actor ``hub``) in
    its last transaction."""
    if days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=days)
    total = 0
    while True:
        with db.session() as session:
            ids = list(
                session.scalars(
                    select(AuditEntry.id)
                    .where(AuditEntry.at < cutoff)
                    .order_by(AuditEntry.at)
                    .limit(PURGE_BATCH)
                )
            )
            if ids:  # counted as deleted here: another process may have taken some first
                gone = session.execute(delete(AuditEntry).where(AuditEntry.id.in_(ids)))
                total += int(gone.rowcount or 0)
            if len(ids) < PURGE_BATCH:
                if total:
                    record(
                        session,
                        RETENTION_ACTOR,
                        "audit.purge",
                        f"{total} entries",
                        {"deleted": total, "before": cutoff, "retention_days": days},
                    )
                break
    if total:
        log.info("audit log: %d entries older than %d days deleted", total, days)
    return total
