"""Retention: how long each route's finished events are kept, and the purge that applies it.

A route keeps its finished events ``retention_days`` days; a route that sets none keeps them
HUB_RETENTION_DAYS (0: until an admin purges them with `hub events purge --older-than`).
The workers purge what is older, one pass every HUB_RETENTION_INTERVAL across all their
processes (``Runner``); `hub events purge` runs the same purge at once, or counts it
(``count``, the dry run). Depends on the store only; raises nothing of its own (a database
error ends a pass, and the next one carries on where the data is).

What goes: a finished event (ended: delivered, partial, failed, dead, filtered; or never
accepted: rejected, duplicate) none of whose deliveries is on its way (pending, processing,
retrying, held, queued: a delivery replayed alone puts its event back on its way), with its
deliveries and attempts, deleted in the same transaction, each table along its event_id
index (the foreign keys' ON DELETE CASCADE would find them too, one row at a time).

How: in batches of HUB_RETENTION_BATCH events, each its own short transaction, resting
HUB_RETENTION_PAUSE between two. A batch is the next events along an index: (route,
received_at, id) for a route with a retention of its own, (received_at, id) for every other
route under the default, walked from the oldest with a keyset cursor, so no batch reads again
what an earlier one passed over (an event still in flight stays, behind the cursor). On
PostgreSQL a batch locks its rows FOR UPDATE SKIP LOCKED: a row someone else holds (a
replay) is left for the next pass, and two purges (two workers, or a worker and the CLI)
never wait on each other. Ingest writes new rows and reads old ones without a lock, so it
never waits for the purge on PostgreSQL (bench/RESULTS.md, "Retention purge"); on SQLite,
whose one writer a batch is while it runs, a webhook waits at most one batch.

Dedup keys outlive their events: an event purged while its route's dedup window is still
open, and that a later copy would be a duplicate of (``may_be_original``), leaves its key in
``dedup_keys`` (route, sender, key, received_at), in the batch's own transaction; the intake's
dedup lookup reads that table in the same statement as the events
(hub.services.intake.find_original), so a sender's retry gets the same answer as before the
purge, ``200 {"id": <the purged original>, "duplicate": true}``, until the window closes.
Each pass then deletes the kept keys whose window has closed, in batches too.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hub.services import audit
from hub.store.db import Database
from hub.store.models import (
    FINISHED,
    UNFINISHED_STATUSES,
    Attempt,
    DedupKey,
    Delivery,
    Event,
    RetentionState,
    Route,
    may_be_original,
    utcnow,
)

log = logging.getLogger("hub.retention")

# A pass's lease on the state row: renewed as batches go, so a process that dies mid-pass
# hands the purge to another within this many seconds.
LEASE_SECONDS = 60.0
RENEW_AFTER = 20.0
# The longest a worker waits between two looks at the state row.
LOOK_EVERY = 60.0
STATE_ID = 1


@dataclass(frozen=True)
class Scope:
    """What one walk of the purge covers: the finished events received before ``cutoff``
    of ``route``, or (``route`` None) of every route but ``others`` (the routes that keep
    their events for a time of their own). ``days`` and ``set_by`` say why: a route's
    ``retention_days`` ("route"), HUB_RETENTION_DAYS ("default"), or an age given by hand
    (``days`` None)."""

    route: str | None
    cutoff: datetime
    days: int | None = None
    set_by: str = "hand"
    others: tuple[str, ...] = ()

    def where(self, *, deliveries: bool = True) -> list[Any]:
        """The condition on events this walk deletes: finished, none of their deliveries on
        its way (left out with ``deliveries=False``: a batch checks its own), received
        before the cutoff, of the scope's routes."""
        conditions = [Event.received_at < self.cutoff, Event.status.in_(FINISHED)]
        if deliveries:
            on_its_way = select(Delivery.id).where(
                Delivery.event_id == Event.id, Delivery.status.in_(UNFINISHED_STATUSES)
            )
            conditions.append(~on_its_way.exists())
        if self.route is not None:
            conditions.append(Event.route == self.route)
        elif self.others:
            conditions.append(Event.route.not_in(self.others))
        return conditions


def scopes(session: Session, default_days: int, now: datetime | None = None) -> list[Scope]:
    """The walks the retention settings ask for now: one per route with ``retention_days``
    (by name), then one for every other route under ``default_days`` (none when 0)."""
    now = now or utcnow()
    own = session.execute(
        select(Route.name, Route.retention_days)
        .where(Route.retention_days.is_not(None))
        .order_by(Route.name)
    ).all()
    walks = [Scope(name, now - timedelta(days=days), days, "route") for name, days in own]
    if default_days > 0:
        others = tuple(name for name, _ in own)
        cutoff = now - timedelta(days=default_days)
        walks.append(Scope(None, cutoff, default_days, "default", others))
    return walks


def older_than(cutoff: datetime) -> list[Scope]:
    """The one walk of `hub events purge --older-than`: every route, one cutoff."""
    return [Scope(None, cutoff)]


def count(db: Database, walks: Sequence[Scope]) -> list[tuple[Scope, dict[str, int]]]:
    """What ``purge(db, walks)`` would delete now, by walk and route (the dry run): the
    same condition, counted along the same indexes."""
    counted = []
    with db.read_session() as session:
        for scope in walks:
            rows = session.execute(
                select(Event.route, func.count())
                .where(*scope.where())
                .group_by(Event.route)
                .order_by(Event.route)
            )
            counted.append((scope, {route: int(n) for route, n in rows}))
    return counted


@dataclass
class Purged:
    """What a purge did: events deleted by route, dedup keys kept for their window, and
    expired kept keys dropped; ``complete`` is False when it stopped before the end."""

    events: Counter[str] = field(default_factory=Counter)
    kept_keys: int = 0
    dropped_keys: int = 0
    batches: int = 0
    longest_batch_s: float = 0.0  # the longest a batch's transaction lasted
    complete: bool = True

    @property
    def total(self) -> int:
        return sum(self.events.values())


def purge(
    db: Database,
    walks: Sequence[Scope],
    *,
    batch: int = 500,
    pause: float = 0.0,
    keep_going: Callable[[], bool] = lambda: True,
    now: datetime | None = None,
    actor: audit.Actor | None = None,
) -> Purged:
    """Delete what each walk covers, ``batch`` events a transaction, ``pause`` seconds
    apart; then the kept dedup keys whose window has closed. Before each batch
    ``keep_going()`` is asked: False stops the purge there (``complete`` False).
    ``actor``: the admin asking (one ``events.purge`` entry, with the last batch that
    deleted any); the workers' own purge is not an admin's action and records none."""
    now = now or utcnow()
    done = Purged()
    with db.read_session() as session:
        windows = {
            name: window for name, window in session.execute(select(Route.name, Route.dedup_window))
        }
    for scope in walks:
        after: tuple[datetime, str] | None = None
        while True:
            if not keep_going():
                done.complete = False
                return done
            if done.batches and pause:
                time.sleep(pause)
            started = time.monotonic()
            with db.session() as session:
                after, routes, kept = purge_batch(session, scope, after, batch, windows, now)
                if actor is not None and after is None and scope is walks[-1]:
                    total = done.total + sum(routes.values())
                    if total:
                        by_route = dict(done.events + routes)
                        change = {"deleted": total, "by_route": by_route}
                        audit.record(session, actor, "events.purge", f"{total} events", change)
            done.longest_batch_s = max(done.longest_batch_s, time.monotonic() - started)
            done.batches += 1
            done.events.update(routes)
            done.kept_keys += kept
            if after is None:
                break
    done.dropped_keys = drop_expired_keys(db, batch=batch, pause=pause, now=now)
    return done


def next_batch(scope: Scope, after: tuple[datetime, str] | None, limit: int) -> Select:
    """The next ``limit`` events of the walk past ``after``, oldest first, with what their
    dedup keys need."""
    query = select(
        Event.id,
        Event.received_at,
        Event.route,
        Event.key_prefix,
        Event.dedup_key,
        may_be_original().label("original"),
    ).where(*scope.where(deliveries=False))
    if after is not None:
        query = query.where(tuple_(Event.received_at, Event.id) > tuple_(*after))
    return query.order_by(Event.received_at, Event.id).limit(limit)


def purge_batch(
    session: Session,
    scope: Scope,
    after: tuple[datetime, str] | None,
    limit: int,
    windows: dict[str, int],
    now: datetime,
) -> tuple[tuple[datetime, str] | None, Counter[str], int]:
    """Delete one batch of the walk, in the session's transaction: (the cursor to go on
    from, None when the walk is done; the events deleted by route; the dedup keys kept)."""
    query = next_batch(scope, after, limit)
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Event)
    found = session.execute(query).all()
    if not found:
        return None, Counter(), 0
    last = found[-1]
    cursor = (last.received_at, last.id) if len(found) == limit else None
    # Of these, the events with a delivery on its way stay: one probe of the deliveries'
    # event_id index each (a NOT EXISTS in the query above was planned as a scan of every
    # delivery for each batch).
    on_its_way = set(
        session.scalars(
            select(Delivery.event_id).where(
                Delivery.event_id.in_([row.id for row in found]),
                Delivery.status.in_(UNFINISHED_STATUSES),
            )
        )
    )
    rows = [row for row in found if row.id not in on_its_way]
    if not rows:
        return cursor, Counter(), 0
    keys = list(kept_keys(rows, windows, now))
    if keys:
        dialect = session.get_bind().dialect.name
        make = postgresql_insert if dialect == "postgresql" else sqlite_insert
        session.execute(make(DedupKey.__table__).on_conflict_do_nothing(), keys)
    ids = [row.id for row in rows]
    session.execute(delete(Attempt.__table__).where(Attempt.event_id.in_(ids)))
    session.execute(delete(Delivery.__table__).where(Delivery.event_id.in_(ids)))
    session.execute(delete(Event.__table__).where(Event.id.in_(ids)))
    return cursor, Counter(row.route for row in rows), len(keys)


def kept_keys(rows: Iterable[Any], windows: dict[str, int], now: datetime):
    """The dedup_keys rows of the events about to go whose dedup window is still open and
    that a copy would be a duplicate of."""
    for row in rows:
        window = windows.get(row.route, 0)
        if not (row.dedup_key and row.original and window):
            continue
        expires_at = row.received_at + timedelta(seconds=window)
        if expires_at > now:
            yield {
                "event_id": row.id,
                "route": row.route,
                "key_prefix": row.key_prefix,
                "dedup_key": row.dedup_key,
                "received_at": row.received_at,
                "expires_at": expires_at,
            }


def drop_expired_keys(
    db: Database, *, batch: int = 500, pause: float = 0.0, now: datetime | None = None
) -> int:
    """Delete the kept dedup keys whose window has closed, ``batch`` a transaction."""
    now = now or utcnow()
    dropped = 0
    while True:
        expired = (
            select(DedupKey.event_id)
            .where(DedupKey.expires_at <= now)
            .order_by(DedupKey.expires_at)
            .limit(batch)
        )
        with db.session() as session:
            n = session.execute(
                delete(DedupKey.__table__).where(DedupKey.event_id.in_(expired.scalar_subquery()))
            ).rowcount
        dropped += n
        if n < batch:
            return dropped
        if pause:
            time.sleep(pause)


# --- the workers' passes: one at a time across every process ---


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def take_turn(db: Database, me: str, now: datetime | None = None) -> bool:
    """Take the next pass if it is due and no live lease holds it: True for one process
    only (a conditional UPDATE of the state row, made the first time)."""
    now = now or utcnow()
    due = (RetentionState.next_run_at.is_(None)) | (RetentionState.next_run_at <= now)
    free = (RetentionState.lease_until.is_(None)) | (RetentionState.lease_until < now)
    lease = {"lease_owner": me, "lease_until": now + timedelta(seconds=LEASE_SECONDS)}
    with db.session() as session:
        taken = session.execute(
            update(RetentionState.__table__)
            .where(RetentionState.id == STATE_ID, due, free)
            .values(**lease)
        ).rowcount
        if taken or session.get(RetentionState, STATE_ID) is not None:
            return bool(taken)
        # No row yet: the first pass is this one. Two processes may both get here; the
        # second's insert does nothing and its pass waits for the next look.
        dialect = session.get_bind().dialect.name
        make = postgresql_insert if dialect == "postgresql" else sqlite_insert
        made = session.execute(
            make(RetentionState.__table__)
            .values(id=STATE_ID, next_run_at=now, purged=0, **lease)
            .on_conflict_do_nothing(index_elements=["id"])
        ).rowcount
        return bool(made)


def renew(db: Database, me: str) -> bool:
    """Extend this process's lease; False when it lost it (it ran out and another took it)."""
    with db.session() as session:
        return bool(
            session.execute(
                update(RetentionState.__table__)
                .where(RetentionState.id == STATE_ID, RetentionState.lease_owner == me)
                .values(lease_until=utcnow() + timedelta(seconds=LEASE_SECONDS))
            ).rowcount
        )


def end_turn(db: Database, me: str, interval: float, purged: int) -> None:
    """Give the lease back and set when the next pass is due."""
    now = utcnow()
    with db.session() as session:
        session.execute(
            update(RetentionState.__table__)
            .where(RetentionState.id == STATE_ID, RetentionState.lease_owner == me)
            .values(
                next_run_at=now + timedelta(seconds=interval),
                lease_owner=None,
                lease_until=None,
                ran_at=now,
                ran_by=me,
                purged=purged,
            )
        )


def run_pass(db: Database, config: Any, me: str, stopping: threading.Event) -> Purged | None:
    """One pass under the retention settings if it is this process's turn (None if not)."""
    if not take_turn(db, me):
        return None
    renewed = time.monotonic()
    lost = False

    def keep_going() -> bool:
        nonlocal renewed, lost
        if stopping.is_set() or lost:
            return False
        if time.monotonic() - renewed > RENEW_AFTER:
            lost, renewed = not renew(db, me), time.monotonic()
        return not lost

    done = Purged(complete=False)
    started = time.monotonic()
    try:
        with db.read_session() as session:
            walks = scopes(session, int(config["RETENTION_DAYS"]))
        done = purge(
            db,
            walks,
            batch=int(config["RETENTION_BATCH"]),
            pause=float(config["RETENTION_PAUSE"]),
            keep_going=keep_going,
        )
    finally:
        if not lost:
            end_turn(db, me, float(config["RETENTION_INTERVAL"]), done.total)
    if done.total or done.dropped_keys:
        by_route = ", ".join(f"{route} {n}" for route, n in sorted(done.events.items()))
        log.info(
            "purged %d event(s) in %.1f s (%s) in %d batch(es), the longest %.0f ms; kept %d "
            "dedup key(s), dropped %d expired",
            done.total,
            time.monotonic() - started,
            by_route or "none",
            done.batches,
            done.longest_batch_s * 1000,
            done.kept_keys,
            done.dropped_keys,
        )
    return done


class Runner:
    """The purge's thread in a worker process: it looks at the state row every
    HUB_RETENTION_INTERVAL (at most every minute) and runs the pass when it is its turn."""

    def __init__(self, db: Database, config: Any):
        self.db = db
        self.config = config
        self.interval = float(config["RETENTION_INTERVAL"])
        self.me = owner_name()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="hub-retention", daemon=True)
        self.thread.start()

    def stop(self, grace: float = 5.0) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(grace)

    def _run(self) -> None:
        while not self.stopping.wait(min(self.interval, LOOK_EVERY)):
            try:
                run_pass(self.db, self.config, self.me, self.stopping)
            except Exception as exc:  # the database went away: the next look tries again
                log.warning("retention pass failed (%s); retrying later", type(exc).__name__)
