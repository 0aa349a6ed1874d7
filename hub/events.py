"""What admins do with stored events: find them, replay them, purge old ones."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime

from sqlalchemy import Select, and_, delete, func, or_, select, update
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
# Statuses a replay may take: any event not in flight. Processing and retrying events count
# only without a live lease. Rejected and duplicate events were never accepted: replaying one
# would run a request the hub refused (bypassing its authentication), so they never are.
REPLAYABLE = ("delivered", "failed", "dead", "filtered", "processing", "retrying")
ENDED = ("delivered", "failed", "dead", "filtered")
NEVER_ACCEPTED = ("rejected", "duplicate")
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


def not_in_flight(now: datetime):
    """Events a replay may take: ended ones, and processing or retrying ones without a live
    lease (a worker's or a sync request's)."""
    return or_(
        Event.status.in_(ENDED),
        and_(
            Event.status.in_(("processing", "retrying")),
            or_(Event.lease_until.is_(None), Event.lease_until < now),
        ),
    )


def replay(session: Session, event_ids: Iterable[str]) -> list[str]:
    """Put events that are not in flight back to pending; the ids that were replayed.

    Attempts keep counting, so the log shows every delivery, and the retry schedule
    starts again from its first delay. ``why_not_replayed`` says why the others were not.
    """
    ids = list(event_ids)
    if not ids:
        return []
    now = utcnow()
    replayed = session.scalars(
        update(Event.__table__)
        .where(Event.id.in_(ids), not_in_flight(now))
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


def why_not_replayed(session: Session, event_ids: Iterable[str]) -> dict[str, str]:
    """For events a replay leaves alone, the reason in a sentence, by id."""
    ids = list(event_ids)
    found = {e.id: e for e in session.scalars(select(Event).where(Event.id.in_(ids)))}
    reasons = {}
    now = utcnow()
    for event_id in ids:
        event = found.get(event_id)
        if event is None:
            reasons[event_id] = "no such event"
        elif event.status in NEVER_ACCEPTED:
            reasons[event_id] = (
                f"{event.status}: never accepted, so never replayed (that would run a "
                "request the hub turned away)"
            )
        elif event.status == "pending":
            reasons[event_id] = "pending: already waiting for delivery"
        elif event.lease_until is not None and event.lease_until >= now:
            until = f"{event.lease_until:%H:%M:%S}"
            reasons[event_id] = f"{event.status}: in flight (leased until {until} UTC)"
        else:
            reasons[event_id] = f"{event.status}: not replayable"
    return reasons


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
