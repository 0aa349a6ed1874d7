"""The HTTP forward connector against a real recording receiver on 127.0.0.1, which checks
the Standard Webhooks signature with its own implementation of the rule."""

from __future__ import annotations

import base64
import json

import pytest

from hub.services.routes import RouteInvalid
from tests.rows import attempts, events, summary
from tests.servers import Receiver, Reply

SECRET = "whsec_" + base64.b64encode(b"forward-secret-32-bytes-long!!!!").decode()
FAST = {"retry-after-ms": "10"}  # keep retry tests quick; the wait rule is tested elsewhere


@pytest.fixture
def signing_secret(monkeypatch):
    monkeypatch.setenv("FORWARD_SECRET", SECRET)
    return SECRET


def forward(add_route, receiver, name="fwd", **config):
    add_route(name, [{"connector": "http", "config": {"url": receiver.url + "/in", **config}}])


def post(client, key, payload, name="fwd"):
    return client.post(f"/hooks/{name}", json=payload, headers={"X-API-Key": key})


def test_forwards_the_payload_signed_and_the_receiver_verifies_it(
    client, key, add_route, receiver, signing_secret, db
):
    forward(
        add_route,
        receiver,
        sign_secret_env="FORWARD_SECRET",
        headers={"X-Source": "hub", "X-Repo": "{{ payload.repo }}"},
    )
    response = post(client, key, {"repo": "octo/hub", "note": "héllo"})

    assert response.status_code == 200, response.json
    assert response.json["result"] == {"status": 200, "body": {"ok": True}}
    [got] = receiver.requests
    assert (got.method, got.path) == ("POST", "/in")
    assert got.json() == {"repo": "octo/hub", "note": "héllo"}
    assert got.headers["content-type"] == "application/json"
    assert (got.headers["x-source"], got.headers["x-repo"]) == ("hub", "octo/hub")
    assert Receiver.verify_standard_webhooks(SECRET, got)
    assert got.headers["webhook-id"] == f"{response.json['id']}_0"
    assert got.headers["webhook-signature"].startswith("v1,")
    # The receiver's check can fail: another secret or a changed body does not verify.
    other = "whsec_" + base64.b64encode(b"another-secret-entirely-32-byte").decode()
    assert not Receiver.verify_standard_webhooks(other, got)
    tampered = type(got)(got.method, got.path, got.headers, got.body + b" ", got.received_at)
    assert not Receiver.verify_standard_webhooks(SECRET, tampered)

    [attempt] = attempts(db)
    assert (attempt.connector, attempt.outcome, attempt.http_status) == ("http", "ok", 200)
    recorded = dict(attempt.request_headers)
    assert recorded["webhook-signature"] == "[redacted]"  # the signature the hub added
    assert recorded["webhook-id"] == got.headers["webhook-id"]
    stored = json.dumps(
        [
            attempt.request,
            attempt.response,
            attempt.request_headers,
            attempt.response_headers,
            events(db)[0].result,
        ]
    )
    assert SECRET not in stored and SECRET[6:] not in stored
    assert got.headers["webhook-signature"][3:] not in stored


def test_the_webhook_id_is_the_same_on_every_retry(
    client, key, add_route, receiver, signing_secret, db
):
    forward(add_route, receiver, sign_secret_env="FORWARD_SECRET")
    receiver.script(Reply(503, {"busy": True}, FAST))
    response = post(client, key, {"n": 1})
    assert response.status_code == 200
    first, second = receiver.requests
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert Receiver.verify_standard_webhooks(SECRET, first)
    assert Receiver.verify_standard_webhooks(SECRET, second)
    assert summary(db) == [(0, "http", 1, "retryable", 503), (0, "http", 2, "ok", 200)]


def test_unsigned_by_default(client, key, add_route, receiver):
    forward(add_route, receiver)
    post(client, key, {"n": 1})
    [got] = receiver.requests
    assert "webhook-signature" not in got.headers
    assert got.headers["user-agent"].startswith("webhook-hub/")


def test_templated_body_method_and_content_type(client, key, add_route, receiver):
    forward(
        add_route,
        receiver,
        method="put",
        body="{{ payload.user }} pushed {{ payload.commits | length }} commits",
        content_type="text/plain; charset=utf-8",
    )
    response = post(client, key, {"user": "ana", "commits": [1, 2, 3]})
    assert response.status_code == 200
    [got] = receiver.requests
    assert (got.method, got.text) == ("PUT", "ana pushed 3 commits")
    assert got.headers["content-type"] == "text/plain; charset=utf-8"


def test_get_sends_no_body(client, key, add_route, receiver):
    forward(add_route, receiver, method="GET")
    post(client, key, {"n": 1})
    [got] = receiver.requests
    assert (got.method, got.body) == ("GET", b"")
    assert "content-type" not in got.headers


def test_text_answers_are_kept_as_text_and_truncated(client, key, add_route, receiver):
    forward(add_route, receiver)
    receiver.script(Reply(201, "created"), Reply(200, "x" * 5000))
    assert post(client, key, {}).json["result"] == {"status": 201, "body": "created"}
    long = post(client, key, {}).json["result"]["body"]
    assert long == "x" * 2000 + "..."


def test_headers_from_env_carry_credentials_that_the_route_does_not_show(
    client, key, add_route, receiver, monkeypatch, runner, db
):
    monkeypatch.setenv("TARGET_TOKEN", "Bearer target-credential-123")
    monkeypatch.setenv("TARGET_TENANT", "tenant-credential-456")
    forward(
        add_route,
        receiver,
        headers_from_env={"Authorization": "TARGET_TOKEN", "X-Tenant": "TARGET_TENANT"},
    )
    assert post(client, key, {"n": 1}).status_code == 200
    got = receiver.requests[0].headers
    assert got["authorization"] == "Bearer target-credential-123"
    assert got["x-tenant"] == "tenant-credential-456"
    shown = runner.invoke(args=["routes", "show", "fwd"]).output
    assert "TARGET_TOKEN" in shown and "target-credential-123" not in shown
    recorded = dict(attempts(db)[0].request_headers)
    # A header from the environment is a credential, whatever its name says.
    assert recorded["Authorization"] == recorded["X-Tenant"] == "[redacted]"


@pytest.mark.parametrize(
    "status, outcomes",
    [
        (400, ["permanent"]),
        (401, ["permanent"]),
        (404, ["permanent"]),
        (410, ["permanent"]),  # gone: the receiver says stop
        (422, ["permanent"]),
        (408, ["retryable"] * 3),
        (409, ["retryable"] * 3),
        (429, ["retryable"] * 3),
        (500, ["retryable"] * 3),
        (503, ["retryable"] * 3),
    ],
)
def test_answers_are_classified_by_hub_http(client, key, add_route, receiver, db, status, outcomes):
    forward(add_route, receiver)
    receiver.script(*[Reply(status, {"error": "no"}, FAST) for _ in range(3)])
    response = post(client, key, {"n": 1})
    assert response.status_code == 502
    assert response.json["code"] == "upstream_error"
    assert f"answered {status}" in response.json["error"]
    assert [row[3] for row in summary(db)] == outcomes
    assert {row[4] for row in summary(db)} == {status}
    assert len(receiver.requests) == len(outcomes)
    assert events(db)[0].status == "failed"


def test_a_refused_connection_is_retried_then_502(client, key, add_route, db):
    with Receiver() as gone:
        url = gone.url
    add_route("fwd", [{"connector": "http", "config": {"url": url}}])
    response = post(client, key, {"n": 1})
    assert response.status_code == 502
    assert response.json["code"] == "upstream_unreachable"
    assert [row[3] for row in summary(db)] == ["retryable"] * 3


def test_a_slow_receiver_times_out_and_is_retried(client, key, add_route, receiver, db):
    forward(add_route, receiver, timeout=0.2)
    receiver.script(Reply(200, {"late": True}, delay=2))
    response = post(client, key, {"n": 1})
    assert response.status_code == 200
    assert summary(db) == [(0, "http", 1, "retryable", None), (0, "http", 2, "ok", 200)]
    assert "timed out" in attempts(db)[0].error


def test_a_missing_signing_secret_is_not_configured(client, key, add_route, receiver):
    forward(add_route, receiver, sign_secret_env="NO_SUCH_SECRET")
    response = post(client, key, {"n": 1})
    assert response.status_code == 500
    assert response.json["code"] == "not_configured"
    assert "NO_SUCH_SECRET is not set" in response.json["error"]
    assert receiver.requests == []


def test_an_unusable_signing_secret_is_not_echoed(
    client, key, add_route, receiver, monkeypatch, caplog
):
    monkeypatch.setenv("FORWARD_SECRET", "whsec_not*base64*secret")
    forward(add_route, receiver, sign_secret_env="FORWARD_SECRET")
    response = post(client, key, {"n": 1})
    assert response.status_code == 500
    assert response.json["code"] == "not_configured"
    assert "not a Standard Webhooks secret" in response.json["error"]
    assert "not*base64" not in response.get_data(as_text=True) + caplog.text
    assert receiver.requests == []


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"url": "ftp://example.com/x"}, "url: Value error, must be an http:// or https:// URL"),
        # Where the hub connects is the route's choice, never the sender's: no template.
        ({"url": "https://example.com/{{ payload.path }}"}, "url: may not be a template"),
        ({"url": "https://example.com", "method": "TRACE"}, "method: Input should be"),
        ({"url": "https://example.com", "headers": {"Bad Header": "x"}}, "not a valid header"),
        ({"url": "https://example.com", "headers": {"Webhook-Signature": "x"}}, "set by the"),
        ({"url": "https://example.com", "sign_secret_env": "whsec_abc+/="}, "sign_secret_env"),
        (
            {"url": "https://example.com", "headers_from_env": {"X-Token": "a b"}},
            "not an environment variable name",
        ),
        ({"url": "https://example.com", "timeout": 0}, "timeout: Input should be greater"),
        ({}, "url: Field required"),
    ],
)
def test_bad_config_is_refused_when_the_route_is_saved(add_route, config, reason):
    with pytest.raises(RouteInvalid) as info:
        add_route("fwd", [{"connector": "http", "config": config}])
    assert reason in str(info.value)
    assert "whsec_abc" not in str(info.value)


# --- the private-address guard (HUB_ALLOW_PRIVATE_TARGETS unset) ---


@pytest.fixture
def guarded(monkeypatch):
    monkeypatch.delenv("HUB_ALLOW_PRIVATE_TARGETS")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://[::1]/x",
        "http://10.1.2.3/x",
        "http://192.168.0.10/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/x",
        "http://[::ffff:127.0.0.1]/x",
    ],
)
def test_local_targets_are_refused_when_the_route_is_saved(add_route, guarded, url):
    with pytest.raises(RouteInvalid, match="loopback, private or link-local"):
        add_route("fwd", [{"connector": "http", "config": {"url": url}}])


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001"])
def test_names_that_resolve_to_loopback_are_refused_at_run_time(
    client, key, add_route, receiver, guarded, db, host
):
    # Not IP literals to the save-time check, but every resolved address is checked per call.
    add_route("fwd", [{"connector": "http", "config": {"url": f"http://{host}:{receiver.port}/"}}])
    response = post(client, key, {"n": 1})
    assert response.status_code == 502
    assert response.json["code"] == "forbidden_target"
    assert response.json["error"] == "refusing to connect to a private or local address"
    assert receiver.requests == []
    assert summary(db) == [(0, "http", 1, "permanent", None)]


def test_private_targets_are_allowed_when_the_operator_says_so(
    client, key, add_route, receiver, monkeypatch
):
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")
    forward(add_route, receiver)
    assert post(client, key, {"n": 1}).status_code == 200
    assert len(receiver.requests) == 1
