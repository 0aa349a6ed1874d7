"""First-in, first-out delivery per ordering key: one key's deliveries to a destination start
one after another, in the order the hub accepted them; different keys go in parallel.

A destination with an ``ordering_key`` (a template over the payload and headers, like a
step's config) gets, for each accepted event, the key rendered (``key_for``) on its
delivery; a key that renders empty, or fails to render (a missing field), leaves that
delivery unordered. Its deliveries are written ``queued``: not due, no worker claims them.
A *promotion* (``promote``) makes the oldest queued delivery of a (lane, key) ``pending``,
due now, when no other unfinished delivery of that (lane, key) is active (pending,
retrying, processing or held). So at most one delivery of a key is ever on its way, and
a key is blocked until that one ends (delivered, filtered, failed, dead, or skipped by
an admin: ``skip``); a retry keeps it blocked. "Oldest" is delivery id order, which is
the order of acceptance (ids sort by their millisecond).

Promotions run after the intake's commit (``promote_new``), in the transaction of an
ordered delivery's ending (hub.services.delivery), after a replay, a resume or a skip,
and in every worker's periodic pass (``promote_stalled``), which promotes the heads of
keys left queued with nothing ahead of them (a web process that died between its commit
and its promotion): every event reaches an end state.

Race-free across processes: on PostgreSQL a promotion first takes a transaction-scoped
advisory lock on its (lane, key) (``lock``), so two promotions of one key never decide
on two snapshots that each miss the other's queued row; they follow one another, and
the second sees what the first promoted. SQLite's writes are serialised by its write
lock (BEGIN IMMEDIATE). The promotion in an ending takes no lock: the delivery ending
was its key's one active delivery, so until that transaction commits every other
promotion of the key sees it active and promotes nothing (and a lock there would be held
across the other pieces of a group commit).

Uses the store, the template sandbox (hub.services.templating) and the roll-up of
hub.services.delivery, which calls back into this module when an ordered delivery ends.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, text, update

from hub.ops import metrics
from hub.services import audit
from hub.services import delivery as delivery_service
from hub.services.templating import TemplateLimits, TemplateProblem, render_config
from hub.store import storable
from hub.store.db import Database
from hub.store.models import (
    ORDERED_PREDICATE,
    Delivery,
    Destination,
    EventStatus,
    utcnow,
)

log = logging.getLogger("hub.worker")

# The longest key kept as it is (the column's width); a longer one is kept as its digest.
MAX_KEY = 200
SKIPPED = "skipped by an admin"
# Unfinished deliveries that hold their key: on their way, or held by a pause.
ACTIVE = (
    EventStatus.PENDING,
    EventStatus.RETRYING,
    EventStatus.PROCESSING,
    EventStatus.HELD,
)
# What a skip may end: anything not ended and not being called right now.
SKIPPABLE = (EventStatus.PENDING, EventStatus.RETRYING, EventStatus.HELD, EventStatus.QUEUED)

# The predicate of ix_deliveries_order, written out so both planners use the index.
_ORDERED = ORDERED_PREDICATE.replace("order_key", "d.order_key").replace("status", "d.status")
_ACTIVE_SQL = ", ".join(f"'{status}'" for status in ACTIVE)

# The oldest queued delivery of (lane, key) becomes pending, due now (or when it was due
# already: its place in its lane's turn), unless another of the key is active. One
# statement: the check and the change see one snapshot, and the row's own status is
# checked again after any lock wait (a skip or another promotion got there first).
_PROMOTE = f"""
UPDATE deliveries SET status = 'pending',
    next_attempt_at = CASE WHEN next_attempt_at IS NULL OR next_attempt_at > :now
                           THEN :now ELSE next_attempt_at END
WHERE id = (
    SELECT d.id FROM deliveries d
    WHERE d.lane = :lane AND d.order_key = :key AND {_ORDERED} AND d.status = 'queued'
    ORDER BY d.lane, d.order_key, d.id LIMIT 1)
  AND status = 'queued'
  AND NOT EXISTS (
    SELECT 1 FROM deliveries d
    WHERE d.lane = :lane AND d.order_key = :key AND {_ORDERED}
      AND d.status IN ({_ACTIVE_SQL}))
RETURNING id, event_id
"""

# The keys with a queued delivery and nothing active: each one's head is stalled.
_STALLED = f"""
SELECT d.lane, d.order_key FROM deliveries d
WHERE {_ORDERED}{{lane}}
GROUP BY d.lane, d.order_key
HAVING SUM(CASE WHEN d.status IN ({_ACTIVE_SQL}) THEN 1 ELSE 0 END) = 0
LIMIT :most
"""


def is_ordered(destination: Destination) -> bool:
    return bool(destination.ordering_key)


def key_for(
    destination: Destination,
    context: dict[str, Any],
    limits: TemplateLimits = TemplateLimits(),
) -> str | None:
    """The destination's ordering key for an event (``context``: what a step's templates
    see), or None: unordered (no ordering key, or one that renders empty or fails, such
    as a missing field). A key longer than MAX_KEY is kept as its SHA-256."""
    if not destination.ordering_key:
        return None
    try:
        value = render_config(destination.ordering_key, context, limits)
    except TemplateProblem as exc:
        log.info(
            "destination %s: ordering key not rendered (%s); delivered unordered",
            destination.name,
            exc.code or "missing",
        )
        return None
    # NUL and lone surrogates escaped: a key is text both databases can store.
    value = storable.text(str(value).strip())
    if not value:
        return None
    if len(value) > MAX_KEY:
        return "sha256:" + hashlib.sha256(value.encode("utf-8")).hexdigest()
    return value


def lock_keys_of(conn: Connection, event_ids: list[str]) -> None:
    """Take the locks of the ordering keys of these events' deliveries, in one order,
    before a replay changes any row (it promotes them afterwards)."""
    keys = conn.execute(
        select(Delivery.lane, Delivery.order_key)
        .where(Delivery.event_id.in_(event_ids), Delivery.order_key.is_not(None))
        .distinct()
    ).all()
    for lane, key in sorted(keys):
        lock(conn, lane, key)


def lock(conn: Connection, lane: str, key: str) -> None:
    """Serialise promotions of (lane, key) until this transaction ends (PostgreSQL; SQLite
    has one writer at a time already)."""
    if conn.dialect.name == "postgresql":
        conn.execute(
            text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
            {"k": f"order\x1f{lane}\x1f{key}"},
        )


def promote(
    conn: Connection, lane: str, key: str, *, locked: bool = True, now: datetime | None = None
) -> str | None:
    """Make the oldest queued delivery of (lane, key) pending if nothing of the key is
    active, and roll up its event; that delivery's id, or None. ``locked``: take the key's
    lock first (every promotion but an ending's)."""
    if locked:
        lock(conn, lane, key)
    statement = text(_PROMOTE).bindparams(
        bindparam("now", now or utcnow(), type_=Delivery.next_attempt_at.type)
    )
    promoted = conn.execute(statement, {"lane": lane, "key": key}).first()
    if promoted is None:
        return None
    delivery_service.rollup(conn, promoted.event_id)
    return promoted.id


def promote_keys(conn: Connection, keys: Iterable[tuple[str, str]]) -> list[str]:
    """``promote`` each (lane, key), locks taken in one order (no two transactions wait
    on each other); the deliveries promoted."""
    promoted = []
    for lane, key in sorted(set(keys)):
        delivery_id = promote(conn, lane, key)
        if delivery_id is not None:
            promoted.append(delivery_id)
    return promoted


def promote_new(db: Database, deliveries: Iterable[Delivery]) -> list[str]:
    """After the intake's commit: promote the keys of its ordered deliveries (each is
    usually its key's head); the deliveries promoted. Short transactions of their own: a
    lock held in a group commit would be held across other requests' writes."""
    return _each_alone(db, {(d.lane, d.order_key) for d in deliveries if d.order_key is not None})


def _each_alone(db: Database, keys: Iterable[tuple[str, str]]) -> list[str]:
    """``promote`` each (lane, key) in a transaction of its own: a transaction never holds
    one key's lock (and the rows its promotion locked) while waiting for another's."""
    promoted = []
    for lane, key in sorted(keys):
        with db.engine.begin() as conn:
            delivery_id = promote(conn, lane, key)
        if delivery_id is not None:
            promoted.append(delivery_id)
    return promoted


def stalled(conn: Connection, lane: str | None = None, most: int = 1000) -> list[tuple]:
    """The (lane, key) pairs (of ``lane``, or of every lane) with a queued delivery and
    nothing active: their head waits for a promotion. One pass over the unfinished ordered
    deliveries (ix_deliveries_order); ``most`` keys at a time."""
    sql = _STALLED.replace("{lane}", " AND d.lane = :lane" if lane is not None else "")
    params: dict[str, Any] = {"most": most}
    if lane is not None:
        params["lane"] = lane
    return [(row.lane, row.order_key) for row in conn.execute(text(sql), params)]


def promote_stalled(conn: Connection, lane: str | None = None) -> list[str]:
    """Promote the head of every stalled key (``stalled``) in this transaction; the
    deliveries promoted."""
    return promote_keys(conn, stalled(conn, lane))


def promote_stalled_in(db: Database) -> list[str]:
    """The worker's periodic pass: the stalled keys' heads promoted, each key in a
    transaction of its own."""
    with db.read_session() as session:
        keys = stalled(session.connection())
    promoted = _each_alone(db, keys)
    if promoted:
        log.warning("promoted %d ordered deliveries left queued with nothing ahead", len(promoted))
    return promoted


class NoSuchDelivery(LookupError):
    """No delivery has that id."""


class NotSkippable(ValueError):
    """The delivery is being called right now, or ended already (``AlreadyEnded``);
    ``args[0]`` says which."""


class AlreadyEnded(NotSkippable):
    """The delivery ended already: nothing to skip."""


def skip(db: Database, delivery_id: str, actor: audit.Actor | None = None) -> dict[str, Any]:
    """End a delivery that blocks its key (or waits behind it) as ``failed``, "skipped by
    an admin", and promote the next of its key, in one transaction; the delivery as it now
    stands. Raises NoSuchDelivery, or NotSkippable for one that ended or is being called
    right now (skip it once that call ends: a retry leaves it skippable). Any delivery may
    be skipped, ordered or not. ``actor``: the admin asking (``delivery.skip``)."""
    now = utcnow()
    with db.engine.begin() as conn:
        row = conn.execute(
            select(Delivery.lane, Delivery.order_key, Delivery.event_id, Delivery.route).where(
                Delivery.id == delivery_id
            )
        ).first()
        if row is None:
            raise NoSuchDelivery(f"No delivery has the id {delivery_id!r}")
        if row.order_key is not None:
            lock(conn, row.lane, row.order_key)
        skipped = conn.execute(
            update(Delivery.__table__)
            .where(Delivery.id == delivery_id, Delivery.status.in_(SKIPPABLE))
            .values(
                status=EventStatus.FAILED,
                last_error=SKIPPED,
                completed_at=now,
                next_attempt_at=None,
                lease_owner=None,
                lease_until=None,
            )
            .returning(Delivery.id)
        ).first()
        if skipped is None:
            status = conn.scalar(select(Delivery.status).where(Delivery.id == delivery_id))
            if status == EventStatus.PROCESSING:
                raise NotSkippable(
                    f"Delivery {delivery_id} is being called right now; skip it once this "
                    "call ends (if it is to be retried)"
                )
            raise AlreadyEnded(f"Delivery {delivery_id} already ended ({status}); nothing to skip")
        rolled = delivery_service.rollup(conn, row.event_id, delivery_id)
        if row.order_key is not None:
            promote(conn, row.lane, row.order_key, locked=False, now=now)
        change = {"event": row.event_id, "route": row.route, "event_status": rolled}
        audit.record(conn, actor, "delivery.skip", delivery_id, change)
    if rolled is not None and rolled not in (*ACTIVE, EventStatus.QUEUED):
        metrics.event_ended(row.route, rolled)  # the event's end: its last delivery skipped
    log.info("delivery %s of event %s: %s", delivery_id, row.event_id, SKIPPED)
    return {
        "id": delivery_id,
        "event_id": row.event_id,
        "status": EventStatus.FAILED.value,
        "last_error": SKIPPED,
        "event_status": rolled,
    }
