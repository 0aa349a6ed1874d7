"""What admins do with stored events: find them, replay them, count them; purging old ones
is hub.services.retention's."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Integer,
    LargeBinary,
    Select,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from hub.services import audit, ordering, pipeline
from hub.services import delivery as delivery_service
from hub.services import keys as key_store
from hub.services import routes as route_store
from hub.services.delivery import rollup
from hub.services.paging import BadCursor
from hub.store.db import Database
from hub.store.models import (
    DEFAULT_DESTINATION,
    DUE_STATUSES,
    ENDED,
    NEVER_ACCEPTED,
    Attempt,
    Delivery,
    Event,
    EventStatus,
    due,
    first_delivery_id,
    iso_time,
    lane_of,
    new_delivery_id,
    utcnow,
)

STATUSES = tuple(EventStatus)
# Statuses a replay may take: any event not in flight. Processing and retrying events count
# only without a live lease. Rejected and duplicate events were never accepted: replaying one
# would run a request the hub refused (bypassing its authentication), so they never are.
REPLAYABLE = (
    EventStatus.DELIVERED,
    EventStatus.PARTIAL,
    EventStatus.FAILED,
    EventStatus.DEAD,
    EventStatus.FILTERED,
    EventStatus.PROCESSING,
    EventStatus.RETRYING,
)
# Deliveries that reached their destination (or were meant not to): a replay leaves them.
REACHED = (EventStatus.DELIVERED, EventStatus.FILTERED)


def matching(
    query: Select,
    route: str | None,
    status: str | None,
    since: datetime | None,
    request_id: str | None = None,
):
    """``query`` narrowed to a route, a status, a start time and a request id, where given."""
    if request_id:
        query = query.where(Event.request_id == request_id)
    if route:
        query = query.where(Event.route == route)
    if status:
        query = query.where(Event.status == status)
    if since:
        query = query.where(Event.received_at >= since)
    return query


def find_query(
    *,
    route: str | None = None,
    status: str | None = None,
    since: datetime | None = None,
    request_id: str | None = None,
    limit: int = 50,
) -> Select:
    """The CLI's `events list`: the newest ``limit`` events matching, each filter along an
    index (tests/test_listing_plans.py reads the plan of each)."""
    query = select(Event).order_by(Event.received_at.desc(), Event.id.desc()).limit(limit)
    return matching(query, route, status, since, request_id)


def find(session: Session, *, limit: int = 50, **filters: Any) -> list[Event]:
    return list(session.scalars(find_query(limit=limit, **filters)))


def not_in_flight(now: datetime):
    """Events a replay may take: ended ones, and processing or retrying ones without a live
    lease (a worker's or a sync request's)."""
    return or_(
        Event.status.in_(ENDED),
        and_(
            Event.status.in_((EventStatus.PROCESSING, EventStatus.RETRYING)),
            or_(Event.lease_until.is_(None), Event.lease_until < now),
        ),
    )


def replay(
    session: Session, event_ids: Iterable[str], actor: audit.Actor | None = None
) -> list[str]:
    """Put events that are not in flight back to pending; the ids that were replayed.

    Of each event, the deliveries that did not end delivered or filtered go back to
    pending: a destination that was reached is not called again. An event whose every
    delivery was reached is delivered again whole. Attempts keep counting, so the log shows
    every run, and the retry schedule starts again from its first delay.
    ``why_not_replayed`` says why the others were not. ``actor``: the admin asking
    (``events.replay``, when any was replayed).
    """
    ids = list(event_ids)
    if not ids:
        return []
    now = utcnow()
    # The ordering keys its deliveries will be promoted in, locked before any row changes
    # (hub.services.ordering).
    ordering.lock_keys_of(session.connection(), ids)
    replayed = session.scalars(
        update(Event.__table__)
        .where(Event.id.in_(ids), not_in_flight(now))
        .values(
            status=EventStatus.PENDING,
            next_attempt_at=utcnow(),
            completed_at=None,
            replayed_at=now,
            retries=0,
            lease_owner=None,
            lease_until=None,
        )
        .returning(Event.id)
    )
    replayed = list(replayed)
    if replayed:
        _replay_deliveries(session, replayed, now)
        target = audit.one_or_count(replayed, "events")
        audit.record(session, actor, "events.replay", target, audit.ids_change(replayed))
    return replayed


def _replay_deliveries(session: Session, event_ids: list[str], now: datetime) -> None:
    """The replayed events' deliveries back to pending: those not reached, or all of an
    event's when every one was reached."""
    free = or_(Delivery.lease_until.is_(None), Delivery.lease_until < now)
    again = {
        # An ordered delivery goes back to its key's queue, in its place by id (the order
        # its event was accepted in), behind the key's delivery on its way if any.
        "status": case(
            (Delivery.order_key.is_(None), EventStatus.PENDING), else_=EventStatus.QUEUED
        ),
        "next_attempt_at": now,
        "completed_at": None,
        "retries": 0,
        "lease_owner": None,
        "lease_until": None,
    }
    returned = (Delivery.event_id, Delivery.lane, Delivery.order_key)
    rows = session.execute(
        update(Delivery.__table__)
        .where(Delivery.event_id.in_(event_ids), Delivery.status.not_in(REACHED), free)
        .values(**again)
        .returning(*returned)
    ).all()
    unreached = {row.event_id for row in rows}
    whole = [event_id for event_id in event_ids if event_id not in unreached]
    if whole:
        rows += session.execute(
            update(Delivery.__table__)
            .where(Delivery.event_id.in_(whole), free)
            .values(**again)
            .returning(*returned)
        ).all()
        rows += _deliveries_for_bare(session, whole, now)
    ordered = [row for row in rows if row.order_key is not None]
    if ordered:
        conn = session.connection()
        ordering.promote_keys(conn, [(row.lane, row.order_key) for row in ordered])
        for event_id in sorted({row.event_id for row in ordered}):
            delivery_service.rollup(conn, event_id)  # queued, or pending if promoted


def _deliveries_for_bare(session: Session, event_ids: list[str], now: datetime) -> list[Any]:
    """An event kept with no delivery (written by hand, or by a tool) gets one, pending,
    for each destination its route has now (queued, with its key, for an ordered one);
    each new delivery's (event_id, lane, order_key)."""
    bare = session.scalars(
        select(Event).where(
            Event.id.in_(event_ids),
            ~select(Delivery.id).where(Delivery.event_id == Event.id).exists(),
        )
    ).all()
    made = []
    for event in bare:
        route = route_store.get(session, event.route)
        targets = route_store.destinations_of(route) if route is not None else []
        for position, name in enumerate([d.name for d in targets] or [DEFAULT_DESTINATION]):
            key = _order_key(event, targets[position]) if targets else None
            row = Delivery(
                id=first_delivery_id(event.id) if position == 0 else new_delivery_id(),
                event_id=event.id,
                route=event.route,
                destination=name,
                lane=lane_of(event.route, name),
                order_key=key,
                position=position,
                status=EventStatus.PENDING if key is None else EventStatus.QUEUED,
                attempts=0,
                retries=0,
                next_attempt_at=now,
                created_at=now,
            )
            session.add(row)
            made.append(row)
    if bare:
        session.flush()
    return made


def _order_key(event: Event, destination) -> str | None:
    """An ordered destination's key for a stored event (None: unordered, or a body that
    no longer decodes)."""
    if not ordering.is_ordered(destination):
        return None
    try:
        payload = pipeline.decode_payload(event.body or b"", event.content_type)
    except pipeline.PayloadError:
        return None
    return ordering.key_for(destination, pipeline.template_context(event, payload, []))


NO_SUCH_EVENT = "no such event"


def why_not_replayed(session: Session, event_ids: Iterable[str]) -> dict[str, str]:
    """For events a replay leaves alone, the reason in a sentence, by id."""
    ids = list(event_ids)
    found = {e.id: e for e in session.scalars(select(Event).where(Event.id.in_(ids)))}
    reasons = {}
    now = utcnow()
    for event_id in ids:
        event = found.get(event_id)
        if event is None:
            reasons[event_id] = NO_SUCH_EVENT
        elif event.status in NEVER_ACCEPTED:
            reasons[event_id] = (
                f"{event.status}: never accepted, so never replayed (that would run a "
                "request the hub turned away)"
            )
        elif event.status == EventStatus.PENDING:
            reasons[event_id] = "pending: already waiting for delivery"
        elif event.lease_until is not None and event.lease_until >= now:
            until = f"{event.lease_until:%H:%M:%S}"
            reasons[event_id] = f"{event.status}: in flight (leased until {until} UTC)"
        else:
            reasons[event_id] = f"{event.status}: not replayable"
    return reasons


# --- replay of one destination's deliveries: one by id, or a bulk replay aimed at it ---

# A delivery may be replayed once it has ended: reached, filtered out, or given up on. One
# still on its way (pending, processing, retrying) or waiting (held, queued) is not: its
# destination will be called anyway, and a second run would race the first.
DELIVERY_ENDED = (
    EventStatus.DELIVERED,
    EventStatus.FILTERED,
    EventStatus.FAILED,
    EventStatus.DEAD,
)
_WHY_WAITING = {
    EventStatus.PENDING: "already waiting for delivery",
    EventStatus.RETRYING: "already waiting for its next try",
    EventStatus.HELD: "held while its destination is paused or its circuit open; it goes "
    "out when the destination is resumed",
    EventStatus.QUEUED: "queued behind an earlier delivery of its ordering key",
}


class NoSuchDelivery(LookupError):
    """No such delivery, event, or destination of the event; ``args[0]`` says which."""


class DeliveryNotReplayable(ValueError):
    """The delivery has not ended (or its event was never accepted); ``args[0]`` says why."""


def replay_deliveries(
    session: Session, delivery_ids: Iterable[str], actor: audit.Actor | None = None
) -> list[str]:
    """Put the ended ones of these deliveries back to pending, due now, and roll up their
    events; the ids replayed. Unlike an event's replay, a delivery that was delivered is
    called again: the admin named it. Its runs keep counting and its retry schedule starts
    from its first delay; the event's other deliveries are left as they are. ``actor``:
    the admin asking (``deliveries.replay``, when any was replayed)."""
    ids = list(delivery_ids)
    if not ids:
        return []
    now = utcnow()
    conn = session.connection()
    # An ordered delivery goes back to its key's queue, in its place by id, as in an
    # event's replay: its key's locks are taken before any row changes.
    keys = conn.execute(
        select(Delivery.lane, Delivery.order_key)
        .where(Delivery.id.in_(ids), Delivery.order_key.is_not(None))
        .distinct()
    ).all()
    for lane, key in sorted(keys):
        ordering.lock(conn, lane, key)
    replayed = session.execute(
        update(Delivery.__table__)
        .where(Delivery.id.in_(ids), Delivery.status.in_(DELIVERY_ENDED))
        .values(
            status=case(
                (Delivery.order_key.is_(None), EventStatus.PENDING), else_=EventStatus.QUEUED
            ),
            next_attempt_at=now,
            completed_at=None,
            retries=0,
            lease_owner=None,
            lease_until=None,
        )
        .returning(Delivery.id, Delivery.event_id, Delivery.lane, Delivery.order_key)
    ).all()
    event_ids = sorted({row.event_id for row in replayed})
    if event_ids:
        session.execute(
            update(Event.__table__).where(Event.id.in_(event_ids)).values(replayed_at=now)
        )
        ordered = {(row.lane, row.order_key) for row in replayed if row.order_key is not None}
        ordering.promote_keys(conn, ordered)  # locks held already: taken again, at once
        for event_id in event_ids:
            rollup(conn, event_id)
    done = [row.id for row in replayed]
    if done:
        target = audit.one_or_count(done, "deliveries")
        audit.record(session, actor, "deliveries.replay", target, audit.ids_change(done))
    return done


def replay_delivery(
    session: Session, delivery_id: str, actor: audit.Actor | None = None
) -> Delivery:
    """Replay one delivery (``replay_deliveries``); its row as it now stands. Raises
    NoSuchDelivery, or DeliveryNotReplayable with the reason while it has not ended."""
    row = session.get(Delivery, delivery_id[:32]) if "\x00" not in delivery_id else None
    if row is None:
        raise NoSuchDelivery(f"No delivery has the id {delivery_id[:40]!r}")
    if not replay_deliveries(session, [row.id], actor):
        raise DeliveryNotReplayable(why_delivery_not_replayed(row))
    session.refresh(row)
    return row


def delivery_of(session: Session, event_id: str, destination: str) -> Delivery:
    """The event's delivery to the destination named ``destination``. Raises
    NoSuchDelivery (no such event, or none to that destination), or
    DeliveryNotReplayable for an event that was never accepted (it has none)."""
    event = session.get(Event, event_id[:32])
    if event is None:
        raise NoSuchDelivery(NO_SUCH_EVENT)
    row = session.scalar(
        select(Delivery).where(Delivery.event_id == event.id, Delivery.destination == destination)
    )
    if row is not None:
        return row
    if event.status in NEVER_ACCEPTED:
        raise DeliveryNotReplayable(
            f"{event.status}: never accepted, so it has no delivery to replay"
        )
    names = session.scalars(
        select(Delivery.destination)
        .where(Delivery.event_id == event.id)
        .order_by(Delivery.position)
    ).all()
    known = ", ".join(names) or "none"
    raise NoSuchDelivery(
        f"event {event.id} has no delivery to a destination named {destination!r} "
        f"(its destinations: {known})"
    )


def why_delivery_not_replayed(row: Delivery) -> str:
    """Why a replay leaves the delivery alone, in a sentence."""
    status = EventStatus(row.status)
    if status == EventStatus.PROCESSING:
        if row.lease_until is not None and row.lease_until >= utcnow():
            until = f"{row.lease_until:%H:%M:%S}"
            why = f"in flight (leased until {until} UTC)"
        else:
            why = "its call was cut off; the reaper puts it back once its lease has run out"
    else:
        why = _WHY_WAITING.get(status, "not replayable")
    return (
        f"the delivery to {row.destination!r} is {status}: {why}; only an ended delivery "
        "(delivered, filtered, failed, dead) is replayed"
    )


def aimed_problems(route: str | None, status: str | None, destination: str | None) -> list[str]:
    """What is wrong with a bulk replay aimed at one destination, field by field: a
    destination's name means something only within its route, and the status is then its
    delivery's, which must be one a replay takes."""
    if destination is None:
        return []
    problems = []
    if not re.fullmatch(route_store.DESTINATION_NAME_PATTERN, destination):
        problems.append(
            "destination: not a destination's name (lowercase letters, digits, - and _)"
        )
    if not route:
        problems.append("destination: give the route too (a destination is named within its route)")
    if status and status not in DELIVERY_ENDED:
        problems.append(
            "status: with a destination, the status is its delivery's: one of "
            + ", ".join(s.value for s in DELIVERY_ENDED)
        )
    return problems


def _aimed_at(query: Select, filters: Filters, destination: str) -> Select:
    """``query`` joined to each event's delivery to ``destination``: the event filters but
    status, and the delivery's status (``filters.status``, else any that ended)."""
    statuses = (filters.status,) if filters.status else DELIVERY_ENDED
    query = query.join(Delivery, Delivery.event_id == Event.id).where(
        Delivery.destination == destination, Delivery.status.in_(statuses)
    )
    return replace(filters, status=None).apply(query)


def matching_ids(
    db: Database,
    *,
    status: str,
    route: str | None = None,
    since: datetime | None = None,
    batch: int = 500,
) -> Iterator[list[str]]:
    """Ids of events matching a bulk replay, in batches, oldest first (keyset paging)."""
    last = ""
    while True:
        query = select(Event.id).where(Event.id > last).order_by(Event.id).limit(batch)
        query = matching(query, route, status, since)
        with db.read_session() as session:
            ids = list(session.scalars(query))
        if not ids:
            return
        yield ids
        last = ids[-1]


def replay_all(
    db: Database,
    *,
    status: str,
    route: str | None = None,
    since: datetime | None = None,
    actor: audit.Actor | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """`events replay --status`: every matching event, oldest first, in batches of their
    own short transactions; how many were replayed. ``progress`` hears each batch's size.
    One ``events.replay`` entry for the whole, written with the last batch."""
    replayed = 0
    batches = matching_ids(db, status=status, route=route, since=since)
    batch = next(batches, None)
    while batch is not None:
        following = next(batches, None)  # keyset by id: this batch's replay moves none
        with db.session() as session:
            replayed += len(replay(session, batch))
            if following is None and replayed:
                wanted = {"route": route, "status": status, "since": since}
                audit.record(
                    session,
                    actor,
                    "events.replay",
                    audit.filter_text(wanted),
                    {"filter": wanted, "count": replayed},
                )
        if progress is not None:
            progress(len(batch))
        batch = following
    return replayed


def count(db: Database, *, status: str, route: str | None, since: datetime | None) -> int:
    query = matching(select(func.count()).select_from(Event), route, status, since)
    with db.read_session() as session:
        return int(session.scalar(query) or 0)


# --- the admin API's listing, bulk replay and statistics: keyset pages, bounded work ---


@dataclass(frozen=True)
class Filters:
    """What an admin narrows events by; every field optional.

    Each one is answered along an index, newest first: route, status, reason, key and
    request_id by their (column, received_at, id) index, since and until by (received_at,
    id). A page then reads ``limit + 1`` index entries past its cursor (p95 under 25 ms at
    300,000 events on both databases, even for a value matching nothing; the reason filter
    took 607 ms on SQLite before its index: bench/RESULTS.md). A time range combines with
    any of them in the same index range. Two or more of the others together walk the index
    of one (the first in ``LEADING``) and check the rest: two common values seldom seen
    together would walk it to its end, so that walk is bounded by the scan window, as a body
    search (``text``, which no index serves) is. A filter added here without an index fails
    tests/test_listing_plans.py, which reads the plan of each and of each pair.
    """

    route: str | None = None
    status: str | None = None
    reason: str | None = None
    key_prefix: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    request_id: str | None = None

    @classmethod
    def of(cls, given: Any) -> Filters:
        """The filters an admin gave: anything with ``route``, ``status``, ``reason``,
        ``key`` (a key's prefix), ``since``, ``until`` and ``request_id`` (the admin API's
        and the dashboard's event query, a bulk replay's body)."""
        return cls(
            route=given.route,
            status=given.status,
            reason=given.reason,
            key_prefix=given.key,
            since=given.since,
            until=given.until,
            request_id=given.request_id,
        )

    def apply(self, query: Select) -> Select:
        query = matching(query, self.route, self.status, self.since, self.request_id)
        if self.reason:
            query = query.where(Event.reason == self.reason)
        if self.key_prefix:
            query = query.where(Event.key_prefix == self.key_prefix)
        if self.until:
            query = query.where(Event.received_at < self.until)
        return query

    def split(self) -> tuple[Filters, list]:
        """The filters one index range answers (the first given of ``LEADING``, and the time
        range), and the conditions left to check on each row it reads."""
        given = [name for name in LEADING if getattr(self, name)]
        rest = {name: None for name in given[1:]}
        checks = [COLUMNS[name] == getattr(self, name) for name in given[1:]]
        return replace(self, **rest), checks


# The filters with an index of their own, (column, received_at, id), the likely narrowest
# first: with several given, the listing walks the first one's index.
LEADING = ("request_id", "key_prefix", "reason", "route", "status")
COLUMNS = {name: getattr(Event, name) for name in LEADING}


def encode_cursor(received_at: datetime, event_id: str) -> str:
    """An opaque position: the (received_at, id) of the last event a page showed."""
    raw = f"{received_at.astimezone(UTC).isoformat()}|{event_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        when, event_id = raw.split("|", 1)
        received_at = datetime.fromisoformat(when)
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("not a cursor from this hub") from None
    if received_at.tzinfo is None or not event_id.startswith("evt_") or len(event_id) > 32:
        raise BadCursor("not a cursor from this hub")
    return received_at, event_id


def _older_than(query: Select, cursor: str | None) -> Select:
    """Keyset paging: rows after the cursor in newest-first order (an index range, no OFFSET)."""
    if cursor is None:
        return query
    received_at, event_id = decode_cursor(cursor)
    return query.where(tuple_(Event.received_at, Event.id) < tuple_(received_at, event_id))


NEWEST_FIRST = (Event.received_at.desc(), Event.id.desc())
SUMMARY_COLUMNS = (
    Event.id,
    Event.route,
    Event.status,
    Event.reason,
    Event.key_prefix,
    Event.remote_addr,
    Event.request_id,
    Event.received_at,
    Event.attempts,
    Event.next_attempt_at,
    Event.completed_at,
    Event.last_error,
    Event.duplicate_of,
)


@dataclass
class Page:
    events: list[dict]
    next_cursor: str | None
    scanned: int | None = None


@dataclass(frozen=True)
class Listing:
    """What one call of the listing asks: events matching ``filters``, a page of ``limit``
    past ``cursor``, optionally only those whose raw body holds ``text``; ``window`` bounds
    the rows a check no index answers may scan."""

    filters: Filters
    limit: int = 50
    cursor: str | None = None
    text: str | None = None
    window: int = 2_000


def search(session: Session, listing: Listing) -> Page:
    """One page of events, newest first, and the cursor of the next (None at the end).

    Never counts the table: a page reads ``limit + 1`` rows along an index. ``text`` looks
    for a substring of the raw body (case-sensitive bytes), and two or more filters of
    ``LEADING`` are checked, among at most ``window`` rows past the cursor; when those hold
    fewer matches than a page, the cursor still moves past them, so the admin pages on
    through a large table at a bounded cost per call.
    """
    query = listing_query(session, listing)
    limit = listing.limit
    if "hit" not in query.selected_columns:
        rows = session.execute(query).all()
        more = len(rows) > limit
        rows = rows[:limit]
        events = _summaries(session, [r.id for r in rows])
        last = rows[-1] if more else None
        return Page(events, encode_cursor(last.received_at, last.id) if last else None)
    scanned = session.execute(query).all()
    hits = [r for r in scanned if r.hit]
    last = None
    if len(hits) > limit:
        last = hits[limit - 1]
    elif len(scanned) == listing.window:
        last = scanned[-1]
    hits = hits[:limit]
    events = _summaries(session, [r.id for r in hits])
    next_cursor = encode_cursor(last.received_at, last.id) if last is not None else None
    return Page(events, next_cursor, scanned=len(scanned))


def listing_query(session: Session, listing: Listing) -> Select:
    """What ``search`` runs: (id, received_at) of ``limit + 1`` matching events past the
    cursor, newest first, along one index range; or, with ``text`` or filters one range
    does not answer, the ``window`` rows of that range past the cursor and whether each
    matches the rest (a ``hit`` column: the scan's bound). Raises BadCursor."""
    ranged, checks = listing.filters.split()
    if listing.text is not None:
        checks.append(_body_contains(session, listing.text))
    base = ranged.apply(_older_than(select(Event.id, Event.received_at), listing.cursor))
    if not checks:
        return base.order_by(*NEWEST_FIRST).limit(listing.limit + 1)
    hit = and_(*checks).label("hit")
    return base.add_columns(hit).order_by(*NEWEST_FIRST).limit(listing.window)


def _summaries(session: Session, ids: list[str]) -> list[dict]:
    """The listed columns of these events (never the body or result), newest first."""
    if not ids:
        return []
    query = select(*SUMMARY_COLUMNS).where(Event.id.in_(ids)).order_by(*NEWEST_FIRST)
    return [
        {k: iso_time(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}
        for row in session.execute(query)
    ]


def _body_contains(session: Session, text: str):
    needle = bindparam("needle", text.encode(), type_=LargeBinary)
    if session.get_bind().dialect.name == "postgresql":
        return func.coalesce(func.position(needle.op("IN")(Event.body)), 0) > 0
    return func.coalesce(func.instr(Event.body, needle), 0) > 0


def replay_matching(
    db: Database,
    filters: Filters,
    *,
    cursor: str | None = None,
    examine: int = 10_000,
    batch: int = 500,
    destination: str | None = None,
    actor: audit.Actor | None = None,
) -> tuple[int, int, str | None]:
    """Replay the events matching ``filters``, newest first, looking at most at ``examine``.

    Each batch is replayed in its own short transaction. Returns (replayed, examined,
    next cursor or None when every match was looked at). Aimed at a ``destination`` (of
    ``filters.route``: ``aimed_problems``), only that destination's deliveries are replayed,
    those whose status is ``filters.status`` (else any that ended), one per event looked at;
    the events' other deliveries are left as they are. ``actor``: the admin asking (one
    ``events.replay`` or ``deliveries.replay`` entry with the filter and the counts,
    written with the last batch, if any was replayed).
    """
    replayed = examined = 0
    while examined < examine:
        take = min(batch, examine - examined)
        query = _bulk_query(filters, destination, cursor)
        with db.session() as session:
            rows = session.execute(query.order_by(*NEWEST_FIRST).limit(take)).all()
            if rows and destination is None:
                replayed += len(replay(session, [r.id for r in rows]))
            elif rows:
                replayed += len(replay_deliveries(session, [r.delivery_id for r in rows]))
            last = len(rows) < take or examined + len(rows) >= examine
            if last and replayed:
                _record_bulk(session, actor, filters, destination, replayed, examined + len(rows))
        examined += len(rows)
        if len(rows) < take:
            return replayed, examined, None
        cursor = encode_cursor(rows[-1].received_at, rows[-1].id)
    more = cursor is not None and _any_left(db, filters, cursor, destination)
    return replayed, examined, cursor if more else None


def _record_bulk(session, actor, filters: Filters, destination, replayed, examined) -> None:
    """The one audit entry of a bulk replay: its filter, destination and counts."""
    wanted = {k: v for k, v in vars(filters).items() if v is not None}
    action = "events.replay"
    if destination is not None:
        wanted["destination"] = destination
        action = "deliveries.replay"
    change = {"filter": wanted, "count": replayed, "examined": examined}
    audit.record(session, actor, action, audit.filter_text(wanted), change)


def _bulk_query(filters: Filters, destination: str | None, cursor: str | None) -> Select:
    """A bulk replay's rows past ``cursor``: (id, received_at) of each matching event, and
    with a destination the id of its delivery there."""
    query = _older_than(select(Event.id, Event.received_at), cursor)
    if destination is None:
        return filters.apply(query)
    return _aimed_at(query.add_columns(Delivery.id.label("delivery_id")), filters, destination)


def _any_left(db: Database, filters: Filters, cursor: str, destination: str | None = None) -> bool:
    with db.read_session() as session:
        return (
            session.execute(_bulk_query(filters, destination, cursor).limit(1)).first() is not None
        )


# Events whose processing time counts in the statistics.
PROCESSED = (EventStatus.DELIVERED, EventStatus.FAILED, EventStatus.DEAD)


@dataclass
class Stats:
    counted: int
    truncated: bool
    routes: dict[str, dict]


def stats(session: Session, since: datetime, until: datetime, max_rows: int = 100_000) -> Stats:
    """Per route: counts by status and by reason, and p50/p95 of completed_at - received_at
    of the events that ended (delivered, failed, dead) and were never replayed: a replayed
    event's completed_at is when its replay ended, days after it came in (one route showed a
    p50 of 143,020 ms), which measures the admin, not the hub. Replayed events still count
    by status and reason.

    Computed in SQL over the newest ``max_rows`` events of the window (an index range of
    received_at), so a busy month costs no more than ``max_rows`` rows.
    """
    in_window = select(Event.id).where(Event.received_at >= since, Event.received_at < until)
    window = (
        select(
            Event.route,
            Event.status,
            Event.reason,
            Event.received_at,
            Event.completed_at,
            Event.replayed_at,
        )
        .where(Event.received_at >= since, Event.received_at < until)
        .order_by(Event.received_at.desc())
        .limit(max_rows)
        .subquery()
    )
    probe = select(func.count()).select_from(in_window.limit(max_rows + 1).subquery())
    present = int(session.scalar(probe) or 0)
    routes: dict[str, dict] = {}

    def entry(route: str) -> dict:
        return routes.setdefault(
            route,
            {"total": 0, "by_status": {}, "by_reason": {}, "p50_ms": None, "p95_ms": None},
        )

    grouped = select(window.c.route, window.c.status, window.c.reason, func.count()).group_by(
        window.c.route, window.c.status, window.c.reason
    )
    for route, status, reason, n in session.execute(grouped):
        item = entry(route)
        item["total"] += n
        item["by_status"][status] = item["by_status"].get(status, 0) + n
        if reason:
            item["by_reason"][reason] = item["by_reason"].get(reason, 0) + n
    ms = _elapsed_ms(session, window.c.received_at, window.c.completed_at)
    ranked = (
        select(
            window.c.route,
            ms.label("ms"),
            func.row_number().over(partition_by=window.c.route, order_by=ms).label("rn"),
            func.count().over(partition_by=window.c.route).label("n"),
        )
        .where(
            window.c.status.in_(PROCESSED),
            window.c.completed_at.is_not(None),
            window.c.replayed_at.is_(None),
        )
        .subquery()
    )
    # The nearest-rank percentile: the ceil(p * n)-th smallest, in integer arithmetic.
    p50 = (ranked.c.n * 50 + 99) // 100
    p95 = (ranked.c.n * 95 + 99) // 100
    picked = select(ranked.c.route, ranked.c.ms, ranked.c.rn, p50.label("r50"), p95.label("r95"))
    picked = picked.where((ranked.c.rn == p50) | (ranked.c.rn == p95))
    for route, value, rank, r50, r95 in session.execute(picked):
        item = entry(route)
        value = round(float(value), 1)
        if rank == int(r50):
            item["p50_ms"] = value
        if rank == int(r95):
            item["p95_ms"] = value
    return Stats(min(present, max_rows), present > max_rows, routes)


def _elapsed_ms(session: Session, start, end):
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start) * 1000
    return (func.julianday(end) - func.julianday(start)) * 86_400_000.0


def parse_time(value: str) -> datetime:
    """An ISO time (UTC when no zone is given) or an age such as ``2h`` before now."""
    try:
        return utcnow() - key_store.parse_duration(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            "not a time (use an ISO time such as 2026-11-01T00:00Z or an age like 2h)"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- the dashboard's overview and event page: bounded reads over the same indexes ---


@dataclass
class Timeline:
    """The last stretch of time per route: events by status in equal slices (oldest first),
    and the totals by status and by refusal reason."""

    since: datetime
    until: datetime
    buckets: int
    counted: int
    truncated: bool  # the window held more than the rows counted: only the newest were
    routes: dict[str, dict]


def timeline(
    session: Session, since: datetime, until: datetime, buckets: int, max_rows: int = 20_000
) -> Timeline:
    """Per route, status and reason, how many events were received in each of ``buckets``
    equal slices of the window: one grouped query over the newest ``max_rows`` (or so:
    events received in the same microsecond as the last one count too) events of the
    window, an index range of received_at, so a busy hour costs no more than that."""
    # Where the newest max_rows begin: one walk along the received_at index, and the
    # grouped query reads from there (a plain range, cheaper than a LIMIT subquery).
    cutoff = session.scalar(
        select(Event.received_at)
        .where(Event.received_at >= since, Event.received_at < until)
        .order_by(Event.received_at.desc())
        .offset(max_rows - 1)
        .limit(1)
    )
    width_ms = (until - since).total_seconds() * 1000 / buckets
    start = literal(since, type_=Event.__table__.c.received_at.type)
    elapsed = _elapsed_ms(session, start, Event.received_at)
    if session.get_bind().dialect.name == "postgresql":
        elapsed = func.floor(elapsed / width_ms)
    else:  # never negative, so SQLite's CAST truncates towards the floor
        elapsed = elapsed / width_ms
    slot = cast(elapsed, Integer).label("slot")
    grouped = (
        select(Event.route, Event.status, Event.reason, slot, func.count())
        .where(Event.received_at >= (cutoff or since), Event.received_at < until)
        .group_by(Event.route, Event.status, Event.reason, slot)
    )
    routes: dict[str, dict] = {}
    counted = 0
    for route, status, reason, index, n in session.execute(grouped):
        item = routes.setdefault(
            route, {"total": 0, "series": {}, "by_status": {}, "by_reason": {}}
        )
        series = item["series"].setdefault(status, [0] * buckets)
        series[min(max(int(index), 0), buckets - 1)] += n
        item["total"] += n
        item["by_status"][status] = item["by_status"].get(status, 0) + n
        if reason:
            item["by_reason"][reason] = item["by_reason"].get(reason, 0) + n
        counted += n
    return Timeline(since, until, buckets, counted, cutoff is not None, routes)


@dataclass
class Queue:
    """Events waiting for a worker: how many (counted up to a cap), by route, and when the
    one that has waited longest became due."""

    depth: int
    capped: bool
    by_route: dict[str, int]
    oldest_due: datetime | None


def queue(session: Session, now: datetime, cap: int = 10_000) -> Queue:
    """The queue's depth (deliveries waiting) counted along the due index, stopping past
    ``cap``."""
    waiting = (
        select(Delivery.route).where(Delivery.status.in_(DUE_STATUSES)).limit(cap + 1).subquery()
    )
    by_route = {
        route: int(n)
        for route, n in session.execute(
            select(waiting.c.route, func.count()).group_by(waiting.c.route)
        )
    }
    depth = sum(by_route.values())
    return Queue(min(depth, cap), depth > cap, by_route, oldest_due(session, now))


def oldest_due(session: Session, now: datetime) -> datetime | None:
    """The next_attempt_at of the delivery due longest, None when none is due: one index
    seek for each due status, (status, next_attempt_at) to its first row."""
    oldest = [
        session.scalar(
            select(Delivery.next_attempt_at)
            .where(due(now, (status,)))
            .order_by(Delivery.next_attempt_at)
            .limit(1)
        )
        for status in DUE_STATUSES
    ]
    return min((t for t in oldest if t is not None), default=None)


def queue_gauges(db: Database, cap: int) -> tuple[int, int, datetime | None, int]:
    """What the queue gauges show: deliveries due now, deliveries waiting (due now or
    later), each counted up to ``cap``, the next_attempt_at of the one due longest, and the
    deliveries held for a paused destination (up to ``cap``)."""
    now = utcnow()
    with db.read_session() as session:

        def capped_count(where) -> int:
            rows = select(Delivery.id).where(where).limit(cap).subquery()
            return int(session.scalar(select(func.count()).select_from(rows)) or 0)

        return (
            capped_count(due(now)),
            capped_count(Delivery.status.in_(DUE_STATUSES)),
            oldest_due(session, now),
            capped_count(Delivery.status == EventStatus.HELD),
        )


def count_replayable(
    session: Session, filters: Filters, cap: int, destination: str | None = None
) -> int:
    """How many events matching ``filters`` a replay would take now, counted up to
    ``cap + 1`` (more than ``cap`` says "more than one bulk replay looks at"); aimed at a
    ``destination``, how many of its deliveries."""
    if destination is not None:
        query = _aimed_at(select(Delivery.id).select_from(Event), filters, destination)
        query = query.limit(cap + 1)
        return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    query = filters.apply(select(Event.id)).where(not_in_flight(utcnow())).limit(cap + 1)
    return int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)


def delivery_rows(session: Session, event_id: str) -> list[Delivery]:
    """The event's deliveries in its route's order."""
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.event_id == event_id)
            .order_by(Delivery.position, Delivery.id)
        )
    )


def deliveries(session: Session, event_id: str) -> list[dict[str, Any]]:
    """The event's deliveries in its route's order, each with its attempts."""
    rows = delivery_rows(session, event_id)
    calls: dict[str | None, list[Attempt]] = {}
    for attempt in session.scalars(
        select(Attempt).where(Attempt.event_id == event_id).order_by(Attempt.id)
    ):
        calls.setdefault(attempt.delivery_id, []).append(attempt)
    return [row.to_dict(calls.get(row.id, [])) for row in rows]


def latest_attempts(session: Session, event_id: str, limit: int) -> tuple[list[Attempt], bool]:
    """The event's newest ``limit`` attempts in the order they were made, and whether older
    ones were left out."""
    rows = list(
        session.scalars(
            select(Attempt)
            .where(Attempt.event_id == event_id)
            .order_by(Attempt.id.desc())
            .limit(limit + 1)
        )
    )
    return list(reversed(rows[:limit])), len(rows) > limit


def last_payload(session: Session, route: str, look: int = 20) -> bytes | None:
    """The body of the newest accepted event of ``route`` among its last ``look`` requests
    (refusals keep a prefix, not a body), or None; one walk of the route's time index."""
    newest = session.scalar(
        select(Event.id)
        .where(
            Event.id.in_(
                select(Event.id).where(Event.route == route).order_by(*NEWEST_FIRST).limit(look)
            ),
            Event.status.not_in(NEVER_ACCEPTED),
        )
        .order_by(*NEWEST_FIRST)
        .limit(1)
    )
    return session.scalar(select(Event.body).where(Event.id == newest)) if newest else None
