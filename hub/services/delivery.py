"""Delivery: claim due deliveries from the database, run them, write how they ended.

An accepted event has one delivery per destination of its route; each is claimed, run
(that destination's filter and steps), retried on that destination's schedule and ended on
its own, so a destination that was called successfully is never called again because
another one failed. The event's own status, runs, result and error are the roll-up of its
deliveries (``rollup``), written in the same transaction as each delivery's outcome.

A claim is one atomic statement that moves due deliveries to ``processing`` under a lease
(PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so any number of workers on any number of machines
share one database; SQLite: ``UPDATE ... RETURNING`` under its single write lock). It takes
due deliveries in turns across lanes (a lane is one destination of one route), and a lane
holds at most ``HUB_WORKER_ROUTE_SHARE`` of a worker's delivery threads: one destination's
backlog or slow receiver cannot hold back another's deliveries (``fair_pick``). A worker
that dies leaves a lease that expires, and the event is claimed again: delivery is
at-least-once, and a receiver that must not see a repeat dedups on the event id.

Every event reaches an end state or holds a live lease: a claim of an expired lease counts
against the route's retry schedule (an event that kills its worker ends ``dead``), an outcome
that can't be written is retried per the schedule, and a sync request's event, leased by the
web process running it, is marked ``failed`` by any worker's reaper if that process died.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import socket
import threading
import time
import types
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from flask import Flask
from sqlalchemy import (
    TextClause,
    and_,
    any_,
    bindparam,
    case,
    func,
    literal_column,
    not_,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from hub import rates
from hub.ops import logs, metrics
from hub.services import alerts, audit, breaker, ordering, pipeline, retention
from hub.services import routes as route_store
from hub.store.db import NOTIFY_CHANNEL, Database
from hub.store.groupcommit import GroupCommitter, row_of
from hub.store.models import (
    DUE_PREDICATE,
    DUE_STATUSES,
    IN_FLIGHT_PREDICATE,
    Attempt,
    Delivery,
    Destination,
    Event,
    EventStatus,
    Route,
    columns_of,
    lane_of,
    loaded,
    utcnow,
)

log = logging.getLogger("hub.worker")

MIN_IDLE = 0.05
# A claim takes events for the threads that will soon be free too: those idle, and those
# whose delivery started less than this many seconds ago. An event claimed ahead waits for
# one of them, never behind a slow receiver (the drain: one claim for a batch, not one an
# event, which cost a third of its rate).
PREFETCH_AGE = 0.5
# A lane whose last delivery here ran in under QUICK seconds and ended the usual way
# (``Worker._usual``: no breaker to count it, no ordering key) is quick: a delivery thread
# takes up to GROUP of its claimed deliveries at once, runs them one after the other and
# writes their endings in one transaction (a claim's statements and an ending's, paid for
# one or two deliveries each, were most of a drain's cost). A thread starts no more of its
# group once GROUP_SECONDS have passed: the rest go back for the other threads, so another
# lane's delivery waits at most about that long behind a group. A delivery claimed more
# than PREFETCH_AGE before its call reads its destination's state again (a pause, an open
# circuit), as one claimed alone does.
QUICK = 0.05
GROUP = 32
GROUP_SECONDS = 0.2
# The lease owner of a sync request's event starts with this: workers never claim it.
SYNC_LEASE_PREFIX = "sync:"
# A reaper pass runs every this many HUB_WORKER_MAX_IDLE (20 s by default).
REAP_EVERY_IDLES = 10
LEASE_EXPIRED = "a delivery did not finish before its lease ran out (the worker died or hung)"
SYNC_PROCESS_DIED = (
    "the process handling the sync request died before it answered (or could not record "
    "the outcome); replay the event to run it again"
)


def process_name() -> str:
    return f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def sync_lease(seconds: float) -> tuple[str, datetime]:
    """Lease owner and expiry for a sync request's event, run by this process."""
    return SYNC_LEASE_PREFIX + process_name(), utcnow() + timedelta(seconds=seconds)


def reap_sync_events(db: Database) -> list[str]:
    """Mark ``failed`` the sync events whose process died (their lease ran out); their ids.

    They are replayable, and never redelivered on their own: the sender got no answer and
    retries by itself.
    """
    now = utcnow()
    ended = {
        "status": EventStatus.FAILED,
        "last_error": SYNC_PROCESS_DIED,
        "completed_at": now,
        "next_attempt_at": None,
        "lease_owner": None,
        "lease_until": None,
    }

    def died(table):  # the sync runs of ``table`` (deliveries, events) whose process died
        return (
            update(table.__table__)
            .where(
                table.status == EventStatus.PROCESSING,
                table.lease_owner.startswith(SYNC_LEASE_PREFIX, autoescape=True),
                table.lease_until < now,
            )
            .values(**ended)
        )

    with db.session() as session:
        session.execute(died(Delivery))
        reaped = list(session.execute(died(Event).returning(Event.id, Event.route)))
    for event_id, route in reaped:
        log.warning("event %s: %s", event_id, SYNC_PROCESS_DIED)
        metrics.event_ended(route, EventStatus.FAILED)
    return [event_id for event_id, _ in reaped]


def one_of(column: Any, values: list[Any], dialect: str) -> Any:
    """``column IN (values)``; on PostgreSQL ``column = ANY(<one array parameter>)``, whose
    SQL is the same for any count: an IN list's parameters were written into the SQL of
    every claim and every group's ending, and the driver parsed that text again (a tenth
    of the claim)."""
    if dialect != "postgresql":
        return column.in_(values)
    return column == any_(bindparam(None, values, type_=ARRAY(column.type)))


def destination_named(route: Route, name: str) -> Destination | None:
    """The route's destination called ``name``, or None once it is removed."""
    for destination in route_store.destinations_of(route):
        if destination.name == name:
            return destination
    return None


PAUSED = "paused"


def lane_states(session: Any, routes: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """The state and circuit probe of every destination of ``routes``, by lane: one read."""
    rows = session.execute(
        select(Route.name, Destination.name, Destination.state, Destination.breaker_probe)
        .join(Route, Route.id == Destination.route_id)
        .where(Route.name.in_(sorted(set(routes))))
    ).all()
    return {lane_of(route, name): (state, probe) for route, name, state, probe in rows}


# The state of the destination named :name of the route named :route, and its circuit's
# probe (breaker.holds). Built once: a statement built for each delivery, and its cache key
# computed again, were half of reading it, which a delivery claimed in a large group does.
DESTINATION_STATE = (
    select(Destination.state, Destination.breaker_probe)
    .join(Route, Route.id == Destination.route_id)
    .where(Route.name == bindparam("route"), Destination.name == bindparam("name"))
)


def schedule_for(route: Route, destination: Destination) -> list[int] | None:
    """The destination's retry schedule, else the route's (None: the hub's default)."""
    if destination.retry_schedule is not None:
        return destination.retry_schedule
    return route.retry_schedule


def schedule_of(schedule: list[int] | None) -> list[int]:
    """A route's retry schedule, or the hub's default one."""
    return route_store.DEFAULT_RETRY_SCHEDULE if schedule is None else schedule


def retry_delay(schedule: list[int], retries: int, retry_after: float | None) -> float | None:
    """Seconds until the next durable retry, or None when the schedule is used up."""
    if retries >= len(schedule):
        return None
    return max(float(schedule[retries]), retry_after or 0.0)


# One definition of "due" for the fair claim's statement: the partial index's own predicate.
_DUE = DUE_PREDICATE.replace("status", "e.status")

# The lanes (a route's destination: ``lane_of``) with deliveries waiting, one index probe
# each (ix_deliveries_due_by_lane): a walk that jumps from one lane to the next instead of
# reading every waiting delivery.
_LANES = f"""
lanes(lane) AS (
    SELECT (SELECT e.lane FROM {{events}} WHERE {_DUE} ORDER BY e.lane LIMIT 1)
    UNION ALL
    SELECT (SELECT e.lane FROM {{events}} WHERE {_DUE} AND e.lane > lanes.lane
            ORDER BY e.lane LIMIT 1)
    FROM lanes WHERE lanes.lane IS NOT NULL
)"""

# Of those, the lanes with a delivery due now and room left, in turn from the one past the
# lane served last (at most one lane for each delivery asked for).
_OPEN_LANES = f"""
open_lanes AS (
    SELECT l.lane, l.room,
           row_number() OVER (ORDER BY l.lane{{c}} <= :after, l.lane{{c}}) AS lane_turn
    FROM (SELECT lane, {{room}} AS room FROM lanes WHERE lane IS NOT NULL) l
    WHERE l.room > 0 AND (
        SELECT e.next_attempt_at FROM {{events}}
        WHERE e.lane >= l.lane AND e.lane <= l.lane AND {_DUE}
        ORDER BY e.lane, e.next_attempt_at LIMIT 1) <= :now
    ORDER BY l.lane{{c}} <= :after, l.lane{{c}}
    LIMIT :n
)"""

# The first due deliveries of each open lane, oldest first, numbered within the lane.
# PostgreSQL locks them as it reads them (SKIP LOCKED: another worker's claim of the
# moment is passed over, not waited for); SQLite's single writer needs no lock.
_HEADS = {
    "postgresql": f"""
heads AS (
    SELECT h.id, o.lane_turn, o.room,
           row_number() OVER (PARTITION BY o.lane ORDER BY h.next_attempt_at, h.id) AS turn
    FROM open_lanes o CROSS JOIN LATERAL (
        SELECT e.id, e.next_attempt_at FROM deliveries e
        WHERE e.lane >= o.lane AND e.lane <= o.lane AND {_DUE}
          AND e.next_attempt_at <= :now
        ORDER BY e.lane, e.next_attempt_at LIMIT LEAST(o.room, :n)
        FOR UPDATE SKIP LOCKED) h
)""",
    "sqlite": f"""
heads AS (
    SELECT e.id, o.lane_turn, o.room,
           row_number() OVER (PARTITION BY o.lane ORDER BY e.next_attempt_at, e.id) AS turn
    FROM open_lanes o JOIN deliveries e ON e.id IN (
        SELECT x.id FROM deliveries x INDEXED BY ix_deliveries_due_by_lane
        WHERE x.lane = o.lane AND {_DUE.replace("e.", "x.")} AND x.next_attempt_at <= :now
        ORDER BY x.next_attempt_at LIMIT :n)
)""",
}


# PostgreSQL reads a lane's deliveries as the range [lane, lane] ordered by (lane,
# next_attempt_at), the lane index's own order, which no other index gives: written
# `lane = ...`, the planner drops the lane from the order (it is fixed) and, with one big
# lane in its statistics, walks ix_deliveries_due_at instead, reading every other lane's
# waiting deliveries to reach this lane's first (5,000 entries for one delivery). SQLite's
# planner, without statistics, walks the status index and sorts every waiting delivery of
# the first lane (14 ms at 20,000 waiting): it is told the index (0.1 ms). Lanes are put
# in turn byte by byte, as Python compares them with the lane served last.
_EVENTS = {
    "postgresql": "deliveries e",
    "sqlite": "deliveries e INDEXED BY ix_deliveries_due_by_lane",
}
_COLLATE = {"postgresql": ' COLLATE "C"', "sqlite": ""}


def fair_pick(
    dialect: str, limit: int, now: datetime, after: str, share: int, room: dict[str, int]
) -> TextClause:
    """The ids of up to ``limit`` due deliveries taken in turns across lanes (a lane is one
    destination of one route, ``lane_of``): the oldest due delivery of each lane with room,
    starting past lane ``after``, then the second of each, and so on. A lane may hold
    ``share`` deliveries of this worker; ``room`` is what is left to the lanes it holds
    some of already (or may take at all).

    One statement, each step an index probe (ix_deliveries_due_by_lane): two for each lane
    with deliveries waiting, then the deliveries taken.
    """
    params: dict[str, Any] = {"n": limit, "after": after, "share": share}
    cases = []
    for i, (lane, left) in enumerate(sorted(room.items())):
        params[f"lane_{i}"], params[f"left_{i}"] = lane, left
        cases.append(f"WHEN :lane_{i} THEN :left_{i}")
    room_sql = f"CASE lane {' '.join(cases)} ELSE :share END" if cases else ":share"
    sql = (
        (
            "WITH RECURSIVE"
            + _LANES
            + ","
            + _OPEN_LANES.replace("{room}", room_sql)
            + ","
            + _HEADS[dialect]
            + "\nSELECT id FROM heads WHERE turn <= room ORDER BY turn, lane_turn LIMIT :n"
        )
        .replace("{events}", _EVENTS[dialect])
        .replace("{c}", _COLLATE[dialect])
    )
    return (
        text(sql)
        .bindparams(**params)
        .bindparams(bindparam("now", now, type_=Delivery.next_attempt_at.type))
        .columns(Delivery.id)
    )


def rotation(after: str):
    """Sort key of the turn order that starts past lane ``after``: the lanes after it,
    then the others from the start (the order ``fair_pick`` serves them in)."""
    return lambda lane: (lane <= after, lane)


def in_turns(deliveries: list[Delivery], after: str) -> list[Delivery]:
    """Claimed deliveries in the order ``fair_pick`` chose them: turns across lanes."""
    lanes: dict[str, list[Delivery]] = collections.defaultdict(list)
    for delivery in sorted(deliveries, key=lambda d: (d.next_attempt_at, d.id)):
        lanes[delivery.lane].append(delivery)
    order = sorted(lanes, key=rotation(after))
    turns = []
    for turn in range(max((len(v) for v in lanes.values()), default=0)):
        turns += [lanes[lane][turn] for lane in order if turn < len(lanes[lane])]
    return turns


# Of the deliveries still on their way, the most active first: what the event shows.
_ACTIVE = (EventStatus.PROCESSING, EventStatus.PENDING, EventStatus.RETRYING)
_REACHED = (EventStatus.DELIVERED, EventStatus.FILTERED)
# Not ended, and not due: held (paused destination, open circuit), queued (behind the
# delivery before it with the same ordering key).
_WAITING = (EventStatus.HELD, EventStatus.QUEUED)
# A delivery's statuses after a run that keep its ordering key blocked: it is still its
# key's one delivery on its way.
_BLOCKING = (EventStatus.RETRYING, EventStatus.HELD)


def rolled_up_status(statuses: Sequence[str]) -> str:
    """An event's status from its deliveries': while any is on its way, the most active of
    those (processing, then pending, then retrying), else ``held`` while any waits for its
    paused (or open) destination, else ``queued`` while any waits for the delivery before it
    with the same ordering key; once all ended: ``delivered`` if every
    one was delivered or filtered (``filtered`` if all were filtered), ``partial`` if some
    were and others ended dead or failed, ``failed`` if all failed, else ``dead``."""
    for status in _ACTIVE:
        if status in statuses:
            return status
    for status in _WAITING:
        if status in statuses:
            return status
    if statuses and all(s == EventStatus.FILTERED for s in statuses):
        return EventStatus.FILTERED
    if all(s in _REACHED for s in statuses):
        return EventStatus.DELIVERED
    if any(s in _REACHED for s in statuses):
        return EventStatus.PARTIAL
    if all(s == EventStatus.FAILED for s in statuses):
        return EventStatus.FAILED
    return EventStatus.DEAD


# What a roll-up reads of each delivery.
ROLLED = (
    "id",
    "status",
    "attempts",
    "retries",
    "next_attempt_at",
    "completed_at",
    "result",
    "last_error",
)


def rollup(conn, event_id: str, latest: str | None = None, alone: Any = None) -> str | None:
    """Write the event's status, runs, next attempt, completion, result and error as the
    roll-up of its deliveries (``rolled_up_status``; ``latest``: the delivery that just
    ended, whose error is the latest); the status written, or None for an event with no
    delivery. On PostgreSQL the event's row is locked first, so two deliveries ending at
    once each see the other's outcome: the second waits for the first's commit. ``alone``,
    the ROLLED columns of an event's only delivery as they now stand, is rolled up without
    reading anything: no other delivery can end at the same time."""
    if alone is not None:
        rows = [alone]
    else:
        if conn.dialect.name == "postgresql":
            conn.execute(select(Event.id).where(Event.id == event_id).with_for_update())
        rows = conn.execute(
            select(*(getattr(Delivery, column) for column in ROLLED))
            .where(Delivery.event_id == event_id)
            .order_by(Delivery.position, Delivery.id)
        ).all()
    if not rows:
        return None
    values = rolled_values(rows, latest)
    conn.execute(update(Event.__table__).where(Event.id == event_id).values(**values))
    return values["status"]


def rolled_values(rows: Sequence[Any], latest: str | None = None) -> dict[str, Any]:
    """The event's columns rolled up from its deliveries' ROLLED columns (``rows``, in
    their order; ``latest``: the delivery that just ended)."""
    status = rolled_up_status([row.status for row in rows])
    waiting = [
        row.next_attempt_at for row in rows if row.status in DUE_STATUSES and row.next_attempt_at
    ]
    ended = status not in _ACTIVE and status not in _WAITING
    errors = sorted((row.id != latest, n) for n, row in enumerate(rows) if row.last_error)
    values = {
        "status": status,
        "attempts": sum(row.attempts for row in rows),
        "retries": max(row.retries for row in rows),
        "next_attempt_at": None if ended else min(waiting, default=None),
        "completed_at": max(row.completed_at for row in rows) if ended else None,
        "result": rows[0].result,
        "last_error": (None if status in _REACHED or not errors else rows[errors[0][1]].last_error),
    }
    if ended:
        values.update(lease_owner=None, lease_until=None)
    return values


# --- a destination's max_in_flight and rate, held across every worker process ---
#
# A claim reads the destinations with a cap or a rate (``controls``) in its own transaction,
# before its statement: on PostgreSQL it locks their rows (FOR UPDATE SKIP LOCKED), so two
# claims never count the same destination's room at once, and a destination another
# process is claiming for at this moment gets no room in this claim (nothing waits for it,
# and claims of other destinations are not serialised); on SQLite the claim's BEGIN
# IMMEDIATE already makes it the only writer. A capped destination's room is its cap less
# its deliveries in flight (``processing`` under a live lease: claimed ones not yet started,
# and a sync request's run, count too); a rated one's is the starts its rate allows now
# (``rate_tokens``). The claim passes them to ``fair_pick`` (a lane with no room takes no
# claim slot of another), then moves each rated destination's next start on by what it
# took, and its commit releases the locks. A delivery that can't be taken now stays due,
# untouched.

# A hub whose destinations have no cap nor rate (most) does not read them at each claim:
# a look that found none is kept this long in the route cache (``HUB_ROUTE_CACHE_SECONDS``,
# cleared by a route saved through this process), like any other change to a route.
NO_CONTROLS = " no controls"  # never a route's name (ROUTE_NAME_PATTERN)

_CONTROLLED = "(d.max_in_flight IS NOT NULL OR d.rate IS NOT NULL)"
_CONTROLS = {
    # The rows locked are read in the CTE: their latest version (rate_next_at as the claim
    # that held the lock last wrote it), whatever the statement's snapshot.
    "postgresql": f"""
WITH mine AS MATERIALIZED (
    SELECT d.id, d.rate_next_at FROM destinations d WHERE {_CONTROLLED}
    ORDER BY d.id FOR UPDATE SKIP LOCKED
)
SELECT d.id, r.name AS route, d.name, d.max_in_flight, d.rate,
       mine.rate_next_at, mine.id IS NOT NULL AS mine
FROM destinations d JOIN routes r ON r.id = d.route_id LEFT JOIN mine ON mine.id = d.id
WHERE {_CONTROLLED}""",
    "sqlite": f"""
SELECT d.id, r.name AS route, d.name, d.max_in_flight, d.rate, d.rate_next_at, 1 AS mine
FROM destinations d JOIN routes r ON r.id = d.route_id
WHERE {_CONTROLLED}""",
}


def rate_burst(rate: rates.Rate) -> int:
    """How many deliveries a rated destination may start at once after a quiet spell: a
    tenth of its limit, at least one ("5/second": 1, "100/second": 10, "600/hour": 60)."""
    return max(1, rate.limit // 10)


def rate_tokens(rate: rates.Rate, next_at: datetime | None, now: datetime) -> int:
    """How many deliveries a destination of ``rate`` may start at ``now`` (GCRA): one each
    ``period / limit`` from ``next_at`` (when the rate lets the next one start; None: never
    used), and up to ``rate_burst`` of them ahead of time."""
    interval = rate.period / rate.limit
    ahead = ((next_at - now).total_seconds() if next_at is not None else 0.0) / interval
    return max(0, min(rate_burst(rate), math.floor(rate_burst(rate) - max(ahead, 0.0) + 1e-9)))


class Controls:
    """The room a claim may give each controlled lane, and what it must write back."""

    def __init__(self, room: dict[str, int], rated: dict[str, tuple[int, rates.Rate, datetime]]):
        self.room = room  # lane -> deliveries it may take now (0: none)
        self.rated = rated  # lane -> (destination id, rate, its next start from now on)

    def within(self, room: dict[str, int], share: int) -> dict[str, int]:
        """A worker's room per lane, no lane past its destination's."""
        merged = dict(room)
        for lane, left in self.room.items():
            if lane in room or left < share:  # else the worker's share is the smaller
                merged[lane] = max(0, min(room.get(lane, share), left))
        return merged

    def spend(self, conn, claimed: Sequence[Delivery]) -> None:
        """Move each rated destination's next start on by the deliveries taken."""
        taken = collections.Counter(d.lane for d in claimed if d.lane in self.rated)
        for lane, n in taken.items():
            destination_id, rate, next_at = self.rated[lane]
            conn.execute(
                update(Destination.__table__)
                .where(Destination.id == destination_id)
                .values(rate_next_at=next_at + timedelta(seconds=n * rate.period / rate.limit))
            )


def read_controls(session, now: datetime) -> Controls | None:
    """The room of every destination with a cap or a rate (locked, see above), or None when
    no destination has one."""
    controls = text(_CONTROLS[session.bind.dialect.name]).columns(
        rate_next_at=Destination.rate_next_at.type
    )
    rows = session.execute(controls).all()
    if not rows:
        return None
    lanes = {lane_of(row.route, row.name): row for row in rows}
    capped = sorted(lane for lane, row in lanes.items() if row.mine and row.max_in_flight)
    in_flight: dict[str, int] = {}
    if capped:
        count = text(
            "SELECT lane, count(*) AS n FROM deliveries "
            f"WHERE {IN_FLIGHT_PREDICATE} AND lane IN :lanes AND lease_until > :now "
            "GROUP BY lane"
        ).bindparams(
            bindparam("lanes", capped, expanding=True),
            bindparam("now", now, type_=Delivery.lease_until.type),
        )
        in_flight = {lane: n for lane, n in session.execute(count)}
    room: dict[str, int] = {}
    rated: dict[str, tuple[int, rates.Rate, datetime]] = {}
    for lane, row in lanes.items():
        if not row.mine:  # another process is claiming for it at this moment
            room[lane] = 0
            continue
        left = math.inf
        if row.max_in_flight:
            left = row.max_in_flight - in_flight.get(lane, 0)
        if row.rate:
            rate = rates.parse(row.rate)
            next_at = row.rate_next_at
            left = min(left, rate_tokens(rate, next_at, now))
            rated[lane] = (row.id, rate, max(next_at or now, now))
        room[lane] = max(0, int(left))
    return Controls(room, rated)


# A delivery ended for good, and what its ending writes (``Worker._write_ended``): one
# statement for every delivery of a group commit, its values bound per row.
_ENDED = (EventStatus.DELIVERED, EventStatus.FILTERED, EventStatus.FAILED)
_END_COLUMNS = ("status", "result", "last_error", "completed_at")
_END_DELIVERY = (
    update(Delivery.__table__)
    .where(Delivery.id == bindparam("b_id"))
    .values(
        **{column: bindparam("b_" + column) for column in _END_COLUMNS},
        next_attempt_at=None,
        lease_owner=None,
        lease_until=None,
    )
)
_EVENT_COLUMNS = tuple(column for column in ROLLED if column != "id")
_END_EVENT = (
    update(Event.__table__)
    .where(Event.id == bindparam("b_id"))
    .values(
        **{column: bindparam("b_" + column) for column in _EVENT_COLUMNS},
        lease_owner=None,
        lease_until=None,
    )
)


# What a claim's two UPDATEs return of each delivery and event: every column, in the order
# ``models.loaded`` takes them.
_DELIVERY_COLUMNS = columns_of(Delivery)
_EVENT_COLUMNS_ALL = columns_of(Event)
# How many deliveries the event of each row an UPDATE of events returns has, written out:
# SQLite's RETURNING names columns without their table, so the same subquery built from
# the models compares a delivery's event_id with its own id there and counts none.
_SIBLINGS = literal_column(
    "(SELECT count(*) FROM deliveries AS siblings WHERE siblings.event_id = events.id)"
)


class _Ending(collections.namedtuple("_Ending", "delivery schedule outcome attempts values")):
    """A usual ending run in a group and not yet written (``Worker.end_together``)."""

    __slots__ = ()


class Worker:
    """Claims and runs deliveries; ``start(n)`` runs n delivery threads, ``stop()`` ends them."""

    def __init__(self, app: Flask, name: str | None = None):
        self.app = app
        self.db: Database = app.extensions["hub.db"]
        self.routes = app.extensions["hub.routes"]
        self.lease = float(app.config["LEASE_SECONDS"])
        self.route_share = float(app.config["WORKER_ROUTE_SHARE"])
        self.max_idle = float(app.config["WORKER_MAX_IDLE"])
        self.name = name or process_name()
        self.stopping = threading.Event()
        self.wakeup: threading.Event = app.extensions["hub.wakeup"]
        self.threads: list[threading.Thread] = []
        self.in_flight: set[str] = set()
        self._lock = threading.Lock()
        # Commits shared with this process's other delivery threads (and its web requests).
        self.commits: GroupCommitter = app.extensions["hub.commits"]
        # Ids of the deliveries claimed for the delivery threads and not yet started.
        self._ready: collections.deque[str] = collections.deque()
        # Each delivery this worker claimed and has not yet started: its row as claimed,
        # and time.monotonic() of the claim.
        self._claimed: dict[str, tuple[Delivery, float]] = {}
        # The event of each delivery claimed and not yet finished (read by the claim), and
        # the deliveries that are their event's only one (their roll-up reads nothing).
        self._events: dict[str, Event] = {}
        self._alone: set[str] = set()
        # Whether each delivery claimed and not yet started must be held, and the
        # time.monotonic() it was read at (its claim, or a group's read: ``_read_held``).
        self._held: dict[str, tuple[bool, float]] = {}
        # The event's status each delivery's ending rolled up to, for the end-state count.
        self._rolled: dict[str, str | None] = {}
        self._claim_lock = threading.Lock()
        # Deliveries of each lane this worker claimed and has not finished (ready or
        # running), and the lane it served last: the next claim starts its turns past it.
        self._busy: collections.Counter[str] = collections.Counter()
        self._last_lane = ""
        # time.monotonic() of the start of each delivery running now, and the lanes whose
        # last delivery here was quick (unknown lanes count as slow).
        self._started: dict[str, float] = {}
        self._fast: set[str] = set()
        self._quick: set[str] = set()
        self._plain: set[str] = set()  # lanes whose last ending here was the usual one
        self.next_reap = 0.0  # time.monotonic() of the next reaper pass
        self.next_audit_purge = 0.0  # time.monotonic() of the next look at the audit log
        self.next_breaker_tick = 0.0  # time.monotonic() of the next look at open circuits
        self.next_expired_look = 0.0  # time.monotonic() of the next look for expired leases
        self.alerts: alerts.AlertRunner | None = None
        # hub.ops.tracing.Tracing when HUB_OTEL=true: claims and runs are spans of each
        # webhook's trace.
        self.tracing = app.extensions.get("hub.tracing")
        self.retention: retention.Runner | None = None

    # --- claiming ---

    def claim(self, limit: int = 1) -> list[str]:
        """Move up to ``limit`` due deliveries to ``processing`` under this worker's lease;
        their ids, taken in turns across lanes (see ``fair_pick``). The rows are read in
        the same statement and kept for ``process``.

        Deliveries whose lease ran out (a worker died) are looked for apart from due ones:
        one query with an OR of both scans the whole table instead of walking the due index.
        They are looked for when nothing is due, and at least once every reaper interval,
        so a busy hub takes them back too.
        """
        now = utcnow()
        started = time.time_ns()
        claimed: list[Delivery] = []
        if self._expired_look_due():
            claimed = self._claim(self._expired_oldest, limit, now)
        if len(claimed) < limit:
            due = self._claim(self._fair_due, limit - len(claimed), now)
            claimed += in_turns(due, self._last_lane)
        if not claimed:
            claimed = self._claim(self._expired_oldest, limit, now)
        at = time.monotonic()
        with self._lock:
            for delivery in claimed:
                self._claimed[delivery.id] = (delivery, at)
                self._busy[delivery.lane] += 1
            if claimed:
                self._last_lane = max(
                    (delivery.lane for delivery in claimed), key=rotation(self._last_lane)
                )
            events = [(d, self._events.get(d.id)) for d in claimed] if self.tracing else None
        if events:
            self.tracing.claimed(started, self.name, events)
        return [delivery.id for delivery in claimed]

    def _room(self) -> tuple[int, dict[str, int]]:
        """How many deliveries a lane may hold in this process, and the room left to the
        lanes it holds some of: ``HUB_WORKER_ROUTE_SHARE`` of the delivery threads. A lane
        whose last delivery here took under PREFETCH_AGE is not held to it: it frees its
        threads before another lane's delivery would notice, and a claim takes a batch of
        it for the threads about to be free (a drain held to its share ran at two thirds
        the rate)."""
        threads = max(1, len(self.threads))
        share = max(1, int(threads * self.route_share))
        with self._lock:
            return share, {
                lane: threads * GROUP
                if lane in self._quick
                else threads
                if lane in self._fast
                else share - n
                for lane, n in self._busy.items()
                if n > 0
            }

    def _fair_due(self, session, limit: int, now, controls: Controls | None):
        share, room = self._room()
        if controls is not None:
            room = controls.within(room, share)
        return Delivery.id.in_(fair_pick(self.db.dialect, limit, now, self._last_lane, share, room))

    @staticmethod
    def _expired(now):
        return and_(
            Delivery.status == EventStatus.PROCESSING,
            Delivery.lease_until < now,
            or_(
                Delivery.lease_owner.is_(None),
                not_(Delivery.lease_owner.startswith(SYNC_LEASE_PREFIX, autoescape=True)),
            ),
        )

    def _expired_look_due(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now < self.next_expired_look:
                return False
            self.next_expired_look = now + self.max_idle * REAP_EVERY_IDLES
        return True

    def _expired_oldest(self, session, limit: int, now, controls: Controls | None):
        candidates = select(Delivery.id).where(self._expired(now))
        if controls is not None:
            full = sorted(lane for lane, left in controls.room.items() if left <= 0)
            candidates = candidates.add_columns(Delivery.lane).where(Delivery.lane.not_in(full))
        candidates = candidates.order_by(Delivery.next_attempt_at).limit(limit)
        if self.db.dialect == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        if controls is None:
            return Delivery.id.in_(candidates)
        # Claimed again, a delivery is in flight again: no more of a lane than its room.
        room = dict(controls.room)
        chosen = []
        for delivery_id, lane in session.execute(candidates):
            if lane in room:
                if room[lane] <= 0:
                    continue
                room[lane] -= 1
            chosen.append(delivery_id)
        return Delivery.id.in_(chosen)

    def _controls(self, session, now) -> Controls | None:
        """The controlled destinations' room for this claim (``read_controls``), or None
        while this process knows that none has a cap or a rate."""
        if self.routes.get(NO_CONTROLS) is not None:
            return None
        controls = read_controls(session, now)
        if controls is None:
            self.routes.put(NO_CONTROLS, (None,))
        return controls

    def _claim(self, pick, limit: int, now) -> list[Delivery]:
        """Lease the deliveries ``pick`` chooses (``_fair_due`` or ``_expired_oldest``: a
        condition on their ids, locked on PostgreSQL), within the room of the destinations
        with a cap or a rate, read and locked first in the same transaction."""
        expired = Delivery.status == EventStatus.PROCESSING
        lease = dict(
            status=EventStatus.PROCESSING,
            lease_owner=self.name,
            lease_until=now + timedelta(seconds=self.lease),
            attempts=Delivery.attempts + 1,
            # A delivery that died counts against the retry schedule, like a failure.
            retries=case((expired, Delivery.retries + 1), else_=Delivery.retries),
            last_error=case((expired, LEASE_EXPIRED), else_=Delivery.last_error),
        )
        with self.db.session() as session:
            controls = self._controls(session, now)
            # Read back as plain rows (``loaded``): the ORM's loading of the rows returned
            # was a seventh of a drain worker's CPU.
            statement = (
                update(Delivery.__table__)
                .where(pick(session, limit, now, controls))
                .values(**lease)
                .returning(*_DELIVERY_COLUMNS)
            )
            # On the session's connection: through the session, the ORM's bulk UPDATE took
            # the statement over (its columns are the mapped classes') for nothing.
            conn = session.connection()
            claimed = [loaded(Delivery, row) for row in conn.execute(statement)]
            if controls is not None:
                controls.spend(session, claimed)
            if not claimed:
                return claimed
            # Their events show that they are on their way, and the runs; read back in the
            # same statement (the run needs the event), with how many deliveries each has.
            mine = Delivery.event_id == Event.id
            events = [
                (loaded(Event, row[:-1]), row[-1])
                for row in conn.execute(
                    update(Event.__table__)
                    .where(
                        one_of(
                            Event.__table__.c.id,
                            sorted({d.event_id for d in claimed}),
                            self.db.dialect,
                        )
                    )
                    .values(
                        status=EventStatus.PROCESSING,
                        attempts=select(func.sum(Delivery.attempts)).where(mine).scalar_subquery(),
                        retries=select(func.max(Delivery.retries)).where(mine).scalar_subquery(),
                    )
                    .returning(*_EVENT_COLUMNS_ALL, _SIBLINGS)
                )
            ]
            # Whether each must wait instead of being called (its destination paused, its
            # circuit open, or half-open and it not the probe), as the database says now:
            # one read for the claim, not one for each delivery (a tenth of the drain).
            # A pause committed after this read finds the delivery in flight, like one
            # whose call has started: the pause holds deliveries waiting, not those.
            lanes = lane_states(session, {d.route for d in claimed})
        read = {event.id: (event, siblings) for event, siblings in events}
        at = time.monotonic()
        with self._lock:
            for delivery in claimed:
                event, siblings = read.get(delivery.event_id, (None, 0))
                if event is not None:
                    self._events[delivery.id] = event
                if siblings == 1:
                    self._alone.add(delivery.id)
                state, probe = lanes.get(delivery.lane, (None, None))
                self._held[delivery.id] = (breaker.holds(state, probe, delivery.id), at)
        return claimed

    def _read_held(self, delivery_ids: Sequence[str]) -> None:
        """Read again whether each of ``delivery_ids`` (claimed, waiting in a group) must be
        held: one read for the group, not one for each delivery claimed longer than
        PREFETCH_AGE ago (a tenth of an http drain worker's time, each read 0.4-0.8 ms of
        CPU). A read that fails leaves them to be read one by one."""
        with self._lock:
            waiting = [self._claimed[i][0] for i in delivery_ids if i in self._claimed]
        if not waiting:
            return
        try:
            with self.db.read_session() as session:
                lanes = lane_states(session, {d.route for d in waiting})
        except Exception as exc:
            log.warning("destination states not read (%s)", type(exc).__name__)
            return
        at = time.monotonic()
        with self._lock:
            for delivery in waiting:
                state, probe = lanes.get(delivery.lane, (None, None))
                self._held[delivery.id] = (breaker.holds(state, probe, delivery.id), at)

    # --- delivering ---

    def process(self, delivery_id: str, later: list[_Ending] | None = None) -> str:
        """Run one claimed delivery through its destination and record the outcome; returns
        its status. Given ``later``, a usual ending (``_usual``) is added to it instead,
        for ``end_together`` to write; the delivery stays in flight until then."""
        deferred = len(later) if later is not None else -1
        with self._lock:
            self.in_flight.add(delivery_id)
            delivery, claimed_at = self._claimed.pop(delivery_id, (None, time.monotonic()))
            self._started[delivery_id] = time.monotonic()
            event = self._events.pop(delivery_id, None)
            held, held_at = self._held.pop(delivery_id, (None, 0.0))
        lane = delivery.lane if delivery is not None else None
        try:
            if delivery is None or event is None:  # claimed by another Worker object (tests)
                with self.db.session() as session:
                    delivery = delivery or session.get(Delivery, delivery_id)
                    event = session.get(Event, delivery.event_id) if delivery else None
            if delivery is None or event is None:
                return "missing"
            # Its lines say which event and destination, and which request brought it.
            with logs.bound(
                event_id=event.id,
                request_id=event.request_id,
                route=event.route,
                key_prefix=event.key_prefix,
            ):
                if time.monotonic() - held_at > PREFETCH_AGE:
                    held = None  # read again: claimed a while ago, in a group
                if self.tracing is None:
                    return self._process(delivery, event, claimed_at, held, later)
                with self.tracing.delivering(event, delivery) as span:
                    status = self._process(delivery, event, claimed_at, held, later)
                    self.tracing.ended(span, status)
                    return status
        finally:
            waits = later is not None and len(later) > deferred  # its ending is in ``later``
            with self._lock:
                started = self._started.pop(delivery_id, None)
                if not waits:
                    self._done(delivery_id, lane)
                if lane is not None:
                    took = time.monotonic() - started if started is not None else math.inf
                    if took < PREFETCH_AGE:
                        self._fast.add(lane)
                    else:
                        self._fast.discard(lane)
                    if took < QUICK and lane in self._plain:
                        self._quick.add(lane)
                    else:
                        self._quick.discard(lane)

    def _done(self, delivery_id: str, lane: str | None) -> None:
        """A delivery's ending is written (or given up): it no longer holds a thread's
        place (called under ``_lock``)."""
        self.in_flight.discard(delivery_id)
        self._alone.discard(delivery_id)
        if lane is not None:
            self._busy[lane] -= 1

    def process_group(self, delivery_ids: Sequence[str]) -> None:
        """Run claimed deliveries of quick lanes one after the other, then write their usual
        endings together (``end_together``); the others were written as each ended. Past
        GROUP_SECONDS (or when the worker stops) the deliveries not started go back to be
        taken by the next free thread, still claimed."""
        later: list[_Ending] = []
        until = time.monotonic() + GROUP_SECONDS
        try:
            for n, delivery_id in enumerate(delivery_ids):
                if n and (time.monotonic() > until or self.stopping.is_set()):
                    with self._claim_lock:
                        self._ready.extendleft(reversed(delivery_ids[n:]))
                    self.wakeup.set()
                    break
                if self._stale(delivery_id):
                    self._read_held(delivery_ids[n:])
                self.process(delivery_id, later)
        finally:
            self.end_together(later)

    def _stale(self, delivery_id: str) -> bool:
        """Whether the held state of a claimed delivery was read over PREFETCH_AGE ago."""
        with self._lock:
            held = self._held.get(delivery_id)
        return held is not None and time.monotonic() - held[1] > PREFETCH_AGE

    def _process(
        self,
        delivery: Delivery,
        event: Event,
        claimed_at: float,
        held: bool | None = None,
        later: list[_Ending] | None = None,
    ) -> str:
        """Run the claimed ``delivery``; ``held``: whether its destination held it at its
        claim (None: unknown, read now)."""
        route = route_store.lookup_opening(self.db.sessionmaker, event.route, self.routes)
        # A disabled route refuses new webhooks only: what it accepted is still delivered.
        if route is None:
            outcome = pipeline.Outcome(
                pipeline.FAILED, error=f"route {event.route!r} no longer exists"
            )
            return self._finish(delivery, None, outcome)
        destination = destination_named(route, delivery.destination)
        if destination is None:
            outcome = pipeline.Outcome(
                pipeline.FAILED,
                error=f"destination {delivery.destination!r} of route {route.name!r} "
                "no longer exists",
            )
            return self._finish(delivery, None, outcome)
        if held is None:
            held = self._paused(delivery)
        if held:  # as the database says: this process's route cache may be seconds old
            return self._hold(delivery)
        # Its breaker counts the run's ending (None: no breaker).
        breaker_of = destination if destination.breaker else None
        schedule = schedule_for(route, destination)
        if delivery.retries > len(schedule_of(schedule)):
            # Claimed again after its runs kept dying, with the schedule used up.
            deaths = pipeline.Outcome(
                pipeline.RETRYABLE, error=delivery.last_error or LEASE_EXPIRED
            )
            return self._finish(delivery, schedule, deaths, destination=breaker_of)

        # Each call is on record before the next call starts, or with the run's outcome: a
        # crash later keeps the log of it. Written then rather than at once, the last call's
        # row shares its commit with the outcome (one commit a delivery, not two), and each
        # commit is shared with the other threads' writes of the moment.
        unwritten: list[dict[str, Any]] = []

        def record(row: Attempt) -> None:
            unwritten.append(row_of(row))

        def before_call() -> None:
            while unwritten:
                self.commits.insert(Attempt.__table__, unwritten[0])
                del unwritten[0]

        # Stop starting new tries well before the lease runs out, so no other worker
        # can claim the delivery while this one is still running it.
        deadline = claimed_at + self.lease - min(30.0, self.lease * 0.2)
        try:
            outcome = pipeline.run(
                event,
                route,
                pipeline.RunOptions.of_app(self.app),
                destination=destination,
                delivery=delivery,
                record=record,
                before_call=before_call,
                deadline=deadline,
            )
        except Exception as exc:  # never let one delivery take the worker down
            # Recording an attempt failed, or a hub bug: a failed attempt, per the schedule.
            log.error("event %s: pipeline error %s", event.id, type(exc).__name__)
            outcome = pipeline.Outcome(pipeline.RETRYABLE, error=f"hub error: {type(exc).__name__}")
        return self._finish(
            delivery, schedule, outcome, unwritten, destination=breaker_of, later=later
        )

    def _paused(self, delivery: Delivery) -> bool:
        """Whether the delivery must wait instead of being called, as the database says
        now: its destination paused or its circuit open, or half-open and the delivery not
        its probe (breaker.holds)."""
        with self.db.engine.connect() as conn:
            row = conn.execute(
                DESTINATION_STATE, {"route": delivery.route, "name": delivery.destination}
            ).first()
        return row is not None and breaker.holds(row.state, row.breaker_probe, delivery.id)

    def _hold(self, delivery: Delivery) -> str:
        """Put a claimed delivery of a paused destination (or open circuit) back, ``held``:
        no run counted, no attempt written."""

        def write(conn) -> int:
            changed = conn.execute(
                update(Delivery.__table__)
                .where(Delivery.id == delivery.id, Delivery.lease_owner == self.name)
                .values(
                    status=EventStatus.HELD,
                    lease_owner=None,
                    lease_until=None,
                    attempts=Delivery.attempts - 1,
                )
            ).rowcount
            if changed:
                rollup(conn, delivery.event_id)
            return changed

        if not self.commits.run(write, []):
            return "lease_lost"
        log.info(
            "event %s to %s: held, its destination is paused or its circuit open",
            delivery.event_id,
            delivery.destination,
        )
        return EventStatus.HELD

    def _finish(
        self,
        delivery: Delivery,
        schedule: list[int] | None,
        outcome: pipeline.Outcome,
        attempts: Sequence[dict[str, Any]] = (),
        destination: Destination | None = None,
        later: list[_Ending] | None = None,
    ) -> str:
        """Write how the run ended, with the rows of its calls not yet written, and the
        event's roll-up, and the count of ``destination``'s circuit breaker if given. An
        outcome that can't be written is a failed attempt: the delivery follows the retry
        schedule to ``dead``, its calls still on record; a call's row that can't be written
        is one too, and only then is the row left out. If even that write fails, the lease
        runs out and the next claim counts against the schedule. Given ``later``, a usual
        ending is added to it, written by ``end_together``."""
        try:
            values = self._ending(delivery, schedule, outcome)
            usual = self._usual(delivery, values, destination)
            with self._lock:
                (self._plain.add if usual else self._plain.discard)(delivery.lane)
            if later is not None and usual:
                later.append(_Ending(delivery, schedule, outcome, tuple(attempts), values))
                return values["status"]
            changed = self._write_ending(delivery, values, attempts, destination)
        except Exception as exc:
            log.error("event %s: outcome not recorded (%s)", delivery.event_id, type(exc).__name__)
            unrecorded = pipeline.Outcome(
                pipeline.RETRYABLE,
                error=f"the outcome could not be recorded ({type(exc).__name__})",
            )
            values = self._ending(delivery, schedule, unrecorded)
            try:
                changed = self._write_ending(delivery, values, attempts, destination)
            except Exception as again:
                if not attempts:
                    raise
                log.error(
                    "event %s: a call not recorded (%s)", delivery.event_id, type(again).__name__
                )
                unstorable = pipeline.Outcome(
                    pipeline.RETRYABLE, error=f"hub error: {type(again).__name__}"
                )
                values = self._ending(delivery, schedule, unstorable)
                changed = self._write_ending(delivery, values, (), destination)
        return self._ended(delivery, values, changed)

    def _ended(self, delivery: Delivery, values: dict[str, Any], changed: int) -> str:
        """Log a written ending and count its event's end; the delivery's status, or
        ``lease_lost`` for an ending another worker's lease kept out."""
        rolled = self._rolled.pop(delivery.id, None)
        if not changed:
            log.warning("event %s: lease lost before the outcome was written", delivery.event_id)
            return "lease_lost"
        log.info(
            "event %s to %s run %d: %s",
            delivery.event_id,
            delivery.destination,
            delivery.attempts,
            values["status"],
        )
        if rolled is not None and rolled not in _ACTIVE and rolled not in _WAITING:
            # The event's end (its last delivery ended), counted once whatever its fan-out.
            metrics.event_ended(delivery.route, rolled)
        return values["status"]

    def _ending(
        self, delivery: Delivery, schedule: list[int] | None, outcome: pipeline.Outcome
    ) -> dict[str, Any]:
        """The delivery's columns after a run: an end state, or the next retry per
        ``schedule``."""
        now = utcnow()
        values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if outcome.status != pipeline.RETRYABLE:
            values.update(pipeline.end_state(outcome, now))
            return values
        delay = retry_delay(schedule_of(schedule), delivery.retries, outcome.retry_after)
        values["last_error"] = (outcome.error or "retryable failure")[:2000]
        if delay is None:
            values.update(status=EventStatus.DEAD, completed_at=now, next_attempt_at=None)
        else:
            # Paused while it was being called: it waits for the resume, not for its retry.
            values.update(
                status=EventStatus.HELD if self._paused(delivery) else EventStatus.RETRYING,
                retries=delivery.retries + 1,
                next_attempt_at=now + timedelta(seconds=delay),
            )
        return values

    def _write_ending(
        self,
        delivery: Delivery,
        values: dict[str, Any],
        attempts: Sequence[dict[str, Any]] = (),
        destination: Destination | None = None,
    ) -> int:
        """Write the delivery's ``values`` and its event's roll-up; with a ``destination``
        whose breaker is on, count the ending on it in the same transaction (which may hold
        the delivery instead: ``values`` then says so once committed)."""
        if self._usual(delivery, values, destination):
            # The usual ending: written with the other threads' like it, a statement for
            # each table for them all (``_write_ended``).
            item = self._ended_item(delivery, values)
            changed = self.commits.run_together(
                self._write_ended, item, [(Attempt.__table__, row) for row in attempts]
            )
            if changed:
                self._rolled[delivery.id] = item[3]["status"]
            return changed
        statement = (
            update(Delivery.__table__)
            .where(Delivery.id == delivery.id, Delivery.lease_owner == self.name)
            .values(**values)
        )
        spec = breaker.spec_of(destination.breaker) if destination is not None else None
        turned: list[breaker.Turn | None] = [None]

        promoted: list[str] = []

        def write(conn) -> int:
            changed = conn.execute(statement).rowcount
            turned[0] = turn = None
            final = values
            if changed and spec is not None and destination.id is not None:
                turn = turned[0] = breaker.after_run(conn, destination.id, spec, delivery, values)
                if turn is not None and turn.values:
                    conn.execute(
                        update(Delivery.__table__)
                        .where(Delivery.id == delivery.id)
                        .values(**turn.values)
                    )
                    final = values | turn.values
            if changed:
                alone = None
                if delivery.id in self._alone:
                    stands = {column: getattr(delivery, column) for column in ROLLED} | final
                    alone = types.SimpleNamespace(**{column: stands[column] for column in ROLLED})
                self._rolled[delivery.id] = rollup(conn, delivery.event_id, delivery.id, alone)
                for event_id in sorted(set(turn.events if turn else ()) - {delivery.event_id}):
                    rollup(conn, event_id)
                # An ordered delivery that ended (a retry, or a hold by its breaker, keeps
                # its key blocked) lets the next of its key go, in the same transaction: no
                # moment when the key has nothing on its way and nothing promoted
                # (hub.services.ordering).
                if delivery.order_key is not None and final["status"] not in _BLOCKING:
                    promoted[:] = [
                        ordering.promote(conn, delivery.lane, delivery.order_key, locked=False)
                    ]
            return changed

        changed = self.commits.run(write, [(Attempt.__table__, row) for row in attempts])
        turn = turned[0]
        if changed and turn is not None:
            if turn.values:
                values.update(turn.values)
            breaker.announce(turn.changes)
            if turn.released:
                wake(self.app, soon=True)
        if changed and any(promoted):
            self.wakeup.set()  # the next of the key is due now
        return changed

    def _usual(
        self, delivery: Delivery, values: dict[str, Any], destination: Destination | None
    ) -> bool:
        """Whether an ending is the usual one, written with others (``_write_ended``):
        delivered, filtered or failed, its event's only delivery, of a destination with no
        ordering key and no breaker."""
        return (
            values["status"] in _ENDED
            and delivery.id in self._alone
            and delivery.order_key is None
            and (destination is None or not destination.breaker)
        )

    @staticmethod
    def _ended_item(delivery: Delivery, values: dict[str, Any]) -> tuple:
        """What ``_write_ended`` writes of a usual ending: the delivery's id, its event's,
        its ROLLED columns as they now stand, and the event's roll-up."""
        stands = {column: getattr(delivery, column) for column in ROLLED} | values
        alone = types.SimpleNamespace(**{column: stands[column] for column in ROLLED})
        return (delivery.id, delivery.event_id, stands, rolled_values([alone], delivery.id))

    def end_together(self, later: list[_Ending]) -> None:
        """Write a group's usual endings (``process_group``) and their calls' rows in one
        transaction, shared with the other threads' writes of the moment. If that fails,
        each is written on its own as ``_finish`` does, with its fallbacks."""
        if not later:
            return
        items = [self._ended_item(ending.delivery, ending.values) for ending in later]
        try:
            try:
                written = self.commits.run_together_all(
                    self._write_ended,
                    items,
                    [(Attempt.__table__, row) for ending in later for row in ending.attempts],
                )
            except Exception as exc:
                log.error("a group's outcomes not recorded together (%s)", type(exc).__name__)
                for ending in later:
                    self._finish(ending.delivery, ending.schedule, ending.outcome, ending.attempts)
                return
            for ending, item, changed in zip(later, items, written, strict=True):
                if changed:
                    self._rolled[ending.delivery.id] = item[3]["status"]
                self._ended(ending.delivery, ending.values, changed)
        finally:
            with self._lock:
                for ending in later:
                    self._done(ending.delivery.id, ending.delivery.lane)

    def _write_ended(self, conn, endings: list[tuple]) -> list[int]:
        """Write deliveries ended for good (delivered, filtered, failed), each its event's
        only one and of no ordered or breaker-counted destination: ``endings`` holds, for
        each, its id, its event's id, its ROLLED columns as they now stand and its event's
        roll-up. Those still under this worker's lease (locked on PostgreSQL: no other
        worker writes them until the commit) are written by one executemany for the
        deliveries and one for the events, in place of two statements for each; 1 for
        each written, 0 for a lease lost."""
        ids = sorted(delivery_id for delivery_id, *_ in endings)
        mine = select(Delivery.id).where(
            one_of(Delivery.__table__.c.id, ids, conn.dialect.name),
            Delivery.lease_owner == self.name,
        )
        if conn.dialect.name == "postgresql":
            mine = mine.with_for_update()
        held = set(conn.scalars(mine))
        written = [ending for ending in endings if ending[0] in held]
        if written:
            conn.execute(
                _END_DELIVERY,
                [
                    {"b_id": delivery_id, **{"b_" + c: stands[c] for c in _END_COLUMNS}}
                    for delivery_id, _, stands, _ in written
                ],
            )
            conn.execute(
                _END_EVENT,
                [
                    {"b_id": event_id, **{"b_" + c: event[c] for c in _EVENT_COLUMNS}}
                    for _, event_id, _, event in written
                ],
            )
        return [1 if ending[0] in held else 0 for ending in endings]

    def release(self, delivery_ids: set[str]) -> None:
        """Hand leases back (a stopping worker): the deliveries are due again at once."""
        if not delivery_ids:
            return
        with self.db.engine.begin() as conn:
            handed = conn.scalars(
                update(Delivery.__table__)
                .where(Delivery.id.in_(delivery_ids), Delivery.lease_owner == self.name)
                .values(
                    status=EventStatus.RETRYING,
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=utcnow(),
                )
                .returning(Delivery.event_id)
            ).all()
            for event_id in sorted(set(handed)):
                rollup(conn, event_id)
        log.info("handed back %d deliveries", len(delivery_ids))

    # --- loops ---

    def run_once(self, limit: int = 100) -> int:
        """Deliver what is due now, one event at a time; the number delivered (tests, cron)."""
        self.reap()
        self.breaker_tick()
        done = 0
        while done < limit and not self.stopping.is_set():
            claimed = self.claim(1)
            if not claimed:
                break
            self.process(claimed[0])
            done += 1
        return done

    def next_event(self) -> str | None:
        """The id of a claimed event for a delivery thread; None if none is due."""
        group = self.next_group()
        return group[0] if group else None

    def next_group(self) -> list[str]:
        """The ids of claimed deliveries for a delivery thread: one, or up to GROUP of quick
        lanes; none if none is due.

        One claim takes a delivery for each delivery thread of this worker that is idle or
        soon free (its delivery started less than PREFETCH_AGE ago), GROUP of them where a
        quick lane has room, and the threads take them from here: one statement for a
        batch under load. Threads held by a slow receiver are not claimed for, so no event
        waits here behind one (another route's event would wait that receiver's time); its
        lease (and the deadline of its tries) runs from its claim. A thread takes the
        first delivery waiting here; if that one's lane is quick, the next ones of quick
        lanes with it, passing over the others (left for the next thread)."""
        with self._claim_lock:
            if not self._ready and not self.stopping.is_set():
                now = time.monotonic()
                with self._lock:
                    held = sum(1 for t in self._started.values() if now - t > PREFETCH_AGE)
                    per_thread = GROUP if self._quick else 1
                claimed = self.claim(max(1, len(self.threads) - held) * per_thread)
                with self._lock:
                    self.in_flight.update(claimed)
                self._ready.extend(claimed)
                if len(claimed) > 1:
                    self.wakeup.set()  # the other idle threads may be asleep
            if not self._ready:
                return []
            with self._lock:
                group = [self._ready.popleft()]
                if not self._is_quick(group[0]):
                    return group
                others = []
                while self._ready and len(group) < GROUP:
                    delivery_id = self._ready.popleft()
                    (group if self._is_quick(delivery_id) else others).append(delivery_id)
                self._ready.extendleft(reversed(others))
            return group

    def _is_quick(self, delivery_id: str) -> bool:
        """Whether a claimed delivery's lane is quick (called under ``_lock``)."""
        claimed = self._claimed.get(delivery_id)
        return claimed is not None and claimed[0].lane in self._quick

    def reap(self) -> None:
        """One reaper pass (sync events whose process died, ordered deliveries left queued
        with nothing ahead of them, the audit log's retention when due); a database error
        waits a turn."""
        try:
            reap_sync_events(self.db)
            if ordering.promote_stalled_in(self.db):
                self.wakeup.set()
            self.purge_audit_when_due()
        except Exception as exc:
            log.warning("reaper pass failed (%s); retrying later", type(exc).__name__)

    def purge_audit_when_due(self) -> None:
        """The audit log's retention (HUB_AUDIT_RETENTION_DAYS): entries past it are deleted,
        at one look an hour per process (audit.PURGE_EVERY_SECONDS)."""
        now = time.monotonic()
        with self._lock:
            if now < self.next_audit_purge:
                return
            self.next_audit_purge = now + audit.PURGE_EVERY_SECONDS
        audit.purge_expired(self.db, int(self.app.config["AUDIT_RETENTION_DAYS"]))

    def breaker_tick(self) -> None:
        """One look at the open circuits (breaker.tick): a cool-down that is over lets a
        probe go. A database error waits a turn."""
        try:
            with self.db.engine.connect() as conn:
                if not breaker.any_open(conn):  # the usual answer: a read, no write lock
                    return
            with self.db.engine.begin() as conn:
                turn = breaker.tick(conn)
                for event_id in sorted(set(turn.events)):
                    rollup(conn, event_id)
        except Exception as exc:
            log.warning("circuit breaker look failed (%s); retrying later", type(exc).__name__)
            return
        breaker.announce(turn.changes)
        if turn.released:
            wake(self.app, soon=True)

    def breaker_tick_when_due(self) -> None:
        """A look at the open circuits if none ran in the last breaker.TICK_SECONDS."""
        now = time.monotonic()
        with self._lock:
            if now < self.next_breaker_tick:
                return
            self.next_breaker_tick = now + breaker.TICK_SECONDS
        self.breaker_tick()

    def reap_when_due(self) -> None:
        """A reaper pass if none ran in the last 10 x HUB_WORKER_MAX_IDLE (one thread does it)."""
        now = time.monotonic()
        with self._lock:
            if now < self.next_reap:
                return
            self.next_reap = now + self.max_idle * REAP_EVERY_IDLES
        self.reap()

    def loop(self) -> None:
        idle = MIN_IDLE
        while not self.stopping.is_set():
            self.reap_when_due()
            self.breaker_tick_when_due()
            try:
                claimed = self.next_group()
            except Exception as exc:  # the database went away: wait and try again
                log.warning("claim failed (%s); retrying", type(exc).__name__)
                claimed = []
                idle = self.max_idle
            if claimed:
                idle = MIN_IDLE
                try:
                    if len(claimed) == 1:
                        self.process(claimed[0])
                    else:
                        self.process_group(claimed)
                except Exception as exc:  # e.g. the database went away mid-write
                    # The lease expires and the event is claimed again; the thread lives on.
                    log.error("event %s: %s while recording", claimed[0], type(exc).__name__)
                    self.stopping.wait(self.max_idle)
                continue
            self.wakeup.wait(idle)
            if self.wakeup.is_set():
                self.wakeup.clear()
                idle = MIN_IDLE
            else:
                idle = min(idle * 2, self.max_idle)

    def start(self, concurrency: int = 1) -> None:
        # The alert evaluator and sender: threads of their own, never a delivery thread's work.
        self.alerts = alerts.AlertRunner(
            self.db, self.app.extensions["hub.secrets"], self.app.config
        )
        self.alerts.start()
        # The purge under the retention settings: a thread of its own too, one pass at a
        # time across every worker process.
        self.retention = retention.Runner(self.db, self.app.config)
        self.retention.start()
        for index in range(concurrency):
            thread = threading.Thread(target=self.loop, name=f"hub-worker-{index}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.db.listen_url is not None:
            listener = threading.Thread(target=self._listen, name="hub-listen", daemon=True)
            listener.start()
        elif self.db.dialect == "postgresql":
            log.info(
                "HUB_DATABASE_POOLER=transaction without HUB_DATABASE_LISTEN_URL: idle "
                "threads look for events every %g s at most",
                self.max_idle,
            )

    def stop(self, grace: float | None = None) -> None:
        """Finish in-flight deliveries within ``grace`` seconds, hand back the rest."""
        self.stopping.set()
        self.wakeup.set()
        if self.alerts is not None:
            self.alerts.stop()
        if self.retention is not None:
            self.retention.stop()
        grace = float(self.app.config["WORKER_GRACE"]) if grace is None else grace
        deadline = time.monotonic() + grace
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            left = set(self.in_flight)  # claimed for a thread that never started it, too
            self._claimed.clear()
            self._events.clear()
            self._held.clear()
        self._ready.clear()
        self.release(left)

    def _listen(self) -> None:
        """PostgreSQL LISTEN: a new event wakes an idle worker now, not at its next poll.
        On a connection of its own, to the server itself (``Database.listen_url``): one per
        worker process, outside the pool."""
        import psycopg

        url = self.db.listen_url
        while not self.stopping.is_set():
            try:
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self.wakeup.set()
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); polling meanwhile", type(exc).__name__)
                self.stopping.wait(self.max_idle)


def wake(app: Flask, *, soon: bool = False, announced: bool = False) -> None:
    """Tell the workers that committed events are due: an idle worker of this process at
    once (``hub.wakeup``), those of other processes by PostgreSQL's NOTIFY, sent now, in
    this thread (a replay: rare, and a command ends right after it). ``soon`` leaves the
    NOTIFY to the Notifier's thread, which sends one for many callers: ingest's, where one
    per request would serialise the commits. ``announced``: the writer process committed
    them and sends the NOTIFY itself (``Writer.announce``); the web process sends none (its
    Notifier's thread and connection took a tenth of a PostgreSQL webhook's CPU there)."""
    wakeup: threading.Event = app.extensions["hub.wakeup"]
    # Set once for every commit until a worker takes it (and clears it before it claims, so
    # it claims after this commit): setting it again would only notify no one, under a lock.
    if not wakeup.is_set():
        wakeup.set()
    if announced:
        return
    notifier: Notifier = app.extensions["hub.notifier"]
    if soon:
        notifier.poke()
    else:
        notifier.send()


# Seconds without a poke after which the Notifier's thread ends and closes its connection.
NOTIFIER_IDLE = 10.0


class Notifier:
    """Tells workers in other processes that events are due (PostgreSQL's NOTIFY).

    Sent after the events' commit from a thread of its own, at most one every ``interval``
    however many requests poke it: a NOTIFY inside each ingest transaction serialises every
    commit (PostgreSQL queues a notification under a lock it holds until the commit is
    durable). A worker that misses one still finds the event at its next poll.
    """

    def __init__(self, db: Database, interval: float = 0.005):
        self.db = db
        self.interval = interval
        self._poked = threading.Event()
        self.postgresql = db.dialect == "postgresql"
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def poke(self) -> None:
        if not self.postgresql:
            return
        if not self._poked.is_set():  # one NOTIFY answers every poke before it is sent
            self._poked.set()
        if self._thread is None or not self._thread.is_alive():  # started lazily: after a fork
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="hub-notify", daemon=True
                    )
                    self._thread.start()

    def _idle_out(self) -> bool:
        """Whether the thread may end, idle: no poke came (decided under the lock poke
        starts a thread under, so a poke either is seen here or starts a new thread)."""
        with self._lock:
            if self._poked.is_set():
                return False
            self._thread = None
            return True

    def send(self) -> None:
        """NOTIFY now, in this thread (raises if the database is unreachable)."""
        if self.db.dialect != "postgresql":
            return
        with self.db.session() as session:
            session.execute(text(f"NOTIFY {NOTIFY_CHANNEL}"))

    def _run(self) -> None:
        conn = None
        while True:
            # Idle for a while, the thread ends and gives its connection back: a process
            # that takes no webhooks holds none, and a poke starts the thread again.
            if not self._poked.wait(NOTIFIER_IDLE) and self._idle_out():
                if conn is not None:
                    # Closed for good, not handed back: the engine's pool may have been
                    # disposed meanwhile, and would leave it open to the garbage collector.
                    with contextlib.suppress(Exception):
                        conn.invalidate()
                    with contextlib.suppress(Exception):
                        conn.close()
                return
            self._poked.clear()
            try:
                conn = self.db.notify_workers(conn)
            except Exception as exc:  # the database went away: workers poll meanwhile
                log.warning("NOTIFY failed (%s)", type(exc).__name__)
                conn = None
                time.sleep(1.0)
            time.sleep(self.interval)


# Delivery threads inside each web process. With one, a burst that `make bench` accepts in
# 5 s (1,700-2,000 events over 2 processes) was delivered 5.9-7.5 s after it ended; with two,
# 0.1 s after, while the same web processes took more webhooks (363-446 against 341-405 req/s).
EMBEDDED_THREADS = 2


def start_embedded(app: Flask) -> Worker | None:
    """The delivery threads inside a web process (``make run``), unless turned off."""
    if not app.config.get("EMBEDDED_WORKER"):
        return None
    worker = Worker(app)
    worker.start(EMBEDDED_THREADS)
    app.extensions["hub.worker"] = worker
    log.info("embedded worker %s started", worker.name)
    return worker
