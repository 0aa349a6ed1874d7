"""Pause and resume of one destination of a route, and the manual opening and closing of
its circuit breaker: the one function each that the admin API, the CLI and the dashboard
call. Each change of state is recorded (``changes``) with its cause and actor.

Pausing sets the destination's state to ``paused`` (when, why) and moves its pending and
retrying deliveries to ``held`` in the same transaction, keeping their next attempt time
(their order). Held deliveries are not due: no worker claims them, no run is counted.
Intake creates a paused destination's deliveries ``held``; a worker whose route cache is
older than the pause finds the state in the database before calling and holds the
delivery instead. Resuming sets the state back to ``active`` and makes the held
deliveries pending and due now in their order, then wakes the workers. Pausing a paused
destination (or resuming an active one) changes nothing.

Pausing an open (or half-open) circuit makes it paused; resuming makes it active with a
fresh count. Opening a circuit by hand (``open_circuit``) holds its deliveries as the
breaker does, with the breaker's first cool-down before a probe; closing it
(``close_circuit``) lets its held deliveries go as resume does. Both need a breaker on
the destination, and leave a paused destination alone (it is resumed, not closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from flask import Flask
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.services import breaker, delivery
from hub.services import routes as route_store
from hub.store.models import (
    Delivery,
    Destination,
    DestinationChange,
    EventStatus,
    iso_time,
    lane_of,
    utcnow,
)

ACTIVE = breaker.ACTIVE
PAUSED = breaker.PAUSED
OPEN = breaker.OPEN
HALF_OPEN = breaker.HALF_OPEN
REASON_MAX = 500
CHANGES_PAGE = 50
CHANGES_MAX = 200


@dataclass
class DestinationState:
    """A destination as the pause and resume calls answer it."""

    route: str
    name: str
    state: str
    state_changed_at: datetime | None
    state_reason: str | None
    held: int
    failures: int = 0
    retry_at: datetime | None = None

    def to_dict(self) -> dict:
        return {
            "route": self.route,
            "name": self.name,
            "state": self.state,
            "state_changed_at": iso_time(self.state_changed_at),
            "state_reason": self.state_reason,
            "held": self.held,
            "failures": self.failures,
            "retry_at": iso_time(self.retry_at),
        }


class NoSuchDestination(LookupError):
    """No route, or no destination of that name in it; ``args[0]`` says which."""


class StateConflict(ValueError):
    """The change asked for does not apply to the destination as it is; ``args[0]`` says
    why, in a sentence for the admin."""


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
        failures=row.breaker_failures or 0,
        retry_at=row.breaker_retry_at,
    )


def _roll_up(session: Session, event_ids) -> None:
    conn = session.connection()
    for event_id in sorted(set(event_ids)):
        delivery.rollup(conn, event_id)


def _record(
    session: Session, route: str, row: Destination, previous: str, cause: str | None, actor
) -> breaker.Change:
    return breaker.record(
        session.connection(),
        breaker.Change(route, row.name, row.state, previous, cause, actor),
        row.state_changed_at,
    )


def pause(
    session: Session,
    route: str,
    name: str,
    reason: str | None = None,
    actor: str | None = None,
) -> DestinationState:
    """Pause the destination ``name`` of ``route`` and hold its waiting deliveries;
    committed. ``actor``: who (recorded with the change). Raises NoSuchDestination."""
    row = _find(session, route, name)
    if row.state != PAUSED:
        previous = row.state
        row.state, row.state_changed_at = PAUSED, utcnow()
        row.state_reason = (reason or "")[:REASON_MAX] or None
        # A paused circuit waits for the resume, not for a probe.
        row.breaker_retry_at = row.breaker_probe = None
        session.flush()
        held = breaker.hold_waiting(session.connection(), lane_of(route, name))
        _roll_up(session, held)
        change = _record(session, route, row, previous, row.state_reason or "paused", actor)
        session.commit()
        breaker.announce([change])
    return _answer(session, route, row)


def _let_go(
    session: Session, route: str, row: Destination, cause: str, actor, app: Flask | None
) -> None:
    """Make ``row`` active with a fresh count and its held deliveries pending in their
    order; committed, the change recorded and the workers of ``app`` woken."""
    now = utcnow()
    previous = row.state
    for column, value in breaker.closed_values(now).items():
        setattr(row, column, value)
    session.flush()
    waiting = breaker.release_held(session.connection(), lane_of(route, row.name), now)
    _roll_up(session, waiting)
    change = _record(session, route, row, previous, cause, actor)
    session.commit()
    breaker.announce([change])
    if waiting and app is not None:
        delivery.wake(app)


def resume(
    session: Session,
    route: str,
    name: str,
    app: Flask | None = None,
    actor: str | None = None,
) -> DestinationState:
    """Resume the destination ``name`` of ``route``: its held deliveries are pending and
    due now, in their order; committed, and the workers of ``app`` woken. Raises
    NoSuchDestination."""
    row = _find(session, route, name)
    if row.state == PAUSED:
        _let_go(session, route, row, "resumed", actor, app)
    return _answer(session, route, row)


def _with_breaker(row: Destination, route: str):
    spec = breaker.spec_of(row.breaker)
    if spec is None:
        raise StateConflict(
            f"Destination {row.name!r} of route {route!r} has no circuit breaker; "
            "pause it instead, or give it a breaker"
        )
    if row.state == PAUSED:
        raise StateConflict(
            f"Destination {row.name!r} of route {route!r} is paused; resume it first"
        )
    return spec


def open_circuit(
    session: Session,
    route: str,
    name: str,
    reason: str | None = None,
    actor: str | None = None,
) -> DestinationState:
    """Open the circuit of the destination ``name`` of ``route`` by hand: its waiting
    deliveries are held and a probe goes after the breaker's cool-down; committed.
    Opening an open circuit changes nothing. Raises NoSuchDestination, StateConflict."""
    row = _find(session, route, name)
    spec = _with_breaker(row, route)
    if row.state != OPEN:
        now = utcnow()
        previous = row.state
        cause = (reason or "opened by hand")[:REASON_MAX]
        row.state, row.state_changed_at, row.state_reason = OPEN, now, cause
        row.breaker_cool_down = spec.cool_down
        row.breaker_retry_at = now + timedelta(seconds=spec.cool_down)
        row.breaker_probe = None
        session.flush()
        held = breaker.hold_waiting(
            session.connection(), lane_of(route, name), in_received_order=True
        )
        _roll_up(session, held)
        change = _record(session, route, row, previous, cause, actor)
        session.commit()
        breaker.announce([change])
    return _answer(session, route, row)


def close_circuit(
    session: Session,
    route: str,
    name: str,
    app: Flask | None = None,
    reason: str | None = None,
    actor: str | None = None,
) -> DestinationState:
    """Close the circuit of the destination ``name`` of ``route`` by hand: active with a
    fresh count, its held deliveries pending in their order; committed, the workers of
    ``app`` woken. Closing a closed circuit changes nothing. Raises NoSuchDestination,
    StateConflict."""
    row = _find(session, route, name)
    _with_breaker(row, route)
    if row.state != ACTIVE:
        _let_go(session, route, row, (reason or "closed by hand")[:REASON_MAX], actor, app)
    return _answer(session, route, row)


def changes(
    session: Session, route: str, name: str, limit: int = CHANGES_PAGE
) -> list[DestinationChange]:
    """The recorded changes of the destination's state, newest first, at most ``limit``
    (up to CHANGES_MAX). Raises NoSuchDestination."""
    _find(session, route, name)
    return list(
        session.scalars(
            select(DestinationChange)
            .where(DestinationChange.route == route, DestinationChange.destination == name)
            .order_by(DestinationChange.at.desc(), DestinationChange.id.desc())
            .limit(max(1, min(limit, CHANGES_MAX)))
        )
    )
