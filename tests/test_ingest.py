"""POST /hooks/<route>: authentication, body checks, sync runs, and the event log."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from hub.services import keys
from hub.store.models import ApiKey, Attempt, Delivery, Event, utcnow
from tests.rows import attempts, events


@pytest.fixture
def shout(add_route):
    add_route("shout", [{"connector": "text", "config": {"field": "text"}}])


@pytest.mark.parametrize("how", ["x-api-key", "bearer", "query"])
def test_sync_hook_runs_the_steps_and_logs_event_and_attempt(client, db, key, shout, how):
    headers, query = {}, ""
    if how == "x-api-key":
        headers["X-API-Key"] = key
    elif how == "bearer":
        headers["Authorization"] = f"Bearer {key}"
    else:
        query = f"?api_key={key}"
    response = client.post(f"/hooks/shout{query}", json={"text": "hello webhook"}, headers=headers)

    assert response.status_code == 200, response.json
    body = response.json
    assert body["status"] == "delivered"
    assert body["result"] == {"processed": "HELLO WEBHOOK", "length": 13, "words": 2}
    [event] = events(db)
    assert event.id == body["id"]
    assert event.status == "delivered"
    assert event.route == "shout"
    assert event.key_prefix == key.split("_")[1]
    assert json.loads(event.body) == {"text": "hello webhook"}
    assert event.result == body["result"]
    assert event.completed_at is not None
    [attempt] = attempts(db)
    assert (attempt.event_id, attempt.connector, attempt.outcome) == (event.id, "text", "ok")
    assert attempt.duration_ms >= 0
    # The key itself is nowhere in the stored row.
    stored = json.dumps([event.headers, event.query, event.path])
    assert key not in stored
    assert key.split("_", 2)[2] not in stored


def test_form_encoded_body_and_github_payload_field(client, key, shout, db):
    r1 = client.post("/hooks/shout", data={"text": "from a form"}, headers={"X-API-Key": key})
    assert r1.status_code == 200
    assert r1.json["result"]["processed"] == "FROM A FORM"
    # GitHub's form content type wraps the JSON in a `payload` field.
    r2 = client.post(
        "/hooks/shout",
        data={"payload": json.dumps({"text": "wrapped"})},
        headers={"X-API-Key": key},
    )
    assert r2.json["result"]["processed"] == "WRAPPED"


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"headers": {}}, 401, "unauthorized"),
        ({"headers": {"X-API-Key": "hk_00000000_" + "a" * 43}}, 401, "unauthorized"),
        ({"headers": {"X-API-Key": "not-even-a-key"}}, 401, "unauthorized"),
        ({"headers": {"Authorization": "Basic Zm9vOmJhcg=="}}, 401, "unauthorized"),
    ],
)
def test_missing_or_wrong_key_is_401_and_logged(client, db, shout, kwargs, status, code):
    response = client.post("/hooks/shout", json={"text": "x"}, **kwargs)
    assert response.status_code == status
    assert response.json == {"error": "Invalid API key", "code": code}
    [event] = events(db)
    assert (event.status, event.reason, event.response_status) == ("rejected", "unauthorized", 401)
    assert attempts(db) == []


def test_revoked_and_expired_keys_are_refused(client, db, make_key, runner, shout):
    revoked = make_key()
    assert runner.invoke(args=["keys", "revoke", revoked.split("_")[1]]).exit_code == 0
    expired = make_key(expires_in=timedelta(seconds=1))
    with db.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == expired.split("_")[1]))
        row.expires_at = utcnow() - timedelta(seconds=1)

    r1 = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": revoked})
    r2 = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": expired})
    assert (r1.status_code, r1.json["code"]) == (401, "unauthorized")
    assert "revoked" in r1.json["error"]
    assert (r2.status_code, r2.json["code"]) == (401, "unauthorized")
    assert "expired" in r2.json["error"]
    logged = events(db)
    assert [e.reason for e in logged] == ["unauthorized", "unauthorized"]
    # The public prefix says whose key knocked.
    assert {e.key_prefix for e in logged} == {revoked.split("_")[1], expired.split("_")[1]}


def test_the_key_digest_is_compared_in_constant_time(client, db, key, shout, compared):
    """Equal or not, the stored digest meets the presented key's through compare_digest:
    ``==`` would stop at the first differing character and time would tell how far it got."""
    prefix = key.split("_")[1]
    with db.session() as session:
        stored = session.scalar(select(ApiKey.digest).where(ApiKey.prefix == prefix))
    forged = f"hk_{prefix}_{'A' * 43}"
    assert (
        client.post("/hooks/shout", json={"text": "a"}, headers={"X-API-Key": key}).status_code
        == 200
    )
    assert (
        client.post("/hooks/shout", json={"text": "b"}, headers={"X-API-Key": forged}).status_code
        == 401
    )
    pairs = [{a, b} for a, b, _ in compared]
    assert {stored} in pairs  # the right key: its digest equals the stored one
    assert {stored, keys.digest(forged)} in pairs


def test_key_without_the_route_scope_is_403(client, db, make_key, shout):
    other = make_key(scopes=["somewhere-else"])
    response = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": other})
    assert response.status_code == 403
    assert response.json["code"] == "forbidden"
    assert events(db)[0].reason == "forbidden"


def test_scoped_key_reaches_its_route(client, make_key, shout):
    scoped = make_key(scopes=["shout"])
    response = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": scoped})
    assert response.status_code == 200


def test_unknown_route_is_404_and_logged(client, db, key):
    response = client.post("/hooks/nope", json={}, headers={"X-API-Key": key})
    assert response.status_code == 404
    assert response.json["code"] == "unknown_route"
    [event] = events(db)
    assert (event.route, event.reason) == ("nope", "unknown_route")


def test_body_over_the_limit_is_413_and_not_stored(app, client, db, key, shout):
    app.config["MAX_BODY_BYTES"] = 1000
    big = json.dumps({"text": "x" * 2000})
    response = client.post(
        "/hooks/shout", data=big, content_type="application/json", headers={"X-API-Key": key}
    )
    assert response.status_code == 413
    assert response.json["code"] == "too_large"
    [event] = events(db)
    assert (event.reason, event.body) == ("too_large", None)


def json_of_size(size: int) -> bytes:
    """``{"text": "xx..."}`` of exactly ``size`` bytes."""
    body = json.dumps({"text": "x" * (size - 12)}).encode()
    assert len(body) == size
    return body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(
    app, client, db, key, shout, framing
):
    """HUB_MAX_BODY_BYTES is the largest body accepted, as nginx's client_max_body_size is."""
    app.config["MAX_BODY_BYTES"] = 1000
    statuses = []
    for size in (1000, 1001):
        body = json_of_size(size)
        if framing == "chunked":  # no length: gunicorn hands the app a terminated stream
            extra = {
                "environ_overrides": {"wsgi.input": io.BytesIO(body), "wsgi.input_terminated": True}
            }
            headers = {"X-API-Key": key, "Transfer-Encoding": "chunked"}
        else:
            extra, headers = {"data": body}, {"X-API-Key": key}
        response = client.post(
            "/hooks/shout", content_type="application/json", headers=headers, **extra
        )
        statuses.append((response.status_code, response.json.get("code")))
    assert statuses == [(200, None), (413, "too_large")]
    accepted, refused = events(db)
    assert (accepted.status, accepted.body_size, len(accepted.body)) == ("delivered", 1000, 1000)
    assert (refused.reason, refused.body_size) == ("too_large", 1001)


class EndlessBody(io.RawIOBase):
    """A request body that never ends (up to ``size``), counting the bytes the hub took."""

    def __init__(self, size: int = 16 * 1024 * 1024):
        self.left = size
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        self.taken += n
        return n


def test_a_body_without_length_is_read_only_to_the_limit(app, client, db, key, shout):
    """Chunked, no Content-Length (gunicorn hands the app a terminated stream): the hub
    takes at most the limit and one byte more to know it is over, then answers 413."""
    app.config["MAX_BODY_BYTES"] = 1000
    body = EndlessBody()
    response = client.post(
        "/hooks/shout",
        content_type="application/json",
        headers={"X-API-Key": key, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": body, "wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert response.json["code"] == "too_large"
    assert 1000 < body.taken <= 1001
    [event] = events(db)
    # A refusal keeps a short prefix of what was read, never the body.
    assert event.reason == "too_large"
    assert len(event.body) <= app.config["REFUSED_BODY_BYTES"]


def test_a_declared_length_over_the_limit_is_refused_unread(app, client, db, key, shout):
    app.config["MAX_BODY_BYTES"] = 1000
    body = EndlessBody()
    response = client.post(
        "/hooks/shout",
        content_type="application/json",
        headers={"X-API-Key": key},
        environ_overrides={"wsgi.input": body, "CONTENT_LENGTH": str(body.left)},
    )
    assert (response.status_code, body.taken) == (413, 0)


def test_malformed_json_is_400(client, db, key, shout):
    response = client.post(
        "/hooks/shout",
        data=b'{"text": ',
        content_type="application/json",
        headers={"X-API-Key": key},
    )
    assert response.status_code == 400
    assert response.json == {"error": "Request body is not valid JSON", "code": "bad_json"}
    [event] = events(db)
    assert (event.reason, event.body) == ("bad_json", b'{"text": ')


def test_other_content_types_are_415(client, db, key, shout):
    response = client.post(
        "/hooks/shout", data=b"<xml/>", content_type="application/xml", headers={"X-API-Key": key}
    )
    assert response.status_code == 415
    assert response.json["code"] == "unsupported_media_type"
    assert events(db)[0].reason == "unsupported_media_type"


def test_wrong_method_is_405_with_allow_header(client, db, key, shout):
    response = client.get("/hooks/shout", headers={"X-API-Key": key})
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.json["code"] == "method_not_allowed"
    assert events(db)[0].reason == "method_not_allowed"


def test_secrets_never_stored_in_headers_or_query(client, db, key, shout):
    client.set_cookie("session", "abc")
    client.post(
        f"/hooks/shout?api_key={key}&other=1",
        json={"text": "x"},
        headers={"Authorization": f"Bearer {key}", "X-Trace": "t1"},
    )
    [event] = events(db)
    assert event.headers["authorization"] == "[redacted]"
    assert event.headers["cookie"] == "[redacted]"
    assert event.headers["x-trace"] == "t1"
    assert "api_key=%5Bredacted%5D" in event.query and "other=1" in event.query


def test_a_payload_without_the_steps_field_is_logged_permanent_and_answers_422(
    client, db, key, add_route
):
    add_route("needs-field", [{"connector": "text", "config": {"field": "missing"}}])
    response = client.post("/hooks/needs-field", json={"text": "x"}, headers={"X-API-Key": key})
    assert response.status_code == 422  # the sender's mistake, not an upstream's
    assert response.json["code"] == "bad_input"
    assert "missing" in response.json["error"]
    [event] = events(db)
    assert event.status == "failed"
    assert "missing" in event.last_error
    [attempt] = attempts(db)
    assert attempt.outcome == "permanent"


def test_no_stack_trace_in_an_unexpected_error(client, app, db, key, shout, monkeypatch):
    from hub.services import intake as ingest

    def explode(accepted):
        raise RuntimeError("SELECT secret FROM internals")

    monkeypatch.setattr(ingest, "run_sync", explode)
    response = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": key})
    assert response.status_code == 500
    assert response.json == {"error": "Server error", "code": "internal_error"}
    assert b"SELECT" not in response.data and b"Traceback" not in response.data


def test_every_request_is_one_event(client, db, key, shout):
    client.post("/hooks/shout", json={"text": "a"}, headers={"X-API-Key": key})
    client.post("/hooks/shout", json={"text": "b"})
    client.post("/hooks/ghost", json={"text": "c"}, headers={"X-API-Key": key})
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Event)) == 3


def test_last_used_is_recorded_at_most_once_a_minute(client, db, key, shout, monkeypatch):
    prefix = key.split("_")[1]

    def last_used():
        with db.session() as session:
            return session.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == prefix))

    assert last_used() is None
    client.post("/hooks/shout", json={"text": "a"}, headers={"X-API-Key": key})
    first = last_used()
    assert first is not None
    client.post("/hooks/shout", json={"text": "b"}, headers={"X-API-Key": key})
    assert last_used() == first  # no write for a second use within the minute
    later = first + timedelta(minutes=2)  # the clock moves on (the process remembers the key)
    monkeypatch.setattr(keys, "utcnow", lambda: later)
    client.post("/hooks/shout", json={"text": "c"}, headers={"X-API-Key": key})
    assert last_used() == later
    client.post("/hooks/shout", json={"text": "d"}, headers={"X-API-Key": key})
    assert last_used() == later  # the new use is remembered too: no write each request


def test_a_key_revoked_behind_the_hubs_back_is_refused_on_its_next_request(
    app, client, db, key, shout
):
    """A sync run acts before its end is committed: its key, remembered by the process, is
    checked by the commit that records the request before the run, so a key revoked
    elsewhere runs nothing."""
    prefix = key.split("_")[1]
    for text in ("a", "b", "c"):  # a warm key, remembered by this process
        answer = client.post("/hooks/shout", json={"text": text}, headers={"X-API-Key": key})
        assert answer.status_code == 200
    with db.session() as session:  # another process (or machine) revokes it
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
    refused = client.post("/hooks/shout", json={"text": "d"}, headers={"X-API-Key": key})
    assert refused.status_code == 401 and "revoked" in refused.json["error"]
    with db.session() as session:
        last = session.scalars(select(Event).order_by(Event.received_at.desc())).first()
        assert (last.status, last.response_status, last.key_prefix) == ("rejected", 401, prefix)
        assert (last.attempts, last.lease_owner, last.lease_until) == (0, None, None)
        ran = session.scalar(
            select(func.count()).select_from(Attempt).where(Attempt.event_id == last.id)
        )
        assert ran == 0
        assert (
            session.scalar(
                select(func.count()).select_from(Delivery).where(Delivery.event_id == last.id)
            )
            == 0
        )


def test_an_async_event_whose_key_was_revoked_before_its_commit_is_refused_not_stored(
    client, db, key, add_route
):
    """A webhook judges a key this process verified before from memory, and the event's
    commit reads it again in its own transaction: a key revoked elsewhere in between is
    refused (401, recorded as a refusal), and nothing of its event reaches a worker."""
    add_route("later", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    prefix = key.split("_")[1]
    for text in ("a", "b"):  # the key is verified and remembered
        answer = client.post("/hooks/later", json={"text": text}, headers={"X-API-Key": key})
        assert answer.status_code == 202
    with db.session() as session:  # another process (or machine) revokes it
        session.execute(update(ApiKey).where(ApiKey.prefix == prefix).values(revoked_at=utcnow()))
    refused = client.post("/hooks/later", json={"text": "c"}, headers={"X-API-Key": key})
    assert refused.status_code == 401
    assert refused.json == {"error": "API key has been revoked", "code": "unauthorized"}
    with db.session() as session:
        events = session.scalars(select(Event).order_by(Event.received_at)).all()
        assert [e.status for e in events] == ["pending", "pending", "rejected"]
        assert events[2].response_status == 401 and events[2].key_prefix == prefix
        delivered = session.scalars(select(Delivery.event_id)).all()
        assert sorted(delivered) == sorted(e.id for e in events[:2])


def test_a_remembered_key_is_refused_from_the_instant_it_expires(
    client, db, make_key, add_route, monkeypatch
):
    """A key this process remembers is judged against its expires_at on every webhook: the
    commit's check looks only for a revocation, so memory must not outlive the expiry."""
    add_route("later", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    key = make_key(expires_in=timedelta(hours=1))
    first = client.post("/hooks/later", json={"text": "a"}, headers={"X-API-Key": key})
    assert first.status_code == 202  # verified, and remembered
    with db.session() as session:
        expires_at = session.scalar(
            select(ApiKey.expires_at).where(ApiKey.prefix == key.split("_")[1])
        )
    later = expires_at + timedelta(seconds=1)
    monkeypatch.setattr(keys, "utcnow", lambda: later)
    refused = client.post("/hooks/later", json={"text": "b"}, headers={"X-API-Key": key})
    assert refused.status_code == 401
    assert refused.json == {"error": "API key has expired", "code": "unauthorized"}
    with db.session() as session:
        statuses = session.scalars(select(Event.status).order_by(Event.received_at)).all()
    assert statuses == ["pending", "rejected"]


def test_the_status_url_names_the_host_and_mount_the_sender_posted_to(client, key, add_route):
    """The 202's status_url is the event's own URL where the sender reached the hub: its
    scheme, host and the path the hub is mounted under (SCRIPT_NAME)."""
    add_route("mounted", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    answer = client.post(
        "/hooks/mounted",
        json={"text": "a"},
        headers={"X-API-Key": key},
        base_url="https://hooks.example.test/hub",
    )
    assert answer.status_code == 202
    event_id = answer.json["id"]
    assert answer.json["status_url"] == f"https://hooks.example.test/hub/events/{event_id}"
    shown = client.get(
        f"/events/{event_id}", headers={"X-API-Key": key}, base_url="https://hooks.example.test/hub"
    )
    assert shown.status_code == 200 and shown.json["id"] == event_id
