"""Read back what the hub wrote: events and attempts, oldest first."""

from __future__ import annotations

from sqlalchemy import select

from hub.store.models import Attempt, Event


def events(db) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event).order_by(Event.received_at, Event.id)))


def attempts(db) -> list[Attempt]:
    with db.session() as session:
        return list(session.scalars(select(Attempt).order_by(Attempt.id)))


def event_row(db, event_id: str) -> Event | None:
    with db.session() as session:
        return session.get(Event, event_id)


def delivery_row(db, delivery_id: str):
    from hub.store.models import Delivery

    with db.session() as session:
        return session.get(Delivery, delivery_id)


def summary(db) -> list[tuple]:
    """(step, connector, try, outcome, http_status) of every attempt, in order."""
    return [
        (a.step_index, a.connector, a.try_number, a.outcome, a.http_status) for a in attempts(db)
    ]


def insert_events(db, route: str, count: int, status: str = "pending", body: bytes = b"{}") -> None:
    """``count`` accepted events of ``route`` written by one INSERT ... SELECT, as ingest would
    have left them (``pending`` and due now, or an end state): a backlog of 20,000 in a
    fraction of a second, not minutes of posts."""
    import os

    import sqlalchemy as sa

    from hub.store.models import utcnow

    now = utcnow()
    ended = status not in ("pending", "retrying")
    table = Event.__table__
    counter = sa.select(sa.literal(1).label("i")).cte("counter", recursive=True)
    counter = counter.union_all(sa.select(counter.c.i + 1).where(counter.c.i < count))
    values = {
        "route": route,
        "method": "POST",
        "path": f"/hooks/{route}",
        "received_at": now,
        "headers": {"content-type": "application/json"},
        "content_type": "application/json",
        "body": body,
        "body_size": len(body),
        "status": status,
        "response_status": 202,
        "attempts": 1 if ended else 0,
        "retries": 0,
        "next_attempt_at": None if ended else now,
        "completed_at": now if ended else None,
    }
    columns = [sa.literal(v, type_=table.c[k].type).label(k) for k, v in values.items()]
    prefix = f"evt_{os.urandom(6).hex()}_"
    event_id = (sa.literal(prefix) + sa.cast(counter.c.i, sa.String)).label("id")
    rows = sa.select(event_id, *columns).select_from(counter)
    with db.session() as session:
        session.execute(sa.insert(table).from_select(["id", *values], rows))
        # and each accepted one its delivery to the route's first destination, as ingest
        # writes it
        # (a database still at a schema before deliveries gets them from its migration)
        has_deliveries = sa.inspect(session.connection()).has_table("deliveries")
        if status not in ("rejected", "duplicate") and has_deliveries:
            insert_deliveries(session, prefix, route)


def insert_deliveries(session, prefix: str, route: str) -> None:
    """One delivery, to ``route``'s first destination, for each event whose id starts with
    ``prefix``, carrying the event's delivery columns."""
    import sqlalchemy as sa

    from hub.store.models import Delivery, Destination, Route

    events = Event.__table__
    destination = (
        sa.select(Destination.name)
        .join(Route, Route.id == Destination.route_id)
        .where(Route.name == route, Destination.position == 0)
        .subquery()
    )
    copied = ["status", "attempts", "retries", "next_attempt_at", "completed_at"]
    rows = sa.select(
        (sa.literal("dlv_") + sa.func.substr(events.c.id, 5)).label("id"),
        events.c.id.label("event_id"),
        events.c.route,
        sa.func.coalesce(destination.c.name, "default").label("destination"),
        (events.c.route + "/" + sa.func.coalesce(destination.c.name, "default")).label("lane"),
        sa.literal(0).label("position"),
        *[events.c[column] for column in copied],
        events.c.received_at.label("created_at"),
    ).select_from(events.outerjoin(destination, sa.true()))
    rows = rows.where(events.c.id.startswith(prefix))
    columns = ["id", "event_id", "route", "destination", "lane", "position"]
    session.execute(
        sa.insert(Delivery.__table__).from_select([*columns, *copied, "created_at"], rows)
    )
