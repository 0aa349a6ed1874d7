"""Pause and resume of one destination of a route: the one function each that the admin
API, the CLI and the dashboard call.

Pausing sets the destination's state to ``paused`` (when, why) and moves its pending and
retrying deliveries to ``held`` in the same transaction, keeping their next attempt time
(their order). Held deliveries are not due: no worker claims them, no run is counted.
Intake creates a paused destination's deliveries ``held``; a worker whose route cache is
older than the pause finds the state in the database before calling and holds the
delivery instead. Resuming sets the state back to ``active`` and makes the held
deliveries pending and due now in their order (an ordered destination's keys with
nothing on their way promote their next: hub.services.ordering), then wakes the workers.
Pausing a paused destination (or resuming an active one) changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from flask import Flask
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from hub.services import delivery, ordering
from hub.services import routes as route_store
from hub.store.models import Delivery, Destination, EventStatus, iso_time, lane_of, utcnow

ACTIVE = "active"
PAUSED = delivery.PAUSED
REASON_MAX = 500


@dataclass
class DestinationState:
    """A destination as the pause and resume calls answer it."""

    route: str
    name: str
    state: str
    state_changed_at: datetime | None
    state_reason: str | None
    held: int

    def to_dict(self) -> dict:
        return {
            "route": self.route,
            "name": self.name,
            "state": self.state,
            "state_changed_at": iso_time(self.state_changed_at),
            "state_reason": self.state_reason,
            "held": self.held,
        }


class NoSuchDestination(LookupError):
    """No route, or no destination of that name in it; ``args[0]`` says which."""


def held_counts(session: Session, route: str) -> dict[str, int]:
    """How many deliveries each destination of ``route`` holds."""
    rows = session.execute(
        select(Delivery.destination, func.count())
        .where(Delivery.route == route, Delivery.status == EventStatus.HELD)
        .group_by(Delivery.destination)
    ).all()
    return {name: count for name, count in rows}


def _find(session: Session, route: str, name: str) -> Destination:
    found = route_store.get(session, route)
    if found is None:
        raise NoSuchDestination(f"No route is named {route!r}")
    row = session.scalar(
        select(Destination).where(Destination.route_id == found.id, Destination.name == name)
    )
    if row is None:
        raise NoSuchDestination(f"Route {route!r} has no destination named {name!r}")
    return row


def _answer(session: Session, route: str, row: Destination) -> DestinationState:
    return DestinationState(
        route=route,
        name=row.name,
        state=row.state,
        state_changed_at=row.state_changed_at,
        state_reason=row.state_reason,
        held=held_counts(session, route).get(row.name, 0),
    )


def _roll_up(session: Session, event_ids) -> None:
    conn = session.connection()
    for event_id in sorted(set(event_ids)):
        delivery.rollup(conn, event_id)


def pause(session: Session, route: str, name: str, reason: str | None = None) -> DestinationState:
    """Pause the destination ``name`` of ``route`` and hold its waiting deliveries;
    committed. Raises NoSuchDestination."""
    row = _find(session, route, name)
    if row.state != PAUSED:
        row.state, row.state_changed_at = PAUSED, utcnow()
        row.state_reason = (reason or "")[:REASON_MAX] or None
        session.flush()
        held = session.scalars(
            update(Delivery.__table__)
            .where(
                Delivery.route == route,
                Delivery.destination == name,
                Delivery.status.in_((EventStatus.PENDING, EventStatus.RETRYING)),
            )
            .values(status=EventStatus.HELD)
            .returning(Delivery.event_id)
        ).all()
        _roll_up(session, held)
        session.commit()
    return _answer(session, route, row)


def resume(session: Session, route: str, name: str, app: Flask | None = None) -> DestinationState:
    """Resume the destination ``name`` of ``route``: its held deliveries are pending and
    due now, in their order; committed, and the workers of ``app`` woken. Raises
    NoSuchDestination."""
    row = _find(session, route, name)
    if row.state == PAUSED:
        now = utcnow()
        row.state, row.state_changed_at, row.state_reason = ACTIVE, now, None
        session.flush()
        waiting = session.scalars(
            update(Delivery.__table__)
            .where(
                Delivery.route == route,
                Delivery.destination == name,
                Delivery.status == EventStatus.HELD,
            )
            .values(
                status=EventStatus.PENDING,
                # Due now; those due before keep their times, so the order stays.
                next_attempt_at=case(
                    (Delivery.next_attempt_at.is_(None), now),
                    (Delivery.next_attempt_at > now, now),
                    else_=Delivery.next_attempt_at,
                ),
            )
            .returning(Delivery.event_id)
        ).all()
        _roll_up(session, waiting)
        # Keys of an ordered destination with nothing held and nothing on its way (their
        # head waited queued through the pause) go again; a held head is pending now, and
        # its key's next waits for it.
        promoted = ordering.promote_stalled(session.connection(), lane=lane_of(route, name))
        session.commit()
        if (waiting or promoted) and app is not None:
            delivery.wake(app)
    return _answer(session, route, row)
