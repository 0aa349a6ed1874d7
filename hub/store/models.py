"""The tables the hub is made of (api_keys, routes and their destinations, events and their
deliveries, attempts), the shared rate-limit counters, the dashboard's sign-ins, the audit
log of what admins did, and the dedup keys that outlive their purged events.

A route fans out to its destinations; an accepted event gets one delivery per destination,
claimed, retried and ended on its own; each connector call is an attempt of one delivery.
The event's own status, attempts, result and error are a roll-up of its deliveries
(``hub.services.delivery.rollup``)."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    false,
    or_,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, configure_mappers, mapped_column, relationship

from hub.store import storable

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


R = TypeVar("R")
_mappers_configured = False


def fresh(cls: type[R], **values: Any) -> R:
    """A new row object of the mapped class ``cls`` holding ``values``, as ``cls(**values)``
    gives, without the ORM's event for each attribute: a webhook's event, deliveries and
    attempts are built on every request and every delivery, and ``Event(...)`` costs 21–22
    µs where this costs 4–6. The object is transient like any new one: inserted from its
    values when added to a session, or turned into a row by groupcommit.row_of."""
    global _mappers_configured
    if not _mappers_configured:  # what the first constructor call of any mapped class does
        configure_mappers()  # 2-3 µs even when done: once
        _mappers_configured = True
    obj = cls.__mapper__.class_manager.new_instance()  # type: ignore[attr-defined]
    obj.__dict__.update(values)
    return obj


def columns_of(cls: type) -> tuple[Any, ...]:
    """The table columns of the mapped class ``cls``, in the order ``loaded`` takes them."""
    return tuple(cls.__table__.columns)  # type: ignore[attr-defined]


_ATTRIBUTE_KEYS: dict[type, tuple[str, ...]] = {}


def loaded(cls: type[R], row: Sequence[Any]) -> R:
    """A ``fresh`` object of ``cls`` from a row of its ``columns_of`` (a Core statement's
    RETURNING): what the ORM's own loading gives to read, at a fraction of its cost (a
    worker's claim read back 32 deliveries and their events this way, a seventh of its
    CPU). Transient: never added to a session, only read."""
    keys = _ATTRIBUTE_KEYS.get(cls)
    if keys is None:
        mapper = cls.__mapper__  # type: ignore[attr-defined]
        keys = tuple(mapper.get_property_by_column(column).key for column in columns_of(cls))
        _ATTRIBUTE_KEYS[cls] = keys
    return fresh(cls, **dict(zip(keys, row, strict=True)))


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC on the way in and out, on SQLite (which keeps no zone) too."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")


class StorableJSON(TypeDecorator):
    """JSON (JSONB on PostgreSQL) for values from outside: what JSONB can't hold is kept as
    its JSON text (``hub.store.storable.json_value``), so writing a value never fails."""

    impl = JSON
    cache_ok = True

    def load_dialect_impl(self, dialect):
        return dialect.type_descriptor(JSONB() if dialect.name == "postgresql" else JSON())

    def process_bind_param(self, value: Any, dialect) -> Any:
        return storable.json_value(value)


class StorableText(TypeDecorator):
    """Text from outside: NUL and lone surrogates escaped (``hub.store.storable.text``), which
    PostgreSQL's TEXT refuses; a ``String(n)`` stays within its length."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        value = storable.text(value)
        length = getattr(self.impl, "length", None)
        return value[:length] if value is not None and length else value


class StorableString(StorableText):
    impl = String
    cache_ok = True


BigID = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER only


class EventStatus(enum.StrEnum):
    """Where an event stands; stored, answered and documented as its value ("pending")."""

    PENDING = "pending"
    PROCESSING = "processing"
    RETRYING = "retrying"
    # Waiting for its paused destination to be resumed, or for its open circuit to close:
    # not due, no run counted.
    HELD = "held"
    # Waiting for the delivery before it with the same ordering key to end: not due.
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    DEAD = "dead"
    FILTERED = "filtered"
    # Every delivery ended, some delivered (or filtered) and some dead or failed.
    PARTIAL = "partial"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


class AttemptOutcome(enum.StrEnum):
    """How one connector call ended: ``ok``, ``retryable`` or ``permanent`` (a failure that
    another try would not mend)."""

    OK = "ok"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


# Deliveries (and events) waiting for a worker; due once their next_attempt_at has come (``due``).
DUE_STATUSES = (EventStatus.PENDING, EventStatus.RETRYING)
# The same, written out (not bound) so the planner can match the partial indexes
# ix_deliveries_due_at and ix_deliveries_due_by_lane (and the events' ones):
# status IN ('pending', 'retrying').
HELD_PREDICATE = "status = 'held'"
DUE_PREDICATE = "status IN ({})".format(", ".join(f"'{status}'" for status in DUE_STATUSES))
# Deliveries not yet ended: waiting, held, queued or being called.
UNFINISHED_STATUSES = (
    EventStatus.PENDING,
    EventStatus.RETRYING,
    EventStatus.PROCESSING,
    EventStatus.HELD,
    EventStatus.QUEUED,
)
# Events whose deliveries all ended (PARTIAL: some reached, some failed or dead).
ENDED = (
    EventStatus.DELIVERED,
    EventStatus.PARTIAL,
    EventStatus.FAILED,
    EventStatus.DEAD,
    EventStatus.FILTERED,
)
# Requests turned away, and copies of a delivery accepted before: ended as they came.
NEVER_ACCEPTED = (EventStatus.REJECTED, EventStatus.DUPLICATE)
# Events nothing changes any more but a replay: what a purge may delete.
FINISHED = (*ENDED, *NEVER_ACCEPTED)
# Deliveries being called (or claimed and about to be), written out like DUE_PREDICATE so
# the planner matches the partial index ix_deliveries_in_flight.
IN_FLIGHT_PREDICATE = "status = 'processing'"
# An ordered destination's deliveries not yet ended (ix_deliveries_order's predicate).
ORDERED_PREDICATE = "order_key IS NOT NULL AND status IN ({})".format(
    ", ".join(f"'{status}'" for status in UNFINISHED_STATUSES)
)

# Deliveries that ended (ix_deliveries_ended_at's predicate).
ENDED_PREDICATE = "completed_at IS NOT NULL"

_CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"


def new_event_id() -> str:
    """``evt_`` + 26 characters: 48 bits of milliseconds, 80 random bits; ids sort by time."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        value, rem = divmod(value, 32)
        chars.append(_CROCKFORD[rem])
    return "evt_" + "".join(reversed(chars))


def lane_of(route: str, destination: str) -> str:
    """A delivery's lane: its route and destination, what the fair claim takes turns across."""
    return f"{route}/{destination}"


def _lane_default(context: Any) -> str | None:
    """A delivery's lane when the row was written without one (its route and destination)."""
    if context is None:
        return None
    values = context.get_current_parameters()
    return lane_of(values["route"], values["destination"])


def new_delivery_id() -> str:
    """``dlv_`` + 26 characters, made like an event's id: they sort by time too."""
    return "dlv_" + new_event_id()[4:]


def first_delivery_id(event_id: str) -> str:
    """The id of an event's delivery to its route's first destination: the event's own,
    ``dlv_`` for ``evt_`` (as migration 0011 named the deliveries it made)."""
    return "dlv_" + event_id[4:]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONType, list[Any]: JSONType}


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    digest: Mapped[str] = mapped_column(String(64))
    # Route names this key may post to, or "*" for every route.
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    # May use the admin side (every event, every route): a property of its own, so a route
    # may be called "admin" and be a scope like any other.
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    # Requests this key may make, such as "1000/hour"; None means no limit.
    rate_limit: Mapped[str | None] = mapped_column(String(32))

    def to_dict(self) -> dict[str, Any]:
        return {
            "prefix": self.prefix,
            "name": self.name,
            "admin": self.is_admin,
            "scopes": list(self.scopes),
            "rate_limit": self.rate_limit,
            "created_at": iso_time(self.created_at),
            "expires_at": iso_time(self.expires_at),
            "last_used_at": iso_time(self.last_used_at),
            "revoked_at": iso_time(self.revoked_at),
        }


class Route(Base):
    __tablename__ = "routes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(8), default="sync")
    steps: Mapped[list[Any]] = mapped_column(default=list)
    # A sandboxed Jinja expression; events for which it is false end as `filtered`.
    filter: Mapped[str | None] = mapped_column(Text)
    # What a sender must show: key, signature, key+signature, key|signature.
    auth: Mapped[str] = mapped_column(String(20), default="key")
    verify_scheme: Mapped[str | None] = mapped_column(String(32))
    verify_options: Mapped[dict[str, Any] | None]
    # Signature secrets, a JSON list encrypted with a key derived from HUB_SECRET_KEY.
    secrets_encrypted: Mapped[str | None] = mapped_column(Text)
    dedup_path: Mapped[str | None] = mapped_column(String(200))
    dedup_window: Mapped[int] = mapped_column(Integer, default=86400)
    # Seconds between durable retries; None means the hub's default schedule.
    retry_schedule: Mapped[list[Any] | None]
    rate_limit: Mapped[str | None] = mapped_column(String(32))
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # A JSON Schema every payload must match (hub.services.payload_schema); None: any.
    # Shown and given as "schema" (the column's name); the attribute's name is not taken
    # by pydantic's or SQLAlchemy's own "schema".
    payload_schema: Mapped[dict[str, Any] | None] = mapped_column("schema")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Days its finished events are kept (hub.services.retention); None: HUB_RETENTION_DAYS.
    retention_days: Mapped[int | None] = mapped_column(Integer)

    # Where its events go, in order; read with the route (a cached route carries them).
    destinations: Mapped[list[Destination]] = relationship(
        back_populates="route",
        order_by="Destination.position",
        cascade="all, delete-orphan",
        passive_deletes=True,
        lazy="selectin",
    )


DEFAULT_DESTINATION = "default"


class Destination(Base):
    """One place a route's events go: its own steps, filter and retry schedule. A route
    given plain ``steps`` has one, named "default"; the route's own steps, filter and
    retry_schedule columns stay equal to its first destination's (sync runs read them).

    max_in_flight, rate, ordering_key and breaker are stored for the delivery controls that
    read them; None (or no breaker) means off."""

    __tablename__ = "destinations"
    __table_args__ = (UniqueConstraint("route_id", "name", name="uq_destinations_route_id_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    route_id: Mapped[int] = mapped_column(ForeignKey("routes.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    position: Mapped[int] = mapped_column(Integer, default=0)
    steps: Mapped[list[Any]] = mapped_column(default=list)
    filter: Mapped[str | None] = mapped_column(Text)
    retry_schedule: Mapped[list[Any] | None]
    max_in_flight: Mapped[int | None]
    rate: Mapped[str | None] = mapped_column(String(32))
    ordering_key: Mapped[str | None] = mapped_column(Text)
    breaker: Mapped[dict[str, Any] | None]
    # active | paused | open | half_open, when and why it last changed.
    state: Mapped[str] = mapped_column(String(16), default="active", server_default="active")
    state_changed_at: Mapped[datetime | None]
    state_reason: Mapped[str | None] = mapped_column(Text)
    # The circuit breaker: consecutive retryable failures, when an open circuit lets a probe
    # through (half-open), and the cool-down it waited last (a failed probe doubles it).
    breaker_failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    breaker_retry_at: Mapped[datetime | None]
    breaker_cool_down: Mapped[int | None]
    # The one held delivery a half-open circuit lets through (its id), else None.
    breaker_probe: Mapped[str | None] = mapped_column(String(32))
    # The rate: the time from which the destination's next delivery may start (a GCRA's
    # theoretical arrival time), shared by every worker process through this row.
    rate_next_at: Mapped[datetime | None]

    route: Mapped[Route] = relationship(back_populates="destinations")


class Event(Base):
    """One row for every request that reached /hooks or /api, accepted or not."""

    __tablename__ = "events"
    __table_args__ = (
        # Due events, oldest first: a claim walks this index from its start, whatever the
        # number of events waiting (a partial index holds only pending and retrying rows).
        Index(
            "ix_events_due_at",
            "next_attempt_at",
            postgresql_where=text(DUE_PREDICATE),
            sqlite_where=text(DUE_PREDICATE),
        ),
        # The same, within each route: a fair claim takes turns across routes by jumping
        # from one route's oldest due event to the next route's (hub.services.delivery.fair_pick).
        Index(
            "ix_events_due_by_route",
            "route",
            "next_attempt_at",
            postgresql_where=text(DUE_PREDICATE),
            sqlite_where=text(DUE_PREDICATE),
        ),
        Index("ix_events_dedup", "route", "dedup_key"),
        # The admin listing: newest first by (received_at, id), alone or within a route,
        # a status or a key, so each page is one index range (no sort, no OFFSET).
        Index("ix_events_received_at_id", "received_at", "id"),
        Index("ix_events_route_received_at_id", "route", "received_at", "id"),
        Index("ix_events_status_received_at_id", "status", "received_at", "id"),
        Index("ix_events_key_prefix_received_at_id", "key_prefix", "received_at", "id"),
        # Refusals by reason: without it a rare reason walked the whole received_at index
        # (2,383 ms on SQLite, 188 ms on PostgreSQL at 300,000 events; now one range).
        Index("ix_events_reason_received_at_id", "reason", "received_at", "id"),
        # Finding what one request brought, by the X-Request-ID a sender or a log line shows;
        # newest first without a sort, even for a sender that sends the same id every time.
        Index("ix_events_request_id_received_at_id", "request_id", "received_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_event_id)
    route: Mapped[str] = mapped_column(StorableString(200))  # indexed by ix_events_dedup
    # The key whose secret the request carried (verified, even if revoked or out of scope).
    key_prefix: Mapped[str | None] = mapped_column(String(16))
    # The prefix of whatever key-shaped value was presented, verified or not: who claimed
    # to knock. Never used to decide whose event this is.
    presented_prefix: Mapped[str | None] = mapped_column(String(16))
    remote_addr: Mapped[str | None] = mapped_column(StorableString(64))
    # The id of the request that brought it (X-Request-ID, the sender's or the hub's): the
    # same id is in the answer's header and in every log line about the event.
    request_id: Mapped[str | None] = mapped_column(String(200))
    # The W3C traceparent of the request's span when HUB_OTEL=true (hub.ops.tracing): the
    # worker's claim and delivery spans join the webhook's trace through it. NULL when off.
    traceparent: Mapped[str | None] = mapped_column(String(55))
    method: Mapped[str] = mapped_column(StorableString(10))
    path: Mapped[str] = mapped_column(StorableString(2000))
    query: Mapped[str | None] = mapped_column(StorableText)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    headers: Mapped[dict[str, Any]] = mapped_column(StorableJSON, default=dict)
    # The provider's signature headers of an accepted signed request (redacted in
    # ``headers``), sealed with the route secrets' SecretBox: opened only for `hub listen`
    # (hub.services.listen), so a local app can check the provider's signature itself.
    sealed_headers: Mapped[str | None] = mapped_column(Text)
    content_type: Mapped[str | None] = mapped_column(StorableString(200))
    # The whole body of an accepted request; a short prefix at most of a refused one.
    body: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Bytes the sender declared (Content-Length) or that were read, whatever was kept.
    body_size: Mapped[int | None] = mapped_column(BigInteger)
    dedup_key: Mapped[str | None] = mapped_column(StorableString(300))
    duplicate_of: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    # Why a request was turned away: unauthorized, forbidden, bad_signature ...
    reason: Mapped[str | None] = mapped_column(String(32))
    # The HTTP status the sender was answered (unset while a sync run is in flight).
    response_status: Mapped[int | None]
    # Delivery runs so far (a replay keeps counting), and durable retries scheduled since the
    # event was last queued (a replay starts the route's retry schedule again).
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[Any | None] = mapped_column(StorableJSON)
    last_error: Mapped[str | None] = mapped_column(StorableText)
    completed_at: Mapped[datetime | None]
    # When an admin last put the event back in the queue (None: never replayed). Its
    # completed_at then measures the replay, not the hub, so latency figures leave it out.
    replayed_at: Mapped[datetime | None]

    attempt_rows: Mapped[list[Attempt]] = relationship(
        back_populates="event",
        order_by="Attempt.id",
        cascade="all, delete-orphan",
        passive_deletes=True,
    )

    def to_dict(self, with_attempts: bool = False) -> dict[str, Any]:
        data = {
            "id": self.id,
            "route": self.route,
            "status": self.status,
            "reason": self.reason,
            "key_prefix": self.key_prefix,
            "presented_prefix": self.presented_prefix,
            "remote_addr": self.remote_addr,
            "request_id": self.request_id,
            "body_size": self.body_size,
            "received_at": iso_time(self.received_at),
            "attempts": self.attempts,
            "next_attempt_at": iso_time(self.next_attempt_at),
            "completed_at": iso_time(self.completed_at),
            "result": self.result,
            "last_error": self.last_error,
            "duplicate_of": self.duplicate_of,
        }
        if with_attempts:
            data["attempt_log"] = [a.to_dict() for a in self.attempt_rows]
        return data

    def sender_dict(self) -> dict[str, Any]:
        """What the key that sent the event sees (GET /events/<id>): acceptance, status,
        times and counts; no result, error or attempt, which name the destinations."""
        return {
            "id": self.id,
            "route": self.route,
            "accepted": self.status != EventStatus.REJECTED,
            "status": self.status,
            "reason": self.reason,
            "request_id": self.request_id,
            "received_at": iso_time(self.received_at),
            "attempts": self.attempts,
            "next_attempt_at": iso_time(self.next_attempt_at),
            "completed_at": iso_time(self.completed_at),
            "duplicate_of": self.duplicate_of,
        }


class Delivery(Base):
    """One accepted event on its way to one destination: what workers claim. Its status
    follows the events' set (pending, processing, retrying, delivered, filtered, failed,
    dead); its attempts are the connector calls made for it."""

    __tablename__ = "deliveries"
    __table_args__ = (
        # Due deliveries, oldest first, and the same within each route (the fair claim's
        # lanes, hub.services.delivery.fair_pick): partial indexes of pending and retrying rows.
        Index(
            "ix_deliveries_due_at",
            "next_attempt_at",
            postgresql_where=text(DUE_PREDICATE),
            sqlite_where=text(DUE_PREDICATE),
        ),
        Index(
            "ix_deliveries_due_by_lane",
            "lane",
            "next_attempt_at",
            postgresql_where=text(DUE_PREDICATE),
            sqlite_where=text(DUE_PREDICATE),
        ),
        # Deliveries being called, by lane: what a claim counts against a destination's
        # max_in_flight (hub.services.delivery), one small range however many rows ended.
        Index(
            "ix_deliveries_in_flight",
            "lane",
            "lease_until",
            postgresql_where=text(IN_FLIGHT_PREDICATE),
            sqlite_where=text(IN_FLIGHT_PREDICATE),
        ),
        # Each lane's held deliveries, oldest first: the probe a half-open circuit lets
        # through, and the order they are let go in.
        Index(
            "ix_deliveries_held_by_lane",
            "lane",
            "next_attempt_at",
            "id",
            postgresql_where=text(HELD_PREDICATE),
            sqlite_where=text(HELD_PREDICATE),
        ),
        # Deliveries by when they ended: what the alert evaluator counts (dead ones, and
        # the failure ratio over a window) reads one small range, not every delivery.
        Index(
            "ix_deliveries_ended_at",
            "completed_at",
            postgresql_where=text(ENDED_PREDICATE),
            sqlite_where=text(ENDED_PREDICATE),
        ),
        # An ordered destination's deliveries by key, in the order they were accepted.
        Index(
            "ix_deliveries_order",
            "lane",
            "order_key",
            "id",
            postgresql_where=text(ORDERED_PREDICATE),
            sqlite_where=text(ORDERED_PREDICATE),
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_delivery_id)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    # Which destination of which route, by name: a worker finds its steps in the route as it
    # stands then (a destination removed meanwhile ends the delivery, with a sentence), and a
    # process whose route cache is a few seconds old never writes a row that fails to insert.
    route: Mapped[str] = mapped_column(StorableString(200))
    destination: Mapped[str] = mapped_column(String(64))
    # route/destination (``lane_of``): what the fair claim takes turns across.
    lane: Mapped[str] = mapped_column(
        String(140), default=lambda ctx: _lane_default(ctx), server_default=""
    )
    # The destination's ordering key rendered for this event (None: unordered): one key's
    # deliveries start one after another, in the order they were accepted.
    order_key: Mapped[str | None] = mapped_column(String(200))
    # The destination's place in its route when the event came (0: the first, whose result
    # is the event's).
    position: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    # Runs so far (a replay keeps counting), and durable retries since last queued.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    retries: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    result: Mapped[Any | None] = mapped_column(StorableJSON)
    last_error: Mapped[str | None] = mapped_column(StorableText)
    completed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    def to_dict(self, attempts: list[Attempt] | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "destination": self.destination,
            "status": self.status,
            "runs": self.attempts,
            "next_attempt_at": iso_time(self.next_attempt_at),
            "last_error": self.last_error,
            "completed_at": iso_time(self.completed_at),
            "result": self.result,
        }
        if attempts is not None:
            data["attempts"] = [a.to_dict() for a in attempts]
        return data


def due(now: datetime, statuses: tuple[EventStatus, ...] = DUE_STATUSES):
    """The condition on deliveries a worker may claim at ``now``: waiting (``DUE_STATUSES``)
    and their next_attempt_at come; ``statuses`` narrows it to some of them."""
    return Delivery.status.in_(statuses) & (Delivery.next_attempt_at <= now)


def may_be_original():
    """The condition on events that a later copy of the same delivery (same route, sender
    and dedup key) is a duplicate of: accepted, and answered 2xx or still running (a sync
    run whose sender heard an error is none: the sender's retry must run)."""
    answered_2xx = or_(
        Event.response_status.between(200, 299),
        and_(Event.response_status.is_(None), Event.status != EventStatus.FAILED),
    )
    return and_(Event.status.not_in(NEVER_ACCEPTED), answered_2xx)


class DestinationChange(Base):
    """One change of a destination's state (active, paused, open, half_open): to what,
    from what, why, and by whom ("breaker", or the admin: a key prefix or "cli:<user>")."""

    __tablename__ = "destination_changes"
    __table_args__ = (
        Index("ix_destination_changes_route_destination_at", "route", "destination", "at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    route: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    previous: Mapped[str | None] = mapped_column(String(16))
    cause: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(String(100))
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "route": self.route,
            "destination": self.destination,
            "state": self.state,
            "previous": self.previous,
            "cause": self.cause,
            "actor": self.actor,
            "at": iso_time(self.at),
        }


class Attempt(Base):
    """One row for every connector call, including each quick retry inside a delivery."""

    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    # The delivery (one destination of the event) this call was made for.
    delivery_id: Mapped[str | None] = mapped_column(
        ForeignKey("deliveries.id", ondelete="CASCADE"), index=True
    )
    # Which run of the delivery this call belongs to (1 for the first, more after retries).
    run: Mapped[int] = mapped_column(Integer, default=1)
    step_index: Mapped[int] = mapped_column(Integer)
    connector: Mapped[str] = mapped_column(String(64))
    # Which quick (in-process) try of the step this was, from 1.
    try_number: Mapped[int] = mapped_column(Integer, default=1)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(StorableText)
    request: Mapped[str | None] = mapped_column(StorableText)
    response: Mapped[str | None] = mapped_column(StorableText)
    # The headers sent and answered, as [name, value] pairs (order and repeats kept),
    # redacted and capped (HUB_ATTEMPT_HEADERS, HUB_ATTEMPT_HEADER_BYTES; a last ``(cut)``
    # pair says how much there was). NULL: not recorded (a call with no HTTP exchange, or
    # an attempt from before they were kept).
    request_headers: Mapped[list[list[str]] | None] = mapped_column(StorableJSON)
    response_headers: Mapped[list[list[str]] | None] = mapped_column(StorableJSON)

    event: Mapped[Event] = relationship(back_populates="attempt_rows")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "step": self.step_index,
            "connector": self.connector,
            "try": self.try_number,
            "started_at": iso_time(self.started_at),
            "duration_ms": self.duration_ms,
            "outcome": self.outcome,
            "http_status": self.http_status,
            "error": self.error,
            "request": self.request,
            "response": self.response,
            "request_headers": self.request_headers,
            "response_headers": self.response_headers,
        }


class DashboardSession(Base):
    """One sign-in to the dashboard. The cookie carries the session's id, signed; this row is
    what makes signing out (or an admin ending every session of a key) final: a copy of the
    cookie kept from before is worth nothing once ``ended_at`` is set."""

    __tablename__ = "dashboard_sessions"

    # SHA-256 of the random id in the cookie: the table alone opens no session.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_prefix: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)
    ended_at: Mapped[datetime | None]


class RateCounter(Base):
    """Requests counted in one fixed window of one bucket (``route:NAME``, ``key:PREFIX``).

    Shared by every worker process: the hub's rate limits hold across gunicorn workers and
    machines when Redis is not configured.
    """

    __tablename__ = "rate_counters"

    bucket: Mapped[str] = mapped_column(String(200), primary_key=True)
    # Start of the window, in whole seconds since the epoch.
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    count: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]


class AlertChannel(Base):
    """Where alerts go: a webhook URL, a Slack incoming webhook or an address over SMTP.
    ``config`` holds the kind's settings; its secret ones (a URL, which carries a token,
    an SMTP password) are sealed (``hub-sealed:...``, hub.store.crypto) and shown masked."""

    __tablename__ = "alert_channels"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AlertRule(Base):
    """When to alert: a kind (hub.services.alerts.RULE_KINDS), optional route and
    destination filters, a threshold and a window where the kind takes them, and the
    channels it goes to (an empty list: every channel). A row named like a built-in rule
    replaces it; a disabled one turns it off."""

    __tablename__ = "alert_rules"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    route: Mapped[str | None] = mapped_column(String(64))
    destination: Mapped[str | None] = mapped_column(String(64))
    threshold: Mapped[float | None]
    window: Mapped[int | None] = mapped_column(Integer)
    channels: Mapped[list[Any]] = mapped_column(default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


ALERT_FIRING_PREDICATE = "state = 'firing'"


class Alert(Base):
    """One condition of one rule while it lasts (``firing``) and after it cleared
    (``resolved``): what it is about (``subject``: route/destination, or a route), how many
    times it was seen (``count``: dead deliveries, circuit openings, evaluations over the
    threshold) and the sentence last sent. At most one firing alert per rule and subject."""

    __tablename__ = "alerts"
    __table_args__ = (
        Index(
            "ix_alerts_firing",
            "rule",
            "subject",
            unique=True,
            postgresql_where=text(ALERT_FIRING_PREDICATE),
            sqlite_where=text(ALERT_FIRING_PREDICATE),
        ),
        Index("ix_alerts_opened_at", "opened_at"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    value: Mapped[float | None]
    message: Mapped[str | None] = mapped_column(Text)
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    resolved_at: Mapped[datetime | None]


class AlertSend(Base):
    """One message to one channel: an alert's firing or resolved notice, or a test. What
    was sent (cut to a few KB), and whether it arrived: ``pending`` (queued), ``sending``,
    ``sent`` or ``failed`` with the error and the number of tries."""

    __tablename__ = "alert_sends"
    __table_args__ = (Index("ix_alert_sends_status_id", "status", "id"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    alert_id: Mapped[int | None] = mapped_column(
        ForeignKey("alerts.id", ondelete="CASCADE"), index=True
    )
    channel: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(StorableText)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(StorableText)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When its sending started; once it ended, when it ended.
    sent_at: Mapped[datetime | None]


class AlertState(Base):
    """The evaluator's one row: when the next evaluation is due (a process takes the turn by
    moving it forward with a conditional UPDATE, in the evaluation's transaction), who ran
    the last one, and how far it read (the last destination change, the end of the window
    of dead deliveries it counted)."""

    __tablename__ = "alert_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    next_run_at: Mapped[datetime | None]
    ran_at: Mapped[datetime | None]
    ran_by: Mapped[str | None] = mapped_column(String(64))
    change_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    dead_cursor: Mapped[datetime | None]


class AuditEntry(Base):
    """One admin action, whatever face it came through: who (an admin key's prefix,
    ``cli:<os user>``, or ``hub`` for the log's own retention), through which face (``api``,
    ``dashboard``, ``cli``, ``hub``), from where (the client's address, ``cli@<host>``),
    what (``key.create``, ``route.update``, ``events.replay`` ...), on what (a key's
    prefix, a route, ``route/destination``, an event), and the change, secrets masked.

    Written by hub.services.audit only, in the transaction of the change it records; never
    updated (a trigger refuses an UPDATE, migration 0017) and deleted only by its retention
    (HUB_AUDIT_RETENTION_DAYS)."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_actor_id", "actor", "id"),
        Index("ix_audit_log_action_id", "action", "id"),
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(StorableString(100))
    face: Mapped[str] = mapped_column(String(16))
    origin: Mapped[str | None] = mapped_column(StorableString(200))
    request_id: Mapped[str | None] = mapped_column(StorableString(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(StorableString(200))
    change: Mapped[dict[str, Any] | None] = mapped_column(StorableJSON)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": iso_time(self.at),
            "actor": self.actor,
            "face": self.face,
            "origin": self.origin,
            "request_id": self.request_id,
            "action": self.action,
            "target": self.target,
            "change": self.change,
        }


class DedupKey(Base):
    """The dedup key of an event purged while its route's dedup window was still open
    (hub.services.retention): a sender's retry of that delivery is still answered as a
    duplicate of it (hub.services.intake.find_original) until ``expires_at``, when the
    row is purged in turn. One row per purged original, named by the event's id."""

    __tablename__ = "dedup_keys"
    __table_args__ = (Index("ix_dedup_keys_route_dedup_key", "route", "dedup_key"),)

    event_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    route: Mapped[str] = mapped_column(StorableString(200))
    # The sender, as on the event: the verified key's prefix, None for a signature alone.
    key_prefix: Mapped[str | None] = mapped_column(String(16))
    dedup_key: Mapped[str] = mapped_column(StorableString(300))
    received_at: Mapped[datetime]
    # received_at plus the route's dedup window when the event was purged.
    expires_at: Mapped[datetime] = mapped_column(index=True)


class RetentionState(Base):
    """The purge's one row: when the next pass is due, and the lease of the process running
    one (a process takes the pass with a conditional UPDATE and renews the lease as it goes;
    one that dies leaves a lease that runs out), and what the last pass did."""

    __tablename__ = "retention_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    next_run_at: Mapped[datetime | None]
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None]
    ran_at: Mapped[datetime | None]
    ran_by: Mapped[str | None] = mapped_column(String(64))
    purged: Mapped[int] = mapped_column(BigInteger, default=0)


def iso_time(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None
