"""`hub listen`: a route's events reach a local app once each, as their senders sent them."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from alembic import command
from werkzeug.serving import make_server

from hub.store.db import alembic_config, upgrade
from hub.store.models import Event, new_event_id, utcnow
from tests.procs import BIN, ROOT, clean_env, closed_port, gunicorn, nginx, stop, wait_until
from tests.tcpproxy import TcpProxy
from tests.test_dashboard import sign_in
from tests.test_front_door import certificate, render

SECRET = "It's a Secret to Everybody"
ROUTE = "gh"


def github_signed(payload: dict) -> tuple[bytes, dict[str, str]]:
    """A body and the headers GitHub sends with it, signed with SECRET."""
    body = json.dumps(payload).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={digest}",
    }


def github_verifies(headers: dict[str, str], body: bytes) -> bool:
    """The local app's own check, as GitHub documents it."""
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers.get("x-hub-signature-256", ""))


@pytest.fixture
def github_route(add_route):
    add_route(
        ROUTE,
        mode="async",
        auth="key|signature",
        verify={"scheme": "github", "secrets": [SECRET]},
    )


def listen(*args: str, out: Path, err: Path, **env: str) -> subprocess.Popen:
    with open(out, "ab") as stdout, open(err, "ab") as stderr:
        return subprocess.Popen(
            [str(BIN / "hub"), "listen", *args],
            cwd=ROOT,
            env=clean_env(PYTHONUNBUFFERED="1", **env),
            stdout=stdout,
            stderr=stderr,
        )


@contextmanager
def served(app) -> Iterator[str]:
    """The test's app on 127.0.0.1 (threaded), for a `hub listen` subprocess to reach."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def test_every_event_reaches_the_local_app_once_signed_though_the_connection_is_cut(
    database_url_for_test, github_route, make_key, receiver, tmp_path
):
    """`hub listen` against gunicorn through a proxy cut mid-poll: ten events posted with
    GitHub signatures, five of them while the listener is cut off, each reaches the local
    receiver exactly once, and the receiver's own check of each signature passes."""
    key = make_key(scopes=[ROUTE], name="listener")
    # One poll per key: a cut listener's poll must end at once for it to come back.
    settings = {
        "HUB_EMBEDDED_WORKER": "false",
        "HUB_LISTEN_SETTLE": "0.2",
        "HUB_LISTEN_STREAMS_PER_KEY": "1",
    }
    with (
        gunicorn(database_url_for_test, tmp_path / "web.log", workers=1, **settings) as (_, base),
        TcpProxy("127.0.0.1", int(base.rsplit(":", 1)[1])) as proxy,
    ):
        out, err = tmp_path / "listen.out", tmp_path / "listen.err"
        proc = listen(
            ROUTE,
            "--forward",
            receiver.url + "/webhooks",
            "--hub",
            f"http://127.0.0.1:{proxy.port}",
            "--key",
            key,
            out=out,
            err=err,
        )
        try:
            wait_until(lambda: b"listening to route" in err.read_bytes(), 15, what="listen")
            sent: dict[str, bytes] = {}

            def post(n: int) -> None:
                body, headers = github_signed({"n": n, "ref": "refs/heads/main"})
                answer = requests.post(
                    f"{base}/hooks/{ROUTE}", data=body, headers=headers, timeout=5
                )
                assert answer.status_code == 202, answer.text
                sent[headers["X-GitHub-Delivery"]] = body

            for n in range(5):
                post(n)
            receiver.wait_for(5, timeout=10)
            time.sleep(1.0)  # its answers reported, the listener waits in its next poll
            proxy.cut()  # mid-poll: its connection drops
            wait_until(lambda: b"connection to the hub lost" in err.read_bytes(), 10, what="cut")
            # The cut poll gave its slot back when its connection closed, not 20 s later.
            direct = f"{base}/listen/routes/{ROUTE}?wait=0"
            wait_until(
                lambda: requests.get(direct, headers={"X-API-Key": key}, timeout=5).ok,
                3,
                what="the cut poll's slot",
            )
            for n in range(5, 10):  # while the listener is cut off
                post(n)
            time.sleep(0.5)  # settled: a listener starting afresh would begin after them
            proxy.restore()
            receiver.wait_for(10, timeout=15)
            time.sleep(1.0)  # time for a copy to arrive, if one were sent twice
        finally:
            stop(proc)
    got = receiver.requests
    assert sorted(r.headers["x-github-delivery"] for r in got) == sorted(sent)
    for request in got:
        assert request.method == "POST" and request.path == "/webhooks"
        assert request.body == sent[request.headers["x-github-delivery"]]
        assert github_verifies(request.headers, request.body)
    lines = out.read_text().splitlines()
    assert len(lines) == 10 and all(" 200 " in line and line.endswith(" ms") for line in lines)


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_hub_listen_works_through_the_shipped_nginx_configuration(
    database_url_for_test, github_route, make_key, receiver, tmp_path
):
    """deploy/nginx.conf as shipped (TLS, buffering, its timeouts): a poll that waits its
    whole HUB_LISTEN_WAIT with no event comes back through nginx, and events before and
    after it reach the local app signed, with no reconnection."""
    key = make_key(scopes=[ROUTE], name="listener")
    cert, private = certificate(tmp_path)
    settings = {"HUB_EMBEDDED_WORKER": "false", "HUB_LISTEN_SETTLE": "0.2", "HUB_LISTEN_WAIT": "2"}
    with gunicorn(database_url_for_test, tmp_path / "web.log", workers=1, **settings) as (
        _,
        direct,
    ):
        for attempt in range(3):  # another run may take the port between pick and bind
            port = closed_port()
            config = render(tmp_path, port, int(direct.rsplit(":", 1)[1]), cert, private)
            front = f"https://127.0.0.1:{port}"
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(nginx(config, tmp_path, front, cert))
                break
            except AssertionError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
        with stack:
            out, err = tmp_path / "listen.out", tmp_path / "listen.err"
            proc = listen(
                ROUTE, "--forward", receiver.url, "--hub", front, "--key", key,
                out=out, err=err, REQUESTS_CA_BUNDLE=str(cert),
            )  # fmt: skip
            try:
                wait_until(lambda: b"listening to route" in err.read_bytes(), 15, what="listen")
                sent = []
                for n in range(3):
                    if n == 2:
                        time.sleep(2.5)  # a whole poll with nothing in it
                    body, headers = github_signed({"n": n})
                    answer = requests.post(
                        f"{front}/hooks/{ROUTE}", data=body, headers=headers, timeout=5, verify=cert
                    )
                    assert answer.status_code == 202, answer.text
                    sent.append(body)
                receiver.wait_for(3, timeout=10)
            finally:
                stop(proc)
    assert [r.body for r in receiver.requests] == sent
    assert all(github_verifies(r.headers, r.body) for r in receiver.requests)
    assert b"connection to the hub lost" not in err.read_bytes()
    # Its polls went through nginx, each answered 200 (none cut by a timeout).
    polls = [
        line
        for line in (tmp_path / "hub.access.log").read_text().splitlines()
        if f"GET /listen/routes/{ROUTE} " in line
    ]
    assert len(polls) >= 3 and all(line.split('" ')[1].startswith("200 ") for line in polls)


def test_a_key_out_of_scope_is_refused_and_a_key_holds_at_most_its_polls(
    app, client, github_route, make_key
):
    scoped = make_key(scopes=[ROUTE], name="listener")
    other = make_key(scopes=["elsewhere"], name="other")
    admin = make_key(admin=True, name="admin")
    app.config.update(LISTEN_STREAMS_PER_KEY=1, LISTEN_WAIT=2.0, LISTEN_SETTLE=0)
    body, headers = github_signed({"n": 1})
    event_id = client.post(f"/hooks/{ROUTE}", data=body, headers=headers).get_json()["id"]

    refused = client.get(f"/listen/routes/{ROUTE}?wait=0", headers={"X-API-Key": other})
    assert refused.status_code == 403 and refused.get_json()["code"] == "forbidden"
    hidden = client.get(f"/listen/events/{event_id}", headers={"X-API-Key": other})
    assert hidden.status_code == 404  # the same as an id that does not exist
    assert client.get(f"/listen/routes/{ROUTE}").status_code == 401
    unknown = client.get("/listen/routes/nowhere?wait=0", headers={"X-API-Key": admin})
    assert unknown.status_code == 404 and unknown.get_json()["code"] == "unknown_route"
    # A key that may not see a route is not told whether it exists.
    assert client.get("/listen/routes/nowhere", headers={"X-API-Key": other}).status_code == 403
    assert client.get(f"/listen/events/{event_id}", headers={"X-API-Key": admin}).status_code == 200

    held: list[int] = []
    poll = threading.Thread(
        target=lambda: held.append(
            client.get(f"/listen/routes/{ROUTE}?wait=2", headers={"X-API-Key": scoped}).status_code
        )
    )
    poll.start()
    time.sleep(0.3)
    busy = client.get(f"/listen/routes/{ROUTE}?wait=0", headers={"X-API-Key": scoped})
    assert busy.status_code == 429 and busy.get_json()["code"] == "too_many_listeners"
    assert busy.headers["Retry-After"] == "2"
    # Another key is not held back by this one's polls.
    assert (
        client.get(f"/listen/routes/{ROUTE}?wait=0", headers={"X-API-Key": admin}).status_code
        == 200
    )
    poll.join(5)
    assert held == [200]
    again = client.get(f"/listen/routes/{ROUTE}?wait=0", headers={"X-API-Key": scoped})
    assert again.status_code == 200


def test_replay_forwards_the_event_without_the_hubs_credentials_and_records_the_answer(
    app, client, db, github_route, make_key, receiver, tmp_path
):
    """A sender that presents a hub key (X-API-Key, a bearer token, ?api_key=) and a GitHub
    signature: `hub listen --replay` forwards the signature and never the key; the stored
    row keeps the signature sealed; the local answer shows on the event as a listen attempt."""
    sender = make_key(scopes=[ROUTE], name="sender")
    listener = make_key(scopes=[ROUTE], name="listener")
    admin = make_key(admin=True, name="admin")
    body, headers = github_signed({"action": "opened"})
    headers |= {"X-API-Key": sender, "Authorization": f"Bearer {sender}"}
    answer = client.post(f"/hooks/{ROUTE}?api_key={sender}&tag=x", data=body, headers=headers)
    event_id = answer.get_json()["id"]
    with db.session() as session:
        stored = session.get(Event, event_id)
        assert stored.headers["x-hub-signature-256"] == "[redacted]"
        assert headers["X-Hub-Signature-256"] not in (stored.sealed_headers or "")
        assert stored.sealed_headers  # sealed, not lost
    receiver.script()  # answers 200
    out, err = tmp_path / "out", tmp_path / "err"
    with served(app) as base:
        proc = listen(
            "--replay", event_id, "--forward", receiver.url + "/local", "--hub", base,
            "--key", listener, out=out, err=err,
        )  # fmt: skip
        assert proc.wait(20) == 0, err.read_text()
    (got,) = receiver.requests
    assert got.body == body and github_verifies(got.headers, got.body)
    assert got.path == "/local?tag=x"
    secret_part = sender.split("_", 2)[2]
    assert secret_part not in json.dumps(got.headers) + got.path
    assert "x-api-key" not in got.headers and "authorization" not in got.headers
    (line,) = out.read_text().splitlines()
    assert event_id in line and " 200 " in line and line.endswith(" ms")

    shown = client.get(f"/admin/api/events/{event_id}", headers={"X-API-Key": admin}).get_json()
    assert headers["X-Hub-Signature-256"] not in json.dumps(shown)  # shown redacted only
    (attempt,) = [a for a in shown["attempt_log"] if a["connector"] == "listen"]
    assert (attempt["outcome"], attempt["http_status"]) == ("ok", 200)
    assert attempt["duration_ms"] >= 0
    assert sign_in(client, admin).status_code == 303
    page = client.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    assert "Local listeners" in page and 'id="listened"' in page


def test_migration_0014_adds_the_sealed_headers_to_a_filled_events_table(db):
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0013")
    try:
        event_id = new_event_id()
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO events (id, route, method, path, received_at, headers, body, "
                    "status, attempts, retries) VALUES (:id, 'gh', 'POST', '/hooks/gh', :at, "
                    "'{}', :body, 'delivered', 1, 0)"
                ),
                {"id": event_id, "at": utcnow(), "body": b'{"n": 1}'},
            )
        upgrade(db)
        with db.session() as session:
            event = session.get(Event, event_id)
            assert (event.body, event.sealed_headers) == (b'{"n": 1}', None)
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0013")
        with db.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("events")}
            assert "sealed_headers" not in columns
            kept = conn.execute(sa.text("SELECT body FROM events WHERE id = :id"), {"id": event_id})
            assert kept.scalar() == b'{"n": 1}'
    finally:
        upgrade(db)
