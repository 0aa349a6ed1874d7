"""The providers that need code or a handshake: Twilio (the URL it called), SendGrid (ECDSA
P-256), Discord (Ed25519 and its PING), Twitch EventSub (RFC 3339 time, its verification
challenge), Zoom (url_validation), Dropbox and Meta (GET handshakes), Postmark (basic auth),
and Standard Webhooks v1a keys fetched from a JWKS URL. Each is signed by the sender's own SDK
where it has one (twilio, sendgrid's verifier, PyNaCl: test-only), else by the rule its docs
give (linked in its declaration), never by the hub's own signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode

import nacl.encoding
import nacl.signing
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sendgrid.helpers.eventwebhook import EventWebhook
from twilio.request_validator import RequestValidator

from hub import providers, signatures
from hub.signatures import SignatureError, StaleSignatureError
from tests.rows import events

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TWILIO_URL = "https://hooks.example.com/hooks/in"
BODY = b'{"text": "signed hello", "id": 7}'
PM_PASS = b"hooks:s3cr3t-pass"
TWILIO_FORM = {"From": "+14158675310", "Body": "signed hello", "MessageSid": "SM1"}


def _hmac_hex(secret: str, message: bytes, algo=hashlib.sha256) -> str:
    return hmac.new(secret.encode(), message, algo).hexdigest()


def rfc3339(ts: float) -> str:
    """Twitch's timestamps: RFC 3339 with nanoseconds."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def ecdsa_pair() -> tuple[ec.EllipticCurvePrivateKey, str]:
    private = ec.generate_private_key(ec.SECP256R1())
    der = private.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return private, base64.b64encode(der).decode()


def nacl_pair() -> tuple[nacl.signing.SigningKey, str]:
    key = nacl.signing.SigningKey.generate()
    return key, key.verify_key.encode(nacl.encoding.HexEncoder).decode()


SENDGRID_KEY, SENDGRID_PUBLIC = ecdsa_pair()
SENDGRID_OTHER, SENDGRID_OTHER_PUBLIC = ecdsa_pair()
DISCORD_KEY, DISCORD_PUBLIC = nacl_pair()
DISCORD_OTHER, DISCORD_OTHER_PUBLIC = nacl_pair()


class Sender:
    """One provider as its sender: the route's secret, a stranger's, its body, and the
    headers it signs a request with."""

    def __init__(self, name, secret, other, body, content_type, options=None, stamped=False):
        self.name, self.secret, self.other = name, secret, other
        self.body, self.content_type = body, content_type
        self.options = options or {}
        self.stamped = stamped

    def headers(self, body: bytes, secret: str, ts: float, delivery: str = "d-1") -> dict:
        return {**self.content_type, **SIGNERS[self.name](body, secret, ts, delivery)}


def _private_for(public: str):
    return {
        SENDGRID_PUBLIC: SENDGRID_KEY,
        SENDGRID_OTHER_PUBLIC: SENDGRID_OTHER,
        DISCORD_PUBLIC: DISCORD_KEY,
        DISCORD_OTHER_PUBLIC: DISCORD_OTHER,
    }[public]


def sign_twilio(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    # Twilio's own SDK: the URL, then each POST field sorted by name.
    from urllib.parse import parse_qsl

    params = dict(parse_qsl(TWILIO_FORM_BODY.decode()))
    signature = RequestValidator(secret).compute_signature(TWILIO_URL, params)
    return {"X-Twilio-Signature": signature, "I-Twilio-Idempotency-Token": delivery}


def sign_twilio_json(body: bytes, secret: str) -> tuple[str, dict]:
    """Twilio's JSON bodies (its SDK again): the body's SHA-256 in the URL's bodySHA256
    parameter, and the URL alone signed. The URL it called, and the headers."""
    url = f"{TWILIO_URL}?bodySHA256={hashlib.sha256(body).hexdigest()}"
    return url, {"X-Twilio-Signature": RequestValidator(secret).compute_signature(url, {})}


def sign_sendgrid(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    stamp = str(int(ts))
    signature = _private_for(secret).sign(stamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": stamp,
    }


def sign_discord(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    stamp = str(int(ts))
    signed = _private_for(secret).sign(stamp.encode() + body)
    return {"X-Signature-Ed25519": signed.signature.hex(), "X-Signature-Timestamp": stamp}


def sign_twitch(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    # https://dev.twitch.tv/docs/eventsub/handling-webhook-events/#verifying-the-event-message
    stamp = rfc3339(ts)
    digest = _hmac_hex(secret, delivery.encode() + stamp.encode() + body)
    return {
        "Twitch-Eventsub-Message-Id": delivery,
        "Twitch-Eventsub-Message-Timestamp": stamp,
        "Twitch-Eventsub-Message-Signature": "sha256=" + digest,
        "Twitch-Eventsub-Message-Type": "notification",
    }


def sign_zoom(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    # https://developers.zoom.us/docs/api/webhooks/#verify-webhook-events
    stamp = str(int(ts))
    digest = _hmac_hex(secret, f"v0:{stamp}:".encode() + body)
    return {"x-zm-request-timestamp": stamp, "x-zm-signature": "v0=" + digest}


def sign_dropbox(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    return {"X-Dropbox-Signature": _hmac_hex(secret, body)}


def sign_meta(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    return {"X-Hub-Signature-256": "sha256=" + _hmac_hex(secret, body)}


def sign_postmark(body: bytes, secret: str, ts: float, delivery: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(secret.encode()).decode()}


SIGNERS = {
    "twilio": sign_twilio,
    "sendgrid": sign_sendgrid,
    "discord": sign_discord,
    "twitch": sign_twitch,
    "zoom": sign_zoom,
    "dropbox": sign_dropbox,
    "meta": sign_meta,
    "postmark": sign_postmark,
}
TWILIO_FORM_BODY = urlencode(TWILIO_FORM).encode()
SENDERS = {
    s.name: s
    for s in (
        Sender("twilio", "twilio-auth-token", "other-auth-token", TWILIO_FORM_BODY, FORM,
               {"url": TWILIO_URL}),
        Sender("sendgrid", SENDGRID_PUBLIC, SENDGRID_OTHER_PUBLIC,
               b'[{"event": "delivered", "sg_event_id": "e1"}]', JSON, stamped=True),
        Sender("discord", DISCORD_PUBLIC, DISCORD_OTHER_PUBLIC,
               b'{"type": 2, "data": {"name": "hello"}}', JSON, stamped=True),
        Sender("twitch", "twitch-secret-0123", "another-twitch-secret", BODY, JSON, stamped=True),
        Sender("zoom", "zoom-secret-token", "other-zoom-token", BODY, JSON, stamped=True),
        Sender("dropbox", "dropbox-app-secret", "other-app-secret", BODY, JSON),
        Sender("meta", "meta-app-secret", "other-meta-secret", BODY, JSON,
               {"verify_token": "my-verify-token"}),
        Sender("postmark", "hooks:s3cr3t-pass", "hooks:wrong-pass", BODY, JSON),
    )
}  # fmt: skip
NAMES = tuple(SENDERS)


def route_for(add_route, name: str, route: str = "in", steps=None, **fields):
    sender = SENDERS[name]
    add_route(
        route,
        steps or [],
        verify={"scheme": name, "secrets": [sender.secret], "options": sender.options},
        **fields,
    )


def post(client, sender: Sender, headers: dict, body: bytes | None = None, route: str = "in"):
    return client.post(
        f"/hooks/{route}", data=sender.body if body is None else body, headers=headers
    )


def last_event(db):
    return events(db)[-1]


# --- the declarations are built-ins, listed with the others ---


def test_the_providers_with_code_or_a_handshake_are_built_in():
    assert set(NAMES) <= set(providers.BUILTIN_PROVIDERS)
    assert {n: providers.get(n).challenge for n in NAMES if providers.get(n).challenge} == {
        "discord": "discord-ping",
        "twitch": "twitch-verification",
        "zoom": "zoom-url-validation",
        "dropbox": "dropbox-challenge",
        "meta": "meta-verify-token",
    }


# --- every provider, end to end, on both databases ---


@pytest.mark.parametrize("name", NAMES)
def test_each_provider_accepts_its_sender_and_redacts_the_signature(client, db, add_route, name):
    sender = SENDERS[name]
    route_for(add_route, name)
    headers = sender.headers(sender.body, sender.secret, time.time())
    response = post(client, sender, headers)
    assert response.status_code == 200, response.json
    assert response.json["status"] == "delivered"
    stored = last_event(db)
    for header in providers.get(name).signature_headers:
        assert stored.headers[header.lower()] == "[redacted]"
        assert headers[header] not in json.dumps(stored.headers)


@pytest.mark.parametrize("name", NAMES)
def test_each_provider_refuses_a_tampered_body_and_a_stranger_s_secret(client, db, add_route, name):
    sender = SENDERS[name]
    route_for(add_route, name)
    now = time.time()
    tampered = sender.body.replace(b"hello", b"HELLO").replace(b"delivered", b"bounce")
    assert tampered != sender.body
    tries = [(sender.body, sender.headers(sender.body, sender.other, now))]
    if name != "postmark":  # Postmark signs nothing: its password does not cover the body
        tries.append((tampered, sender.headers(sender.body, sender.secret, now)))
    for body, headers in tries:
        response = post(client, sender, headers, body)
        assert response.status_code == 401, name
        assert response.json == {"error": "Invalid signature", "code": "bad_signature"}
    assert [e.status for e in events(db)] == ["rejected"] * len(tries)


@pytest.mark.parametrize("name", [n for n in NAMES if SENDERS[n].stamped])
def test_each_timestamped_provider_refuses_a_stale_signature(client, add_route, name):
    sender = SENDERS[name]
    route_for(add_route, name)
    tolerance = providers.get(name).timestamp.tolerance
    headers = sender.headers(sender.body, sender.secret, time.time() - tolerance - 5)
    response = post(client, sender, headers)
    assert (response.status_code, response.json["code"]) == (401, "stale_signature")


def test_the_timestamped_ones_and_their_windows():
    windows = {n: providers.get(n).timestamp.tolerance for n in NAMES if providers.get(n).timestamp}
    assert windows == {"sendgrid": 300, "discord": 300, "twitch": 600, "zoom": 300}


@pytest.mark.parametrize("name", ["twilio", "twitch"])
def test_each_provider_with_a_delivery_id_dedups_by_it(client, db, add_route, name):
    sender = SENDERS[name]
    route_for(add_route, name, dedup_window=3600)

    def send(delivery: str) -> dict:
        response = post(
            client, sender, sender.headers(sender.body, sender.secret, time.time(), delivery)
        )
        assert response.status_code == 200, response.json
        return response.json

    first = send("delivery-1")
    assert send("delivery-1") == {"id": first["id"], "duplicate": True}
    assert send("delivery-2")["status"] == "delivered"
    assert [e.dedup_key for e in events(db)] == ["delivery-1", "delivery-1", "delivery-2"]


# --- Twilio: the URL it called, as the operator told the hub ---


def test_twilio_s_sdk_signature_verifies_a_form_and_a_json_body():
    token = "twilio-auth-token"
    validator = RequestValidator(token)
    params = {"Body": "b", "From": "+1", "To": "+2"}
    headers = {"X-Twilio-Signature": validator.compute_signature(TWILIO_URL + "?x=1", params)}
    signatures.verify(
        "twilio", body=urlencode(params).encode(), headers=headers, secrets=[token],
        url=TWILIO_URL + "?x=1",
    )  # fmt: skip
    # A JSON body: its SHA-256 in the URL's bodySHA256, the URL alone signed.
    body = b'{"event": "x"}'
    url, headers = sign_twilio_json(body, token)
    signatures.verify("twilio", body=body, headers=headers, secrets=[token], url=url)
    with pytest.raises(SignatureError) as refused:
        signatures.verify("twilio", body=body + b" ", headers=headers, secrets=[token], url=url)
    assert "bodySHA256" in refused.value.reason


def test_twilio_is_checked_against_the_hub_s_public_url_when_the_route_names_none(
    app, client, db, add_route
):
    app.config["PUBLIC_URL"] = "https://public.example.org/"
    add_route("tw", [], verify={"scheme": "twilio", "secrets": ["tok"]})
    url = "https://public.example.org/hooks/tw?From=x"
    signature = RequestValidator("tok").compute_signature(url, TWILIO_FORM)
    ok = client.post(
        "/hooks/tw?From=x",
        data=TWILIO_FORM_BODY,
        headers={**FORM, "X-Twilio-Signature": signature},
    )
    assert ok.status_code == 200, ok.json
    # The Host and X-Forwarded-* headers are the sender's: they never move the URL.
    forged_url = "https://evil.example/hooks/tw?From=x"
    forged = client.post(
        "/hooks/tw?From=x",
        data=TWILIO_FORM_BODY,
        base_url="https://evil.example",
        headers={
            **FORM,
            "X-Forwarded-Host": "evil.example",
            "X-Forwarded-Proto": "https",
            "X-Twilio-Signature": RequestValidator("tok").compute_signature(
                forged_url, TWILIO_FORM
            ),
        },
    )
    assert forged.status_code == 401


def test_a_twilio_route_without_a_public_url_is_a_clear_server_error(client, db, add_route, caplog):
    add_route("tw", [], verify={"scheme": "twilio", "secrets": ["tok"]})
    signature = RequestValidator("tok").compute_signature("http://localhost/hooks/tw", TWILIO_FORM)
    response = client.post(
        "/hooks/tw", data=TWILIO_FORM_BODY, headers={**FORM, "X-Twilio-Signature": signature}
    )
    assert (response.status_code, response.json["code"]) == (500, "internal_error")
    assert "set the route's verify option url or HUB_PUBLIC_URL" in last_event(db).last_error
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"url": "ftp://x.example/hooks/tw"}, r"an http\(s\) URL"),
        ({"url": "https://x.example/hooks/tw?a=1"}, "without a query"),
        ({"verify_token": "t"}, "Unknown option"),
    ],
)
def test_a_bad_twilio_url_option_is_refused_when_the_route_is_saved(options, message):
    with pytest.raises(ValueError, match=message):
        signatures.validate_options("twilio", options)


# --- SendGrid: ECDSA P-256, the SDK's verifier agrees ---


def test_sendgrid_s_verifier_and_the_hub_accept_the_same_signature():
    body = '[{"event": "processed"}]'
    headers = sign_sendgrid(body.encode(), SENDGRID_PUBLIC, time.time(), "")
    signature = headers["X-Twilio-Email-Event-Webhook-Signature"]
    stamp = headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    sdk = EventWebhook(SENDGRID_PUBLIC)
    assert sdk.verify_signature(body, signature, stamp) is True
    assert (
        signatures.verify(
            "sendgrid", body=body.encode(), headers=headers, secrets=[SENDGRID_PUBLIC]
        )
        == SENDGRID_PUBLIC
    )
    assert sdk.verify_signature(body + " ", signature, stamp) is False
    with pytest.raises(SignatureError):
        signatures.verify(
            "sendgrid", body=body.encode() + b" ", headers=headers, secrets=[SENDGRID_PUBLIC]
        )


@pytest.mark.parametrize(
    "secret",
    [
        "not base64 at all!",
        base64.b64encode(b"\x30\x03junk").decode(),
        # An Ed25519 key in DER: a public key, but not P-256.
        base64.b64encode(
            Ed25519PrivateKey.generate()
            .public_key()
            .public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        ).decode(),
    ],
    # Named, not shown: a key made at collection differs between test processes.
    ids=["not base64", "not a key", "an Ed25519 key"],
)
def test_a_sendgrid_key_that_cannot_verify_is_refused_when_the_route_is_saved(secret):
    with pytest.raises(ValueError, match="verification key|P-256"):
        signatures.validate_secret("sendgrid", secret)


# --- handshakes ---


def test_discord_s_ping_is_answered_pong_once_verified_and_never_run(
    client, db, add_route, receiver
):
    sender = SENDERS["discord"]
    route_for(add_route, "discord", steps=[{"connector": "http", "config": {"url": receiver.url}}])
    ping = b'{"type": 1, "id": "p1", "application_id": "a"}'
    response = post(client, sender, sender.headers(ping, sender.secret, time.time()), ping)
    assert response.status_code == 200 and response.is_json
    assert response.json == {"type": 1}
    assert last_event(db).status == "delivered" and receiver.requests == []
    # A PING signed by another key, or unsigned, is refused, not answered.
    stranger = post(client, sender, sender.headers(ping, sender.other, time.time()), ping)
    unsigned = post(client, sender, JSON, ping)
    assert (stranger.status_code, unsigned.status_code) == (401, 401)
    assert receiver.requests == []


def test_twitch_s_verification_is_answered_with_its_challenge_as_text(
    client, db, add_route, receiver
):
    sender = SENDERS["twitch"]
    route_for(add_route, "twitch", steps=[{"connector": "http", "config": {"url": receiver.url}}])
    body = json.dumps(
        {
            "challenge": "pogchamp-kappa-360noscope-vohiyo",
            "subscription": {"id": "f1c2", "status": "webhook_callback_verification_pending"},
        }
    ).encode()
    headers = {
        **sender.headers(body, sender.secret, time.time(), "m-1"),
        "Twitch-Eventsub-Message-Type": "webhook_callback_verification",
    }
    response = post(client, sender, headers, body)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "pogchamp-kappa-360noscope-vohiyo"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert receiver.requests == []
    forged = {**headers, **sign_twitch(body, sender.other, time.time(), "m-2")}
    forged["Twitch-Eventsub-Message-Type"] = "webhook_callback_verification"
    assert post(client, sender, forged, body).status_code == 401
    # A revocation is an event like any other.
    revoked = {
        **sender.headers(b'{"subscription": {"status": "authorization_revoked"}}', sender.secret,
                         time.time(), "m-3"),
        "Twitch-Eventsub-Message-Type": "revocation",
    }  # fmt: skip
    answer = post(client, sender, revoked, b'{"subscription": {"status": "authorization_revoked"}}')
    assert answer.status_code == 200 and answer.json["status"] == "delivered"
    assert len(receiver.requests) == 1


def test_zoom_s_url_validation_is_answered_with_the_token_s_hmac(client, db, add_route, receiver):
    sender = SENDERS["zoom"]
    route_for(add_route, "zoom", steps=[{"connector": "http", "config": {"url": receiver.url}}])
    body = json.dumps(
        {
            "payload": {"plainToken": "qgg8vlvZRS6UYooatFL8Aw"},
            "event_ts": 1,
            "event": "endpoint.url_validation",
        }
    ).encode()
    response = post(client, sender, sender.headers(body, sender.secret, time.time()), body)
    assert response.status_code == 200, response.json
    expected = hmac.new(b"zoom-secret-token", b"qgg8vlvZRS6UYooatFL8Aw", hashlib.sha256).hexdigest()
    assert response.json == {"plainToken": "qgg8vlvZRS6UYooatFL8Aw", "encryptedToken": expected}
    assert receiver.requests == []
    forged = post(client, sender, sender.headers(body, sender.other, time.time()), body)
    assert forged.status_code == 401


def test_dropbox_s_get_challenge_is_echoed_as_text_on_a_dropbox_route_only(client, db, add_route):
    route_for(add_route, "dropbox")
    add_route("gh", [], verify={"scheme": "github", "secrets": ["s"]})
    response = client.get("/hooks/in?challenge=Wj9Ns1jR5Do")
    assert response.status_code == 200
    assert (response.mimetype, response.get_data(as_text=True)) == ("text/plain", "Wj9Ns1jR5Do")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    stored = last_event(db)
    assert (stored.method, stored.status, stored.result) == ("GET", "delivered", "Wj9Ns1jR5Do")
    # Another provider's route, a route that does not exist, a GET with no challenge: the
    # same 405 as before handshakes existed; nothing tells them apart.
    answers = [
        client.get(path)
        for path in ("/hooks/gh?challenge=x", "/hooks/nope?challenge=x", "/hooks/in")
    ]
    assert {(a.status_code, a.json["code"], a.headers["Allow"]) for a in answers} == {
        (405, "method_not_allowed", "POST")
    }


def test_a_challenge_longer_than_the_limit_is_refused_and_the_limit_is_a_setting(
    app, client, add_route
):
    route_for(add_route, "dropbox")
    assert client.get("/hooks/in?challenge=" + "x" * 512).status_code == 200
    too_long = client.get("/hooks/in?challenge=" + "x" * 513)
    assert (too_long.status_code, too_long.json["code"]) == (400, "challenge_too_long")
    app.config["MAX_CHALLENGE_BYTES"] = 8
    assert client.get("/hooks/in?challenge=123456789").status_code == 400


def test_a_get_handshake_spends_the_route_s_rate_limit(client, add_route):
    # Windows are aligned to the clock: a minute's could end between the three.
    route_for(add_route, "dropbox", rate_limit="2/hour")
    codes = [client.get("/hooks/in?challenge=c").status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_meta_s_get_is_answered_only_with_the_route_s_verify_token(client, db, add_route):
    route_for(add_route, "meta")
    good = client.get(
        "/hooks/in?hub.mode=subscribe&hub.verify_token=my-verify-token&hub.challenge=1158201444"
    )
    assert (good.status_code, good.get_data(as_text=True)) == (200, "1158201444")
    assert good.mimetype == "text/plain"
    assert "my-verify-token" not in (last_event(db).query or "")
    bad = client.get("/hooks/in?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1")
    assert bad.status_code == 403
    assert bad.json == {
        "error": "hub.verify_token is not this route's verify token",
        "code": "bad_verify_token",
    }
    assert last_event(db).status == "rejected"
    other_mode = client.get("/hooks/in?hub.mode=unsubscribe&hub.verify_token=my-verify-token")
    assert other_mode.status_code == 405


def test_the_verify_token_is_compared_in_constant_time(client, add_route, compared):
    route_for(add_route, "meta")
    client.get("/hooks/in?hub.mode=subscribe&hub.verify_token=guess&hub.challenge=1")
    assert (b"guess", b"my-verify-token", False) in compared


# --- nothing the sender sends turns verification off or picks another key kind ---


def test_no_sender_header_switches_verification_off_or_picks_another_key_kind(
    client, db, add_route
):
    route_for(add_route, "discord", route="dc")
    route_for(add_route, "postmark", route="pm")
    add_route(
        "tw", [], verify={"scheme": "twilio", "secrets": ["tok"], "options": {"url": TWILIO_URL}}
    )
    now = str(int(time.time()))
    attempts = [
        # Discord: an HMAC with the public key as its secret, a base64 signature, an empty one.
        ("dc", {**JSON, "X-Signature-Timestamp": now,
                "X-Signature-Ed25519": _hmac_hex(DISCORD_PUBLIC, now.encode() + BODY)}),
        ("dc", {**JSON, "X-Signature-Timestamp": now, "X-Signature-Ed25519": ""}),
        ("dc", {**JSON, "X-Signature-Timestamp": now, "X-Signature-Ed25519": "00" * 64,
                "X-Signature-Algorithm": "none"}),
        # Postmark: the right password as a bearer token, or as a header of another name.
        ("pm", {**JSON, "Authorization": "Bearer hooks:s3cr3t-pass"}),
        ("pm", {**JSON, "X-Authorization": "Basic " + base64.b64encode(PM_PASS).decode()}),
        # Twilio: a SHA-256 signature that a settings header claims is the algorithm.
        ("tw", {**FORM, "X-Twilio-Webhooks-Signature-Settings": "key=k,algorithm=HMAC_SHA256",
                "X-Twilio-Signature": RequestValidator("tok").compute_signature(
                    TWILIO_URL, TWILIO_FORM, "HMAC_SHA256")}),
    ]  # fmt: skip
    for route, headers in attempts:
        body = TWILIO_FORM_BODY if route == "tw" else BODY
        response = client.post(f"/hooks/{route}", data=body, headers=headers)
        assert response.status_code == 401, (route, headers)
    assert {e.status for e in events(db)} == {"rejected"}


def test_pure_checks_of_each_key_kind():
    body = b'{"type": 2}'
    stamp = str(int(time.time()))
    discord = sign_discord(body, DISCORD_PUBLIC, time.time(), "")
    assert signatures.verify("discord", body=body, headers=discord, secrets=[DISCORD_PUBLIC])
    with pytest.raises(SignatureError):  # the timestamp is signed too
        signatures.verify(
            "discord",
            body=body,
            headers={**discord, "X-Signature-Timestamp": str(int(stamp) - 1)},
            secrets=[DISCORD_PUBLIC],
        )
    with pytest.raises(ValueError, match="64 hex digits"):
        signatures.validate_secret("discord", "zz" * 32)
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        signatures.validate_secret("postmark", "no-colon")
    twitch = sign_twitch(body, "tw-secret", time.time() - 700, "m")
    with pytest.raises(StaleSignatureError):
        signatures.verify("twitch", body=body, headers=twitch, secrets=["tw-secret"])
    with pytest.raises(SignatureError, match="Invalid signature") as malformed:
        signatures.verify(
            "twitch",
            body=body,
            headers={**twitch, "Twitch-Eventsub-Message-Timestamp": "yesterday"},
            secrets=["tw-secret"],
        )
    assert malformed.value.reason == "malformed timestamp"


def test_the_secret_that_signed_is_the_one_zoom_s_answer_uses(client, add_route):
    sender = SENDERS["zoom"]
    add_route("in", [], verify={"scheme": "zoom", "secrets": ["old-token", sender.secret]})
    body = json.dumps(
        {"payload": {"plainToken": "abc"}, "event": "endpoint.url_validation"}
    ).encode()
    response = post(client, sender, sender.headers(body, sender.secret, time.time()), body)
    assert response.json["encryptedToken"] == _hmac_hex(sender.secret, b"abc")


# --- Standard Webhooks v1a keys from a JWKS URL ---


class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JSON Web Key Set, counting its requests."""

    def __init__(self):
        self.keys: list[dict] = []
        self.requests = 0
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                server.requests += 1
                payload = json.dumps({"keys": server.keys}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, private: Ed25519PrivateKey, kid: str) -> None:
        raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        self.keys.append({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "use": "sig"})

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def jwks():
    signatures.JWKS.clear()
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()
        signatures.JWKS.clear()


def v1a(private: Ed25519PrivateKey, body: bytes, msg_id: str = "msg_1", ts=None) -> dict:
    ts = int(time.time()) if ts is None else ts
    signature = private.sign(f"{msg_id}.{ts}.".encode() + body)
    return {
        **JSON,
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1a," + base64.b64encode(signature).decode(),
    }


def jwks_route(add_route, url: str):
    add_route(
        "gem",
        [],
        verify={"scheme": "standard-webhooks", "secrets": [], "options": {"jwks_url": url}},
    )


def test_v1a_keys_fetched_from_a_jwks_url_verify_and_are_cached(client, db, add_route, jwks):
    first = Ed25519PrivateKey.generate()
    jwks.add(first, "k1")
    jwks_route(add_route, jwks.url)
    for n in range(3):
        response = client.post("/hooks/gem", data=BODY, headers=v1a(first, BODY, f"msg_{n}"))
        assert response.status_code == 200, response.json
    assert jwks.requests == 1  # one fetch, then the cache
    stranger = client.post("/hooks/gem", data=BODY, headers=v1a(Ed25519PrivateKey.generate(), BODY))
    assert stranger.status_code == 401
    tampered = client.post("/hooks/gem", data=BODY + b" ", headers=v1a(first, BODY))
    assert (tampered.status_code, tampered.json["code"]) == (401, "bad_signature")
    stale = client.post(
        "/hooks/gem", data=BODY, headers=v1a(first, BODY, ts=int(time.time()) - 400)
    )
    assert (stale.status_code, stale.json["code"]) == (401, "stale_signature")


def test_an_unknown_key_fetches_the_set_again_but_not_at_every_request(client, add_route, jwks):
    first, rotated = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    jwks.add(first, "k1")
    jwks_route(add_route, jwks.url)
    assert client.post("/hooks/gem", data=BODY, headers=v1a(first, BODY)).status_code == 200
    jwks.add(rotated, "k2")
    # Within the minimum interval, an unknown key is refused without a fetch ...
    assert client.post("/hooks/gem", data=BODY, headers=v1a(rotated, BODY, "m2")).status_code == 401
    assert jwks.requests == 1
    # ... after it, the set is fetched again and the rotated key verifies.
    signatures.JWKS._sets[jwks.url] = (time.monotonic() - 31, signatures.JWKS._sets[jwks.url][1])
    assert client.post("/hooks/gem", data=BODY, headers=v1a(rotated, BODY, "m3")).status_code == 200
    assert jwks.requests == 2


def test_a_jwks_fetch_failure_is_a_503_sentence_never_a_stack_trace(
    client, db, add_route, jwks, caplog
):
    key = Ed25519PrivateKey.generate()
    jwks.add(key, "k1")
    jwks.status = 500
    jwks_route(add_route, jwks.url)
    response = client.post("/hooks/gem", data=BODY, headers=v1a(key, BODY))
    assert response.status_code == 503
    assert response.json == {
        "error": "The sender's signing keys could not be fetched; try again later",
        "code": "keys_unavailable",
    }
    assert response.headers["Retry-After"] == "30"
    assert "127.0.0.1" in last_event(db).last_error
    assert "Traceback" not in caplog.text


def test_a_key_set_larger_than_the_limit_is_not_used(app, client, add_route, jwks):
    key = Ed25519PrivateKey.generate()
    for n in range(40):
        jwks.add(key, f"k{n}")
    signatures.JWKS.configure(max_bytes=1024)
    try:
        jwks_route(add_route, jwks.url)
        response = client.post("/hooks/gem", data=BODY, headers=v1a(key, BODY))
        assert (response.status_code, response.json["code"]) == (503, "keys_unavailable")
    finally:
        signatures.JWKS.configure(max_bytes=app.config["JWKS_MAX_BYTES"])


def test_a_jwks_url_on_a_private_address_is_refused_without_the_setting(
    client, db, add_route, jwks, monkeypatch
):
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "false")
    key = Ed25519PrivateKey.generate()
    jwks.add(key, "k1")
    jwks_route(add_route, jwks.url)
    response = client.post("/hooks/gem", data=BODY, headers=v1a(key, BODY))
    assert response.status_code == 503
    assert jwks.requests == 0
    assert "private or local address" in last_event(db).last_error


def test_a_key_set_cannot_switch_the_algorithm():
    """Keys of another kind in the set (an RSA or EC key, an HMAC 'oct' key) are ignored."""
    verifier = signatures.key_verifier("hub.signatures:ED25519_V1A")
    secret = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")
    assert verifier.jwk_keys([{"kty": "oct", "k": secret}, {"kty": "EC", "crv": "P-256"}]) == []


def test_a_ping_that_came_with_a_key_instead_of_a_signature_is_no_handshake(
    client, db, add_route, make_key
):
    """On a route that takes a key or a signature, a PING with only a key is an event: a
    handshake is answered only once its signature verified."""
    route_for(add_route, "discord", auth="key|signature")
    response = client.post(
        "/hooks/in", data=b'{"type": 1}', headers={**JSON, "X-API-Key": make_key()}
    )
    assert response.status_code == 200
    assert response.json != {"type": 1} and response.json["status"] == "delivered"
