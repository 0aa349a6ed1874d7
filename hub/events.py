"""What admins do with stored events: find them, replay them, purge old ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session

from hub.db import Database
from hub.models import Attempt, Event, utcnow

STATUSES = (
    "pending",
    "processing",
    "retrying",
    "delivered",
    "failed",
    "dead",
    "filtered",
    "duplicate",
    "rejected",
)
REPLAYABLE = ("failed", "dead", "delivered")
FINISHED = ("delivered", "failed", "dead", "filtered", "duplicate", "rejected")


def matching(query: Select, route: str | None, status: str | None, since: datetime | None):
    """``query`` narrowed to a route, a status and a start time, where given."""
    if route:
        query = query.where(Event.route == route)
    if status:
        query = query.where(Event.status == status)
    if since:
        query = query.where(Event.received_at >= since)
    return query


def find(
    session: Session,
    *,
    route: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[Event]:
    query = select(Event).order_by(Event.received_at.desc(), Event.id.desc()).limit(limit)
    return list(session.scalars(matching(query, route, status, since)))


def replay(session: Session, event_ids: Iterable[str]) -> list[str]:
    """Put failed, dead or delivered events back to pending; the ids that were replayed.

    Attempts keep counting, so the log shows every delivery, and the retry schedule
    starts again from its first delay.
    """
    ids = list(event_ids)
    if not ids:
        return []
    replayed = session.scalars(
        update(Event.__table__)
        .where(Event.id.in_(ids), Event.status.in_(REPLAYABLE))
        .values(
            status="pending",
            next_attempt_at=utcnow(),
            completed_at=None,
            retries=0,
            lease_owner=None,
            lease_until=None,
        )
        .returning(Event.id)
    )
    return list(replayed)


def matching_ids(
    db: Database,
    *,
    status: str,
    route: str | None = None,
    since: datetime | None = None,
    batch: int = 500,
) -> Iterator[list[str]]:
    """Ids of events matching a bulk replay, in batches, oldest first (keyset paging)."""
    last = ""
    while True:
        query = select(Event.id).where(Event.id > last).order_by(Event.id).limit(batch)
        query = matching(query, route, status, since)
        with db.session() as session:
            ids = list(session.scalars(query))
        if not ids:
            return
        yield ids
        last = ids[-1]


def count(db: Database, *, status: str, route: str | None, since: datetime | None) -> int:
    query = matching(select(func.count()).select_from(Event), route, status, since)
    with db.session() as session:
        return int(session.scalar(query) or 0)


def purge(db: Database, older_than: datetime, batch: int = 500) -> int:
    """Delete finished events received before ``older_than``, with their attempts.

    Each batch is its own short transaction, so ingest is never locked out for long.
    """
    total = 0
    while True:
        with db.session() as session:
            ids = list(
                session.scalars(
                    select(Event.id)
                    .where(Event.status.in_(FINISHED), Event.received_at < older_than)
                    .order_by(Event.received_at)
                    .limit(batch)
                )
            )
            if not ids:
                return total
            session.execute(delete(Attempt).where(Attempt.event_id.in_(ids)))
            session.execute(delete(Event).where(Event.id.in_(ids)))
        total += len(ids)
