"""Runs one event through its route's steps and records every connector call as an attempt.

The pipeline knows nothing of HTTP requests or workers: ingest calls it inside a request
(sync routes), the worker calls it for claimed events (async routes). Both get an
``Outcome`` back and decide what the event's status becomes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

from hub.connectors import (
    DEFAULT_MAX_RESPONSE_BYTES,
    ConnectorError,
    PermanentError,
    Registry,
    RetryableError,
    StepConfigError,
    StepContext,
    UnknownConnectorError,
)
from hub.deadline import DeadlineExceeded, call_before
from hub.http import DEFAULT_TRIES, retry_policy
from hub.ops import metrics, redact
from hub.services import step_secrets
from hub.services.templating import TemplateLimits, TemplateProblem, evaluate_filter, render_config
from hub.store import storable
from hub.store.crypto import SecretBox, SecretsUnreadable
from hub.store.models import Attempt, AttemptOutcome, Event, EventStatus, Route, utcnow

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


def run(
    event: Event,
    route: Route,
    registry: Registry,
    *,
    payload: Any = None,
    record: Callable[[Attempt], None],
    before_call: Callable[[], None] | None = None,
    deadline: float | None = None,
    tries: int = DEFAULT_TRIES,
    copy_bytes: int = 4096,
    max_depth: int = DEFAULT_MAX_DEPTH,
    sleep: Callable[[float], None] = time.sleep,
    template_limits: TemplateLimits = TemplateLimits(),
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    secrets: SecretBox | None = None,
) -> Outcome:
    """Run every step of ``route`` for ``event``; ``record`` receives each attempt row, and
    ``before_call``, where given, is called before each connector call (the worker writes the
    rows of the calls before it there: each call is on record before the next one starts).
    ``secrets`` opens the sealed secrets of step configs (hub.services.step_secrets)."""
    if payload is None:
        try:
            payload = decode_payload(event.body or b"", event.content_type, max_depth)
        except PayloadError as exc:
            return Outcome(FAILED, error=exc.message, code=exc.code)
    outputs: list[Any] = []
    if route.filter:
        try:
            keep = evaluate_filter(
                route.filter, template_context(event, payload, outputs), template_limits, deadline
            )
        except TemplateProblem as exc:
            return _template_failed(exc, "bad_filter")
        if not keep:
            return Outcome(FILTERED)
    current = payload
    for index, step in enumerate(route.steps or []):
        outcome = _run_step(
            event,
            route,
            registry,
            index,
            step,
            payload=payload,
            current=current,
            outputs=outputs,
            record=record,
            before_call=before_call,
            deadline=deadline,
            tries=tries,
            copy_bytes=copy_bytes,
            max_depth=max_depth,
            sleep=sleep,
            template_limits=template_limits,
            max_response_bytes=max_response_bytes,
            secrets=secrets,
        )
        if outcome.status != DELIVERED:
            outcome.step_index = index
            return outcome
        current = outcome.result
        outputs.append(current)
    return Outcome(DELIVERED, result=current)


def _run_step(
    event: Event,
    route: Route,
    registry: Registry,
    index: int,
    step: dict[str, Any],
    *,
    payload: Any,
    current: Any,
    outputs: list[Any],
    record: Callable[[Attempt], None],
    before_call: Callable[[], None] | None,
    deadline: float | None,
    tries: int,
    copy_bytes: int,
    max_depth: int,
    sleep: Callable[[float], None],
    template_limits: TemplateLimits,
    max_response_bytes: int,
    secrets: SecretBox | None,
) -> Outcome:
    name = step.get("connector", "?")
    hidden: list[str] = []  # the step's secret values, cut from every copy and error
    run_number = max(event.attempts, 1)

    def attempt_row(try_number: int, started, t0: float, outcome: str, **extra) -> Attempt:
        # Every connector call's row is built here, so every call is counted here.
        metrics.attempt_done(name, outcome, time.monotonic() - t0)
        return Attempt(
            event_id=event.id,
            run=run_number,
            step_index=index,
            connector=name,
            try_number=try_number,
            started_at=started,
            duration_ms=int((time.monotonic() - t0) * 1000),
            outcome=outcome,
            **extra,
        )

    if deadline is not None and time.monotonic() >= deadline:
        return Outcome(FAILED, error="deadline passed before the step started", code="timeout")
    try:
        opened, hidden = step_secrets.opened_config(
            step.get("config") or {}, secrets, registry, name
        )
        config = render_config(
            opened, template_context(event, payload, outputs), template_limits, deadline
        )
        connector = registry.build(name, config)
    except SecretsUnreadable:
        message = f"{name}: a secret of the step's config does not open with this HUB_SECRET_KEY"
        record(attempt_row(1, utcnow(), time.monotonic(), AttemptOutcome.PERMANENT, error=message))
        log.warning("event %s step %d (%s): %s", event.id, index, name, message)
        return Outcome(FAILED, error=message, code="bad_config")
    except (TemplateProblem, StepConfigError, UnknownConnectorError) as exc:
        message = redact.values_in_text(str(exc), hidden)
        outcome = (
            _template_failed(exc, "bad_config")
            if isinstance(exc, TemplateProblem)
            else Outcome(FAILED, error=message, code="bad_config")
        )
        kind = RETRYABLE if outcome.status == RETRYABLE else AttemptOutcome.PERMANENT
        record(attempt_row(1, utcnow(), time.monotonic(), kind, error=message))
        log.warning("event %s step %d (%s): %s", event.id, index, name, message)
        return outcome

    try_number = 0

    def record_call(ctx: StepContext, started, t0: float, outcome: str, **extra) -> None:
        """Record this try of the step with its exchange (what was sent and answered)."""
        if extra.get("error"):
            extra["error"] = redact.values_in_text(extra["error"], hidden)
        row = attempt_row(try_number, started, t0, outcome, **extra)
        record(_with_exchange(row, ctx, copy_bytes, hidden))

    last: Outcome | None = None
    step_logger = logging.getLogger(f"hub.connector.{name}")
    try:
        for attempt in retry_policy(tries, deadline=deadline, sleep=sleep, connector=name):
            with attempt:
                try_number += 1
                ctx = StepContext(
                    event_id=event.id,
                    route=route.name,
                    step_index=index,
                    payload=payload,
                    outputs=list(outputs),
                    logger=step_logger,
                    attempt=run_number,
                    request_id=event.request_id,
                    deadline=deadline,
                    max_response_bytes=max_response_bytes,
                )
                if before_call is not None:
                    before_call()
                started, t0 = utcnow(), time.monotonic()
                try:
                    try:
                        # Stopped at the deadline whatever it is doing, even sleeping;
                        # interrupted only in the connector's own code, never a library's.
                        output = call_before(deadline, connector.run, current, ctx)
                    except DeadlineExceeded:
                        raise RetryableError(
                            "the step was still running at its deadline and was stopped",
                            code="timeout",
                        ) from None
                except ConnectorError as exc:
                    exc.message = redact.values_in_text(exc.message, hidden)
                    kind = (
                        RETRYABLE if isinstance(exc, RetryableError) else AttemptOutcome.PERMANENT
                    )
                    status = exc.status or ctx.exchange.status
                    record_call(
                        ctx, started, t0, kind, http_status=status, error=exc.message[:2000]
                    )
                    last = Outcome(
                        RETRYABLE if kind == RETRYABLE else FAILED,
                        error=exc.message,
                        code=exc.code,
                        http_status=status,
                        retry_after=getattr(exc, "retry_after", None),
                    )
                    log.warning(
                        "event %s step %d (%s) try %d: %s",
                        event.id,
                        index,
                        name,
                        try_number,
                        exc.message[:300],
                    )
                    raise
                except Exception as exc:  # permanent, never retried
                    if isinstance(exc, RecursionError):  # a receiver's answer nested very deep
                        message, code = (
                            f"{name}: the step's data nests too deep to be read",
                            "too_deep",
                        )
                    else:  # a bug in the connector
                        message, code = describe_bug(exc), "connector_bug"
                        message = redact.values_in_text(message, hidden)
                    record_call(ctx, started, t0, AttemptOutcome.PERMANENT, error=message)
                    level = logging.ERROR if code == "connector_bug" else logging.WARNING
                    log.log(level, "event %s step %d (%s): %s", event.id, index, name, message)
                    last = Outcome(FAILED, error=message, code=code)
                    raise PermanentError(message) from None
                if storable.depth(output, max_depth) > max_depth:
                    message = (
                        f"{name}: the step's output nests deeper than {max_depth} levels "
                        "(HUB_MAX_JSON_DEPTH)"
                    )
                    record_call(ctx, started, t0, AttemptOutcome.PERMANENT, error=message)
                    log.warning("event %s step %d (%s): %s", event.id, index, name, message)
                    last = Outcome(FAILED, error=message, code="too_deep")
                    raise PermanentError(message)
                record_call(
                    ctx, started, t0, AttemptOutcome.OK
                )  # the exchange's status is recorded
                return Outcome(DELIVERED, result=_jsonable(output))
    except ConnectorError:
        assert last is not None
        return last
    raise AssertionError("unreachable: the retry loop always returns or raises")


def _template_failed(exc: TemplateProblem, code: str) -> Outcome:
    """A template past its own limit fails for good; one cut by the step's deadline is the
    hub's timeout (504 on a sync route, retried later on an async one)."""
    if exc.code == "timeout":
        return Outcome(RETRYABLE, error=str(exc), code="timeout")
    return Outcome(FAILED, error=str(exc), code=exc.code or code)


def _with_exchange(row: Attempt, ctx: StepContext, limit: int, hidden: list[str]) -> Attempt:
    row.request = redact.copy_for_log(ctx.exchange.request, limit, hidden)
    row.response = redact.copy_for_log(ctx.exchange.response, limit, hidden)
    if row.http_status is None:
        row.http_status = ctx.exchange.status
    return row


def _jsonable(value: Any) -> Any:
    """Outputs are stored as JSON: make sure they are, rather than fail at commit."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return json.loads(json.dumps(value, default=str))
