"""Refused requests cost little: no body read for a stranger on a key route, a refused row
kept small, refusals limited per remote address, the client address from a trusted proxy
only, and a presented key prefix never taken for the key that was verified."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
from sqlalchemy import text

from hub import create_app
from hub.config import SettingsError
from hub.services.intake import HEADERS_CUT
from tests.procs import gunicorn
from tests.rows import events
from tests.test_ratelimit import (  # noqa: F401 (redis_prefix is a fixture)
    REDIS_URL,
    Clock,
    needs_redis,
    redis_app,
    redis_prefix,
)
from tests.test_sender_auth import signed, verify_spec

SHOUT = [{"connector": "text", "config": {"field": "text"}}]
MB = 1_000_000
JUNK_HEADERS = {f"X-Junk-{i}": chr(97 + i % 26) * 8192 for i in range(50)}
BAD_KEY = "hk_0badc0de_" + "b" * 43


def database_bytes(db) -> int:
    """What the database takes on disk for its tables, as its own server counts it."""
    with db.engine.connect() as conn:
        if db.engine.dialect.name == "postgresql":
            return int(conn.scalar(text("SELECT pg_database_size(current_database())")))
        pages = conn.scalar(text("PRAGMA page_count"))
        return int(pages) * int(conn.scalar(text("PRAGMA page_size")))


@pytest.fixture
def shout(add_route):
    add_route("shout", SHOUT)


def test_200_bad_key_requests_with_big_bodies_and_headers_leave_the_database_small(
    app, client, db, shout
):
    """The issue's attack: 1 MB bodies, 50 headers of 8 KB, a wrong key. It grew the
    database by 280 MB; each refusal now keeps its size and a capped set of headers."""
    app.config["REFUSAL_LIMIT"] = ""  # every refusal stored, to measure what one costs
    body = b"x" * MB
    before = database_bytes(db)
    for _ in range(200):
        response = client.post(
            "/hooks/shout",
            data=body,
            headers={"X-API-Key": BAD_KEY, "Content-Type": "application/json", **JUNK_HEADERS},
        )
        assert response.status_code == 401
    grown = database_bytes(db) - before
    rows = events(db)
    assert len(rows) == 200
    # Generous for page and index overhead; a stored body or header set would be > 400 KB.
    assert grown / 200 < 12_000, f"{grown / 200:.0f} bytes per refused request"
    for row in rows:
        assert row.body is None  # the key was checked first: the body was never read
        assert row.body_size == MB
        stored = json.dumps(row.headers)
        assert len(stored) < 2048 + 300
        assert re.match(r"kept \d+ of 5\d headers", row.headers[HEADERS_CUT])
        assert row.headers.get("x-api-key") == "[redacted]"


def test_a_refused_body_keeps_its_size_and_a_short_prefix(app, client, db, add_route):
    """Signature routes need the body, so it is read; a refused one keeps 256 bytes of it."""
    add_route("gh", SHOUT, verify=verify_spec("github"))
    body = json.dumps({"text": "y" * 10_000}).encode()
    bad = signed("github", body=b"something else")
    response = client.post("/hooks/gh", data=body, headers={**bad, "Content-Type": "text/plain"})
    assert response.status_code == 401
    [row] = events(db)
    assert row.reason == "bad_signature"
    assert row.body == body[:256]
    assert row.body_size == len(body)

    app.config["REFUSED_BODY_BYTES"] = 0
    client.post("/hooks/gh", data=body, headers={**bad, "Content-Type": "text/plain"})
    assert events(db)[-1].body is None


def test_a_too_large_body_keeps_its_declared_size(app, client, db, key, shout):
    app.config["MAX_BODY_BYTES"] = 1000
    response = client.post(
        "/hooks/shout", data=b"z" * 5000, headers={"X-API-Key": key, **JUNK_HEADERS}
    )
    assert response.status_code == 413
    [row] = events(db)
    assert (row.reason, row.body, row.body_size) == ("too_large", None, 5000)
    assert HEADERS_CUT in row.headers


def test_accepted_events_keep_the_body_and_a_generous_cap_on_headers(app, client, db, key, shout):
    response = client.post(
        "/hooks/shout", json={"text": "hi"}, headers={"X-API-Key": key, **JUNK_HEADERS}
    )
    assert response.status_code == 200
    row = events(db)[0]
    assert row.body == b'{"text": "hi"}' and row.body_size == len(row.body)
    # 50 x 8 KB is past the default 32 KB: the first few are kept, whole or cut, and marked.
    junk = [name for name in row.headers if name.startswith("x-junk")]
    assert 1 <= len(junk) <= 4 and HEADERS_CUT in row.headers
    assert row.headers["x-api-key"] == "[redacted]" and row.headers["host"] == "localhost"
    assert sum(len(k) + len(v) for k, v in row.headers.items() if k != HEADERS_CUT) <= 32768

    app.config["STORED_HEADERS"] = 4
    client.post("/hooks/shout", json={"text": "hi"}, headers={"X-API-Key": key, "X-A": "1"})
    newest = events(db)[-1]
    assert len(newest.headers) == 5  # 4 kept, and the marker
    assert newest.headers[HEADERS_CUT].startswith("kept 4 of ")


def test_few_small_headers_are_stored_whole_without_a_marker(client, db, key, shout):
    client.post("/hooks/shout", json={"text": "hi"}, headers={"X-API-Key": key, "X-A": "1"})
    row = events(db)[0]
    assert row.headers["x-a"] == "1" and HEADERS_CUT not in row.headers


@pytest.mark.slow
def test_a_stranger_never_makes_the_hub_wait_for_a_body(database_url_for_test, shout, tmp_path):
    """A bad key announcing 1 MB and sending none of it is answered at once (the body used
    to be read first: the request thread waited for bytes that never came), and refusals
    that leave body bytes unread do not garble the connection's next request."""
    with gunicorn(database_url_for_test, tmp_path / "gunicorn.log", workers=1) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /hooks/shout HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                + f"X-API-Key: {BAD_KEY}\r\nContent-Length: {MB}\r\n\r\n".encode()
            )
            started = time.monotonic()
            head = read_response(sock)
            assert head.startswith(b"HTTP/1.1 401"), head[:200]
            assert time.monotonic() - started < 15  # it used to wait for the body's bytes

        for size in (10_000, 300_000):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                refused = (
                    b"POST /hooks/shout HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json"
                    + f"\r\nX-API-Key: {BAD_KEY}\r\nContent-Length: {size}\r\n\r\n".encode()
                    + b"x" * size
                )
                sock.sendall(refused + b"GET /health HTTP/1.1\r\nHost: hub\r\n\r\n")
                first = read_response(sock)
                assert first.startswith(b"HTTP/1.1 401"), first[:200]
                second = read_response(sock)
                # The unread body is skipped (gunicorn drains a little) or the connection
                # closes; its bytes are never parsed as the next request (a 400).
                assert second == b"" or second.startswith(b"HTTP/1.1 200"), second[:200]


def read_response(sock: socket.socket) -> bytes:
    """One HTTP response (head and Content-Length body) from ``sock``, read to its last byte
    and no further (a response sent right behind it stays for the next call); b"" or the
    part read if it closed."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        try:
            byte = sock.recv(1)
        except (ConnectionResetError, TimeoutError):
            return head
        if not byte:
            return head
        head += byte
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return head + body


# --- refusals limited per remote address ---


def test_a_flood_of_bad_keys_gets_429_after_the_limit(app, client, db, key, shout):
    """The issue's figure: 5,000 bad-key requests got 5,000 x 401. Now the first N are
    refused and stored; the rest get 429 with Retry-After, unread and unlogged."""
    app.config["REFUSAL_LIMIT"] = "20/hour"
    Clock(app)
    answers = [
        client.post("/hooks/shout", data=b"x" * 10_000, headers={"X-API-Key": BAD_KEY})
        for _ in range(120)
    ]
    assert [a.status_code for a in answers] == [401] * 20 + [429] * 100
    throttled = answers[-1]
    assert throttled.json["code"] == "too_many_refusals"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 3600
    rows = events(db)
    assert len(rows) == 20  # the 429s cost no row
    assert "refusal limit reached" in rows[-1].last_error

    # A valid key from the same address (a sender behind the same NAT) still gets through,
    # and its success does not reset the flood's count.
    ok = client.post("/hooks/shout", json={"text": "mine"}, headers={"X-API-Key": key})
    assert ok.status_code == 200
    assert client.post("/hooks/shout", json={}, headers={"X-API-Key": BAD_KEY}).status_code == 429
    # No key at all, or an unknown route: the same 429.
    assert client.post("/hooks/shout", json={}).status_code == 429
    assert client.post("/hooks/nowhere", json={}).status_code == 429
    # Another address is not affected.
    other = client.post(
        "/hooks/shout",
        json={},
        headers={"X-API-Key": BAD_KEY},
        environ_base={"REMOTE_ADDR": "10.1.2.3"},
    )
    assert other.status_code == 401
    # A header the client controls does not move it to another address (no trusted proxy).
    spoofed = client.post(
        "/hooks/shout", json={}, headers={"X-API-Key": BAD_KEY, "X-Forwarded-For": "10.9.9.9"}
    )
    assert spoofed.status_code == 429


def test_a_provider_signing_from_a_flooded_address_still_gets_through(app, client, db, add_route):
    """GitHub or Stripe may share an address with a flood of bad keys: over the budget, a
    request that proves itself with a valid signature is accepted; one that doesn't gets
    the same 429, with no row."""
    app.config["REFUSAL_LIMIT"] = "5/hour"
    Clock(app)
    add_route("gh", SHOUT, verify=verify_spec("github"))
    add_route("shout", SHOUT)
    for _ in range(5):
        client.post("/hooks/shout", json={}, headers={"X-API-Key": BAD_KEY})
    assert client.post("/hooks/shout", json={}, headers={"X-API-Key": BAD_KEY}).status_code == 429
    rows = len(events(db))

    body = json.dumps({"text": "push"}).encode()
    headers = {**signed("github", body=body), "Content-Type": "application/json"}
    accepted = client.post("/hooks/gh", data=body, headers=headers)
    assert accepted.status_code == 200, accepted.json
    assert accepted.json["result"]["processed"] == "PUSH"

    forged = {**signed("github", body=b"other"), "Content-Type": "application/json"}
    refused = client.post("/hooks/gh", data=body, headers=forged)
    assert refused.status_code == 429 and refused.json["code"] == "too_many_refusals"
    assert int(refused.headers["Retry-After"]) > 0
    assert client.post("/hooks/nowhere", json={}).status_code == 429
    assert len(events(db)) == rows + 1  # the signed delivery; the 429s cost no row


def test_refusals_of_a_known_sender_do_not_spend_the_address_budget(app, client, make_key, shout):
    app.config["REFUSAL_LIMIT"] = "3/hour"
    Clock(app)
    scoped = make_key(scopes=["elsewhere"])
    codes = [
        client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": scoped}).status_code
        for _ in range(5)
    ]
    assert codes == [403] * 5
    assert client.post("/hooks/shout", json={}, headers={"X-API-Key": BAD_KEY}).status_code == 401


def test_the_refusal_limit_can_be_turned_off(app, client, shout):
    app.config["REFUSAL_LIMIT"] = 0
    codes = {client.post("/hooks/shout", json={}).status_code for _ in range(40)}
    assert codes == {401}


# --- the client's address ---


def proxied_app(database_url: str, **config):
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": "test-secret-key-for-the-hub",
            **config,
        }
    )


def test_the_address_comes_from_a_trusted_proxy_only_when_configured(
    database_url_for_test, client, db, shout
):
    client.post("/hooks/shout", json={}, headers={"X-Forwarded-For": "6.6.6.6"})
    assert events(db)[-1].remote_addr == "127.0.0.1"

    behind = proxied_app(database_url_for_test, TRUSTED_PROXIES=1, REFUSAL_LIMIT="2/hour")
    try:
        Clock(behind)
        proxy = behind.test_client()
        # The nearest proxy appended what it saw; what the client wrote before it is ignored.
        forwarded = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"}
        assert proxy.post("/hooks/shout", json={}, headers=forwarded).status_code == 401
        assert events(db)[-1].remote_addr == "203.0.113.7"
        assert proxy.post("/hooks/shout", json={}, headers=forwarded).status_code == 401
        assert proxy.post("/hooks/shout", json={}, headers=forwarded).status_code == 429
        # Another client behind the same proxy has its own budget.
        other = {"X-Forwarded-For": "198.51.100.9"}
        assert proxy.post("/hooks/shout", json={}, headers=other).status_code == 401
    finally:
        behind.extensions["hub.db"].dispose()


@pytest.mark.parametrize(
    "setting, value",
    [
        ("TRUSTED_PROXIES", "two"),
        ("TRUSTED_PROXIES", -1),
        ("REFUSAL_LIMIT", "lots"),
        ("REFUSED_BODY_BYTES", "small"),
        ("STORED_HEADER_BYTES", -5),
    ],
)
def test_bad_front_door_settings_stop_the_start_naming_the_setting(
    database_url_for_test, setting, value
):
    with pytest.raises(SettingsError, match=f"^HUB_{setting}: expected"):
        proxied_app(database_url_for_test, **{setting: value})


# --- a presented prefix is not the verified key ---


def test_a_garbage_key_with_a_real_prefix_is_not_that_keys_event(client, db, key, shout):
    prefix = key.split("_")[1]
    forged = f"hk_{prefix}_" + "f" * 43
    refused = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": forged})
    assert refused.status_code == 401
    [row] = events(db)
    assert (row.presented_prefix, row.key_prefix) == (prefix, None)
    # The victim does not see it as theirs ...
    seen = client.get(f"/events/{row.id}", headers={"X-API-Key": key})
    assert seen.status_code == 404
    # ... while its own request is verified and shows under its key.
    mine = client.post("/hooks/shout", json={"text": "x"}, headers={"X-API-Key": key}).json["id"]
    assert client.get(f"/events/{mine}", headers={"X-API-Key": key}).status_code == 200
    shown = next(e for e in events(db) if e.id == mine)
    assert (shown.key_prefix, shown.presented_prefix) == (prefix, prefix)


@needs_redis
def test_refusals_are_counted_in_redis_for_every_instance(
    database_url_for_test,
    redis_prefix,  # noqa: F811 (the fixture imported above)
    add_route,
):
    add_route("shout", SHOUT)
    one, two = (
        redis_app(database_url_for_test, redis_prefix, "test-secret-key-for-the-hub", REDIS_URL)
        for _ in range(2)
    )
    try:
        Clock(one, two)
        for app in (one, two):
            app.config["REFUSAL_LIMIT"] = "3/hour"
        first, second = one.test_client(), two.test_client()
        codes = [c.post("/hooks/shout", json={}).status_code for c in (first, second, first)]
        assert codes == [401, 401, 401]
        assert second.post("/hooks/shout", json={}).status_code == 429
        assert first.post("/hooks/shout", json={}).status_code == 429
    finally:
        for app in (one, two):
            app.extensions["hub.db"].dispose()
