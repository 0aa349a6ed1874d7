"""Log lines: one JSON object per line (or escaped text), each saying which request and
event it is about; a URL or header can't split a record into lines of its own (a forged line).
Every request has an id: the sender's X-Request-ID when sane, a new one otherwise."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import requests

from hub import create_app
from hub.config import SettingsError
from hub.connectors import Connector, EmptyConfig
from hub.ops.logs import EscapingFormatter, JsonFormatter, bound, choose_format, escape_controls
from hub.services.delivery import Worker
from tests.procs import ROOT, gunicorn, hub_env, wait_until
from tests.rows import event_row, events


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain route", "plain route"),
        ("x\r\nfake-line", "x\\r\\nfake-line"),
        ("nul\x00here", "nul\\x00here"),
        ("tab\tand\x1b[31mansi", "tab\\tand\\x1b[31mansi"),
        ("del\x7f c1\x85 ls\u2028", "del\\x7f c1\\x85 ls\\x2028"),
        ("ünïcode stays", "ünïcode stays"),
    ],
)
def test_control_characters_are_escaped(raw, escaped):
    assert escape_controls(raw) == escaped


def test_a_record_is_one_line_and_a_traceback_stays_under_it():
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("hub.t", logging.INFO, "", 0, "route %s", ("a\nFAKE",), None)
    assert formatter.format(record) == "INFO route a\\nFAKE"
    try:
        raise ValueError("boom\nFAKE record")
    except ValueError:
        record = logging.LogRecord("hub.t", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert lines[0] == "ERROR failed"
    assert all(line.startswith("    | ") for line in lines[1:])
    assert lines[-2:] == ["    | ValueError: boom", "    | FAKE record"]


def raw_request(base: str, request: bytes) -> bytes:
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_gunicorn_and_hub_log_lines_escape_what_the_url_carries(database_url_for_test, tmp_path):
    log_path = tmp_path / "gunicorn.log"
    with gunicorn(database_url_for_test, log_path, workers=1) as (_, base):
        answer = raw_request(
            base,
            b"POST /hooks/x%0D%0Afake-line%00end HTTP/1.1\r\nHost: hub\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        assert answer.startswith(b"HTTP/1.1 404")  # refused, and logged by the hub

        # gunicorn's own limits: what a webhook needs and no more.
        long_line = b"GET /hooks/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: hub\r\n\r\n"
        assert raw_request(base, long_line).startswith(b"HTTP/1.1 414")
        many = b"".join(b"X-Field-%d: v\r\n" % i for i in range(70))
        assert raw_request(base, b"GET /health HTTP/1.1\r\n" + many + b"\r\n").startswith(
            b"HTTP/1.1 431"
        )
        big = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
        assert raw_request(base, big).startswith(b"HTTP/1.1 431")
    text = log_path.read_text()
    forged = [line for line in text.splitlines() if line.startswith("fake-line")]
    assert not forged, text[-2000:]
    assert "\x00" not in text and "\r" not in text
    escaped = "x\\r\\nfake-line\\x00end"
    hub_lines = [line for line in text.splitlines() if "hub.ingest" in line and escaped in line]
    access_lines = [line for line in text.splitlines() if f"POST /hooks/{escaped}" in line]
    assert hub_lines and access_lines, text[-2000:]


# --- JSON lines ---


def record(message: str, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("hub.t", logging.WARNING, "", 0, message, args, exc_info)


def test_a_json_line_is_one_line_of_ascii_that_gives_back_what_was_logged():
    hostile = 'x\r\nFAKE {"level": "INFO"}\x00\x7f\x85\u2028"quoted" ünï'
    line = JsonFormatter().format(record("route %s", hostile))
    assert "\n" not in line and "\r" not in line
    assert all(" " <= ch <= "~" for ch in line), line  # printable ASCII only: no DEL, no C1
    data = json.loads(line)
    assert data["message"] == f"route {hostile}"
    assert data["level"] == "WARNING" and data["logger"] == "hub.t"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])


def test_a_json_line_names_an_exception_by_its_type_only():
    try:
        raise ValueError("password=hunter2\nTraceback (most recent call last):")
    except ValueError:
        line = JsonFormatter().format(record("failed", exc_info=sys.exc_info()))
    assert json.loads(line)["exc_type"] == "ValueError"
    assert "hunter2" not in line and "Traceback" not in line and "test_logs" not in line


def test_lines_inside_a_bound_block_say_what_they_are_about():
    with bound(event_id="evt_1", route="orders"), bound(request_id="req-1"):
        inside = json.loads(JsonFormatter().format(record("delivering")))
        text = EscapingFormatter("%(message)s").format(record("delivering"))
    outside = json.loads(JsonFormatter().format(record("idle")))
    assert inside["event_id"] == "evt_1" and inside["route"] == "orders"
    assert inside["request_id"] == "req-1"
    assert text == "delivering [request_id=req-1 route=orders event_id=evt_1]"
    assert not {"event_id", "route", "request_id", "key_prefix"} & set(outside)


@pytest.mark.parametrize(
    ("configured", "env", "chosen"),
    [
        (None, "production", "json"),
        (None, "development", "text"),
        ("", "production", "json"),
        ("TEXT", "production", "text"),
        ("json", "development", "json"),
    ],
)
def test_the_format_is_json_in_production_and_text_in_development(configured, env, chosen):
    assert choose_format(configured, env) == chosen


def test_an_unknown_log_format_stops_the_start_with_its_name(tmp_path):
    with pytest.raises(SettingsError, match="HUB_LOG_FORMAT: expected json or text, got 'xml'"):
        create_app({"TESTING": True, "LOG_FORMAT": "xml", "DATABASE_URL": "sqlite://"})


# --- request ids ---


@pytest.mark.parametrize(
    "hostile",
    [
        "abc\r\nX-Injected: 1",  # CRLF: a header of its own, or a forged log line
        "a" * 10_000,  # far past the 200 characters an id may have
        "quoted\"id'",
        "with space",
        "",
    ],
)
def test_a_hostile_request_id_is_replaced(client, key, add_route, hostile, caplog):
    add_route("orders")
    caplog.set_level(logging.INFO, "hub")
    response = client.post(
        "/hooks/orders",
        json={"n": 1},
        headers={"X-API-Key": key},
        environ_overrides={"HTTP_X_REQUEST_ID": hostile},  # past the test client's checks
    )
    assert response.status_code == 200
    request_id = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.get_json()["id"]
    assert (
        event_row(client.application.extensions["hub.db"], response.get_json()["id"]).request_id
        == request_id
    )


def test_a_sane_request_id_is_kept_answered_and_stored(client, db, key, add_route):
    add_route("orders")
    response = client.post(
        "/hooks/orders", json={"n": 1}, headers={"X-API-Key": key, "X-Request-ID": "ab.C-9_z"}
    )
    assert response.headers["X-Request-ID"] == "ab.C-9_z"
    event = response.get_json()["id"]
    assert event_row(db, event).request_id == "ab.C-9_z"
    shown = client.get(f"/events/{event}", headers={"X-API-Key": key})
    assert shown.get_json()["request_id"] == "ab.C-9_z"
    assert shown.headers["X-Request-ID"] != "ab.C-9_z"  # a request of its own, an id of its own
    assert "X-Request-ID" in client.get("/health").headers


def test_an_event_is_found_by_its_request_id(client, runner, db, make_key, add_route):
    """The id in a sender's report or a log line finds its event in the API, CLI and dashboard."""
    add_route("orders")
    key, admin = make_key(), {"X-API-Key": make_key(admin=True)}
    sent = {}
    for rid in ("order-7f3a", "order-7f3b", "order-7f3a0"):
        answer = client.post(
            "/hooks/orders", json={"rid": rid}, headers={"X-API-Key": key, "X-Request-ID": rid}
        )
        sent[rid] = answer.get_json()["id"]
    page = client.get("/admin/api/events?request_id=order-7f3a", headers=admin).get_json()
    assert [e["id"] for e in page["events"]] == [sent["order-7f3a"]]
    assert page["events"][0]["request_id"] == "order-7f3a"
    long_id = {"request_id": "x" * 201}
    too_long = client.get("/admin/api/events", query_string=long_id, headers=admin)
    assert too_long.status_code == 422 and "request_id" in too_long.get_data(as_text=True)

    listed = runner.invoke(args=["events", "list", "--request-id", "order-7f3b", "--json"])
    assert [e["id"] for e in json.loads(listed.output)] == [sent["order-7f3b"]]

    client.post(
        "/dashboard/sign-in",
        data={
            "key": admin["X-API-Key"],
            "csrf_token": re.search(
                r'name="csrf-token" content="([^"]+)"',
                client.get("/dashboard/sign-in").get_data(as_text=True),
            ).group(1),
        },
    )
    html = client.get("/dashboard/events?request_id=order-7f3a0").get_data(as_text=True)
    assert sent["order-7f3a0"] in html
    assert sent["order-7f3a"] not in html and sent["order-7f3b"] not in html
    detail = client.get(f"/dashboard/events/{sent['order-7f3b']}").get_data(as_text=True)
    assert "/dashboard/events?request_id=order-7f3b" in detail


def test_every_answer_carries_a_request_id_refusals_and_errors_too(app, client, db, key, add_route):
    app.config["MAX_BODY_BYTES"] = 10
    add_route("orders")
    answers = {
        "unknown URL": client.get("/nowhere", headers={"X-Request-ID": "r404"}),
        "unknown route": client.post("/hooks/none", json={}, headers={"X-Request-ID": "r-route"}),
        "no key": client.post("/hooks/orders", json={}, headers={"X-Request-ID": "r401"}),
        "too large": client.post(
            "/hooks/orders",
            data=b"x" * 100,
            headers={"X-API-Key": key, "X-Request-ID": "r413", "Content-Type": "text/plain"},
        ),
        "wrong method": client.get("/hooks/orders", headers={"X-Request-ID": "r405"}),
    }
    statuses = {name: (r.status_code, r.headers.get("X-Request-ID")) for name, r in answers.items()}
    assert statuses == {
        "unknown URL": (404, "r404"),
        "unknown route": (404, "r-route"),
        "no key": (401, "r401"),
        "too large": (413, "r413"),
        "wrong method": (405, "r405"),
    }
    kept = {e.request_id: (e.status, e.reason) for e in events(db)}
    assert kept == {
        "r-route": ("rejected", "unknown_route"),
        "r401": ("rejected", "unauthorized"),
        "r413": ("rejected", "too_large"),
        "r405": ("rejected", "method_not_allowed"),
    }


def json_lines(text: str) -> list[dict]:
    """Every line of a log, each parsed as one JSON object (a line that isn't fails)."""
    parsed = []
    for line in text.splitlines():
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


@pytest.mark.slow
def test_gunicorn_json_logs_follow_a_request_to_its_delivery(
    database_url_for_test, db, make_key, add_route, receiver, tmp_path
):
    add_route("orders", [{"connector": "http", "config": {"url": receiver.url}}], mode="async")
    key = make_key()
    log_path = tmp_path / "gunicorn.log"
    with gunicorn(database_url_for_test, log_path, workers=1, HUB_LOG_FORMAT="json") as (_, base):
        answer = requests.post(
            f"{base}/hooks/orders?api_key={key}",
            json={"n": 1},
            headers={"X-Request-ID": "order-42.retry_1"},
            timeout=10,
        )
        assert answer.status_code == 202
        assert answer.headers["X-Request-ID"] == "order-42.retry_1"
        event_id = answer.json()["id"]
        (delivered,) = receiver.wait_for(1, timeout=15)
        wait_until(lambda: event_row(db, event_id).status == "delivered", what="delivered")

        made = requests.post(f"{base}/hooks/orders", json={}, timeout=10)  # no key, no id
        assert made.status_code == 401
        made_id = made.headers["X-Request-ID"]
        raw = raw_request(
            base,
            b"POST /hooks/x%0D%0Afake-line HTTP/1.1\r\nHost: hub\r\nContent-Length: 2\r\n"
            b'X-Request-ID: evil"id\r\nConnection: close\r\n\r\n{}',
        )
        assert raw.startswith(b"HTTP/1.1 404")
    assert delivered.headers["x-request-id"] == "order-42.retry_1"
    assert event_row(db, event_id).request_id == "order-42.retry_1"
    assert re.fullmatch(r"[0-9a-f]{32}", made_id)

    text = log_path.read_text()
    lines = json_lines(text)
    assert key not in text and "api_key" not in text
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    assert any(
        line["logger"] == "gunicorn.error" and "Booting worker" in line["message"] for line in lines
    )

    (access,) = [
        line
        for line in lines
        if line.get("request_id") == "order-42.retry_1" and line["logger"] == "gunicorn.access"
    ]
    assert access["method"] == "POST" and access["path"] == "/hooks/orders"
    assert access["status"] == 202 and access["bytes"] > 0 and access["duration_ms"] >= 0
    delivery = [
        line
        for line in lines
        if line["logger"] == "hub.worker" and line.get("event_id") == event_id
    ]
    assert delivery and delivery[0]["request_id"] == "order-42.retry_1"
    assert delivery[0]["route"] == "orders" and delivery[0]["key_prefix"] == key.split("_")[1]

    refused = [
        line
        for line in lines
        if line["logger"] == "hub.ingest" and line.get("request_id") == made_id
    ]
    assert refused and refused[0]["route"] == "orders" and refused[0]["event_id"]
    assert any(
        line["logger"] == "gunicorn.access"
        and line.get("request_id") == made_id
        and line["status"] == 401
        for line in lines
    )

    forged = [
        line for line in lines if line["logger"] == "hub.ingest" and "fake-line" in line["message"]
    ]
    assert forged and forged[0]["route"] == "x\r\nfake-line"  # the value kept, as data
    assert "evil" not in text  # the hostile id was replaced, never logged


class Chatty(Connector):
    """Logs one line through its step logger and passes the payload on."""

    name = "chatty"
    description = "test connector that logs"
    Config = EmptyConfig

    def run(self, payload, ctx):
        ctx.logger.info("working on it")
        return payload


@pytest.fixture
def json_lines_of_hub():
    """The hub logger's lines, formatted as production writes them, parsed."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("hub")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield lambda: json_lines(stream.getvalue())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_connectors_own_lines_say_which_request_and_event(
    app, client, key, add_route, json_lines_of_hub
):
    app.extensions["hub.connectors"].register(Chatty)
    try:
        add_route("now", [{"connector": "chatty"}])
        add_route("later", [{"connector": "chatty"}], mode="async")
        sync = client.post(
            "/hooks/now", json={}, headers={"X-API-Key": key, "X-Request-ID": "sync-1"}
        )
        queued = client.post(
            "/hooks/later", json={}, headers={"X-API-Key": key, "X-Request-ID": "async-1"}
        )
        assert Worker(app).run_once() == 1
    finally:
        app.extensions["hub.connectors"].unregister("chatty")
    said = [line for line in json_lines_of_hub() if line["message"] == "working on it"]
    about = [(line["request_id"], line["event_id"], line["route"]) for line in said]
    assert about == [
        ("sync-1", sync.get_json()["id"], "now"),
        ("async-1", queued.get_json()["id"], "later"),
    ]
    assert all(line["logger"] == "hub.connector.chatty" for line in said)
    assert all(line["key_prefix"] == key.split("_")[1] for line in said)


THIRD_PARTY_NOISE = """
import logging, threading, warnings
from hub import create_app

app = create_app()
logging.getLogger("psycopg").warning(
    "error ignored terminating <psycopg.Pipeline [BAD]>: server closed the connection\\n"
    "\\tThis probably means the server terminated abnormally"
)
logging.getLogger("sqlalchemy.pool.impl.QueuePool").error("Exception during reset")
warnings.warn("a library's warning", DeprecationWarning, stacklevel=1)
thread = threading.Thread(target=lambda: 1 / 0, name="delivery-1")
thread.start()
thread.join()
class Leaky:
    def __del__(self):
        raise RuntimeError("in __del__")
Leaky()
"""


def test_in_json_mode_every_stderr_line_of_a_process_is_one_json_object(tmp_path):
    """What libraries log (psycopg's warning of a dropped connection spans three lines), a
    Python warning, a thread that died and an exception Python could only ignore: each is
    one JSON object on stderr, never a raw line or a traceback."""
    database = f"sqlite:///{tmp_path / 'hub.db'}"
    env = hub_env(database, HUB_LOG_FORMAT="json", PYTHONWARNINGS="always")
    done = subprocess.run(
        [sys.executable, "-c", THIRD_PARTY_NOISE],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines()]  # each line parses
    assert all(isinstance(record, dict) for record in records)
    by_logger = {record["logger"]: record for record in records}
    assert "terminated abnormally" in by_logger["psycopg"]["message"]
    assert by_logger["sqlalchemy.pool.impl.QueuePool"]["level"] == "ERROR"
    assert "a library's warning" in by_logger["py.warnings"]["message"]
    crashes = [record for record in records if record["logger"] == "hub.crash"]
    assert {record.get("exc_type") for record in crashes} == {"ZeroDivisionError", "RuntimeError"}
    assert "Traceback" not in done.stderr


CONTEXT = {"request_id", "route", "event_id", "key_prefix"}


def test_a_request_s_values_do_not_reach_the_next_request_on_the_same_thread(
    client, db, make_key, add_route, json_lines_of_hub
):
    """The test client answers every request on this one thread, as a server thread answers
    one request after another: each line carries its own request's values and no other's."""
    add_route("orders")
    page = client.get("/dashboard/sign-in").get_data(as_text=True)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    outsider = make_key(scopes=["elsewhere"])
    first = client.post(
        "/hooks/orders", json={}, headers={"X-API-Key": outsider, "X-Request-ID": "first-1"}
    )
    assert first.status_code == 403
    second = client.post(
        "/dashboard/sign-in",
        data={"key": "hk_wrong_key", "csrf_token": csrf},
        headers={"X-Request-ID": "second-2"},
    )
    assert second.status_code == 401
    logging.getLogger("hub.test").info("between requests")
    lines = {line["message"]: line for line in json_lines_of_hub()}
    refused_first = next(line for m, line in lines.items() if m.startswith("rejected"))
    assert refused_first["request_id"] == "first-1"
    [event] = [e for e in events(db) if e.request_id == "first-1"]
    assert refused_first["event_id"] == event.id
    assert (refused_first["route"], refused_first["key_prefix"]) == (
        "orders",
        outsider.split("_")[1],
    )
    refused_second = lines["dashboard: sign-in refused (unauthorized)"]
    assert {k: v for k, v in refused_second.items() if k in CONTEXT} == {"request_id": "second-2"}
    assert not CONTEXT & set(lines["between requests"])
