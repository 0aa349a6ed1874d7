"""The circuit breaker of a destination: a receiver that keeps failing is left alone for a
while instead of having every delivery burn through its retry schedule against it.

Only destinations with a ``breaker`` setting have one (BreakerSpec in routes.py). Its state
is the destination's row, shared by every process through the database:

- ``active`` (closed): each retryable failure of a run adds one to ``breaker_failures``,
  in the transaction that writes the run's ending; a delivered run sets it back to 0 (a
  write only when it isn't 0 already). A permanent failure (a 4xx: the payload's fault,
  not the receiver being down) and a filtered event neither count nor reset.
- ``open``: reached when the count reaches ``failures``. The destination's pending and
  retrying deliveries become ``held`` (as a pause holds them), and so does the failing
  delivery, its retry not spent; new ones are created held. ``breaker_retry_at`` says when
  a probe may go.
- ``half_open``: once that time has come, one worker's periodic look (``tick``, at most
  once a second per process) flips the state with a conditional UPDATE (one winner across
  processes) and lets the oldest held delivery go as the probe (``breaker_probe``). With
  nothing held, the circuit stays open until a delivery arrives, which then is the probe.
  Only the probe is called; every other delivery of the destination waits held.
- The probe's ending decides: delivered closes the circuit (count 0, the cool-down back to
  its start, the held deliveries pending in their order); a retryable failure opens it
  again for twice the last cool-down (at most ``max_cool_down``); an ending that says
  nothing of the receiver (a permanent failure, filtered) passes the probe on to the next
  held delivery.

Every change of state is a ``DestinationChange`` row (to, from, cause, actor: "breaker" for
these, the admin for the manual ones in destinations.py) and a log line.

These functions write through the connection (or session) they are given and never commit:
the caller's transaction holds the change and its deliveries together. They return the ids
of the events whose deliveries they moved, for the caller to roll up (delivery.rollup).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, insert, select, update

from hub.ops import metrics
from hub.services.routes import BreakerSpec
from hub.store.db import Database
from hub.store.models import (
    Delivery,
    Destination,
    DestinationChange,
    EventStatus,
    Route,
    utcnow,
)

log = logging.getLogger("hub.breaker")

ACTIVE = "active"
PAUSED = "paused"
OPEN = "open"
HALF_OPEN = "half_open"
# The states in which a destination's new deliveries are created held.
HOLDING = (PAUSED, OPEN, HALF_OPEN)
BREAKER_ACTOR = "breaker"
CAUSE_MAX = 500
# A worker looks for circuits whose cool-down is over at most this often (seconds).
TICK_SECONDS = 1.0
# Deliveries of a lane that are on their way: a half-open circuit's probe is one of them.
_LIVE = (EventStatus.PENDING, EventStatus.RETRYING, EventStatus.PROCESSING)


def holds(state: str | None, probe: str | None, delivery_id: str) -> bool:
    """Whether a delivery of a destination in ``state`` must wait instead of being called:
    paused or open, or half-open and not its probe."""
    if state in (PAUSED, OPEN):
        return True
    return state == HALF_OPEN and probe != delivery_id


def spec_of(breaker: dict[str, Any] | None):
    """The destination's BreakerSpec, or None when it has no breaker."""
    if not breaker:
        return None
    return BreakerSpec.model_validate(breaker)


@dataclass
class Change:
    """A change of a destination's state, written and to be logged (``announce``)."""

    route: str
    destination: str
    state: str
    previous: str | None
    cause: str | None
    actor: str | None


@dataclass
class Turn:
    """What a run's ending did to the breaker: the delivery's columns to write instead of
    its own (held, its retry not spent), the changes made, the events whose other
    deliveries moved, and whether held deliveries were let go (workers to wake)."""

    values: dict[str, Any] | None = None
    changes: list[Change] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    released: bool = False


def record(conn: Connection, change: Change, now: datetime | None = None) -> Change:
    """Write ``change`` to destination_changes."""
    conn.execute(
        insert(DestinationChange.__table__).values(
            route=change.route,
            destination=change.destination,
            state=change.state,
            previous=change.previous,
            cause=(change.cause or "")[:CAUSE_MAX] or None,
            actor=(change.actor or "")[:100] or None,
            at=now or utcnow(),
        )
    )
    return change


def announce(changes: list[Change]) -> None:
    """Log each change (after its commit) and count the openings."""
    for change in changes:
        log.warning(
            "destination %s of route %s: %s -> %s (%s; by %s)",
            change.destination,
            change.route,
            change.previous,
            change.state,
            change.cause or "no cause given",
            change.actor or "unknown",
        )
        if change.state == OPEN:
            metrics.breaker_opened(change.route, change.destination)


def hold_waiting(conn: Connection, lane: str, in_received_order: bool = False) -> list[str]:
    """Hold the lane's pending and retrying deliveries; their events. They keep their next
    attempt times (their order), or with ``in_received_order`` take the time they were
    received instead: an open circuit lets them go in the order they came, its probe the
    oldest, whatever retries some of them had been given before it opened."""
    values: dict[str, Any] = {"status": EventStatus.HELD}
    if in_received_order:
        values["next_attempt_at"] = Delivery.created_at
    return list(
        conn.scalars(
            update(Delivery.__table__)
            .where(
                Delivery.lane == lane,
                Delivery.status.in_((EventStatus.PENDING, EventStatus.RETRYING)),
            )
            .values(**values)
            .returning(Delivery.event_id)
        )
    )


def release_held(conn: Connection, lane: str, now: datetime) -> list[str]:
    """Make the lane's held deliveries pending and due now, in their order; their events."""
    return list(
        conn.scalars(
            update(Delivery.__table__)
            .where(Delivery.lane == lane, Delivery.status == EventStatus.HELD)
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
        )
    )


def oldest_held(conn: Connection, lane: str) -> str | None:
    """The id of the lane's oldest held delivery (ix_deliveries_held_by_lane)."""
    return conn.scalar(
        select(Delivery.id)
        .where(Delivery.lane == lane, Delivery.status == EventStatus.HELD)
        .order_by(Delivery.next_attempt_at, Delivery.id)
        .limit(1)
    )


def let_probe_go(conn: Connection, probe: str, now: datetime) -> list[str]:
    """The held delivery ``probe`` pending and due now; its event."""
    return list(
        conn.scalars(
            update(Delivery.__table__)
            .where(Delivery.id == probe, Delivery.status == EventStatus.HELD)
            .values(status=EventStatus.PENDING, next_attempt_at=now)
            .returning(Delivery.event_id)
        )
    )


def _open_values(cool_down: int, now: datetime, cause: str) -> dict[str, Any]:
    return {
        "state": OPEN,
        "state_changed_at": now,
        "state_reason": cause[:CAUSE_MAX],
        "breaker_retry_at": now + timedelta(seconds=cool_down),
        "breaker_cool_down": cool_down,
        "breaker_probe": None,
    }


def closed_values(now: datetime, reason: str | None = None) -> dict[str, Any]:
    """A destination's columns once active again: a fresh count, the cool-down reset."""
    return {
        "state": ACTIVE,
        "state_changed_at": now,
        "state_reason": reason,
        "breaker_failures": 0,
        "breaker_retry_at": None,
        "breaker_cool_down": None,
        "breaker_probe": None,
    }


def _error_of(values: dict[str, Any]) -> str:
    error = " ".join(str(values.get("last_error") or "a retryable failure").split())
    return error[:200]


def after_run(
    conn: Connection,
    destination_id: int,
    spec,
    delivery: Delivery,
    values: dict[str, Any],
) -> Turn | None:
    """Count a run's ending on its destination's breaker, in the ending's transaction
    (``values``: the delivery's columns as the ending writes them, already written). A
    Turn when the breaker acted, else None."""
    status = values.get("status")
    now = utcnow()
    table = Destination.__table__
    me = Destination.id == destination_id
    route, name, lane = delivery.route, delivery.destination, delivery.lane
    if status in (EventStatus.RETRYING, EventStatus.HELD, EventStatus.DEAD):
        row = conn.execute(
            update(table)
            .where(me)
            .values(breaker_failures=Destination.breaker_failures + 1)
            .returning(
                Destination.breaker_failures,
                Destination.state,
                Destination.breaker_probe,
                Destination.breaker_cool_down,
            )
        ).one_or_none()
        if row is None:
            return None
        turn = Turn()
        if row.state == HALF_OPEN and row.breaker_probe == delivery.id:
            cool_down = min(max(row.breaker_cool_down or spec.cool_down, 1) * 2, spec.max_cool_down)
            cause = f"the probe failed: {_error_of(values)}; next probe in {cool_down} s"
            conn.execute(update(table).where(me).values(**_open_values(cool_down, now, cause)))
            turn.changes.append(
                record(conn, Change(route, name, OPEN, HALF_OPEN, cause, BREAKER_ACTOR), now)
            )
        elif row.state == ACTIVE and row.breaker_failures >= spec.failures:
            cause = (
                f"{row.breaker_failures} consecutive failures; last: {_error_of(values)}; "
                f"probe in {spec.cool_down} s"
            )
            opened = conn.execute(
                update(table)
                .where(me, Destination.state == ACTIVE)
                .values(**_open_values(spec.cool_down, now, cause))
            ).rowcount
            if not opened:
                return None
            turn.changes.append(
                record(conn, Change(route, name, OPEN, ACTIVE, cause, BREAKER_ACTOR), now)
            )
            turn.events = hold_waiting(conn, lane, in_received_order=True)
        elif row.state == ACTIVE:
            return None
        # Open (now or already), paused, or half-open with another probe: the receiver is
        # down, not this delivery's fault; it waits held with its retry not spent.
        turn.values = {
            "status": EventStatus.HELD,
            "retries": delivery.retries,
            "next_attempt_at": delivery.created_at or now,
            "completed_at": None,
        }
        return turn
    if status == EventStatus.DELIVERED:
        row = conn.execute(
            update(table)
            .where(
                me,
                (Destination.breaker_failures > 0) | (Destination.breaker_probe == delivery.id),
            )
            .values(breaker_failures=0)
            .returning(Destination.state, Destination.breaker_probe)
        ).one_or_none()
        if row is None or row.state != HALF_OPEN or row.breaker_probe != delivery.id:
            return None
        cause = "the probe was delivered"
        conn.execute(update(table).where(me).values(**closed_values(now)))
        turn = Turn(released=True)
        turn.changes.append(
            record(conn, Change(route, name, ACTIVE, HALF_OPEN, cause, BREAKER_ACTOR), now)
        )
        turn.events = release_held(conn, lane, now)
        return turn
    # Failed for good, or filtered: nothing learnt of the receiver. A probe that ended so
    # hands its turn to the next held delivery.
    if (
        conn.scalar(select(Destination.breaker_probe).where(me, Destination.state == HALF_OPEN))
        != delivery.id
    ):
        return None
    following = oldest_held(conn, lane)
    conn.execute(
        update(table)
        .where(me, Destination.state == HALF_OPEN, Destination.breaker_probe == delivery.id)
        .values(breaker_probe=following)
    )
    turn = Turn(released=following is not None)
    if following is not None:
        turn.events = let_probe_go(conn, following, now)
    return turn


def any_open(conn: Connection) -> bool:
    """Whether any destination's circuit is open or half-open (a read of a tiny table)."""
    return (
        conn.scalar(select(Destination.id).where(Destination.state.in_((OPEN, HALF_OPEN))).limit(1))
        is not None
    )


def tick(conn: Connection, now: datetime | None = None) -> Turn:
    """One look at the open and half-open circuits (a tiny read of the destinations
    table): each open one whose cool-down is over turns half-open and lets its oldest held
    delivery go as the probe; a half-open one whose probe is no longer on its way (replayed
    or ended another way) lets the next held one go; one whose breaker was turned off
    closes. Conditional updates: one process wins each change."""
    now = now or utcnow()
    turn = Turn()
    rows = conn.execute(
        select(
            Destination.id,
            Route.name.label("route"),
            Destination.name,
            Destination.state,
            Destination.breaker,
            Destination.breaker_retry_at,
            Destination.breaker_probe,
        )
        .join(Route, Route.id == Destination.route_id)
        .where(Destination.state.in_((OPEN, HALF_OPEN)))
    ).all()
    table = Destination.__table__
    for row in rows:
        lane = f"{row.route}/{row.name}"
        me = (Destination.id == row.id) & (Destination.state == row.state)
        if not row.breaker:
            cause = "the circuit breaker was turned off"
            if conn.execute(update(table).where(me).values(**closed_values(now))).rowcount:
                turn.changes.append(
                    record(
                        conn,
                        Change(row.route, row.name, ACTIVE, row.state, cause, BREAKER_ACTOR),
                        now,
                    )  # fmt: skip
                )
                turn.events += release_held(conn, lane, now)
                turn.released = True
            continue
        if row.state == OPEN:
            if row.breaker_retry_at is None or row.breaker_retry_at > now:
                continue
            probe = oldest_held(conn, lane)
            if probe is None:  # nothing to try: the next delivery accepted is the probe
                continue
            cause = "cool-down over; one probe delivery let through"
            flipped = conn.execute(
                update(table)
                .where(me, Destination.breaker_retry_at <= now)
                .values(
                    state=HALF_OPEN,
                    state_changed_at=now,
                    state_reason=cause,
                    breaker_retry_at=None,
                    breaker_probe=probe,
                )
            ).rowcount
            if flipped:
                turn.changes.append(
                    record(
                        conn,
                        Change(row.route, row.name, HALF_OPEN, OPEN, cause, BREAKER_ACTOR),
                        now,
                    )  # fmt: skip
                )
                turn.events += let_probe_go(conn, probe, now)
                turn.released = True
            continue
        # Half-open: is its probe still on its way?
        if (
            row.breaker_probe is not None
            and conn.scalar(select(Delivery.status).where(Delivery.id == row.breaker_probe))
            in _LIVE
        ):
            continue
        following = oldest_held(conn, lane)
        if following is None and row.breaker_probe is None:
            continue
        passed = conn.execute(
            update(table)
            .where(me, Destination.breaker_probe.is_not_distinct_from(row.breaker_probe))
            .values(breaker_probe=following)
        ).rowcount
        if passed and following is not None:
            turn.events += let_probe_go(conn, following, now)
            turn.released = True
    return turn


def state_gauges(db: Database, cap: int) -> list[tuple[str, str, str]]:
    """(route, destination, state) of the destinations that are not active, up to ``cap``:
    what /metrics shows."""
    with db.read_session() as session:
        rows = session.execute(
            select(Route.name, Destination.name, Destination.state)
            .join(Route, Route.id == Destination.route_id)
            .where(Destination.state != ACTIVE)
            .order_by(Route.name, Destination.name)
            .limit(cap)
        ).all()
    return [(route, name, state) for route, name, state in rows]
