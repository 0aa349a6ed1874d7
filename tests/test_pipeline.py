"""Pipelines end to end through POST /hooks/<route>: steps in order, each fed the previous
output, templates over the payload and every earlier output, filters, and the attempt log."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from hub.connectors import Connector, StepContext
from hub.services.routes import RouteInvalid
from tests.rows import attempts, events, summary
from tests.servers import FakeOpenAI, Receiver

SECRET = "whsec_" + base64.b64encode(b"pipeline-secret-0123456789abcdef").decode()


def post(client, key, payload, route="flow", **headers):
    return client.post(f"/hooks/{route}", json=payload, headers={"X-API-Key": key, **headers})


@pytest.fixture
def three_steps(add_route, fake_openai, receiver, monkeypatch):
    """text -> openai -> http forward, each step using earlier outputs."""
    monkeypatch.setenv("FLOW_SECRET", SECRET)
    add_route(
        "flow",
        [
            {"connector": "text", "config": {"field": "issue.title", "operations": ["strip"]}},
            {
                "connector": "openai",
                "config": {
                    "base_url": fake_openai.base_url,
                    "user_message": "Triage for {{ payload.user }}: {{ steps[0].processed }}"
                    " ({{ previous.words }} words)",
                },
            },
            {
                "connector": "http",
                "config": {
                    "url": receiver.url + "/triage",
                    "sign_secret_env": "FLOW_SECRET",
                    "headers": {"X-Event": "{{ event.id }}"},
                    "body": '{"user": {{ payload.user | tojson }}, '
                    '"title": {{ steps[0].processed | tojson }}, '
                    '"answer": {{ steps[1].assistant_message | tojson }}, '
                    '"tokens": {{ previous.tokens_used }}}',
                },
            },
        ],
    )
    return fake_openai, receiver


def test_steps_run_in_order_and_templates_reach_payload_and_earlier_outputs(
    client, key, three_steps, db
):
    fake, receiver = three_steps
    response = post(client, key, {"user": "ana", "issue": {"title": "  Login broken  "}})

    assert response.status_code == 200, response.json
    prompt = fake.requests[0].json()["messages"][-1]["content"]
    assert prompt == "Triage for ana: Login broken (2 words)"
    [got] = receiver.requests
    assert got.json() == {
        "user": "ana",
        "title": "Login broken",
        "answer": "echo: Triage for ana: Login broken (2 words)",
        "tokens": 7 + 8,  # the fake counts words: prompt 7, answer 8
    }
    assert got.headers["x-event"] == response.json["id"]
    assert Receiver.verify_standard_webhooks(SECRET, got)
    # The route's result is the last step's output.
    assert response.json["result"] == {"status": 200, "body": {"ok": True}}
    assert summary(db) == [
        (0, "text", 1, "ok", None),
        (1, "openai", 1, "ok", 200),
        (2, "http", 1, "ok", 200),
    ]
    [event] = events(db)
    assert (event.status, event.result) == ("delivered", response.json["result"])
    assert {a.event_id for a in attempts(db)} == {event.id}


def test_each_step_gets_the_previous_output(client, key, add_route, receiver):
    add_route(
        "flow",
        [
            {"connector": "text", "config": {"field": "msg", "operations": ["upper"]}},
            {"connector": "http", "config": {"url": receiver.url}},  # default body: its input
        ],
    )
    post(client, key, {"msg": "hello there"})
    assert receiver.requests[0].json() == {"processed": "HELLO THERE", "length": 11, "words": 2}


def test_a_failing_step_stops_the_pipeline(client, key, three_steps, db):
    fake, receiver = three_steps
    fake.script(FakeOpenAI.unauthorized())
    response = post(client, key, {"user": "ana", "issue": {"title": "x"}})
    assert response.status_code == 502
    assert receiver.requests == []
    assert summary(db) == [(0, "text", 1, "ok", None), (1, "openai", 1, "permanent", 401)]
    assert events(db)[0].status == "failed"


def test_a_retried_middle_step_then_carries_on(client, key, three_steps, db):
    fake, receiver = three_steps
    fake.script(FakeOpenAI.rate_limited(retry_after=0, retry_after_ms=20))
    response = post(client, key, {"user": "ana", "issue": {"title": "x"}})
    assert response.status_code == 200
    assert [(s, o) for s, _, _, o, _ in summary(db)] == [
        (0, "ok"),
        (1, "retryable"),
        (1, "ok"),
        (2, "ok"),
    ]
    assert len(receiver.requests) == 1


@pytest.fixture
def filtered_route(add_route, receiver):
    add_route(
        "flow",
        [{"connector": "http", "config": {"url": receiver.url}}],
        filter="payload.action == 'opened' and headers['x-github-event'] == 'issues'",
    )
    return receiver


@pytest.mark.parametrize(
    "payload, event_header, status",
    [
        ({"action": "opened"}, "issues", "delivered"),
        ({"action": "closed"}, "issues", "filtered"),
        ({"action": "opened"}, "push", "filtered"),
        ({"other": "field"}, "issues", "filtered"),  # a missing field is simply false
    ],
)
def test_filter_drops_events_that_do_not_match(
    client, key, filtered_route, db, payload, event_header, status
):
    response = post(client, key, payload, **{"X-GitHub-Event": event_header})
    assert response.status_code == 200
    assert response.json["status"] == status
    [event] = events(db)
    assert event.status == status
    if status == "filtered":
        assert filtered_route.requests == []
        assert attempts(db) == []
        assert event.completed_at is not None
    else:
        assert len(filtered_route.requests) == 1
        assert summary(db) == [(0, "http", 1, "ok", 200)]


def test_a_filter_that_fails_at_run_time_fails_the_event_clearly(client, key, add_route, db):
    add_route("flow", [{"connector": "text"}], filter="payload.n / 0")
    response = post(client, key, {"n": 1})
    assert response.status_code == 502
    assert response.json["code"] == "bad_filter"
    assert response.json["error"] == "filter: expression failed: ZeroDivisionError"
    assert events(db)[0].status == "failed"


def test_a_filter_that_does_not_parse_is_refused_when_saved(add_route):
    with pytest.raises(RouteInvalid, match="filter: expression does not parse"):
        add_route("flow", [{"connector": "text"}], filter="payload.action ==")


def test_the_sandbox_refuses_unsafe_templates(client, key, add_route, receiver, db):
    add_route(
        "flow",
        [{"connector": "http", "config": {"url": receiver.url, "body": "{{ ''.__class__ }}"}}],
    )
    response = post(client, key, {})
    assert response.status_code == 500
    assert response.json["code"] == "bad_config"
    assert "body: template failed" in response.json["error"]
    assert receiver.requests == []


def test_an_unknown_connector_at_run_time_is_a_clear_error_not_a_crash(
    client, key, add_route, app, db
):
    add_route(
        "flow",
        [{"connector": "text"}, {"connector": "http", "config": {"url": "https://example.com"}}],
    )
    app.extensions["hub.connectors"].unregister("http")  # e.g. HUB_CONNECTORS changed since
    response = post(client, key, {"input": "x"})
    assert response.status_code == 500
    assert response.json["code"] == "bad_config"
    assert response.json["error"].startswith("unknown connector 'http' (known: ")
    assert summary(db) == [(0, "text", 1, "ok", None), (1, "http", 1, "permanent", None)]


class Buggy(Connector):
    name = "buggy"
    description = "Raises what no connector should."

    def run(self, payload: Any, ctx: StepContext) -> Any:
        return {"n": 1 / payload["n"]}


def test_a_connector_bug_is_permanent_logged_and_kept_out_of_the_answer(
    client, key, add_route, app, db, caplog
):
    app.extensions["hub.connectors"].register(Buggy)
    add_route("flow", [{"connector": "buggy"}])
    response = post(client, key, {"n": 0})
    assert response.status_code == 500
    assert response.json["code"] == "connector_bug"
    assert response.json["error"].startswith("connector bug: ZeroDivisionError: division by zero")
    text = response.get_data(as_text=True) + caplog.text
    assert "Traceback" not in text
    assert summary(db) == [(0, "buggy", 1, "permanent", None)]  # a bug is never retried
    assert json.loads(events(db)[0].body) == {"n": 0}
