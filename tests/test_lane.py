"""The webhook lane (hub/web/lane.py): a POST to /hooks/<route> is answered without Flask's
request dispatch, and exactly as the Flask face answers it: status, headers, body and the
event row it leaves."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from werkzeug.test import Client
from werkzeug.wrappers import Response

from hub.services import intake
from hub.services.routes import ensure_demo_routes
from hub.store.models import Event
from hub.web.lane import HooksLane

# Columns that differ between any two requests: ids and times.
VOLATILE = {"id", "received_at", "next_attempt_at", "completed_at", "request_id", "body_size"}


@pytest.fixture
def routes(app, db, add_route):
    add_route("later", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    add_route("now", [{"connector": "text", "config": {"field": "text"}}], mode="sync")
    with db.session() as session:  # the seed's /api/process and /api/chat
        ensure_demo_routes(session, app.extensions["hub.connectors"])


@pytest.fixture
def faces(app):
    """(the lane, Flask's own dispatch) as two clients of the same app."""
    lane = app.wsgi_app
    assert isinstance(lane, HooksLane)
    return Client(app, Response), Client(lane.inner, Response)


def test_a_webhook_is_answered_without_flask_dispatch(app, client, key, routes):
    dispatched = []
    app.before_request(lambda: dispatched.append(1))

    response = client.post("/hooks/later", json={"text": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 202
    assert dispatched == []

    # So is the seed's POST /api/process, a sync run.
    response = client.post("/api/process", json={"input": "hi"}, headers={"X-API-Key": key})
    assert response.status_code == 200 and response.json["result"]["processed"] == "HI"
    assert dispatched == []

    # Anything else under /hooks is Flask's: another method, a trailing slash; and so is
    # anything but a POST to /api/process.
    assert client.get("/hooks/later").status_code == 405
    assert client.post("/hooks/later/", json={}, headers={"X-API-Key": key}).status_code == 404
    assert client.get("/api/process", headers={"X-API-Key": key}).status_code == 405
    assert len(dispatched) == 3


def _row(db, event_id):
    with db.session() as session:
        event = session.get(Event, event_id)
        return {
            c.name: getattr(event, c.key) for c in Event.__table__.columns if c.name not in VOLATILE
        }


def _rows_since(db, seen):
    with db.session() as session:
        return [e for e in session.scalars(select(Event.id)) if e not in seen]


CASES = {
    "accepted": ("later", {"json": {"text": "hi"}}),
    "sync result": ("now", {"json": {"text": "hi"}}),
    "bad key": ("later", {"json": {"text": "hi"}, "headers": {"X-API-Key": "hub_bad_key"}}),
    "no route": ("nowhere", {"json": {"text": "hi"}}),
    "bad json": ("later", {"data": b"{nope", "content_type": "application/json"}),
    "bad media": ("later", {"data": b"\x00\x01", "content_type": "image/png"}),
    "missing field": ("now", {"json": {"other": 1}}),
    "key in the query": ("later", {"json": {"text": "hi"}}),
    # The seed's POST /api/process: a sync run in the article's shapes.
    "seed result": ("/api/process", {"json": {"input": "hello hub"}}),
    "seed without input": ("/api/process", {"json": {"text": "hi"}}),
    "seed bad key": (
        "/api/process",
        {"json": {"input": "hi"}, "headers": {"X-API-Key": "hub_bad_key"}},
    ),
    "seed bad json": ("/api/process", {"data": b"{nope", "content_type": "application/json"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_lane_answers_as_flask_does(db, key, routes, faces, case):
    route, kwargs = CASES[case]
    headers = {"X-API-Key": key, "X-Request-ID": f"req-{case.replace(' ', '-')}"}
    headers.update(kwargs.pop("headers", {}))
    if case == "key in the query":
        kwargs["query_string"] = {"api_key": headers.pop("X-API-Key"), "x": "1"}
    answers, rows = [], []
    for face in faces:
        seen = set(_rows_since(db, set()))
        path = route if route.startswith("/") else f"/hooks/{route}"
        response = face.post(path, headers=headers, **kwargs)
        answers.append(response)
        [event_id] = _rows_since(db, seen)
        rows.append(_row(db, event_id))
    lane, flask = answers
    assert lane.status == flask.status  # "202 ACCEPTED", as Werkzeug writes it
    assert dict(lane.headers) == dict(flask.headers) | {
        "Content-Length": lane.headers["Content-Length"]
    }
    body, expected = lane.get_json(), flask.get_json()
    for field in ("id", "status_url"):  # the event's own
        assert (field in body) == (field in expected)
        body.pop(field, None), expected.pop(field, None)
    assert body == expected
    assert lane.headers["X-Request-ID"] == headers["X-Request-ID"]
    assert rows[0] == rows[1]


def test_a_status_url_names_the_host_and_mount_it_was_sent_to(client, key, routes):
    for host, root in (("hooks.example", ""), ("other.example:8443", "/hub")):
        response = client.post(
            "/hooks/later",
            json={"text": "hi"},
            headers={"X-API-Key": key, "Host": host},
            environ_overrides={"SCRIPT_NAME": root},
        )
        event_id = response.json["id"]
        assert response.json["status_url"] == f"http://{host}{root}/events/{event_id}"


def test_an_unexpected_error_is_a_json_500_without_its_text(client, key, routes, monkeypatch):
    def broken(_incoming):
        raise RuntimeError("SELECT secret FROM keys")

    monkeypatch.setattr(intake, "accept", broken)
    response = client.post(
        "/hooks/later", json={"text": "hi"}, headers={"X-API-Key": key, "X-Request-ID": "r-1"}
    )
    assert response.status_code == 500
    assert response.json == {"error": "Server error", "code": "internal_error"}
    assert response.headers["X-Request-ID"] == "r-1"
    assert "SELECT" not in response.get_data(as_text=True)
