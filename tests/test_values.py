"""No value strands an event: whatever JSON a sender or a receiver produces is stored
faithfully on both databases or refused with a clear 4xx at ingest; never a 500, never a row
left `processing`. Also the nesting limit (HUB_MAX_JSON_DEPTH) and 422 for input that doesn't
fit its step.
"""

from __future__ import annotations

import json
import math
import socket

import pytest

from hub.services.delivery import Worker
from tests.procs import gunicorn
from tests.rows import attempts, event_row, events
from tests.servers import Reply

MODES = ["sync", "async"]


@pytest.fixture
def forward(add_route, receiver):
    """``forward(mode)``: a route named ``fwd`` whose one step posts the payload to the receiver."""

    def make(mode: str, **fields) -> str:
        steps = [{"connector": "http", "config": {"url": receiver.url + "/in"}}]
        add_route("fwd", steps, mode=mode, **fields)
        return "fwd"

    return make


def post_raw(client, key, route: str, body: bytes):
    return client.post(
        f"/hooks/{route}", data=body, content_type="application/json", headers={"X-API-Key": key}
    )


def run_to_the_end(app, client, key, route: str, body: bytes):
    """Post ``body`` and, on an async route, let a worker deliver it; (answer, event row)."""
    response = post_raw(client, key, route, body)
    if response.status_code == 202:
        assert Worker(app).run_once() == 1
    [event] = [e for e in events(app.extensions["hub.db"]) if e.route == route]
    return response, event


def nested(levels: int) -> bytes:
    return b'{"v": ' + b"[" * (levels - 1) + b"1" + b"]" * (levels - 1) + b"}"


# --- what senders send ---


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "body, why",
    [
        (b'{"v": NaN}', "NaN is not a JSON number"),
        (b'{"v": Infinity}', "Infinity is not a JSON number"),
        (b'{"v": [-Infinity]}', "-Infinity is not a JSON number"),
        (b'{"v": 1e999}', "too large"),
        (b'{"v": "a\\ud800b"}', "lone UTF-16 surrogate"),
        (b'{"\\udc00": 1}', "lone UTF-16 surrogate"),
    ],
)
def test_values_json_does_not_allow_are_refused_with_a_reason(
    client, db, key, forward, receiver, mode, body, why
):
    route = forward(mode)
    response = post_raw(client, key, route, body)
    assert response.status_code == 400
    assert response.json["code"] == "bad_json"
    assert why in response.json["error"]
    [event] = events(db)
    assert (event.status, event.reason, event.response_status) == ("rejected", "bad_json", 400)
    assert receiver.requests == []


@pytest.mark.parametrize("mode", MODES)
def test_a_surrogate_pair_and_big_but_finite_numbers_are_accepted(
    app, client, key, forward, receiver, mode
):
    route = forward(mode)
    body = b'{"emoji": "\\ud83d\\ude00", "big": 1e308, "long": 123456789012345678901234567890}'
    response, event = run_to_the_end(app, client, key, route, body)
    assert response.status_code in (200, 202)
    assert event.status == "delivered"
    assert receiver.requests[0].json() == {
        "emoji": "\U0001f600",
        "big": 1e308,
        "long": 123456789012345678901234567890,
    }


@pytest.mark.parametrize("mode", MODES)
def test_nul_in_a_string_is_delivered_end_to_end(app, client, db, key, forward, receiver, mode):
    route = forward(mode)
    response, event = run_to_the_end(app, client, key, route, b'{"input": "a\\u0000b"}')
    assert response.status_code in (200, 202)
    assert event.status == "delivered", event.last_error
    assert event.lease_until is None
    assert receiver.requests[0].json() == {"input": "a\x00b"}  # faithfully, NUL and all
    assert [a.outcome for a in attempts(db)] == ["ok"]


@pytest.mark.parametrize("mode", MODES)
def test_a_text_step_keeps_nul_in_its_result(app, client, db, key, add_route, mode):
    add_route("shout", [{"connector": "text"}], mode=mode)
    response, event = run_to_the_end(app, client, key, "shout", b'{"input": "a\\u0000b"}')
    assert event.status == "delivered"
    expected = {"processed": "A\x00B", "length": 3, "words": 1}
    if mode == "sync":
        assert response.json["result"] == expected
    # JSONB holds no NUL: the result is kept as its JSON text, which loads back the same.
    assert json.loads(event.result["json_text"]) == expected


# --- what receivers answer ---


def answer(body: bytes) -> Reply:
    return Reply(body=body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "raw, check",
    [
        (b'{"v": "a\\u0000b"}', lambda v: v == "a\x00b"),
        (b'{"v": "a\\ud800b"}', lambda v: v == "a\ud800b"),
        (b'{"v": NaN}', math.isnan),
        (b'{"v": 1e999}', lambda v: v == math.inf),
        (b'{"v": -Infinity}', lambda v: v == -math.inf),
    ],
)
def test_a_receiver_answer_no_database_column_takes_is_kept_as_json_text(
    app, client, db, key, forward, receiver, mode, raw, check
):
    receiver.script(answer(raw))
    route = forward(mode)
    response, event = run_to_the_end(app, client, key, route, b'{"n": 1}')
    assert response.status_code in (200, 202)
    assert event.status == "delivered", event.last_error
    assert (event.attempts, event.lease_until) == (1, None)
    kept = json.loads(event.result["json_text"])
    assert kept["status"] == 200 and check(kept["body"]["v"])
    if mode == "sync":  # the answer is JSON too: no NaN or Infinity in it
        shown = json.loads(response.get_data(), parse_constant=pytest.fail)["result"]
        if "json_text" in shown:
            shown = json.loads(shown["json_text"])
        assert check(shown["body"]["v"])
    [attempt] = attempts(db)
    assert attempt.outcome == "ok" and attempt.response  # the response copy is stored too
    assert len(receiver.requests) == 1  # delivered once, not again and again


def test_nul_and_surrogates_in_an_error_are_escaped_in_text_columns(
    app, client, db, key, forward, receiver
):
    receiver.script(
        Reply(status=400, body="bad \x00 value \ud800".encode("utf-8", "surrogatepass"))
    )
    route = forward("async")
    response, event = run_to_the_end(app, client, key, route, b'{"n": 1}')
    assert event.status == "failed"
    [attempt] = attempts(db)
    assert "\\u0000" in attempt.response and "\x00" not in attempt.response
    assert attempt.http_status == 400


# --- names and URLs ---


def test_nul_in_the_route_name_is_an_unknown_route_with_a_row(client, db, key):
    response = client.post("/hooks/a%00b", json={"n": 1}, headers={"X-API-Key": key})
    assert response.status_code == 404
    assert response.json["code"] == "unknown_route"
    [event] = events(db)
    assert (event.status, event.reason) == ("rejected", "unknown_route")
    assert event.route == "a\\u0000b" and event.path == "/hooks/a\\u0000b"


def test_nul_in_an_event_id_is_no_such_event(client, key):
    response = client.get("/events/evt_%00", headers={"X-API-Key": key})
    assert (response.status_code, response.json["code"]) == (404, "not_found")


def test_nul_in_the_query_and_a_header_is_stored_escaped(client, db, key, add_route):
    add_route("shout", [{"connector": "text"}])
    response = client.post(
        "/hooks/shout?note=x%00y",
        json={"input": "hi"},
        headers={"X-API-Key": key, "X-Note": "p\x00q"},
    )
    assert response.status_code == 200
    [event] = events(db)
    assert event.status == "delivered"
    assert event.query == "note=x%00y"
    assert json.loads(event.headers["json_text"])["x-note"] == "p\x00q"


# --- nesting ---


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("levels", [101, 970, 1000, 20000])
def test_bodies_nested_past_the_limit_are_refused(client, db, key, forward, mode, levels):
    route = forward(mode)
    response = post_raw(client, key, route, nested(levels))
    assert response.status_code == 400
    assert response.json["code"] == "too_deep"
    assert "deeper than 100 levels" in response.json["error"]
    [event] = events(db)
    assert (event.status, event.reason) == ("rejected", "too_deep")


@pytest.mark.parametrize("mode", MODES)
def test_a_body_at_the_limit_is_delivered(app, client, key, forward, receiver, mode):
    route = forward(mode)
    response, event = run_to_the_end(app, client, key, route, nested(100))
    assert response.status_code in (200, 202)
    assert event.status == "delivered"
    assert receiver.requests[0].body.count(b"[") == 99


def test_the_depth_limit_is_a_setting(app, client, db, key, add_route):
    app.config["MAX_JSON_DEPTH"] = 3
    add_route("plain", [])
    assert post_raw(client, key, "plain", b'{"a": [{"b": 1}]}').status_code == 200
    response = post_raw(client, key, "plain", b'{"a": [{"b": []}]}')
    assert (response.status_code, response.json["code"]) == (400, "too_deep")
    assert "deeper than 3 levels" in response.json["error"]


def test_the_depth_limit_can_not_go_past_what_the_encoders_write(app, client, key, add_route):
    app.config["MAX_JSON_DEPTH"] = 100000
    add_route("plain", [])
    response = post_raw(client, key, "plain", nested(501))
    assert (response.status_code, response.json["code"]) == (400, "too_deep")
    assert "deeper than 500 levels" in response.json["error"]


def test_a_form_payload_nested_past_the_limit_is_refused(client, key, add_route):
    add_route("plain", [])
    response = client.post(
        "/hooks/plain",
        data={"payload": nested(1000).decode()},
        headers={"X-API-Key": key},
    )
    assert (response.status_code, response.json["code"]) == (400, "too_deep")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("levels", [150, 5000])
def test_a_receiver_answer_nested_too_deep_fails_the_step_permanently(
    app, client, db, key, forward, receiver, mode, levels
):
    receiver.script(answer(nested(levels)))
    route = forward(mode)
    response, event = run_to_the_end(app, client, key, route, b'{"n": 1}')
    if mode == "sync":
        assert response.status_code == 502
        assert response.json["code"] == "too_deep"
    assert event.status == "failed"
    assert "nests too deep" in event.last_error or "deeper than 100 levels" in event.last_error
    [attempt] = attempts(db)
    assert attempt.outcome == "permanent"
    assert len(receiver.requests) == 1


# --- input that doesn't fit its step ---


@pytest.fixture
def demo(app, db):
    from hub.services.routes import ensure_demo_routes

    with db.session() as session:
        ensure_demo_routes(session, app.extensions["hub.connectors"])


def test_api_process_with_a_number_as_input_is_422(client, db, key, demo):
    response = client.post("/api/process", json={"input": 5}, headers={"X-API-Key": key})
    assert response.status_code == 422
    assert response.json["code"] == "bad_input"
    assert response.json["error"] == "field 'input' is not text"
    assert event_row(db, response.json["id"]).status == "failed"


def test_api_chat_with_a_number_as_message_is_422(client, key, add_route, fake_openai):
    add_route("chat", [{"connector": "openai", "config": {"base_url": fake_openai.base_url}}])
    response = client.post("/api/chat", json={"message": 5}, headers={"X-API-Key": key})
    assert response.status_code == 422
    assert response.json["code"] == "bad_input"
    assert fake_openai.requests == []


def test_async_input_that_does_not_fit_fails_at_once(app, client, db, key, add_route):
    add_route("shout", [{"connector": "text"}], mode="async", retry_schedule=[1, 1])
    response, event = run_to_the_end(app, client, key, "shout", b'{"input": 5}')
    assert response.status_code == 202
    assert (event.status, event.retries) == ("failed", 0)
    assert event.last_error == "field 'input' is not text"
    assert [a.outcome for a in attempts(db)] == ["permanent"]


# --- the body itself ---


@pytest.mark.slow
def test_malformed_chunked_encoding_is_400_with_a_row(
    database_url_for_test, db, make_key, add_route, tmp_path
):
    add_route("plain", [])
    key = make_key()
    with gunicorn(database_url_for_test, tmp_path / "web.log", workers=1) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /hooks/plain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                + f"X-API-Key: {key}\r\n\r\n".encode()
                + b"zz\r\n{}\r\n0\r\n\r\n"
            )
            answer_bytes = b""
            while b"\r\n\r\n" not in answer_bytes or not answer_bytes.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer_bytes += chunk
    head, _, body = answer_bytes.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400", answer_bytes
    assert json.loads(body)["code"] == "bad_body"
    [event] = events(db)
    assert (event.status, event.reason, event.response_status) == ("rejected", "bad_body", 400)
    assert event_row(db, event.id).body is None
