"""The bodies the hub's HTTP API reads and writes, as pydantic models.

The admin views validate requests with them and shape their answers with them, and
``hub.web.openapi`` builds the document from them: one description of each payload.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from hub.config import MAX_RETENTION_DAYS
from hub.services import keys as key_store
from hub.services.alerts import ChannelSpec, RuleSpec
from hub.services.destinations import BACKLOG_CAP
from hub.services.events import STATUSES, parse_time
from hub.services.paging import PAGE_DEFAULT, PAGE_MAX
from hub.services.routes import (
    ROUTE_NAME_PATTERN,
    AuthMode,
    DestinationSpec,
    RouteSpec,
    StepSpec,
)

EventStatus = Literal[STATUSES]  # type: ignore[valid-type]


TimeBound = Annotated[str, Field(max_length=64), AfterValidator(parse_time)]


def documented(**limits: Any) -> Any:
    """Limits the document shows for a field that ``hub.services`` checks (in its own words,
    the same on every face), not the model."""
    return Field(json_schema_extra=limits)


class Strict(BaseModel):
    """Unknown fields are refused (422 naming them), never silently dropped."""

    model_config = ConfigDict(extra="forbid")


# Every admin listing pages the same way: ``limit`` rows, and ``next_cursor`` to send back.
PageLimit = Annotated[
    int, Field(ge=1, le=PAGE_MAX, description=f"Rows per page (at most {PAGE_MAX})")
]
Cursor = Annotated[str, Field(max_length=200, description="next_cursor of a prior page")]
NextCursor = Annotated[
    str | None, Field(description="Pass as cursor for the next page; null on the last one")
]


class PageQuery(Strict):
    """One keyset page of a listing (keys by creation, routes by name)."""

    cursor: Cursor | None = None
    limit: PageLimit = PAGE_DEFAULT


# --- public ---


class HealthOut(BaseModel):
    status: Literal["healthy"]


class ReadyOut(BaseModel):
    status: Literal["ready"]
    database: str
    schema_: str | None = Field(alias="schema")


class EventStatusOut(BaseModel):
    """What the key that sent an event sees of it: whether it was accepted, where it
    stands, when, and how many tries. Never where it went, what was sent there or what
    came back (an admin key sees all of that, as EventOut)."""

    id: str
    route: str
    accepted: bool = Field(description="False when the hub refused the request (see reason)")
    status: str
    reason: str | None = Field(description="Why the request was refused, if it was")
    request_id: str | None
    received_at: str | None
    attempts: int = Field(description="Deliveries tried so far (replays included)")
    next_attempt_at: str | None
    completed_at: str | None
    duplicate_of: str | None


class AttemptOut(BaseModel):
    run: int
    step: int
    connector: str
    try_: int = Field(alias="try")
    started_at: str | None
    duration_ms: int
    outcome: str
    http_status: int | None
    error: str | None
    request: str | None
    response: str | None
    request_headers: list[list[str]] | None = Field(
        None,
        description="The headers the hub sent, as [name, value] pairs in order; credentials "
        "read [redacted], a value cut short ends in ...[N more bytes], a last (cut) pair says "
        "how many there were (HUB_ATTEMPT_HEADERS, HUB_ATTEMPT_HEADER_BYTES); null: not "
        "recorded (no HTTP call, or an attempt older than the recording)",
    )
    response_headers: list[list[str]] | None = Field(
        None,
        description="The headers the destination answered with, kept as request_headers "
        "are (Set-Cookie and other credentials [redacted]); null: not recorded",
    )


class EventSummary(BaseModel):
    """An event as listings show it: where it came from and what became of it."""

    id: str
    route: str
    status: str
    reason: str | None
    key_prefix: str | None
    remote_addr: str | None
    request_id: str | None = Field(
        description="X-Request-ID of the request that brought it (the sender's, or made)"
    )
    received_at: str | None
    attempts: int
    next_attempt_at: str | None
    completed_at: str | None
    last_error: str | None
    duplicate_of: str | None


class DeliveryOut(BaseModel):
    """The event on its way to one destination of its route, delivered on its own."""

    id: str
    destination: str = Field(description="The destination's name")
    status: str = Field(
        description="pending, processing, retrying, delivered, filtered, failed or dead"
    )
    runs: int = Field(description="Runs of the destination's steps so far (replays included)")
    next_attempt_at: str | None
    last_error: str | None
    completed_at: str | None
    result: Any = None
    attempts: list[AttemptOut] = Field(description="Every connector call made for it")


class EventOut(EventSummary):
    result: Any = Field(None, description="The first destination's result")
    attempt_log: list[AttemptOut]


class HookOut(BaseModel):
    """A webhook's answer: delivered (with the result), filtered, queued, or a duplicate."""

    id: str
    status: str | None = None
    result: Any = None
    status_url: str | None = None
    duplicate: bool | None = None
    challenge: str | None = None


class ProcessIn(BaseModel):
    input: str = Field(description="The text to process")


class ProcessOut(BaseModel):
    success: bool | None = None
    result: Any = None
    input: Any = None
    task_id: str | None = None
    id: str | None = None
    status: str | None = None
    status_url: str | None = None
    duplicate: bool | None = None


class ChatIn(BaseModel):
    message: str = Field(min_length=1, description="The user's message to the model")


class ChatOut(BaseModel):
    success: bool | None = None
    user_message: str | None = None
    assistant_message: str | None = None
    tokens_used: int | None = None
    task_id: str | None = None
    id: str | None = None
    status: str | None = None
    status_url: str | None = None
    duplicate: bool | None = None


# --- admin: keys ---


# A new key's values are checked by keys.create_from_input, as the dashboard's key form's
# and `keys create`'s are (the same sentences on every face); the document shows the limits.
class KeyIn(Strict):
    name: Annotated[str, documented(minLength=1, maxLength=key_store.MAX_NAME)]
    scopes: Annotated[
        list[Annotated[str, documented(minLength=1, maxLength=key_store.MAX_SCOPE)]],
        documented(maxItems=key_store.MAX_SCOPES),
    ] = Field(default_factory=list, description="Routes the key may post to; * for all")
    admin: bool = Field(False, description="The key may use the admin API and every route")
    expires_in: (
        Annotated[
            str, documented(maxLength=key_store.MAX_SETTING, pattern=r"^\s*\d+\s*[smhdw]\s*$")
        ]
        | None
    ) = Field(None, description="Lifetime such as 30d, 12h, 2w")
    rate_limit: (
        Annotated[
            str,
            documented(maxLength=key_store.MAX_SETTING, pattern=r"^\s*\d{1,9}\s*/\s*[a-z]+\s*$"),
        ]
        | None
    ) = Field(None, description="Most requests, such as 1000/hour")


class KeyOut(BaseModel):
    prefix: str
    name: str
    scopes: list[str]
    admin: bool
    rate_limit: str | None
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    revoked_at: str | None


class KeyCreated(KeyOut):
    key: str = Field(description="The secret key: shown in this answer only, never again")


class KeyList(BaseModel):
    keys: list[KeyOut] = Field(description="Oldest first")
    next_cursor: NextCursor


# --- admin: routes ---


class RouteIn(RouteSpec):
    """A whole route; ``verify.secrets`` are written, never read back."""


class RoutePut(RouteSpec):
    """A whole route replacing the stored one; its name comes from the URL.

    With ``verify`` given and no secrets, the route keeps the secrets it has.
    """

    name: str | None = Field(None, pattern=ROUTE_NAME_PATTERN)


class VerifyPatch(Strict):
    scheme: str | None = None
    options: dict[str, Any] | None = None
    secrets: list[str] | None = None
    secrets_env: list[str] | None = None


class RoutePatch(Strict):
    """Only the fields given change; ``verify: null`` removes the verifier."""

    description: str | None = None
    mode: Literal["sync", "async"] | None = None
    steps: list[StepSpec] | None = None
    filter: str | None = None
    dedup_path: str | None = None
    dedup_window: int | None = Field(None, ge=0)
    retention_days: int | None = Field(
        None,
        ge=1,
        le=MAX_RETENTION_DAYS,
        description="Days the route's finished events are kept; null: HUB_RETENTION_DAYS",
    )
    retry_schedule: list[int] | None = None
    destinations: list[DestinationSpec] | None = Field(
        None, description="Replace the route's destinations (and so its steps)"
    )
    auth: AuthMode | None = None
    verify: VerifyPatch | None = None
    rate_limit: str | None = None
    enabled: bool | None = None
    payload_schema: dict[str, Any] | None = Field(
        None, alias="schema", description="Replace the route's JSON Schema; null removes it"
    )


class VerifyOut(BaseModel):
    scheme: str
    options: dict[str, Any]
    secrets: list[str] | str = Field(description="Masked: whsec_…abcd; never the secret")


class BreakerOut(BaseModel):
    failures: int
    cool_down: int
    max_cool_down: int


class DestinationOut(BaseModel):
    name: str
    steps: list[dict[str, Any]] = Field(description="Secrets in step configs masked")
    filter: str | None
    retry_schedule: list[int] | None
    max_in_flight: int | None = Field(description="Deliveries called at once (null: no cap)")
    rate: str | None = Field(description='Deliveries started per period ("10/second")')
    ordering_key: str | None = Field(description="The template whose value orders deliveries")
    breaker: BreakerOut | None = Field(description="The circuit breaker's settings (null: off)")


class RouteOut(BaseModel):
    name: str
    description: str | None
    mode: str
    steps: list[dict[str, Any]] | None = Field(
        description='The "default" destination\'s, for a route that has only it; else null'
    )
    filter: str | None
    dedup_path: str | None
    dedup_window: int
    retention_days: int | None = Field(
        description="Days its finished events are kept (null: HUB_RETENTION_DAYS)"
    )
    retry_schedule: list[int] | None
    destinations: list[DestinationOut] = Field(description="In order; the first answers sync")
    auth: str
    verify: VerifyOut | None
    rate_limit: str | None
    enabled: bool
    payload_schema: dict[str, Any] | None = Field(
        alias="schema", description="The JSON Schema every payload must match (null: none)"
    )


class RouteList(BaseModel):
    routes: list[RouteOut] = Field(description="By name")
    next_cursor: NextCursor


class RouteRemoved(BaseModel):
    name: str
    removed: bool


class PauseIn(Strict):
    reason: str | None = Field(None, max_length=500, description="Why, shown with the state")


class DestinationStateOut(BaseModel):
    route: str
    name: str
    state: str = Field(description="active, paused, open or half_open (its circuit breaker)")
    state_changed_at: str | None
    state_reason: str | None
    held: int = Field(description="How many of its deliveries wait for the resume or the close")
    failures: int = Field(description="Consecutive retryable failures its breaker counted")
    retry_at: str | None = Field(description="When an open circuit lets a probe through")


class ChangesQuery(Strict):
    limit: int = Field(50, ge=1, le=200, description="Changes to show, newest first (at most 200)")


class DestinationChangeOut(BaseModel):
    route: str
    destination: str
    state: str = Field(description="The state it changed to")
    previous: str | None = Field(description="The state it changed from")
    cause: str | None
    actor: str | None = Field(
        description='Who: "breaker", an admin key\'s prefix, "cli:<user>" or "dashboard:<prefix>"'
    )
    at: str | None


class DestinationChangeList(BaseModel):
    changes: list[DestinationChangeOut] = Field(description="Newest first")


class BacklogOut(BaseModel):
    """A destination's deliveries waiting, by status."""

    pending: int = Field(description="Due now or at their next attempt time")
    retrying: int = Field(description="Waiting for their next try")
    held: int = Field(description="Held while the destination is paused or its circuit open")
    queued: int = Field(description="Behind an earlier delivery of their ordering key")


class DestinationView(BaseModel):
    """A destination as it stands: settings, state, deliveries in flight and waiting."""

    route: str
    name: str
    position: int = Field(description="Its place in the route, from 0 (0 answers sync)")
    state: str = Field(description="active, paused, open or half_open")
    state_changed_at: str | None
    state_reason: str | None
    in_flight: int = Field(description="Deliveries being called now (under a live lease)")
    in_flight_capped: bool = Field(description="More were in flight than counted")
    backlog: BacklogOut
    backlog_total: int = Field(description="The backlog's figures added up")
    backlog_capped: bool = Field(
        description=f"More than {BACKLOG_CAP} deliveries wait: counting stopped there"
    )
    oldest_waiting_at: str | None = Field(
        description="When the oldest waiting delivery was created (of those counted)"
    )
    oldest_waiting_seconds: float | None = Field(description="Its age, in seconds")
    settings: DestinationOut = Field(description="As the route shows it (secrets masked)")


class DestinationViewList(BaseModel):
    route: str
    destinations: list[DestinationView] = Field(description="In the route's order")


class SecretIn(Strict):
    secret: str = Field(min_length=1, max_length=1000)


class SecretsOut(BaseModel):
    route: str
    secrets: int = Field(description="How many secrets the route now has; any one verifies")


# --- admin: connectors ---


class ConnectorOut(BaseModel):
    name: str
    description: str
    config_schema: dict[str, Any]


class ConnectorList(BaseModel):
    connectors: list[ConnectorOut]


class ProviderOut(BaseModel):
    name: str = Field(description="What a route's verify.scheme names")
    title: str
    docs_url: str = Field(description="The provider's page on verifying its webhooks")
    setup: str = Field(description="What to paste where in the provider's settings")
    signature_headers: list[str] = Field(description="Where the signature is, tried in order")
    secret: str = Field(description="What the route's secret is")
    id_headers: list[str] = Field(description="The delivery id a duplicate is known by")
    timestamp: str | None = Field(description="Where the signed time is; null: none")
    tolerance: int | None = Field(description="Seconds the signed time may be from now")
    challenge: str | None = Field(description="The handshake the hub answers; null: none")
    options: list[str] = Field(description="What a route's verify.options may set")


class ProviderList(BaseModel):
    providers: list[ProviderOut]


# --- admin: events ---


class EventFilters(Strict):
    route: str | None = Field(None, max_length=200)
    status: EventStatus | None = None
    reason: str | None = Field(None, max_length=32)
    key: str | None = Field(None, max_length=16, description="A key prefix")
    since: TimeBound | None = Field(None, description="Received at or after: ISO time or age")
    until: TimeBound | None = Field(None, description="Received before: ISO time or age")
    request_id: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="The X-Request-ID of the request that brought the event",
    )
    cursor: Cursor | None = None

    def given(self) -> bool:
        fields = ("route", "status", "reason", "key", "since", "until", "request_id")
        return any(getattr(self, f) is not None for f in fields)


class EventQuery(EventFilters):
    q: str | None = Field(
        None, min_length=1, max_length=200, description="Substring of the body (bounded scan)"
    )
    limit: PageLimit = PAGE_DEFAULT


class EventPage(BaseModel):
    events: list[EventSummary]
    next_cursor: NextCursor
    scanned: int | None = Field(
        None,
        description="With q, or two or more of route, status, reason, key and request_id: "
        "rows looked at for this page (at most HUB_ADMIN_SEARCH_WINDOW; follow next_cursor "
        "for more)",
    )


class EventDetail(EventOut):
    deliveries: list[DeliveryOut] = Field(
        description="One per destination of its route, in the route's order (none for a "
        "refused request or a duplicate); the event's status is their roll-up"
    )
    method: str
    path: str
    query: str | None
    content_type: str | None
    headers: dict[str, Any]
    body: str = Field(description="The stored body as text (undecodable bytes replaced)")


class ReplayOut(BaseModel):
    id: str
    status: str = Field(
        description="The event's status now: pending, or queued when its deliveries wait "
        "behind earlier ones of their ordering keys (held: its destinations are held back)"
    )


class DeliveryReplayOut(BaseModel):
    id: str = Field(description="The delivery's id (dlv_...)")
    event_id: str
    destination: str
    status: str = Field(
        description="The delivery's status: pending, or queued behind the delivery of its "
        "ordering key on its way"
    )
    event_status: str = Field(description="The event's status, rolled up again")


class SkipOut(BaseModel):
    id: str = Field(description="The delivery skipped")
    event_id: str
    status: str = Field(description="failed")
    last_error: str = Field(description='"skipped by an admin"')
    event_status: str | None = Field(description="The event's status now")


class BulkReplayIn(EventFilters):
    all: bool = Field(False, description="Required to replay without any filter")
    destination: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Replay only this destination's deliveries (of the route given); "
        "status is then the delivery's: delivered, filtered, failed or dead (any of them "
        "when not given)",
    )


class BulkReplayOut(BaseModel):
    replayed: int = Field(description="Events replayed; with a destination, its deliveries")
    examined: int
    next_cursor: str | None = Field(description="More events matched: send again with this")


# --- admin: stats ---


class StatsQuery(Strict):
    since: TimeBound = Field(
        "24h", validate_default=True, description="Start of the window: ISO time or age"
    )
    until: TimeBound | None = None


class RouteStats(BaseModel):
    route: str
    total: int
    by_status: dict[str, int]
    by_reason: dict[str, int]
    p50_ms: float | None = Field(
        description="Median milliseconds from receipt to the end (delivered, failed or dead), "
        "retries included, of the window's events that were never replayed (a replay's end "
        "measures when it was replayed); null when none ended"
    )
    p95_ms: float | None = Field(
        description="95th percentile of the same: receipt to end, never-replayed events only"
    )


class StatsOut(BaseModel):
    since: str
    until: str
    events: int = Field(description="Events counted (at most HUB_ADMIN_STATS_MAX_ROWS)")
    truncated: bool = Field(description="The window held more: only the newest were counted")
    routes: list[RouteStats]


# --- hub listen ---

EventCursor = Annotated[
    str,
    Field(
        min_length=30,
        max_length=30,
        pattern=r"^evt_[0-9a-hjkmnp-tv-z]{26}$",
        description="The id of the last event this listener forwarded; the answer starts "
        "after it. Without it, the stream starts now.",
    ),
]


class ListenQuery(Strict):
    after: EventCursor | None = None
    wait: float = Field(
        20,
        ge=0,
        le=60,
        allow_inf_nan=False,
        description="Seconds to wait for an event before answering with none (at most "
        "HUB_LISTEN_WAIT)",
    )
    limit: int = Field(20, ge=1, le=100, description="Most events in one answer")


class ListenedEvent(BaseModel):
    id: str
    route: str
    received_at: str | None
    method: str
    path: str = Field(description="What followed /hooks/<route> in the request's path")
    query: str = Field(description="The query string, without credential parameters")
    headers: dict[str, str] = Field(
        description="The sender's headers, its signature headers included; never the hub's "
        "credentials (API keys) nor hop-by-hop headers"
    )
    body_base64: str = Field(description="The body as it was received, base64")


class ListenPage(BaseModel):
    events: list[ListenedEvent] = Field(
        description="Accepted events after the cursor, oldest first"
    )
    cursor: str = Field(description="Send back as `after` for the next events")


class LocalAnswerIn(Strict):
    status: int | None = Field(
        None, ge=100, le=599, description="The local app's HTTP status; null if unreachable"
    )
    duration_ms: int = Field(ge=0, le=86_400_000)
    error: str | None = Field(None, max_length=500, description="Why the call failed, if it did")


class LocalAnswerOut(BaseModel):
    event_id: str
    run: int = Field(description="Which forwarding of this event by a listener this was")
    outcome: str


# --- alerts ---


class AlertChannelIn(ChannelSpec):
    """A channel: ``webhook`` and ``slack`` take ``url``; ``email`` takes ``host``, ``port``,
    ``sender``, ``to`` and optionally ``username``, ``password``, ``starttls``, ``ssl``."""


class AlertChannelOut(BaseModel):
    name: str
    kind: str
    url: str | None = Field(None, description="Masked: scheme and host only")
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = Field(None, description="Masked when set")
    starttls: bool | None = None
    ssl: bool | None = None
    sender: str | None = None
    to: list[str] | None = None
    created_at: str | None = None


class AlertChannelList(BaseModel):
    channels: list[AlertChannelOut]


class AlertRuleIn(RuleSpec):
    """A rule; a rule named like a built-in one (dead-deliveries, open-circuits) replaces it."""


class AlertRulePatch(Strict):
    """What a rule may change in place: whether it is on (its thresholds are kept)."""

    enabled: bool


class AlertRuleOut(BaseModel):
    name: str
    kind: str
    route: str | None
    destination: str | None
    threshold: float | None
    window: int | None
    channels: list[str]
    enabled: bool
    builtin: bool = Field(description="A built-in rule, in force until a rule of its name")


class AlertRuleList(BaseModel):
    rules: list[AlertRuleOut]
    kinds: dict[str, str] = Field(description="What each kind of rule watches")


class AlertSendOut(BaseModel):
    id: int
    channel: str
    kind: Literal["firing", "resolved", "test"]
    status: Literal["pending", "sending", "sent", "failed"]
    attempts: int
    error: str | None
    body: str = Field(description="What was (or will be) sent, cut to 4,000 characters")
    created_at: str | None
    sent_at: str | None


class AlertOut(BaseModel):
    id: int
    rule: str
    kind: str
    subject: str = Field(description="route/destination, a route, or * (every route)")
    state: Literal["firing", "resolved"]
    count: int = Field(description="What it counted while it lasted")
    value: float | None
    message: str | None
    opened_at: str | None
    last_seen_at: str | None
    resolved_at: str | None
    sends: list[AlertSendOut]


class AlertList(BaseModel):
    alerts: list[AlertOut]
    tests: list[AlertSendOut] = Field(description="The newest test messages")


class AlertListQuery(Strict):
    limit: int = Field(50, ge=1, le=200)


# --- admin: the audit log ---


class AuditQuery(Strict):
    actor: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        description='Who: an admin key\'s prefix, "cli:<user>", or "cli" for every CLI user',
    )
    action: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description='What: an action ("route.update"), or its family ("route": every route.*)',
    )
    since: TimeBound | None = Field(None, description="At or after: ISO time or age (2h, 7d)")
    cursor: Cursor | None = None
    limit: PageLimit = PAGE_DEFAULT


class AuditEntryOut(BaseModel):
    id: int
    at: str | None
    actor: str = Field(description='An admin key\'s prefix, "cli:<user>", or "hub" (retention)')
    face: str = Field(description="api, dashboard, cli, or hub")
    origin: str | None = Field(description='The client\'s address, or "cli@<host>"')
    request_id: str | None = Field(description="The request's X-Request-ID (HTTP faces)")
    action: str = Field(description="key.create, route.update, events.replay ... (docs/audit.md)")
    target: str | None = Field(
        description="What it acted on: a key's prefix, a route, route/destination, an event, "
        "or a bulk action's filter"
    )
    change: Any = Field(
        description='What changed: the thing made or removed, {field: {"from", "to"}} of an '
        "update, a bulk action's filter and count; secrets masked, never their values"
    )


class AuditPage(BaseModel):
    entries: list[AuditEntryOut] = Field(description="Newest first")
    next_cursor: NextCursor
