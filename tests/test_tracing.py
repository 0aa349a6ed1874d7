"""OpenTelemetry traces (HUB_OTEL=true): one webhook is one trace, from its request through its
commit and the worker's claim to the destination's HTTP call, which carries the W3C
traceparent; nothing secret is in a span; off by default, with no OpenTelemetry module
loaded. Spans are read from the SDK's in-memory exporter, and, for a real gunicorn hub,
from an OTLP/HTTP receiver on 127.0.0.1 that decodes what the exporter sends."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import requests
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select, update

from hub import create_app
from hub.config import SettingsError
from hub.ops import tracing
from hub.services.delivery import Worker
from hub.store.groupcommit import TracedGroupCommitter
from hub.store.models import Delivery, Event, utcnow
from hub.web.lane import HooksLane
from tests.procs import ROOT, closed_port, gunicorn, wait_until
from tests.rows import event_row
from tests.servers import Receiver, Reply

FORWARD = "http"


@pytest.fixture(scope="session")
def exporter() -> InMemorySpanExporter:
    """The process's TracerProvider, made once by the hub's own ``build_provider`` (a process
    sets one provider, and the hub uses the one it finds), its spans kept in memory."""
    memory = InMemorySpanExporter()
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    trace.set_tracer_provider(tracing.build_provider(memory, batch=False))
    return memory


@pytest.fixture
def spans(exporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


def hub_config(database_url: str, **extra) -> dict:
    return {
        "TESTING": True,
        "DATABASE_URL": database_url,
        "SECRET_KEY": "test-secret-key-for-the-hub",
        "ROUTE_CACHE_SECONDS": 0,
        **extra,
    }


@pytest.fixture
def app(database_url_for_test, monkeypatch, spans):
    """The hub with HUB_OTEL=true (the conftest's app, traced); its instrumentation undone
    at the end, so the next test of this process starts untraced."""
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")
    app = create_app(hub_config(database_url_for_test, OTEL=True))
    # No webhook lane (hub/web/lane.py): Flask's instrumentation sees every request.
    assert not isinstance(app.wsgi_app, HooksLane)
    yield app
    app.extensions["hub.tracing"].close()
    app.extensions["hub.db"].dispose()


def by_name(finished) -> dict[str, list]:
    found: dict[str, list] = {}
    for span in finished:
        found.setdefault(span.name, []).append(span)
    return found


def hex_trace(span) -> str:
    return f"{span.context.trace_id:032x}"


def test_one_webhook_is_one_trace_from_its_request_to_the_destinations_call(
    app, client, db, key, add_route, receiver, spans
):
    add_route(
        "orders", [{"connector": FORWARD, "config": {"url": receiver.url + "/in"}}], mode="async"
    )
    response = client.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
    assert response.status_code == 202
    event_id = response.json["id"]
    assert Worker(app).run_once() == 1

    named = by_name(spans.get_finished_spans())
    (server,) = named["POST /hooks/<route_name>"]
    (commit,) = named["hub.commit"]
    (claim,) = named["hub.claim"]
    (deliver,) = named["hub.deliver"]
    (step,) = named[f"hub.step {FORWARD}"]
    (outbound,) = [s for s in named["POST"] if s.kind == SpanKind.CLIENT]
    batches = named["hub.group_commit"]

    # One trace: the request's server span is the parent of its commit, of the worker's
    # claim and of the delivery (across the asynchronous hop, through the stored context);
    # the connector call is the delivery's child, the HTTP call the connector call's.
    assert server.kind == SpanKind.SERVER and server.parent is None
    assert commit.parent.span_id == server.context.span_id
    assert claim.kind == SpanKind.CONSUMER and claim.parent.span_id == server.context.span_id
    assert deliver.parent.span_id == server.context.span_id
    assert step.parent.span_id == deliver.context.span_id
    assert outbound.parent.span_id == step.context.span_id
    trace_id = server.context.trace_id
    assert {s.context.trace_id for s in spans.get_finished_spans()} == {trace_id}
    # The new event's batch is linked to its commit; it ran inside it (this request wrote it).
    inserts = [b for b in batches if b.attributes["hub.committer"] == "inserts"]
    assert [link.context.span_id for link in inserts[0].links] == [commit.context.span_id]

    # Every span names the event: the hub's, Flask's, the HTTP call's and each SQL statement's.
    assert all(s.attributes.get("hub.event_id") == event_id for s in spans.get_finished_spans())
    assert deliver.attributes["hub.status"] == "delivered"
    assert claim.attributes["hub.delivery_id"] == deliver.attributes["hub.delivery_id"]
    assert deliver.attributes["hub.destination"] == "default"
    assert step.attributes["hub.connector"] == FORWARD
    assert outbound.attributes["http.status_code"] == 200
    sql = [s for s in spans.get_finished_spans() if "db.statement" in s.attributes]
    assert any(s.attributes["db.statement"].startswith("INSERT INTO events") for s in sql)

    # The destination got the HTTP call's context: same trace, the call's span as parent.
    (sent,) = receiver.requests
    _, sent_trace, sent_parent, _ = sent.headers["traceparent"].split("-")
    assert (sent_trace, sent_parent) == (f"{trace_id:032x}", f"{outbound.context.span_id:016x}")
    # The event keeps its request's context: that is how the worker's spans found the trace.
    stored = event_row(db, event_id).traceparent
    flags = int(server.context.trace_flags)
    assert stored == f"00-{trace_id:032x}-{server.context.span_id:016x}-{flags:02x}"


def test_a_sync_routes_call_is_a_span_of_its_request(app, client, key, add_route, receiver, spans):
    add_route("now", [{"connector": FORWARD, "config": {"url": receiver.url}}], mode="sync")
    response = client.post("/hooks/now", json={"n": 1}, headers={"X-API-Key": key})
    assert response.status_code == 200
    named = by_name(spans.get_finished_spans())
    (server,) = named["POST /hooks/<route_name>"]
    (step,) = named[f"hub.step {FORWARD}"]
    assert step.parent.span_id == server.context.span_id
    assert server.attributes["hub.event_id"] == response.json["id"]
    (sent,) = receiver.requests
    assert sent.headers["traceparent"].split("-")[1] == hex_trace(server)


def test_a_failed_call_is_an_error_span_and_its_retry_joins_the_same_trace(
    app, client, db, key, add_route, receiver, spans
):
    app.config["STEP_TRIES"] = 1
    add_route("flaky", [{"connector": FORWARD, "config": {"url": receiver.url}}], mode="async")
    receiver.script(Reply(503, "busy"))
    assert client.post("/hooks/flaky", json={}, headers={"X-API-Key": key}).status_code == 202
    worker = Worker(app)
    assert worker.run_once() == 1
    (failed,) = by_name(spans.get_finished_spans())["hub.deliver"]
    assert failed.attributes["hub.status"] == "retrying"
    assert failed.status.status_code == trace.StatusCode.ERROR
    (step,) = by_name(spans.get_finished_spans())[f"hub.step {FORWARD}"]
    assert step.status.status_code == trace.StatusCode.ERROR
    assert step.attributes["hub.error_code"] == "upstream_error"

    # Its retry, made due now: claimed and run again, in the webhook's own trace.
    with db.session() as session:
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    assert worker.run_once() == 1
    delivered = by_name(spans.get_finished_spans())["hub.deliver"]
    assert [d.attributes["hub.status"] for d in delivered] == ["retrying", "delivered"]
    assert {d.context.trace_id for d in delivered} == {failed.context.trace_id}
    assert [d.attributes["hub.attempt"] for d in delivered] == [1, 2]


def test_no_key_signature_or_body_leaves_in_a_span(
    app, client, db, make_key, add_route, receiver, spans, monkeypatch
):
    """A key in ``?api_key=``, captured credential headers, a destination URL's token, a
    call's error text (which quotes its URL) and the body: none reaches an exported span."""
    # An operator who asked the instrumentations to capture every header.
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST", ".*")
    monkeypatch.setenv("OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_REQUEST", ".*")
    app.extensions["hub.tracing"].close()  # instrumented again, reading those variables
    tracing.init_app(app)
    key = make_key()
    secret = key.split("_", 2)[2]  # hk_<prefix>_<secret>; the secret may hold "_" itself
    token = "tok3n-of-the-destination"
    add_route(
        "leaky",
        mode="async",
        steps=[
            {
                "connector": FORWARD,
                "config": {
                    "url": receiver.url + f"/in?token={token}",
                    "headers": {"X-Destination-Key": "dest-secret-value"},
                },
            }
        ],
    )
    down = f"http://127.0.0.1:{closed_port()}/gone?token={token}"
    add_route("down", [{"connector": FORWARD, "config": {"url": down}}], mode="async")
    app.config["STEP_TRIES"] = 1
    body = {"card": "the-body-secret"}
    for route in ("leaky", "down"):
        response = client.post(
            f"/hooks/{route}?api_key={key}",
            json=body,
            headers={"X-Hub-Signature-256": "sha256=signature-secret", "Cookie": "s=cookie-secret"},
        )
        assert response.status_code == 202
    worker = Worker(app)
    assert worker.run_once() == 2
    assert receiver.requests[0].headers["x-destination-key"] == "dest-secret-value"

    finished = spans.get_finished_spans()
    exported = json.dumps([json.loads(s.to_json()) for s in finished])
    for never in (secret, token, "signature-secret", "cookie-secret", "dest-secret", "body-secret"):
        assert never not in exported, never
    assert "exception.stacktrace" not in exported
    # What is left says where the key and headers were, so the redaction is visible.
    server = by_name(finished)["POST /hooks/<route_name>"][0]
    assert "api_key=[redacted]" in server.attributes["http.target"]
    assert server.attributes["http.request.header.x_hub_signature_256"] == ("[redacted]",)
    assert "token=[redacted]" in exported


def test_requests_nobody_follows_and_an_idle_worker_make_no_span(app, client, spans):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert Worker(app).run_once() == 0  # its claim's SQL ran outside any span
    assert spans.get_finished_spans() == ()


def test_a_group_commit_is_one_span_linked_to_each_request_it_wrote(app, db, spans):
    """Two requests that queued while a batch was being written share the next one: its
    span is linked to both requests' spans."""
    committer = app.extensions["hub.commits"]  # one writer on both databases
    assert isinstance(committer, TracedGroupCommitter)
    tracer = trace.get_tracer("test")
    first_writing, release = threading.Event(), threading.Event()

    def slow(_conn):
        first_writing.set()
        release.wait(10)

    def request(name: str, fn) -> None:
        with tracer.start_as_current_span(name):
            committer.run(fn)

    threads = [threading.Thread(target=request, args=("first", slow))]
    threads[0].start()
    assert first_writing.wait(10)
    for name in ("second", "third"):
        threads.append(threading.Thread(target=request, args=(name, lambda _conn: None)))
        threads[-1].start()
    wait_until(lambda: len(committer._queue) == 2, 10, what="two requests queued")
    release.set()
    for thread in threads:
        thread.join(10)
    named = by_name(spans.get_finished_spans())
    shared = [b for b in named["hub.group_commit"] if b.attributes["hub.batch_size"] == 2]
    assert len(shared) == 1
    callers = {named[n][0].context.span_id for n in ("second", "third")}
    assert {link.context.span_id for link in shared[0].links} == callers


def test_tracing_is_off_by_default(database_url_for_test, monkeypatch, spans, receiver):
    """Without HUB_OTEL: no tracer, no span, no traceparent sent to the destination."""
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")
    plain = create_app(hub_config(database_url_for_test))
    try:
        assert plain.extensions["hub.tracing"] is None
        assert type(plain.extensions["hub.inserts"]).__name__ == "GroupCommitter"
        from hub.services.keys import create_key
        from hub.services.routes import save_routes

        db = plain.extensions["hub.db"]
        with db.session() as session:
            _, key = create_key(session, "off", None)
            steps = [{"connector": FORWARD, "config": {"url": receiver.url}}]
            save_routes(
                session,
                [{"name": "off", "mode": "async", "steps": steps}],
                plain.extensions["hub.connectors"],
                plain.extensions["hub.secrets"],
            )
        client = plain.test_client()
        assert client.post("/hooks/off", json={}, headers={"X-API-Key": key}).status_code == 202
        assert Worker(plain).run_once() == 1
        (sent,) = receiver.requests
        assert "traceparent" not in sent.headers
        assert spans.get_finished_spans() == ()
        assert all(event.traceparent is None for event in _events(db))
    finally:
        plain.extensions["hub.db"].dispose()


def _events(db) -> list[Event]:
    with db.session() as session:
        return list(session.scalars(select(Event)))


LOADED = """
import sys
from hub import create_app
app = create_app({"DATABASE_URL": sys.argv[1], "SECRET_KEY": "k" * 32})
app.test_client().post("/hooks/nothing", json={})
print(sorted(name for name in sys.modules if name.startswith("opentelemetry")))
"""


def test_off_no_opentelemetry_module_is_imported(tmp_path):
    """create_app and a request without HUB_OTEL load nothing of OpenTelemetry (in a process
    of their own: this one has loaded it)."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    env = {"PATH": "/usr/bin:/bin", "HUB_ENV_FILE": "", "HOME": str(tmp_path)}
    off = subprocess.run(
        [sys.executable, "-c", LOADED, url], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "[]"
    on = subprocess.run(
        [sys.executable, "-c", LOADED, url],
        cwd=ROOT,
        env={**env, "HUB_OTEL": "true", "OTEL_TRACES_EXPORTER": "none"},
        capture_output=True,
        text=True,
    )
    assert on.returncode == 0, on.stderr
    assert "opentelemetry.sdk.trace" in on.stdout


def test_hub_otel_without_opentelemetry_installed_says_what_to_install(tmp_path):
    blocked = (
        "import sys; sys.modules['opentelemetry'] = None\n"  # as if it were not installed
        "from hub import create_app\n"
        f"create_app({{'DATABASE_URL': 'sqlite:///{tmp_path}/hub.db', 'SECRET_KEY': 'k' * 32}})\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HUB_ENV_FILE": "", "HOME": str(tmp_path), "HUB_OTEL": "1"}
    done = subprocess.run(
        [sys.executable, "-c", blocked], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "HUB_OTEL=true needs OpenTelemetry installed: pip install 'webhook-hub[otel]' "
        "(opentelemetry is missing)"
    )


@pytest.mark.parametrize(
    ("variables", "sentence"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: the hub exports traces as"),
        (
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            "OTEL_EXPORTER_OTLP_PROTOCOL: the hub sends traces as http/protobuf or grpc",
        ),
    ],
)
def test_an_exporter_the_hub_cannot_make_stops_the_start_with_a_sentence(
    monkeypatch, variables, sentence
):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as stopped:
        tracing.exporter_from_environment()
    assert str(stopped.value).startswith(sentence)


# --- a real gunicorn hub exporting over OTLP/HTTP ---


class OtlpReceiver(Receiver):
    """An OTLP/HTTP trace receiver on 127.0.0.1: it answers as a collector does and
    decodes every ExportTraceServiceRequest it was sent."""

    def answer(self, recorded, reply):
        ok = ExportTraceServiceResponse().SerializeToString()
        return Reply(200, ok, {"Content-Type": "application/x-protobuf"})

    def spans(self) -> list[dict]:
        found = []
        for recorded in self.requests:
            assert recorded.path == "/v1/traces"
            assert recorded.headers["content-type"] == "application/x-protobuf"
            request = ExportTraceServiceRequest.FromString(recorded.body)
            for resource in request.resource_spans:
                service = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append(
                            {
                                "name": span.name,
                                "trace": span.trace_id.hex(),
                                "id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "service": service.get("service.name"),
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                            }
                        )
        return found


def _value(value):
    kind = value.WhichOneof("value")
    return (
        getattr(value, kind)
        if kind != "array_value"
        else [_value(v) for v in value.array_value.values]
    )


@pytest.mark.slow
def test_gunicorn_sends_each_webhooks_trace_to_an_otlp_receiver(
    database_url_for_test, make_key, add_route, receiver, tmp_path
):
    """The hub under gunicorn, its embedded worker delivering, HUB_OTEL=true and the standard
    OTEL_* variables: the OTLP/HTTP exporter sends the webhook's trace to a collector; the
    spans still waiting in the batch when gunicorn stops leave before the processes do."""
    key = make_key()
    add_route(
        "orders", [{"connector": FORWARD, "config": {"url": receiver.url + "/in"}}], mode="async"
    )
    with OtlpReceiver() as collector:
        env = {
            "HUB_OTEL": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_SERVICE_NAME": "hub-under-test",
            # Sent only when the batch is full or the process stops: the stop must send it.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        }
        log = tmp_path / "gunicorn.log"
        with gunicorn(database_url_for_test, log, workers=1, **env) as (_, base):
            answer = requests.post(f"{base}/hooks/orders?api_key={key}", json={"n": 1}, timeout=10)
            assert answer.status_code == 202
            event_id = answer.json()["id"]
            receiver.wait_for(1, timeout=15)
            status = f"{base}/events/{event_id}"
            wait_until(
                lambda: (
                    requests.get(status, headers={"X-API-Key": key}, timeout=5).json()["status"]
                    == "delivered"
                ),
                15,
                what="the event delivered",
            )
            assert collector.requests == []  # still in the batch
        wait_until(lambda: collector.requests, 15, what="the spans sent at the stop")
        exported = collector.spans()

    mine = [s for s in exported if s["attributes"].get("hub.event_id") == event_id]
    names = {s["name"] for s in mine}
    assert {
        "POST /hooks/<route_name>",
        "hub.commit",
        "hub.claim",
        "hub.deliver",
        f"hub.step {FORWARD}",
        "POST",
    } <= names
    assert any(s["name"].startswith("INSERT") for s in mine)  # the worker's engine traced
    assert {s["trace"] for s in mine} == {mine[0]["trace"]}
    assert {s["service"] for s in exported} == {"hub-under-test"}
    (sent,) = receiver.requests
    assert sent.headers["traceparent"].split("-")[1] == mine[0]["trace"]
    server = next(s for s in mine if s["name"] == "POST /hooks/<route_name>")
    assert key not in json.dumps(exported)
    assert "api_key=[redacted]" in server["attributes"]["http.target"]
