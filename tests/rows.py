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


def insert_events(db, route: str, count: int, status: str = "pending", body: bytes = b"{}") -> None:
    """``count`` accepted events of ``route`` written in bulk, as ingest would have left them
    (``pending`` and due now, or an end state): a backlog in a second, not minutes of posts."""
    from datetime import timedelta

    from hub.models import new_event_id, utcnow

    start = utcnow()
    ended = status not in ("pending", "retrying")
    rows = []
    for i in range(count):
        at = start + timedelta(microseconds=i)
        rows.append(
            {
                "id": new_event_id(),
                "route": route,
                "method": "POST",
                "path": f"/hooks/{route}",
                "received_at": at,
                "headers": {"content-type": "application/json"},
                "content_type": "application/json",
                "body": body,
                "body_size": len(body),
                "status": status,
                "response_status": 202,
                "attempts": 1 if ended else 0,
                "retries": 0,
                "next_attempt_at": None if ended else at,
                "completed_at": at if ended else None,
            }
        )
    with db.session() as session:
        for first in range(0, count, 5000):
            session.execute(Event.__table__.insert(), rows[first : first + 5000])
