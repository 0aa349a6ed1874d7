"""Read back what the hub wrote: events and attempts, oldest first."""

from __future__ import annotations

from sqlalchemy import select

from hub.models import Attempt, Event


def events(db) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).order_by(Event.received_at, Event.id)))


def attempts(db) -> list[Attempt]:
    with db.session() as session:
        return list(session.scalars(select(Attempt).order_by(Attempt.id)))


def event_row(db, event_id: str) -> Event | None:
    with db.session() as session:
        return session.get(Event, event_id)


def summary(db) -> list[tuple]:
    """(step, connector, try, outcome, http_status) of every attempt, in order."""
    return [
        (a.step_index, a.connector, a.try_number, a.outcome, a.http_status) for a in attempts(db)
    ]
