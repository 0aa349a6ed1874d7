"""Sender authentication through the whole stack: POST /hooks/<route> with provider signatures.

The providers' published examples (GitHub, Slack, Standard Webhooks) go through the real
app, database and verifier; then every refusal path, each auth mode, redaction, and the
secrets' encryption at rest.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import select, text

from hub import create_app, signatures
from hub.secret_key import MissingSecretKey
from hub.store.crypto import SecretBox
from hub.store.models import Event, Route
from tests.procs import ROOT, clean_env
from tests.test_signatures import (
    GITHUB_BODY,
    GITHUB_SECRET,
    GITHUB_SIGNATURE,
    HMAC_OPTIONS,
    OTHER_SECRETS,
    SECRETS,
    SLACK_BODY,
    SLACK_SECRET,
    SLACK_SIGNATURE,
    SLACK_TIMESTAMP,
    SW_BODY,
    SW_ID,
    SW_SECRET,
    SW_SIGNATURE,
    SW_TIMESTAMP,
)
from tests.test_signatures import (
    SCHEMES as SIGNED_SCHEMES,
)

BODY = b'{"text": "signed hello", "id": 7}'
JSON = {"Content-Type": "application/json"}
TIMESTAMPED = ("standard-webhooks", "stripe", "slack")
SHOUT = [{"connector": "text", "config": {"field": "text"}}]


def last_event(db) -> Event:
    with db.session() as session:
        return session.scalars(
            select(Event).order_by(Event.received_at.desc(), Event.id.desc())
        ).first()


def verify_spec(scheme: str, secrets: list[str] | None = None) -> dict:
    return {
        "scheme": scheme,
        "options": HMAC_OPTIONS if scheme == "hmac" else {},
        "secrets": secrets or [SECRETS[scheme]],
    }


def signed(scheme: str, body: bytes = BODY, secret: str | None = None, ts: int | None = None):
    return sign_headers(scheme, body, secret or SECRETS[scheme], ts)


def sign_headers(scheme, body, secret, ts=None) -> dict:
    options = HMAC_OPTIONS if scheme == "hmac" else None
    return signatures.sign(scheme, body=body, secret=secret, timestamp=ts, options=options)


@pytest.fixture
def frozen_clock(monkeypatch):
    """Set the verifier's clock (only the verifier's) to a published example's timestamp."""

    def freeze(ts: float) -> None:
        monkeypatch.setattr(signatures, "time", SimpleNamespace(time=lambda: ts))

    return freeze


# --- the providers' published examples, end to end ---


def test_github_published_example(client, db, add_route):
    add_route("gh", verify=verify_spec("github", [GITHUB_SECRET]))
    # The docs' body is plain text: it passes the signature, then is refused as a payload.
    good = client.post(
        "/hooks/gh",
        data=GITHUB_BODY,
        headers={"X-Hub-Signature-256": GITHUB_SIGNATURE, "Content-Type": "text/plain"},
    )
    assert good.status_code == 415
    assert last_event(db).reason == "unsupported_media_type"
    tampered = client.post(
        "/hooks/gh",
        data=b"Hello, World?",
        headers={"X-Hub-Signature-256": GITHUB_SIGNATURE, "Content-Type": "text/plain"},
    )
    assert tampered.status_code == 401
    assert tampered.json == {"error": "Invalid signature", "code": "bad_signature"}
    event = last_event(db)
    assert (event.status, event.reason, event.response_status) == ("rejected", "bad_signature", 401)
    assert event.last_error == "no signature matched"


def test_github_secret_signs_a_json_delivery(client, db, add_route):
    add_route("gh", SHOUT, verify=verify_spec("github", [GITHUB_SECRET]))
    headers = {**JSON, "X-GitHub-Event": "push", **signed("github", secret=GITHUB_SECRET)}
    response = client.post("/hooks/gh", data=BODY, headers=headers)
    assert response.status_code == 200, response.json
    assert response.json["result"]["processed"] == "SIGNED HELLO"
    event = last_event(db)
    assert event.status == "delivered" and event.key_prefix is None
    assert event.headers["x-hub-signature-256"] == "[redacted]"
    assert GITHUB_SIGNATURE.split("=")[1] not in json.dumps(event.headers)


def test_slack_published_example(client, db, add_route, frozen_clock):
    add_route("slack", verify=verify_spec("slack", [SLACK_SECRET]))
    headers = {
        "X-Slack-Request-Timestamp": str(SLACK_TIMESTAMP),
        "X-Slack-Signature": SLACK_SIGNATURE,
        "Content-Type": "application/x-www-form-urlencoded",
    }
    # Today the example is years old: a replay.
    stale = client.post("/hooks/slack", data=SLACK_BODY, headers=headers)
    assert stale.status_code == 401
    assert stale.json == {"error": "Invalid signature", "code": "stale_signature"}
    assert last_event(db).reason == "stale_signature"
    # At the moment Slack's docs signed it, it verifies.
    frozen_clock(SLACK_TIMESTAMP + 10)
    fresh = client.post("/hooks/slack", data=SLACK_BODY, headers=headers)
    assert fresh.status_code == 200, fresh.json
    event = last_event(db)
    assert event.status == "delivered"
    assert event.body == SLACK_BODY  # the raw bytes that were verified are the ones kept
    assert event.headers["x-slack-signature"] == "[redacted]"


def test_standard_webhooks_published_example(client, db, add_route, frozen_clock):
    add_route("sw", verify=verify_spec("standard-webhooks", [SW_SECRET]))
    headers = {
        **JSON,
        "webhook-id": SW_ID,
        "webhook-timestamp": str(SW_TIMESTAMP),
        "webhook-signature": SW_SIGNATURE,
    }
    frozen_clock(SW_TIMESTAMP)
    assert client.post("/hooks/sw", data=SW_BODY, headers=headers).status_code == 200
    assert client.post("/hooks/sw", data=SW_BODY + b" ", headers=headers).status_code == 401
    frozen_clock(SW_TIMESTAMP + 301)
    late = client.post("/hooks/sw", data=SW_BODY, headers=headers)
    assert (late.status_code, late.json["code"]) == (401, "stale_signature")


# --- every scheme: accepted, and each way of failing ---


@pytest.mark.parametrize("scheme", SIGNED_SCHEMES)
def test_every_scheme_accepts_a_good_signature(client, db, add_route, scheme):
    add_route("in", SHOUT, verify=verify_spec(scheme))
    response = client.post("/hooks/in", data=BODY, headers={**JSON, **signed(scheme)})
    assert response.status_code == 200, response.json
    assert last_event(db).status == "delivered"


def _tampered(scheme):
    return BODY.replace(b"hello", b"HELLO"), signed(scheme)


def _wrong_secret(scheme):
    return BODY, signed(scheme, secret=OTHER_SECRETS[scheme])


def _missing_headers(scheme):
    return BODY, {}


def _signature_header_only_missing(scheme):
    headers = signed(scheme)
    for name in signatures.signature_headers(scheme, HMAC_OPTIONS if scheme == "hmac" else None):
        headers = {k: v for k, v in headers.items() if k.lower() != name}
    return BODY, headers


FAILURES = {
    "tampered body": (_tampered, "no signature matched"),
    "wrong secret": (_wrong_secret, "no signature matched"),
    "no headers": (_missing_headers, "missing header"),
    "no signature header": (_signature_header_only_missing, "missing header"),
}


@pytest.mark.parametrize("scheme", SIGNED_SCHEMES)
@pytest.mark.parametrize("failure", FAILURES)
def test_every_scheme_refuses_and_says_nothing_more(client, db, add_route, scheme, failure):
    add_route("in", SHOUT, verify=verify_spec(scheme))
    make, cause = FAILURES[failure]
    body, headers = make(scheme)
    response = client.post("/hooks/in", data=body, headers={**JSON, **headers})
    assert response.status_code == 401
    assert response.json == {"error": "Invalid signature", "code": "bad_signature"}
    event = last_event(db)
    assert (event.status, event.reason) == ("rejected", "bad_signature")
    assert cause in event.last_error
    assert SECRETS[scheme] not in event.last_error


@pytest.mark.parametrize("scheme", TIMESTAMPED)
# -301 stays stale however long the request takes; a future stamp nears the window as the
# clock runs (301 s ahead at one second's end is 300 s ahead an instant later), so 330.
@pytest.mark.parametrize("offset", [-301, 330, -3600, 86400])
def test_stale_and_future_timestamps_are_refused(client, db, add_route, scheme, offset):
    add_route("in", SHOUT, verify=verify_spec(scheme))
    headers = signed(scheme, ts=int(time.time()) + offset)
    response = client.post("/hooks/in", data=BODY, headers={**JSON, **headers})
    assert response.status_code == 401
    assert response.json == {"error": "Invalid signature", "code": "stale_signature"}
    assert last_event(db).reason == "stale_signature"


@pytest.mark.parametrize("scheme", TIMESTAMPED)
def test_tolerance_is_configurable_per_route(client, add_route, scheme):
    spec = {**verify_spec(scheme), "options": {"tolerance": 900}}
    add_route("in", SHOUT, verify=spec)
    headers = signed(scheme, ts=int(time.time()) - 600)
    assert client.post("/hooks/in", data=BODY, headers={**JSON, **headers}).status_code == 200
    headers = signed(scheme, ts=int(time.time()) - 1000)
    assert client.post("/hooks/in", data=BODY, headers={**JSON, **headers}).status_code == 401


def test_several_signatures_in_one_header(client, add_route):
    now = int(time.time())
    add_route("sw", SHOUT, verify=verify_spec("standard-webhooks"))
    good = signed("standard-webhooks", ts=now)
    other = signed("standard-webhooks", secret=OTHER_SECRETS["standard-webhooks"], ts=now)
    headers = {
        **good,
        "webhook-id": good["webhook-id"],
        "webhook-signature": f"v1a,Zm9v {other['webhook-signature']} {good['webhook-signature']}",
    }
    assert client.post("/hooks/sw", data=BODY, headers={**JSON, **headers}).status_code == 200
    headers["webhook-signature"] = other["webhook-signature"] + " v1,bm90LWl0"
    assert client.post("/hooks/sw", data=BODY, headers={**JSON, **headers}).status_code == 401

    add_route("stripe", SHOUT, verify=verify_spec("stripe"))
    good = signed("stripe", ts=now)["Stripe-Signature"]
    t, v1 = good.split(",")
    wrong = "v1=" + "0" * 64
    both = {"Stripe-Signature": f"{t},{wrong},{v1},v0=abc"}
    assert client.post("/hooks/stripe", data=BODY, headers={**JSON, **both}).status_code == 200
    only_wrong = {"Stripe-Signature": f"{t},{wrong}"}
    assert (
        client.post("/hooks/stripe", data=BODY, headers={**JSON, **only_wrong}).status_code == 401
    )


def test_a_custom_hmac_header_is_redacted_in_the_event(client, db, add_route):
    options = {"header": "X-Checksum", "algorithm": "sha512", "encoding": "base64"}
    add_route("in", SHOUT, verify={"scheme": "hmac", "options": options, "secrets": ["k" * 20]})
    headers = signatures.sign("hmac", body=BODY, secret="k" * 20, options=options)
    response = client.post("/hooks/in", data=BODY, headers={**JSON, **headers})
    assert response.status_code == 200, response.json
    stored = last_event(db).headers
    assert stored["x-checksum"] == "[redacted]"
    assert headers["X-Checksum"] not in json.dumps(stored)
    # Refused requests are redacted the same way.
    client.post("/hooks/in", data=b"{}", headers={**JSON, **headers})
    assert last_event(db).headers["x-checksum"] == "[redacted]"


# --- auth modes ---

SIG, KEY = "signature", "key"
MODES = {
    # mode: {what is presented: expected status}
    "key": {(): 401, (KEY,): 200, (SIG,): 401, (KEY, SIG): 200},
    "signature": {(): 401, (KEY,): 401, (SIG,): 200, (KEY, SIG): 200},
    "key+signature": {(): 401, (KEY,): 401, (SIG,): 401, (KEY, SIG): 200},
    "key|signature": {(): 401, (KEY,): 200, (SIG,): 200, (KEY, SIG): 200},
}


@pytest.mark.parametrize("mode", MODES)
def test_auth_modes(client, db, add_route, key, mode):
    verify = None if mode == "key" else verify_spec("github")
    add_route("in", SHOUT, auth=mode, verify=verify)
    for presented, status in MODES[mode].items():
        headers = dict(JSON)
        if KEY in presented:
            headers["X-API-Key"] = key
        if SIG in presented:
            headers.update(signed("github"))
        response = client.post("/hooks/in", data=BODY, headers=headers)
        assert response.status_code == status, (mode, presented, response.json)
        event = last_event(db)
        if status == 200 and KEY in presented and mode != "signature":
            assert event.key_prefix == key.split("_")[1]


def test_key_and_signature_refusals_keep_their_own_reason(client, db, add_route, key):
    add_route("both", SHOUT, auth="key+signature", verify=verify_spec("github"))
    client.post("/hooks/both", data=BODY, headers={**JSON, **signed("github")})
    assert last_event(db).reason == "unauthorized"
    client.post("/hooks/both", data=BODY, headers={**JSON, "X-API-Key": key})
    assert last_event(db).reason == "bad_signature"

    add_route("either", SHOUT, auth="key|signature", verify=verify_spec("github"))
    client.post("/hooks/either", data=BODY, headers=JSON)
    assert last_event(db).reason == "bad_signature"
    bad_key = "hk_00000000_" + "a" * 43
    client.post("/hooks/either", data=BODY, headers={**JSON, "X-API-Key": bad_key})
    assert last_event(db).reason == "unauthorized"


def test_a_valid_signature_does_not_excuse_a_key_without_scope(client, db, add_route, make_key):
    add_route("both", SHOUT, auth="key+signature", verify=verify_spec("github"))
    other = make_key(scopes=["elsewhere"])
    headers = {**JSON, **signed("github"), "X-API-Key": other}
    assert client.post("/hooks/both", data=BODY, headers=headers).status_code == 403


# --- secrets at rest ---


def test_secrets_are_encrypted_at_rest(app, db, add_route):
    secret = SECRETS["stripe"]
    add_route("st", verify=verify_spec("stripe", [secret, OTHER_SECRETS["stripe"]]))
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM routes WHERE name = 'st'")).mappings().one()
    raw = json.dumps(dict(row), default=str)
    assert secret not in raw and OTHER_SECRETS["stripe"] not in raw
    assert "secret" not in row["secrets_encrypted"]
    box = SecretBox(app.config["SECRET_KEY"])
    assert box.open(row["secrets_encrypted"]) == [secret, OTHER_SECRETS["stripe"]]
    assert SecretBox("another key").seal([secret]) != row["secrets_encrypted"]


def test_a_changed_secret_key_is_a_clear_error_that_leaks_nothing(
    app, db, add_route, database_url_for_test, caplog
):
    add_route("gh", SHOUT, verify=verify_spec("github"))
    other = create_app(
        {"TESTING": True, "DATABASE_URL": database_url_for_test, "SECRET_KEY": "a-new-key"}
    )
    try:
        with caplog.at_level(logging.INFO, logger="hub"):
            response = other.test_client().post(
                "/hooks/gh", data=BODY, headers={**JSON, **signed("github")}
            )
        assert response.status_code == 500
        assert response.json == {"error": "Server error", "code": "internal_error"}
        event = last_event(db)
        assert (event.status, event.reason) == ("rejected", "secrets_unreadable")
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("HUB_SECRET_KEY" in m for m in errors)
        assert SECRETS["github"] not in caplog.text
        result = other.test_cli_runner().invoke(args=["routes", "show", "gh"])
        assert json.loads(result.output)["verify"]["secrets"] == "[unreadable]"
    finally:
        other.extensions["hub.db"].dispose()


def test_production_without_secret_key_refuses_to_start(database_url_for_test, monkeypatch):
    monkeypatch.delenv("HUB_SECRET_KEY", raising=False)
    with pytest.raises(MissingSecretKey, match="HUB_SECRET_KEY is not set"):
        create_app({"ENV": "production", "DATABASE_URL": database_url_for_test})
    env = clean_env(HUB_ENV="production", HUB_DATABASE_URL=database_url_for_test)
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "hub", "routes", "list"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "HUB_SECRET_KEY is not set" in done.stderr


def test_development_makes_a_secret_key_once_under_instance(tmp_path, monkeypatch):
    monkeypatch.delenv("HUB_SECRET_KEY", raising=False)
    from hub import secret_key

    app = SimpleNamespace(config={}, instance_path=str(tmp_path))
    secret_key.init_app(app)
    first = app.config["SECRET_KEY"]
    assert len(first) >= 40 and (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    again = SimpleNamespace(config={}, instance_path=str(tmp_path))
    secret_key.init_app(again)
    assert again.config["SECRET_KEY"] == first


# --- what a route may be saved with ---

INVALID = [
    ({"auth": "signature"}, "auth: 'signature' needs a signature verifier"),
    ({"auth": "key", "verify": verify_spec("github")}, "auth: 'key' ignores the verifier"),
    ({"verify": {"scheme": "telepathy", "secrets": ["x"]}}, "verify.scheme: Unknown signature"),
    (
        {"verify": {"scheme": "slack", "options": {"tolerance": 0}, "secrets": ["x"]}},
        "verify.options: Option 'tolerance'",
    ),
    ({"verify": {"scheme": "hmac", "secrets": ["x"]}}, "verify.options: Scheme 'hmac' needs"),
    (
        {"verify": {"scheme": "standard-webhooks", "secrets": ["whsec_%%%not-base64"]}},
        "verify.secrets[0]: A Standard Webhooks secret",
    ),
    ({"verify": {"scheme": "github", "secrets": []}}, "verify.secrets: a verifier needs"),
    ({"verify": {"scheme": "github", "secrets": [""]}}, "verify.secrets[0]: A secret must not"),
    ({"verify": {"scheme": "github", "secrets": ["whsec_…abcd"]}}, "masked secret"),
    ({"rate_limit": "lots"}, "rate_limit: not a rate"),
    ({"rate_limit": "0/minute"}, "rate_limit: not a rate"),
    ({"auth": "password"}, "auth: Input should be"),
]


@pytest.mark.parametrize("fields, message", INVALID)
def test_invalid_auth_settings_are_refused_naming_the_field(app, db, add_route, fields, message):
    from hub.services.routes import RouteInvalid

    with pytest.raises(RouteInvalid) as caught:
        add_route("bad", **fields)
    assert message in str(caught.value)
    assert "%%%not-base64" not in str(caught.value)
    with db.session() as session:
        assert session.scalar(select(Route)) is None


def test_slack_url_verification_is_answered_with_its_challenge(client, db, add_route, receiver):
    add_route(
        "slack-events",
        [{"connector": "http", "config": {"url": receiver.url}}],
        verify=verify_spec("slack"),
    )
    body = json.dumps(
        {
            "token": "t",
            "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",
            "type": "url_verification",
        }
    ).encode()
    response = client.post(
        "/hooks/slack-events",
        data=body,
        headers={
            **sign_headers("slack", body, SECRETS["slack"]),
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 200
    assert response.json == {"challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"}
    assert last_event(db).status == "delivered"
    assert receiver.requests == []  # a handshake, not an event for the pipeline

    forged = client.post(
        "/hooks/slack-events", data=body, headers={"Content-Type": "application/json"}
    )
    assert forged.status_code == 401
