"""Header redaction catches credential-looking names, in stored events and attempt copies,
and leaves the headers an admin searches by (event type, delivery ids) alone."""

from __future__ import annotations

import json

import pytest

from hub.ops.redact import HEADERS_CUT, REDACTED, header_pairs, is_credential_header
from tests.rows import attempts, events
from tests.servers import Reply

CREDENTIALS = {
    "X-Auth": "auth-value-1",
    "X-Access-Key": "access-value-2",
    "X-Auth-Token": "token-value-3",
    "X-Client-Key": "client-key-4",
    "X-Session-Id": "session-value-5",
    "X-Private-Token": "private-value-6",
    "X-Credential": "credential-value-7",
    "X-Password": "password-value-8",
    "X-Custom-Signature": "signature-value-9",
    "Proxy-Authorization": "Basic cHJveHk6cGFzcw==",
    "X-Amz-Security-Token": "amz-token-10",
}
HARMLESS = {
    "Content-Type": "application/json",
    "X-GitHub-Event": "push",
    "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    "webhook-id": "msg_2Lh9",
    "Idempotency-Key": "order-7",
    "X-Request-Id": "req-1",
    "User-Agent": "GitHub-Hookshot/abc",
}


@pytest.mark.parametrize("name", sorted(CREDENTIALS))
def test_credential_looking_names_are_caught(name):
    assert is_credential_header(name) and is_credential_header(name.lower())


@pytest.mark.parametrize("name", sorted(HARMLESS))
def test_harmless_names_are_kept(name):
    assert not is_credential_header(name)


def test_stored_event_headers_hide_credentials_and_keep_the_rest(client, db, key, add_route):
    add_route("shout", [{"connector": "text", "config": {"field": "text"}}])
    sent = {**CREDENTIALS, **HARMLESS, "X-API-Key": key}
    for path in ("/hooks/shout", "/hooks/nowhere"):  # accepted, then refused
        response = client.post(path, data=json.dumps({"text": "hi"}), headers=sent)
        assert response.status_code in (200, 404)
    for event in events(db):
        stored = json.dumps(event.headers)
        for name, value in CREDENTIALS.items():
            assert event.headers[name.lower()] == REDACTED
            assert value not in stored
        for name, value in HARMLESS.items():
            assert event.headers[name.lower()] == value


def test_attempt_copies_hide_credential_headers(client, db, key, add_route, receiver):
    outbound = {"X-Auth": "outbound-auth-1", "X-Access-Key": "outbound-key-2", "X-Source": "hub"}
    add_route(
        "fwd", [{"connector": "http", "config": {"url": receiver.url + "/in", "headers": outbound}}]
    )
    assert client.post("/hooks/fwd", json={"a": 1}, headers={"X-API-Key": key}).status_code == 200
    [got] = receiver.requests
    assert got.headers["x-auth"] == "outbound-auth-1"  # sent as configured ...
    [attempt] = attempts(db)
    stored = json.dumps([attempt.request, attempt.request_headers])
    assert "outbound-auth-1" not in stored  # ... and never stored
    assert "outbound-key-2" not in stored
    assert ["X-Source", "hub"] in attempt.request_headers


def test_a_destinations_answer_keeps_its_headers_with_every_credential_redacted(
    client, db, key, add_route, receiver
):
    """Whatever credential a destination answers with (Set-Cookie, a token, a signature,
    proxy credentials) reads [redacted] in the attempt; the rest is kept as answered."""
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    hub_key_echo = f"hk_{key.split('_')[1]}_{'A' * 43}"
    answer = [*CREDENTIALS.items(), *HARMLESS.items(), ("X-Echo", f"key {hub_key_echo}")]
    receiver.script(Reply(200, {"ok": True}, answer))
    assert client.post("/hooks/fwd", json={"a": 1}, headers={"X-API-Key": key}).status_code == 200
    [attempt] = attempts(db)
    answered = dict(attempt.response_headers)
    stored = json.dumps(attempt.response_headers)
    for name, value in CREDENTIALS.items():
        assert answered[name] == REDACTED, name
        assert value not in stored
    for name, value in HARMLESS.items():
        assert answered[name] == value
    assert answered["X-Echo"] == f"key hk_{key.split('_')[1]}_{REDACTED}"


def test_header_pairs_keep_order_and_repeats_within_the_count_and_the_bytes():
    pairs = [("A", "1"), ("Set-Cookie", "x=1"), ("Set-Cookie", "y=2"), ("B", "2")]
    assert header_pairs(pairs, 10, 1000) == [
        ["A", "1"],
        ["Set-Cookie", REDACTED],
        ["Set-Cookie", REDACTED],
        ["B", "2"],
    ]
    assert header_pairs(pairs, 2, 1000) == [
        ["A", "1"],
        ["Set-Cookie", REDACTED],
        [HEADERS_CUT, "kept 2 of 4 headers, 22 of 44 bytes"],
    ]
    long = [("X-Short", "s"), ("X-Long", "v" * 500), ("X-After", "a")]
    kept = header_pairs(long, 10, 100)
    assert kept[0] == ["X-Short", "s"]
    name, value = kept[1]
    assert name == "X-Long" and value.startswith("v" * 60) and value.endswith("more bytes]")
    assert sum(len(n) + len(v) for n, v in kept[:2]) <= 100
    assert kept[2] == [HEADERS_CUT, "kept 2 of 3 headers, 95 of 522 bytes"]  # X-After dropped
    secret = [("X-Echo", "token-abc in here"), ("X-Tenant", "t-1")]
    assert header_pairs(secret, 10, 1000, also=["x-tenant"], secrets=["token-abc"]) == [
        ["X-Echo", f"{REDACTED} in here"],
        ["X-Tenant", REDACTED],
    ]
