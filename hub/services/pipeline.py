"""Runs one event through one destination's steps (a delivery) and records every connector
call as an attempt of that delivery.

The pipeline knows nothing of HTTP requests or workers: ingest calls it inside a request
(sync routes), the worker calls it for claimed events (async routes). Both pass the app's
``RunOptions`` (connectors, secret key, limits from the settings), get an ``Outcome`` back
and decide what the event's status becomes.

A step is prepared (secrets opened, config rendered, connector built), then its connector is
called under the run's deadline, at most HUB_STEP_TRIES times while its error is retryable;
every call, and a preparation that fails, is one attempt row.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from hub.connectors import (
    DEFAULT_MAX_RESPONSE_BYTES,
    Connector,
    ConnectorError,
    PermanentError,
    Registry,
    RetryableError,
    StepConfigError,
    StepContext,
    UnknownConnectorError,
)
from hub.deadline import DeadlineExceeded, call_before, interrupting
from hub.http import DEFAULT_TRIES, retry_policy
from hub.ops import metrics, redact
from hub.services import step_secrets
from hub.services.templating import (
    TemplateLimits,
    TemplateProblem,
    evaluate_filter,
    has_template,
    render_config,
)
from hub.store import storable
from hub.store.crypto import SecretBox, SecretsUnreadable
from hub.store.models import (
    Attempt,
    AttemptOutcome,
    Delivery,
    Destination,
    Event,
    EventStatus,
    Route,
    fresh,
    utcnow,
)

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("hub.pipeline")

DELIVERED, FAILED, FILTERED = EventStatus.DELIVERED, EventStatus.FAILED, EventStatus.FILTERED
RETRYABLE = AttemptOutcome.RETRYABLE


@dataclass
class Outcome:
    """How a run ended: ``delivered``, ``filtered``, ``failed`` (permanent) or ``retryable``."""

    status: str
    result: Any = None
    error: str | None = None
    code: str | None = None
    http_status: int | None = None
    retry_after: float | None = None
    step_index: int | None = None


def end_state(outcome: Outcome, now: datetime) -> dict[str, Any]:
    """The event's columns after a run that will not be retried: delivered, filtered, failed."""
    if outcome.status in (DELIVERED, FILTERED):
        values = {"status": outcome.status, "result": outcome.result, "last_error": None}
    else:
        values = {"status": FAILED, "last_error": (outcome.error or "failed")[:2000]}
    return {**values, "completed_at": now, "next_attempt_at": None}


class PayloadError(ValueError):
    """The body is not JSON or form data the hub can read."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


JSON_TYPES = ("application/json",)
FORM_TYPE = "application/x-www-form-urlencoded"
DEFAULT_MAX_DEPTH = 100

# A \uD800-\uDFFF escape in the raw text: only then can a parsed string hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def max_json_depth(config: Mapping[str, Any]) -> int:
    """HUB_MAX_JSON_DEPTH, kept within what the hub's JSON encoders can write."""
    return max(1, min(int(config["MAX_JSON_DEPTH"]), storable.DEPTH_CAP))


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _not_a_number(token: str) -> Any:
    raise PayloadError(
        "bad_json",
        f"Request body is not valid JSON: {token} is not a JSON number (RFC 8259)",
    )


def _finite(token: str) -> float:
    number = float(token)
    if not math.isfinite(number):
        raise PayloadError(
            "bad_json",
            f"Request body is not valid JSON: the number {token[:40]} is too large to represent",
        )
    return number


def parse_json(raw: bytes | str, max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """Strict JSON (RFC 8259): no NaN or Infinity, no number that overflows to infinity, no
    string holding a lone UTF-16 surrogate, nothing nested deeper than ``max_depth``.

    What passes can be stored and sent on by every part of the hub; PayloadError otherwise.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    too_deep = PayloadError(
        "too_deep", f"Request body nests deeper than {max_depth} levels of objects and arrays"
    )
    try:
        value = json.loads(data, parse_constant=_not_a_number, parse_float=_finite)
    except RecursionError:
        raise too_deep from None
    except PayloadError:
        raise
    except (UnicodeDecodeError, ValueError):
        raise PayloadError("bad_json", "Request body is not valid JSON") from None
    # Nesting can't pass the limit with fewer brackets than that: most bodies skip the walk.
    brackets = data.count(b"[") + data.count(b"{")
    if brackets > max_depth and storable.depth(value, max_depth) > max_depth:
        raise too_deep
    if _SURROGATE_ESCAPE.search(data) and storable.has_lone_surrogate(value):
        raise PayloadError(
            "bad_json",
            "Request body is not valid JSON text: a string holds a lone UTF-16 surrogate "
            "(such as \\ud800), which is not a Unicode character",
        )
    return value


def decode_payload(
    body: bytes, content_type: str | None, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """The payload a route's steps see: parsed JSON, or form fields as a dict.

    A form whose only field is ``payload`` holding JSON (GitHub's form content type) is
    unwrapped to that JSON. An empty body is an empty object.
    """
    kind = media_type(content_type)
    if not body:
        return {}
    if kind in JSON_TYPES or kind.endswith("+json"):
        return parse_json(body, max_depth)
    if kind == FORM_TYPE:
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise PayloadError("bad_form", "Form body is not valid UTF-8") from None
        form = {k: v[0] if len(v) == 1 else v for k, v in fields.items()}
        if set(form) == {"payload"} and isinstance(form["payload"], str):
            try:
                return parse_json(form["payload"], max_depth)
            except PayloadError as exc:
                if exc.code == "too_deep":
                    raise
        return form
    raise PayloadError(
        "unsupported_media_type",
        "Content-Type must be application/json or application/x-www-form-urlencoded",
    )


def template_context(event: Event, payload: Any, outputs: list[Any]) -> dict[str, Any]:
    return {
        "payload": payload,
        "steps": outputs,
        "previous": outputs[-1] if outputs else payload,
        "headers": event.headers or {},
        "event": {"id": event.id, "route": event.route},
    }


def describe_bug(exc: BaseException) -> str:
    """Type, message and where it happened: enough to find the bug, no full traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno})" if frames else ""
    return f"connector bug: {type(exc).__name__}: {exc}{where}"[:1000]


@dataclass(frozen=True)
class RunOptions:
    """What every run of an app shares: its connectors, the key that opens step secrets, and
    the limits from its settings (``RunOptions.of_app``)."""

    registry: Registry
    secrets: SecretBox | None = None
    tries: int = DEFAULT_TRIES
    copy_bytes: int = 4096
    # Headers kept of each request and answer: how many, and how many bytes of them.
    header_limits: tuple[int, int] = (50, 8192)
    max_depth: int = DEFAULT_MAX_DEPTH
    template_limits: TemplateLimits = TemplateLimits()
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    sleep: Callable[[float], None] = time.sleep
    # The app's hub.ops.tracing.Tracing when HUB_OTEL=true: each connector call a span.
    tracing: Any = None

    @classmethod
    def of_app(cls, app: Flask) -> RunOptions:
        """The app's connectors and secret key, and HUB_STEP_TRIES, HUB_ATTEMPT_COPY_BYTES,
        HUB_ATTEMPT_HEADERS, HUB_ATTEMPT_HEADER_BYTES, HUB_MAX_JSON_DEPTH, HUB_TEMPLATE_*
        and HUB_MAX_RESPONSE_BYTES as they are now."""
        config = app.config
        return cls(
            registry=app.extensions["hub.connectors"],
            secrets=app.extensions["hub.secrets"],
            tries=int(config["STEP_TRIES"]),
            copy_bytes=int(config["ATTEMPT_COPY_BYTES"]),
            header_limits=(int(config["ATTEMPT_HEADERS"]), int(config["ATTEMPT_HEADER_BYTES"])),
            max_depth=max_json_depth(config),
            template_limits=TemplateLimits.from_config(config),
            max_response_bytes=int(config["MAX_RESPONSE_BYTES"]),
            tracing=app.extensions.get("hub.tracing"),
        )


@dataclass(frozen=True)
class _Run:
    """What stays the same across the steps of one run of an event."""

    event: Event
    route: Route
    payload: Any
    options: RunOptions
    record: Callable[[Attempt], None]
    before_call: Callable[[], None] | None
    deadline: float | None
    delivery: Delivery | None = None


def run(
    event: Event,
    route: Route,
    options: RunOptions,
    *,
    destination: Destination | None = None,
    delivery: Delivery | None = None,
    payload: Any = None,
    record: Callable[[Attempt], None],
    before_call: Callable[[], None] | None = None,
    deadline: float | None = None,
) -> Outcome:
    """Run the filter and every step of ``destination`` (default: the route's own, its
    first destination's) for ``event``; ``record`` receives each attempt row (of
    ``delivery``, where given), and ``before_call``, where given, is called before each
    connector call (the worker writes the rows of the calls before it there: each call is
    on record before the next one starts). ``options.secrets`` opens the sealed secrets of
    step configs (hub.services.step_secrets)."""
    target: Route | Destination = destination if destination is not None else route
    if payload is None:
        try:
            payload = decode_payload(event.body or b"", event.content_type, options.max_depth)
        except PayloadError as exc:
            return Outcome(FAILED, error=exc.message, code=exc.code)
    outputs: list[Any] = []
    if target.filter:
        context = template_context(event, payload, outputs)
        try:
            keep = evaluate_filter(target.filter, context, options.template_limits, deadline)
        except TemplateProblem as exc:
            return _template_failed(exc, "bad_filter")
        if not keep:
            return Outcome(FILTERED)
    this_run = _Run(event, route, payload, options, record, before_call, deadline, delivery)
    current = payload
    for index, step in enumerate(target.steps or []):
        outcome = _run_step(_Step.start(this_run, index, step, outputs), step, current)
        if outcome.status != DELIVERED:
            outcome.step_index = index
            return outcome
        current = outcome.result
        outputs.append(current)
    return Outcome(DELIVERED, result=current)


@dataclass
class _Step:
    """One step of a run: its place, its connector's name, the outputs of the steps before
    it, and the step's secret values (cut from every copy and error), known once opened."""

    run: _Run
    index: int
    name: str
    outputs: list[Any]
    run_number: int  # the delivery's run this is (1 for a sync route's first destination)
    hidden: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, run: _Run, index: int, entry: dict[str, Any], outputs: list[Any]) -> _Step:
        name = entry.get("connector", "?")
        runs = run.delivery.attempts if run.delivery is not None else run.event.attempts
        return cls(run, index, name, outputs, run_number=max(runs, 1))

    def attempt_row(
        self, try_number: int, started: datetime, t0: float, outcome: str, **extra: Any
    ) -> Attempt:
        # Every connector call's row is built here, so every call is counted here.
        metrics.attempt_done(self.name, outcome, time.monotonic() - t0)
        return fresh(
            Attempt,
            event_id=self.run.event.id,
            delivery_id=self.run.delivery.id if self.run.delivery is not None else None,
            run=self.run_number,
            step_index=self.index,
            connector=self.name,
            try_number=try_number,
            started_at=started,
            duration_ms=int((time.monotonic() - t0) * 1000),
            outcome=outcome,
            **extra,
        )

    def context(self) -> StepContext:
        """What the connector is told of the event, the run and the steps before it."""
        event = self.run.event
        return StepContext(
            event_id=event.id,
            route=self.run.route.name,
            step_index=self.index,
            payload=self.run.payload,
            outputs=list(self.outputs),
            logger=logging.getLogger(f"hub.connector.{self.name}"),
            attempt=self.run_number,
            request_id=event.request_id,
            deadline=self.run.deadline,
            max_response_bytes=self.run.options.max_response_bytes,
        )


def _run_step(step: _Step, entry: dict[str, Any], current: Any) -> Outcome:
    """Prepare the step (``entry`` is its entry in the route's steps), then call its connector on
    ``current`` (the previous step's output) until a try ends it, at most HUB_STEP_TRIES."""
    deadline = step.run.deadline
    if deadline is not None and time.monotonic() >= deadline:
        return Outcome(FAILED, error="deadline passed before the step started", code="timeout")
    connector = _prepare(step, entry)
    if isinstance(connector, Outcome):
        return connector
    options = step.run.options
    # The first try is made before the retry policy is built: most calls end there, and
    # the policy's machinery (its state, a Future for each try) cost over half of a text
    # step. A retryable failure hands its error to the policy as its first try, so the
    # waits, the stop and the log lines are the policy's, as if it had made that try.
    last, error = _try_once(step, connector, current, 1)
    if error is None or not isinstance(error, RetryableError) or options.tries <= 1:
        return last
    first: ConnectorError | None = error
    try_number = 1
    try:
        policy = retry_policy(
            options.tries, deadline=deadline, sleep=options.sleep, connector=step.name
        )
        for attempt in policy:
            with attempt:
                if first is not None:
                    error, first = first, None
                    raise error
                try_number += 1
                last, error = _try_once(step, connector, current, try_number)
                if error is not None:
                    raise error
                return last
    except ConnectorError:
        return last
    raise AssertionError("unreachable: the retry loop always returns or raises")


# The checked config of each step with neither a template nor a secret, by the step's entry
# in its route (the route cache's object: a route saved again, or read again once its
# cache entry expires, is another entry, checked again); the entry and the registry are
# kept to tell a reused id from the same entry. Rendering and checking such a config gave
# the same config on every run, a third of a text step's CPU (0.052-0.069 -> 0.037 ms).
_PLAIN_CONFIGS: dict[int, tuple[dict[str, Any], Registry, type[Connector], Any]] = {}
PLAIN_CONFIGS_MAX = 1024


def _prepare(step: _Step, entry: dict[str, Any]) -> Connector | Outcome:
    """The step's connector, built from its config with secrets opened and templates
    rendered; or, when that fails, the failed outcome (recorded as the step's one attempt)."""
    this_run = step.run
    options = this_run.options
    known = _PLAIN_CONFIGS.get(id(entry))
    if known is not None and known[0] is entry and known[1] is options.registry:
        return known[2](known[3])
    try:
        config = entry.get("config") or {}
        opened, step.hidden = step_secrets.opened_config(
            config, options.secrets, options.registry, step.name
        )
        if not step.hidden and not has_template(opened):
            cls = options.registry.get(step.name)
            checked = options.registry.validate(step.name, opened)
            if len(_PLAIN_CONFIGS) >= PLAIN_CONFIGS_MAX:
                _PLAIN_CONFIGS.clear()
            _PLAIN_CONFIGS[id(entry)] = (entry, options.registry, cls, checked)
            return cls(checked)
        context = template_context(this_run.event, this_run.payload, step.outputs)
        rendered = render_config(opened, context, options.template_limits, this_run.deadline)
        return options.registry.build(step.name, rendered)
    except SecretsUnreadable:
        message = (
            f"{step.name}: a secret of the step's config does not open with this HUB_SECRET_KEY"
        )
        outcome = Outcome(FAILED, error=message, code="bad_config")
    except (TemplateProblem, StepConfigError, UnknownConnectorError) as exc:
        message = redact.values_in_text(str(exc), step.hidden)
        outcome = (
            _template_failed(exc, "bad_config")
            if isinstance(exc, TemplateProblem)
            else Outcome(FAILED, error=message, code="bad_config")
        )
    kind = RETRYABLE if outcome.status == RETRYABLE else AttemptOutcome.PERMANENT
    this_run.record(step.attempt_row(1, utcnow(), time.monotonic(), kind, error=message))
    log.warning("event %s step %d (%s): %s", this_run.event.id, step.index, step.name, message)
    return outcome


@dataclass(frozen=True)
class _Call:
    """One try of a step's connector: its number, its context (which holds the exchange:
    what was sent and answered) and when it started."""

    step: _Step
    try_number: int
    ctx: StepContext
    started: datetime
    t0: float

    def record(self, outcome: str, **extra: Any) -> None:
        """Record this try of the step with its exchange."""
        step = self.step
        if extra.get("error"):
            extra["error"] = redact.values_in_text(extra["error"], step.hidden)
        row = step.attempt_row(self.try_number, self.started, self.t0, outcome, **extra)
        step.run.record(_with_exchange(row, self.ctx, step.run.options, step.hidden))


def _try_once(
    step: _Step, connector: Connector, current: Any, try_number: int
) -> tuple[Outcome, ConnectorError | None]:
    """Call the connector once, stopped at the run's deadline, and record the call: its
    outcome, and the error to raise for the retry policy when it did not deliver."""
    ctx = step.context()
    if step.run.before_call is not None:
        step.run.before_call()
    call = _Call(step, try_number, ctx, utcnow(), time.monotonic())
    tracing = step.run.options.tracing
    try:
        if tracing is None:
            output = _call_before_deadline(connector, current, ctx)
        else:
            delivery = step.run.delivery
            with tracing.calling(
                step.name,
                step.index,
                try_number,
                ctx.event_id,
                ctx.route,
                delivery.destination if delivery is not None else None,
            ):
                output = _call_before_deadline(connector, current, ctx)
    except ConnectorError as exc:
        return _connector_failed(call, exc), exc
    except Exception as exc:  # permanent, never retried
        outcome = _call_broke(call, exc)
        return outcome, PermanentError(outcome.error or "")
    max_depth = step.run.options.max_depth
    if storable.depth(output, max_depth) > max_depth:
        message = (
            f"{step.name}: the step's output nests deeper than {max_depth} levels "
            "(HUB_MAX_JSON_DEPTH)"
        )
        call.record(AttemptOutcome.PERMANENT, error=message)
        _log_step(logging.WARNING, step, message)
        return Outcome(FAILED, error=message, code="too_deep"), PermanentError(message)
    call.record(AttemptOutcome.OK)  # the exchange's status is recorded
    return Outcome(DELIVERED, result=_jsonable(output)), None


def _call_before_deadline(connector: Connector, current: Any, ctx: StepContext) -> Any:
    try:
        if connector.computes_only:  # nothing it does waits outside Python: no hand-off
            with interrupting(ctx.deadline, only_in=_code_file(connector)):
                return connector.run(current, ctx)
        # Stopped at the deadline whatever it is doing, even sleeping;
        # interrupted only in the connector's own code, never a library's.
        return call_before(ctx.deadline, connector.run, current, ctx)
    except DeadlineExceeded:
        raise RetryableError(
            "the step was still running at its deadline and was stopped", code="timeout"
        ) from None


def _code_file(connector: Connector) -> str | None:
    """The file of the connector's own ``run``: where an interrupt may land."""
    code = getattr(type(connector).run, "__code__", None)
    return code.co_filename if code is not None else None


def _connector_failed(call: _Call, exc: ConnectorError) -> Outcome:
    """A connector's own error: retryable or permanent as it says, its secrets cut."""
    step = call.step
    exc.message = redact.values_in_text(exc.message, step.hidden)
    kind = RETRYABLE if isinstance(exc, RetryableError) else AttemptOutcome.PERMANENT
    status = exc.status or call.ctx.exchange.status
    call.record(kind, http_status=status, error=exc.message[:2000])
    outcome = Outcome(
        RETRYABLE if kind == RETRYABLE else FAILED,
        error=exc.message,
        code=exc.code,
        http_status=status,
        retry_after=getattr(exc, "retry_after", None),
    )
    log.warning(
        "event %s step %d (%s) try %d: %s",
        step.run.event.id,
        step.index,
        step.name,
        call.try_number,
        exc.message[:300],
    )
    return outcome


def _call_broke(call: _Call, exc: Exception) -> Outcome:
    """Any other exception from the connector fails the step for good: data nested too
    deep to read, or a bug in the connector."""
    step = call.step
    if isinstance(exc, RecursionError):  # a receiver's answer nested very deep
        message, code = f"{step.name}: the step's data nests too deep to be read", "too_deep"
    else:  # a bug in the connector
        message, code = describe_bug(exc), "connector_bug"
        message = redact.values_in_text(message, step.hidden)
    call.record(AttemptOutcome.PERMANENT, error=message)
    _log_step(logging.ERROR if code == "connector_bug" else logging.WARNING, step, message)
    return Outcome(FAILED, error=message, code=code)


def _log_step(level: int, step: _Step, message: str) -> None:
    log.log(level, "event %s step %d (%s): %s", step.run.event.id, step.index, step.name, message)


def _template_failed(exc: TemplateProblem, code: str) -> Outcome:
    """A template past its own limit fails for good; one cut by the step's deadline is the
    hub's timeout (504 on a sync route, retried later on an async one)."""
    if exc.code == "timeout":
        return Outcome(RETRYABLE, error=str(exc), code="timeout")
    return Outcome(FAILED, error=str(exc), code=exc.code or code)


def _with_exchange(
    row: Attempt, ctx: StepContext, options: RunOptions, hidden: list[str]
) -> Attempt:
    """The call's copy on its row, redacted and cut; its headers too, in the same row (so
    in the same INSERT: recording them costs no round trip)."""
    exchange = ctx.exchange
    row.request = redact.copy_for_log(exchange.request, options.copy_bytes, hidden)
    row.response = redact.copy_for_log(exchange.response, options.copy_bytes, hidden)
    most, budget = options.header_limits
    if exchange.request_headers is not None:
        row.request_headers = redact.header_pairs(
            exchange.request_headers, most, budget, secrets=hidden
        )
    if exchange.response_headers is not None:
        row.response_headers = redact.header_pairs(
            exchange.response_headers, most, budget, secrets=hidden
        )
    if row.http_status is None:
        row.http_status = exchange.status
    return row


def _jsonable(value: Any) -> Any:
    """Outputs are stored as JSON: make sure they are, rather than fail at commit."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
