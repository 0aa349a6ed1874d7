"""Header redaction catches credential-looking names, in stored events and attempt copies,
and leaves the headers an admin searches by (event type, delivery ids) alone."""

from __future__ import annotations

import json

import pytest

from hub.ops.redact import REDACTED, is_credential_header
from tests.rows import attempts, events

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
    assert "outbound-auth-1" not in attempt.request  # ... and never stored
    assert "outbound-key-2" not in attempt.request
    assert "X-Source" in attempt.request and "hub" in attempt.request
