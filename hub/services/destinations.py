"""Pause and resume of one destination of a route, and the manual opening and closing of
its circuit breaker: the one function each that the admin API, the CLI and the dashboard
call. Each change of state is recorded (``changes``) with its cause and actor, and each
admin's change in the audit log too (``destination.pause`` ...; a call that changes nothing
records nothing).

Pausing sets the destination's state to ``paused`` (when, why) and moves its pending and
retrying deliveries to ``held`` in the same transaction, keeping their next attempt time
(their order). Held deliveries are not due: no worker claims them, no run is counted.
Intake creates a paused destination's deliveries ``held``; a worker whose route cache is
older than the pause finds the state in the database before calling and holds the
delivery instead. Resuming sets the state back to ``active`` and makes the held
deliveries pending and due now in their order (an ordered destination's keys with
nothing on their way promote their next: hub.services.ordering), then wakes the workers.
Pausing a paused destination (or resuming an active one) changes nothing.

Pausing an open (or half-open) circuit makes it paused; resuming makes it active with a
fresh count. Opening a circuit by hand (``open_circuit``) holds its deliveries as the
breaker does, with the breaker's first cool-down before a probe; closing it
(``close_circuit``) lets its held deliveries go as resume does. Both need a breaker on
the destination, and leave a paused destination alone (it is resumed, not closed).

``overview`` is what the faces show of a route's destinations: each one's settings, state,
deliveries in flight and backlog by status, in one statement per route whose every count
stops at a cap, so a destination with a million waiting deliveries costs the same to show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Flask
from sqlalchemy import and_, func, literal, select, text, union_all
from sqlalchemy.orm import Session

from hub.connectors import Registry
from hub.services import audit, breaker, delivery, ordering
from hub.services import routes as route_store
from hub.store.crypto import SecretBox
from hub.store.models import (
    DUE_PREDICATE,
    DUE_STATUSES,
    HELD_PREDICATE,
    IN_FLIGHT_PREDICATE,
    ORDERED_PREDICATE,
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
    session: Session,
    route: str,
    row: Destination,
    previous: str,
    cause: str | None,
    actor: audit.Actor | None,
    action: str,
    held: int,
) -> breaker.Change:
    """The change in destination_changes, and in the audit log for an admin's."""
    audit.record(
        session,
        actor,
        action,
        f"{route}/{row.name}",
        {"state": {"from": previous, "to": row.state}, "cause": cause, "deliveries": held},
    )
    return breaker.record(
        session.connection(),
        breaker.Change(route, row.name, row.state, previous, cause, actor and actor.label),
        row.state_changed_at,
    )


def pause(
    session: Session,
    route: str,
    name: str,
    reason: str | None = None,
    actor: audit.Actor | None = None,
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
        cause = row.state_reason or "paused"
        change = _record(
            session, route, row, previous, cause, actor, "destination.pause", len(held)
        )
        session.commit()
        breaker.announce([change])
    return _answer(session, route, row)


def _let_go(
    session: Session,
    route: str,
    row: Destination,
    cause: str,
    actor: audit.Actor | None,
    app: Flask | None,
    action: str,
) -> None:
    """Make ``row`` active with a fresh count and its held deliveries pending in their
    order; committed, the change recorded and the workers of ``app`` woken."""
    now = utcnow()
    previous = row.state
    for column, value in breaker.closed_values(now).items():
        setattr(row, column, value)
    session.flush()
    lane = lane_of(route, row.name)
    waiting = breaker.release_held(session.connection(), lane, now)
    _roll_up(session, waiting)
    # Keys of an ordered destination with nothing held and nothing on its way (their head
    # waited queued meanwhile) go again; a held head is pending now, and its key's next
    # waits for it.
    promoted = ordering.promote_stalled(session.connection(), lane=lane)
    change = _record(session, route, row, previous, cause, actor, action, len(waiting))
    session.commit()
    breaker.announce([change])
    if (waiting or promoted) and app is not None:
        delivery.wake(app)


def resume(
    session: Session,
    route: str,
    name: str,
    app: Flask | None = None,
    actor: audit.Actor | None = None,
) -> DestinationState:
    """Resume the destination ``name`` of ``route``: its held deliveries are pending and
    due now, in their order; committed, and the workers of ``app`` woken. Raises
    NoSuchDestination."""
    row = _find(session, route, name)
    if row.state == PAUSED:
        _let_go(session, route, row, "resumed", actor, app, "destination.resume")
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
    actor: audit.Actor | None = None,
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
        change = _record(session, route, row, previous, cause, actor, "destination.open", len(held))
        session.commit()
        breaker.announce([change])
    return _answer(session, route, row)


def close_circuit(
    session: Session,
    route: str,
    name: str,
    app: Flask | None = None,
    reason: str | None = None,
    actor: audit.Actor | None = None,
) -> DestinationState:
    """Close the circuit of the destination ``name`` of ``route`` by hand: active with a
    fresh count, its held deliveries pending in their order; committed, the workers of
    ``app`` woken. Closing a closed circuit changes nothing. Raises NoSuchDestination,
    StateConflict."""
    row = _find(session, route, name)
    _with_breaker(row, route)
    if row.state != ACTIVE:
        cause = (reason or "closed by hand")[:REASON_MAX]
        _let_go(session, route, row, cause, actor, app, "destination.close")
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


# --- what every face shows of a route's destinations: state, in flight, backlog ---

# Deliveries waiting for their destination, by status: due (pending, retrying), held for a
# paused or open destination, queued behind an earlier one of their ordering key.
BACKLOG_STATUSES = (
    EventStatus.PENDING,
    EventStatus.RETRYING,
    EventStatus.HELD,
    EventStatus.QUEUED,
)
# Rows counted before a figure says "more than": the queue gauges' bound.
BACKLOG_CAP = 10_000
# Destinations whose figures one statement reads (four capped branches each: SQLite takes
# at most 500 in one compound statement).
DESTINATIONS_PER_STATEMENT = 100


@dataclass
class DestinationView:
    """A destination as the faces show it: its settings (step secrets masked), its state,
    how many of its deliveries are being called now, and how many wait, by status.

    The counts stop at a cap (``_figures``): past it, ``in_flight`` or the backlog is "at
    least" (``*_capped``), and ``oldest_waiting_at`` is the oldest among the rows read (the
    true oldest may be older)."""

    route: str
    name: str
    position: int
    settings: dict[str, Any]
    state: str
    state_changed_at: datetime | None
    state_reason: str | None
    in_flight: int
    in_flight_capped: bool
    backlog: dict[str, int]
    backlog_capped: bool
    oldest_waiting_at: datetime | None

    @property
    def waiting(self) -> int:
        return sum(self.backlog.values())

    def oldest_waiting_seconds(self, now: datetime) -> float | None:
        if self.oldest_waiting_at is None:
            return None
        return round(max(0.0, (now - self.oldest_waiting_at).total_seconds()), 3)

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or utcnow()
        return {
            "route": self.route,
            "name": self.name,
            "position": self.position,
            "state": self.state,
            "state_changed_at": iso_time(self.state_changed_at),
            "state_reason": self.state_reason,
            "in_flight": self.in_flight,
            "in_flight_capped": self.in_flight_capped,
            "backlog": dict(self.backlog),
            "backlog_total": self.waiting,
            "backlog_capped": self.backlog_capped,
            "oldest_waiting_at": iso_time(self.oldest_waiting_at),
            "oldest_waiting_seconds": self.oldest_waiting_seconds(now),
            "settings": self.settings,
        }


def overview(
    session: Session,
    route: str,
    box: SecretBox | None = None,
    registry: Registry | None = None,
    *,
    only: str | None = None,
    now: datetime | None = None,
    cap: int = BACKLOG_CAP,
) -> list[DestinationView]:
    """Each destination of ``route`` in order (or only the one named ``only``): settings
    as ``routes show`` shows them, state, in flight, backlog. Raises NoSuchDestination."""
    found = route_store.get(session, route)
    if found is None:
        raise NoSuchDestination(f"No route is named {route!r}")
    rows = route_store.destinations_of(found)
    shown = route_store.to_dict(found, box, registry)["destinations"]
    pairs = list(zip(rows, shown, strict=True))
    if only is not None:
        pairs = [(row, settings) for row, settings in pairs if row.name == only]
        if not pairs:
            raise NoSuchDestination(f"Route {route!r} has no destination named {only!r}")
    now = now or utcnow()
    figures: dict[str, _Figures] = {}
    names = [row.name for row, _ in pairs]
    for start in range(0, len(names), DESTINATIONS_PER_STATEMENT):
        chunk = names[start : start + DESTINATIONS_PER_STATEMENT]
        figures.update(_figures(session, found.name, chunk, now, cap))
    views = []
    for row, settings in pairs:
        counted = figures.get(row.name) or _Figures()
        views.append(
            DestinationView(
                route=found.name,
                name=row.name,
                position=row.position,
                settings=settings,
                state=row.state or ACTIVE,
                state_changed_at=row.state_changed_at,
                state_reason=row.state_reason,
                in_flight=min(counted.in_flight, cap),
                in_flight_capped=counted.others_capped and counted.in_flight > 0,
                backlog=_at_most(counted.backlog, cap),
                backlog_capped=counted.due() > cap
                or (counted.others_capped and counted.waiting() > counted.due()),
                oldest_waiting_at=counted.oldest,
            )
        )
    return views


@dataclass
class _Figures:
    in_flight: int = 0
    backlog: dict[str, int] = field(default_factory=dict)
    oldest: datetime | None = None
    others_capped: bool = False  # more held, queued or in flight than were read

    def due(self) -> int:
        return sum(n for status, n in self.backlog.items() if status in DUE_STATUSES)

    def waiting(self) -> int:
        return sum(self.backlog.values())


def _figures(
    session: Session, route: str, names: list[str], now: datetime, cap: int
) -> dict[str, _Figures]:
    """The figures of the destinations ``names`` of ``route``, read by ``figures_query``;
    a count past ``cap`` is ``cap``, and says so."""
    figures: dict[str, _Figures] = {}
    for name, status, other, n, oldest in session.execute(figures_query(route, names, now, cap)):
        item = figures.setdefault(name, _Figures())
        n = int(n)
        if other and n > cap:  # the read of these stopped at the cap
            item.others_capped = True
            n = cap
        if status == EventStatus.PROCESSING:
            item.in_flight += n
            continue
        item.backlog[status] = item.backlog.get(status, 0) + n
        if oldest is not None:
            oldest = _utc(oldest)
            item.oldest = oldest if item.oldest is None else min(item.oldest, oldest)
    return figures


def figures_query(route: str, names: list[str], now: datetime, cap: int):
    """One statement for the destinations ``names`` of ``route``: for each, its deliveries
    due (pending, retrying), held, queued, and being called under a live lease, each read
    along its own partial index (ix_deliveries_due_by_lane, ix_deliveries_held_by_lane,
    ix_deliveries_order, ix_deliveries_in_flight) and at most ``cap`` + 1 of each: what it
    costs is bounded by the cap, whatever the size of the deliveries table. Rows of
    (destination, status, other, count, oldest)."""
    branches = []
    since = Delivery.created_at.label("since")
    for name in names:
        lane = lane_of(route, name)
        # The lane as a range in each index's order, as the claim reads it (delivery.py's
        # _EVENTS): written `lane = ...`, PostgreSQL walks ix_deliveries_due_at instead,
        # past every other lane's due deliveries (15 ms for a lane with none, at 15,000).
        in_lane = (Delivery.lane >= lane, Delivery.lane <= lane)
        kinds = [
            (text(DUE_PREDICATE), (Delivery.lane, Delivery.next_attempt_at), False),
            (text(HELD_PREDICATE), (Delivery.lane, Delivery.next_attempt_at), True),
            (
                and_(text(ORDERED_PREDICATE), Delivery.status == EventStatus.QUEUED),
                (Delivery.lane, Delivery.order_key, Delivery.id),
                True,
            ),
            (
                and_(text(IN_FLIGHT_PREDICATE), Delivery.lease_until > now),
                (Delivery.lane, Delivery.lease_until),
                True,
            ),
        ]
        for where, order, other in kinds:
            rows = (
                select(Delivery.destination, Delivery.status, since, literal(other).label("other"))
                .where(*in_lane, where)
                .order_by(*order)
                .limit(cap + 1)
                .subquery()
            )
            branches.append(select(*rows.c))
    rows = union_all(*branches).subquery()
    return select(
        rows.c.destination, rows.c.status, rows.c.other, func.count(), func.min(rows.c.since)
    ).group_by(rows.c.destination, rows.c.status, rows.c.other)


def _utc(value: datetime | str) -> datetime:
    """A time read back from an expression (SQLite answers text there, unzoned)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _at_most(read: dict[str, int], cap: int) -> dict[str, int]:
    """The backlog by status as read, every status named. Of ``cap`` + 1 due rows read (the
    sign that more are due) one less, so the due figures add up to the cap."""
    backlog = {status.value: read.get(status, 0) for status in BACKLOG_STATUSES}
    over = sum(backlog[status] for status in DUE_STATUSES) - cap
    if over > 0:
        largest = max(DUE_STATUSES, key=lambda status: backlog[status])
        backlog[largest] -= over
    return backlog
