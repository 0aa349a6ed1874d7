"""OpenTelemetry traces (``HUB_OTEL=true``): one webhook followed from its request, through
its commit and the worker's claim, to every connector call and the HTTP request each makes.

Off by default, and then this module is never imported: ``create_app`` reads the setting and
leaves ``app.extensions["hub.tracing"]`` None, so no OpenTelemetry module is loaded, nothing
is wrapped, and the ingest path pays one ``is None`` test (docs/tracing.md has the figures).

On, ``init_app`` makes the process's TracerProvider from the standard ``OTEL_*`` variables
(an OTLP/HTTP exporter behind a batch processor, the sampler, the resource), or takes the
one the process already set (a program embedding the hub, the tests), and instruments the
app's Flask face (a server span per request), ``requests`` (a client span per outbound call,
with the W3C ``traceparent`` header sent to the destination) and the app's engine (a span
per SQL statement, made only inside another span: a worker's idle polls make none).
The hub's own spans are made by ``Tracing``'s methods, called where the work happens:

- ``committing``: the event's commit (intake), a child of the request's server span; the
  server span's context is stored with the event (``events.traceparent``), the one link
  across the asynchronous hop;
- ``batch``: one group commit's transaction (hub.store.groupcommit), linked to each
  caller's span;
- ``claimed``: the worker's claim of each delivery, and ``delivering``: its run, each a
  child of the stored context, so they join the webhook's own trace;
- ``calling``: each connector call (hub.services.pipeline).

Every span started while an event is bound for log lines (``hub.ops.logs``) carries its id
as ``hub.event_id`` (and ``hub.route``): a backend finds a webhook's spans by its id.

Nothing secret leaves in a span: ``_HubSpans`` is the one processor between every span and
the exporter, and redacts what an instrumentation may record (a URL's ``?api_key=``, a
credential header an operator chose to capture, a hub key anywhere, the parameters a
database error quotes, a traceback); the hub's own spans carry ids, names and outcomes,
never a body, a header or an error's text.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from hub.config import SettingsError
from hub.ops import logs, redact

SERVICE_NAME = "webhook-hub"
# The attributes the hub's spans carry (and every span started while an event is bound).
EVENT_ID = "hub.event_id"
ROUTE = "hub.route"
DESTINATION = "hub.destination"
DELIVERY_ID = "hub.delivery_id"
REQUEST_ID = "hub.request_id"
# The requests no one follows: a scrape of /metrics or a health check every few seconds
# would be most of a trace store. OTEL_PYTHON_FLASK_EXCLUDED_URLS (or
# OTEL_PYTHON_EXCLUDED_URLS) replaces this list.
EXCLUDED_URLS = r"^[a-z]+://[^/]+/(?:health|ready|metrics)(?:\?|$)"
# Attributes holding a URL or a part of one, as the HTTP instrumentations name them.
URL_ATTRIBUTES = frozenset({"http.target", "http.url", "url.full", "url.query", "url.path"})
HEADER_ATTRIBUTE = re.compile(r"^http\.(?:request|response)\.header\.(.+)$")
# name=value in a query string (or a URL quoted in an error's text).
QUERY_PAIR = re.compile(r"([?&;])([^=&;#\s'\"]+)=([^&;#\s'\"]*)")
# What is kept of a status description or an exception's message: its first line, cut.
MESSAGE_KEEP = 200


def init_app(app: Any) -> Tracing:
    """Start tracing for ``app`` (HUB_OTEL=true): its provider, its instrumentations; the
    ``Tracing`` the services call, also kept as ``app.extensions["hub.tracing"]``."""
    tracing = Tracing.start(app)
    app.extensions["hub.tracing"] = tracing
    return tracing


# --- the provider ---


def build_provider(exporter: SpanExporter | None = None, batch: bool = True) -> TracerProvider:
    """A TracerProvider for the hub: the resource and sampler of the OTEL_* variables,
    and the hub's processor (attributes, redaction) in front of ``exporter`` (default: the
    one OTEL_TRACES_EXPORTER names), batched unless ``batch`` is false."""
    # The hub names itself; OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over that.
    resource = Resource.create({"service.name": SERVICE_NAME}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource)
    if exporter is None:
        exporter = exporter_from_environment()
    if exporter is not None:
        inner = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        provider.add_span_processor(_HubSpans(inner))
    return provider


def exporter_from_environment() -> SpanExporter | None:
    """The exporter OTEL_TRACES_EXPORTER names: ``otlp`` (the default) over the protocol
    OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or OTEL_EXPORTER_OTLP_PROTOCOL names (``http/protobuf``
    by default, ``grpc`` where its exporter is installed), ``console``, or ``none``. The
    OTLP exporters read their endpoint, headers and timeout from the OTEL_* variables."""
    kind = (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").strip().lower()
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if kind != "otlp":
        raise SettingsError(
            [f"OTEL_TRACES_EXPORTER: the hub exports traces as otlp, console or none: {kind!r}"]
        )
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise SettingsError(
                [
                    "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs the gRPC exporter: "
                    "pip install opentelemetry-exporter-otlp-proto-grpc (or use http/protobuf)"
                ]
            ) from None
        return GrpcExporter()
    raise SettingsError(
        [
            "OTEL_EXPORTER_OTLP_PROTOCOL: the hub sends traces as http/protobuf or grpc: "
            f"{protocol!r}"
        ]
    )


class _HubSpans(SpanProcessor):
    """The one processor in front of the exporter: a span started while an event is bound
    (hub.ops.logs) is given its id and route; an ended span is redacted before it leaves."""

    def __init__(self, inner: SpanProcessor):
        self.inner = inner

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        bound = logs.context_fields()
        if "event_id" in bound:
            span.set_attribute(EVENT_ID, bound["event_id"])
        if "route" in bound:
            span.set_attribute(ROUTE, bound["route"])
        if "request_id" in bound:
            span.set_attribute(REQUEST_ID, bound["request_id"])
        self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        self.inner.on_end(redacted(span))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


# --- redaction ---


def redacted_url(text: str) -> str:
    """A URL, path or query string with the values of its secret-named parameters replaced
    (``?api_key=[redacted]``), its user's password dropped and any hub key cut."""
    if "@" in text:
        text = re.sub(r"(://[^/@:]*):[^/@]*@", r"\1:[redacted]@", text)
    if "=" in text:
        bare = "://" not in text and text[0] not in "?&/"  # a query string alone (url.query)
        text = _redacted_pairs("?" + text)[1:] if bare else _redacted_pairs(text)
    return redact.keys_in_text(text)


def _redacted_pairs(text: str) -> str:
    def pair(match: re.Match) -> str:
        sep, name, value = match.groups()
        if redact.is_sensitive_query(name) or redact.is_sensitive(name):
            value = redact.REDACTED
        return f"{sep}{name}={value}"

    return redact.keys_in_text(QUERY_PAIR.sub(pair, text))


def redacted_message(text: str) -> str:
    """An error's text as a span may keep it: its first line (a database error's next
    lines quote the row), at most MESSAGE_KEEP characters, URLs and keys redacted."""
    lines = text.strip().splitlines()
    return redacted_url(lines[0][:MESSAGE_KEEP]) if lines else ""


def _clean(key: str, value: Any) -> Any:
    if key in URL_ATTRIBUTES and isinstance(value, str):
        return redacted_url(value)
    header = HEADER_ATTRIBUTE.match(key)
    if header is not None and redact.is_credential_header(header.group(1).replace("_", "-")):
        return (redact.REDACTED,)
    if isinstance(value, str) and "hk_" in value:
        return redact.keys_in_text(value)
    return value


def redacted(span: ReadableSpan) -> ReadableSpan:
    """``span`` as it may leave the hub: the same span when nothing in it needs redacting
    (the usual case, no copy), else a copy with the redacted values."""
    attributes = span.attributes or {}
    changed: dict[str, Any] | None = None
    for key, value in attributes.items():
        clean = _clean(key, value)
        if clean != value:
            changed = changed if changed is not None else dict(attributes)
            changed[key] = clean
    events = span.events
    exceptions = any(event.name == "exception" for event in events)
    description = span.status.description
    clean_description = redacted_message(description) if description else description
    if changed is None and not exceptions and clean_description == description:
        return span
    if exceptions:
        events = tuple(_redacted_event(event) for event in events)
    status = Status(span.status.status_code, clean_description)
    # A copy of the ended span; the SDK's own type, so any exporter reads it as it would.
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=changed if changed is not None else attributes,
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _redacted_event(event: Event) -> Event:
    """An exception event keeps the exception's type and the first line of its message,
    never its traceback (a stack trace leaves the hub in no log line, nor in a span)."""
    if event.name != "exception":
        return event
    attributes = dict(event.attributes or {})
    attributes.pop("exception.stacktrace", None)
    message = attributes.get("exception.message")
    if isinstance(message, str):
        attributes["exception.message"] = redacted_message(message)
    return Event(event.name, attributes, event.timestamp)


def _redact_open_span(span: Any, *_args: Any) -> None:
    """The Flask and requests instrumentations' response hook: the URL's parts without the
    key a sender may put in ``?api_key=`` (or a destination's token), while the span is
    still open, for any other processor of the provider; ``_HubSpans`` redacts what leaves
    through the hub's own."""
    if span is None or not span.is_recording():
        return
    for key, value in (span.attributes or {}).items():
        clean = _clean(key, value)
        if clean != value:
            span.set_attribute(key, clean)


# --- spans only inside spans ---


class _ChildTracer(trace.Tracer):
    """A tracer whose spans are made only inside another span: the SQL of a request, a
    commit or a delivery is traced, a worker's idle poll (a root span every second) is not."""

    def __init__(self, inner: trace.Tracer):
        self._inner = inner

    def start_span(self, name: str, context: Any = None, *args: Any, **kwargs: Any) -> Any:
        if not trace.get_current_span(context).get_span_context().is_valid:
            return INVALID_SPAN
        return self._inner.start_span(name, context, *args, **kwargs)

    @contextlib.contextmanager
    def start_as_current_span(
        self, name: str, context: Any = None, *args: Any, end_on_exit: bool = True, **kwargs: Any
    ) -> Iterator[Any]:
        span = self.start_span(name, context, *args, **kwargs)
        with trace.use_span(span, end_on_exit=end_on_exit) as current:
            yield current


class _ChildSpansOnly(trace.TracerProvider):
    def __init__(self, provider: trace.TracerProvider):
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _ChildTracer(self._provider.get_tracer(*args, **kwargs))


# --- the hub's spans ---


def traceparent(context: SpanContext) -> str:
    """The W3C ``traceparent`` of ``context`` (version 00)."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parent_of(stored: str | None) -> Any:
    """The context a stored ``traceparent`` names (None: none stored, or not one)."""
    match = TRACEPARENT.match(stored or "")
    if match is None:
        return None
    trace_id, span_id, flags = (int(part, 16) for part in match.groups())
    if not trace_id or not span_id:
        return None
    remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return trace.set_span_in_context(NonRecordingSpan(remote))


class Tracing:
    """The tracer of one app, what it instrumented, and the spans the hub makes itself."""

    def __init__(self, provider: Any, owned: bool):
        self.provider = provider
        self.owned = owned  # made here: flushed and shut down by ``close``
        self.tracer = provider.get_tracer("hub")
        self._undo: list[Any] = []
        self._closed = threading.Event()

    @classmethod
    def start(cls, app: Any) -> Tracing:
        """The process's provider (made from OTEL_* unless one is set), and the app's Flask
        face, its engine and ``requests`` instrumented with it. Called in each process that
        serves (after gunicorn's fork: a batch processor's thread does not survive one)."""
        provider = trace.get_tracer_provider()
        owned = isinstance(provider, trace.ProxyTracerProvider)
        if owned:
            provider = build_provider()
            trace.set_tracer_provider(provider)
        tracing = cls(provider, owned)
        tracing._instrument(app)
        return tracing

    def _instrument(self, app: Any) -> None:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

        configured = os.environ.get("OTEL_PYTHON_FLASK_EXCLUDED_URLS") or os.environ.get(
            "OTEL_PYTHON_EXCLUDED_URLS"
        )
        FlaskInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            excluded_urls=configured or EXCLUDED_URLS,
            response_hook=_redact_open_span,
            enable_commenter=False,
        )
        self._undo.append(lambda: FlaskInstrumentor.uninstrument_app(app))
        # requests and SQLAlchemy are instrumented once per process; an app made later in
        # the same process (tests) finds them instrumented and leaves them to the first.
        client = RequestsInstrumentor()
        if not client.is_instrumented_by_opentelemetry:
            client.instrument(tracer_provider=self.provider, response_hook=_redact_open_span)
            self._undo.append(client.uninstrument)
        database = SQLAlchemyInstrumentor()
        if not database.is_instrumented_by_opentelemetry:
            # Its declared range stops short of SQLAlchemy 2.1, whose engine events (all it
            # uses) are 2.0's: tests/test_tracing.py checks the statements' spans.
            database.instrument(
                engine=app.extensions["hub.db"].engine,
                tracer_provider=_ChildSpansOnly(self.provider),
                skip_dep_check=True,
            )
            self._undo.append(database.uninstrument)

    def close(self) -> None:
        """Undo the instrumentation, then send the spans still waiting; once. A test's end,
        or a program that embeds the hub; a process that exits needs none of it (the
        provider sends what waits at exit: gunicorn's workers, `hub worker`)."""
        if self._closed.is_set():
            return
        self._closed.set()
        for undo in reversed(self._undo):
            with contextlib.suppress(Exception):
                undo()
        if self.owned:
            self.provider.force_flush()
            self.provider.shutdown()
        else:
            with contextlib.suppress(Exception):
                self.provider.force_flush()

    # --- ingest ---

    @contextlib.contextmanager
    def committing(self, event_id: str, route: str) -> Iterator[str]:
        """The event's commit as a span ``hub.commit``, a child of the request's span, which
        is given the event's id and route. Yields the ``traceparent`` to store with the
        event: the request's span's (the commit's own when no span is open)."""
        attributes = {EVENT_ID: event_id, ROUTE: route}
        request = trace.get_current_span()
        if request.is_recording():
            request.set_attributes(attributes)
        span = self.tracer.start_span("hub.commit", attributes=attributes)
        stored = request if request.get_span_context().is_valid else span
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            yield traceparent(stored.get_span_context())

    def current(self) -> SpanContext | None:
        """The open span's context in this thread, if one is open."""
        context = trace.get_current_span().get_span_context()
        return context if context.is_valid else None

    @contextlib.contextmanager
    def batch(self, committer: str, callers: Sequence[SpanContext | None]) -> Iterator[None]:
        """One group commit's transaction as a span ``hub.group_commit``, linked to the span
        of each caller whose work it writes; none when no caller had a span open."""
        links = [Link(caller) for caller in callers if caller is not None]
        if not links:
            yield
            return
        attributes = {"hub.committer": committer, "hub.batch_size": len(callers)}
        span = self.tracer.start_span("hub.group_commit", attributes=attributes, links=links)
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            yield

    # --- delivery ---

    def claimed(self, started_ns: int, worker: str, claimed: Iterable[tuple[Any, Any]]) -> None:
        """The claim that just leased ``claimed`` ((delivery, event) pairs), as a span
        ``hub.claim`` in each event's trace, from ``started_ns`` (time.time_ns()) to now."""
        ended = time.time_ns()
        claimed = list(claimed)
        for delivery, event in claimed:
            if event is None:
                continue
            span = self.tracer.start_span(
                "hub.claim",
                context=parent_of(event.traceparent),
                kind=SpanKind.CONSUMER,
                start_time=started_ns,
                attributes={
                    EVENT_ID: event.id,
                    ROUTE: event.route,
                    DESTINATION: delivery.destination,
                    DELIVERY_ID: delivery.id,
                    "hub.worker": worker,
                    "hub.claimed": len(claimed),
                    "hub.attempt": int(delivery.attempts or 0),
                },
            )
            span.end(end_time=ended)

    @contextlib.contextmanager
    def delivering(self, event: Any, delivery: Any) -> Iterator[Any]:
        """One run of ``delivery`` as a span ``hub.deliver`` in its event's trace; the block
        sets ``span.set_attribute("hub.status", ...)`` through ``ended``."""
        span = self.tracer.start_span(
            "hub.deliver",
            context=parent_of(event.traceparent),
            attributes={
                EVENT_ID: event.id,
                ROUTE: event.route,
                DESTINATION: delivery.destination,
                DELIVERY_ID: delivery.id,
                "hub.attempt": int(delivery.attempts or 0),
            },
        )
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            yield span

    @staticmethod
    def ended(span: Any, status: str) -> None:
        """How a delivery's run ended, on its span: an error unless delivered, filtered
        or held."""
        span.set_attribute("hub.status", str(status))
        if status not in ("delivered", "filtered", "held"):
            span.set_status(Status(StatusCode.ERROR, str(status)))

    @contextlib.contextmanager
    def calling(
        self,
        connector: str,
        step_index: int,
        try_number: int,
        event_id: str,
        route: str,
        destination: str | None,
    ) -> Iterator[None]:
        """One connector call as a span ``hub.step <connector>``; a failure sets its status
        to the error's code (its text stays in the attempt row, where it is redacted)."""
        attributes: dict[str, Any] = {
            EVENT_ID: event_id,
            ROUTE: route,
            "hub.connector": connector,
            "hub.step_index": step_index,
            "hub.try": try_number,
        }
        if destination is not None:
            attributes[DESTINATION] = destination
        span = self.tracer.start_span(f"hub.step {connector}", attributes=attributes)
        with trace.use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            try:
                yield
            except Exception as exc:
                code = getattr(exc, "code", None) or type(exc).__name__
                span.set_attribute("hub.error_code", str(code))
                span.set_status(Status(StatusCode.ERROR, str(code)))
                raise
