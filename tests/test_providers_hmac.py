"""The shared-secret providers (Svix and its senders, GitLab, Intercom, Typeform, Linear,
Calendly, PagerDuty, HubSpot, Paddle, Square, Mailgun, Meta, Sentry, Vercel, Lemon Squeezy),
each end to end through /hooks/<route> on both databases: what its sender sends is made by the
sender's own SDK where one signs (svix), checked by the SDK's verifier where it only verifies
(Paddle, Square), else built from the rule its documentation gives (the URL beside it), never
by the hub's own signer. Then what the declarations added: a token compared in constant time,
a signature and a timestamp in the JSON body, the delivery named by a body field, the URL a
route gives for providers that sign it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
import svix.webhooks
from paddle_billing.Notifications import Secret, Verifier
from square.utils.webhooks_helper import verify_signature as square_verify

from hub import providers, signatures
from hub.providers import Provider
from hub.signatures import SignatureError, SignedRequest, StaleSignatureError
from tests.rows import events
from tests.test_dashboard import other_app

SHOUT = [{"connector": "text", "config": {"field": "text"}}]
JSON = {"Content-Type": "application/json"}
WHSEC = "whsec_" + base64.b64encode(b"svix-signing-key-0123456789abcd").decode()
WHSEC_2 = "whsec_" + base64.b64encode(b"another-svix-key-for-rotation!!").decode()
SQUARE_URL = "https://hooks.example.com/hooks/in"
# The URL the test client calls, and HubSpot signs: its route names it (option url).
LOCAL_URL = "http://localhost/hooks/in"

NAMES = (
    "svix",
    "clerk",
    "resend",
    "gitlab",
    "intercom",
    "typeform",
    "linear",
    "calendly",
    "pagerduty",
    "hubspot",
    "paddle",
    "square",
    "mailgun",
    "meta",
    "sentry",
    "vercel",
    "lemon-squeezy",
)
SECRETS = {name: (f"{name}-secret-one", f"{name}-secret-two") for name in NAMES}
SECRETS.update({name: (WHSEC, WHSEC_2) for name in ("svix", "clerk", "resend")})
OPTIONS = {"square": {"url": SQUARE_URL}, "hubspot": {"url": LOCAL_URL}}
STAMPED = tuple(n for n in NAMES if providers.get(n).timestamp)
WITH_ID = tuple(n for n in NAMES if providers.get(n).id_headers or providers.get(n).id_field)


def _mac(secret: str, message: bytes, algo=hashlib.sha256) -> bytes:
    return hmac.new(secret.encode(), message, algo).digest()


def _hex(secret: str, message: bytes, algo=hashlib.sha256) -> str:
    return _mac(secret, message, algo).hex()


def _b64(secret: str, message: bytes) -> str:
    return base64.b64encode(_mac(secret, message)).decode()


def payload(name: str, delivery: str, ts: int, text: str = "signed hello") -> dict:
    """A body the provider could send: the delivery id and the time where it puts them."""
    body: dict = {"text": text}
    provider = providers.get(name)
    if provider.id_field:  # e.g. event.id: nested as the path says
        parts = provider.id_field.split(".")
        node = body
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = delivery
    if name == "linear":
        body["webhookTimestamp"] = ts * 1000
    return body


def send(name: str, secret: str, ts: int | None = None, delivery: str = "d-1", text=None):
    """(body, headers) as the sender makes them."""
    ts = int(time.time()) if ts is None else ts
    data = payload(name, delivery, ts, **({"text": text} if text else {}))
    if name == "mailgun":
        # https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks
        # hex HMAC-SHA256 of timestamp + token with the webhook signing key, in the body.
        data["signature"] = {
            "timestamp": str(ts),
            "token": data["signature"]["token"],
            "signature": _hex(secret, f"{ts}{data['signature']['token']}".encode()),
        }
    body = json.dumps(data).encode()
    return body, headers_for(name, body, secret, ts, delivery)


def headers_for(name: str, body: bytes, secret: str, ts: int, delivery: str) -> dict:
    if name in ("svix", "clerk", "resend"):
        value = svix.webhooks.Webhook(secret).sign(
            delivery, datetime.fromtimestamp(ts, UTC), body.decode()
        )
        return {"svix-id": delivery, "svix-timestamp": str(ts), "svix-signature": value}
    if name == "gitlab":
        # https://docs.gitlab.com/user/project/integrations/webhooks/ : the secret token, as
        # it is, in X-Gitlab-Token; Idempotency-Key the same across retries.
        return {"X-Gitlab-Token": secret, "Idempotency-Key": delivery}
    if name == "intercom":
        # https://developers.intercom.com/docs/references/webhooks/webhook-models
        # ("Signed notifications"): sha1= + hex HMAC-SHA1 of the body, the client secret.
        return {"X-Hub-Signature": "sha1=" + _hex(secret, body, hashlib.sha1)}
    if name == "typeform":
        # https://www.typeform.com/developers/webhooks/secure-your-webhooks/ : sha256= +
        # base64 HMAC-SHA256 of the body.
        return {"Typeform-Signature": "sha256=" + _b64(secret, body)}
    if name == "linear":
        # https://linear.app/developers/webhooks#securing-webhooks : hex HMAC-SHA256 of the
        # body; webhookTimestamp (ms) inside it.
        return {"Linear-Signature": _hex(secret, body), "Linear-Delivery": delivery}
    if name == "calendly":
        # https://developer.calendly.com/api-docs/overview/webhooks/webhook-signatures :
        # t=<ts>,v1=<hex HMAC-SHA256 of "<ts>.<body>">.
        return {"Calendly-Webhook-Signature": f"t={ts},v1={_hex(secret, f'{ts}.'.encode() + body)}"}
    if name == "pagerduty":
        # https://github.com/PagerDuty/developer-docs/blob/main/docs/webhooks/04-Signatures.md
        return {"X-PagerDuty-Signature": "v1=" + _hex(secret, body)}
    if name == "hubspot":
        # https://developers.hubspot.com/docs/apps/developer-platform/build-apps/authentication/request-validation
        # base64 HMAC-SHA256 of method + URI + body + timestamp (ms).
        ms = str(ts * 1000)
        signed = b"POST" + LOCAL_URL.encode() + body + ms.encode()
        return {"X-HubSpot-Signature-v3": _b64(secret, signed), "X-HubSpot-Request-Timestamp": ms}
    if name == "paddle":
        # https://developer.paddle.com/webhooks/signature-verification : ts=..;h1=<hex HMAC of
        # "<ts>:<body>">. Paddle's SDK only verifies: it must accept what the recipe built.
        value = f"ts={ts};h1={_hex(secret, f'{ts}:'.encode() + body)}"
        request = SimpleNamespace(headers={"Paddle-Signature": value}, body=body)
        assert Verifier(maximum_variance=None).verify(request, Secret(secret), False)
        return {"Paddle-Signature": value}
    if name == "square":
        # https://developer.squareup.com/docs/webhooks/step3validate : base64 HMAC-SHA256 of
        # the notification URL + body; Square's SDK must accept it.
        value = _b64(secret, SQUARE_URL.encode() + body)
        assert square_verify(
            request_body=body.decode(),
            signature_header=value,
            signature_key=secret,
            notification_url=SQUARE_URL,
        )
        return {"x-square-hmacsha256-signature": value}
    if name == "mailgun":
        return {}
    if name == "meta":
        # https://developers.facebook.com/docs/graph-api/webhooks/getting-started#validate-payloads
        return {"X-Hub-Signature-256": "sha256=" + _hex(secret, body)}
    if name == "sentry":
        # https://docs.sentry.io/integrations/integration-platform/webhooks/ : hex
        # HMAC-SHA256 of the body with the client secret.
        return {"Sentry-Hook-Signature": _hex(secret, body), "Request-ID": delivery}
    if name == "vercel":
        # https://vercel.com/docs/webhooks/webhooks-api#securing-webhooks : hex HMAC-SHA1.
        return {"x-vercel-signature": _hex(secret, body, hashlib.sha1)}
    if name == "lemon-squeezy":
        # https://docs.lemonsqueezy.com/help/webhooks/signing-requests : hex HMAC-SHA256.
        return {"X-Signature": _hex(secret, body)}
    raise AssertionError(name)


def spec(name: str, secrets) -> dict:
    return {"scheme": name, "secrets": list(secrets), "options": OPTIONS.get(name, {})}


def test_every_provider_of_this_family_is_loaded_and_tested():
    assert set(NAMES) <= set(providers.registry().names())
    assert set(STAMPED) == {
        "svix",
        "clerk",
        "resend",
        "linear",
        "calendly",
        "hubspot",
        "paddle",
        "mailgun",
    }


# --- end to end, on both databases: one test per property, every provider ---


@pytest.mark.parametrize("name", NAMES)
def test_each_accepts_either_secret_of_a_rotation_and_redacts_its_signature(
    client, db, add_route, name
):
    add_route("in", SHOUT, verify=spec(name, SECRETS[name]))
    for n, secret in enumerate(SECRETS[name]):
        body, headers = send(name, secret, delivery=f"delivery-{n}")
        response = client.post("/hooks/in", data=body, headers={**JSON, **headers})
        assert response.status_code == 200, response.json
        assert response.json["result"]["processed"] == "SIGNED HELLO"
        stored = events(db)[-1].headers
        for header in providers.get(name).signature_headers:
            assert stored[header.lower()] == "[redacted]"
            assert headers[header] not in json.dumps(stored)


@pytest.mark.parametrize("name", NAMES)
def test_each_refuses_a_tampered_body_and_a_stranger_s_secret(client, db, add_route, name):
    add_route("in", SHOUT, verify=spec(name, SECRETS[name][:1]))
    body, headers = send(name, SECRETS[name][0])
    tampered = body.replace(b"hello", b"HELLO")
    if name == "mailgun":  # Mailgun signs its timestamp and token, not the event: change those
        tampered = body.replace(b'"token": "d-1"', b'"token": "d-2"')
    assert tampered != body
    stranger = send(name, SECRETS[name][1])  # a valid secret of its kind, not this route's
    # GitLab's token proves who sent the request, not what it says (TLS guards the body).
    cases = [stranger] if name == "gitlab" else [(tampered, headers), stranger]
    for data, sent in cases:
        response = client.post("/hooks/in", data=data, headers={**JSON, **sent})
        assert response.status_code == 401, name
        assert response.json == {"error": "Invalid signature", "code": "bad_signature"}
        assert events(db)[-1].last_error == "no signature matched"


@pytest.mark.parametrize("name", STAMPED)
def test_each_timestamped_one_refuses_a_stale_signature(client, add_route, name):
    add_route("in", SHOUT, verify=spec(name, SECRETS[name][:1]))
    tolerance = providers.get(name).timestamp.tolerance
    body, headers = send(name, SECRETS[name][0], ts=int(time.time()) - tolerance - 5)
    response = client.post("/hooks/in", data=body, headers={**JSON, **headers})
    assert (response.status_code, response.json["code"]) == (401, "stale_signature")


@pytest.mark.parametrize("name", WITH_ID)
def test_each_with_a_delivery_id_dedups_by_it(client, db, add_route, name):
    add_route("in", SHOUT, verify=spec(name, SECRETS[name][:1]), dedup_window=3600)

    def post(delivery: str) -> dict:
        body, headers = send(name, SECRETS[name][0], delivery=delivery)
        response = client.post("/hooks/in", data=body, headers={**JSON, **headers})
        assert response.status_code == 200, response.json
        return response.json

    original = post("delivery-1")
    assert post("delivery-1") == {"id": original["id"], "duplicate": True}
    assert post("delivery-2")["status"] == "delivered"
    assert [e.dedup_key for e in events(db)] == ["delivery-1", "delivery-1", "delivery-2"]
    assert [e.status for e in events(db)] == ["delivered", "duplicate", "delivered"]


def test_a_mailgun_token_seen_again_is_a_duplicate_even_in_a_new_signed_body(client, db, add_route):
    """Mailgun's token is signed; a replay re-signed with a new time (or a body that only
    differs elsewhere) still names the same delivery."""
    add_route("mg", SHOUT, verify=spec("mailgun", SECRETS["mailgun"][:1]), dedup_window=3600)
    secret = SECRETS["mailgun"][0]
    first = send("mailgun", secret, delivery="token-50-chars")
    again = send("mailgun", secret, ts=int(time.time()) - 10, delivery="token-50-chars", text="x")
    answers = [
        client.post("/hooks/mg", data=b, headers={**JSON, **h}).json for b, h in (first, again)
    ]
    assert answers[1] == {"id": answers[0]["id"], "duplicate": True}


# --- nothing the sender sends chooses the rule ---


def test_no_sender_header_can_change_the_algorithm_the_provider_or_the_time_rule():
    now = int(time.time())
    secret = "shared-secret"
    body = json.dumps({"text": "x", "event_id": "e1", "id": "e1"}).encode()
    attempts = {
        # SHA-256 where Intercom declares SHA-1, and the other way round for Typeform.
        "intercom": {"X-Hub-Signature": "sha256=" + _hex(secret, body)},
        "vercel": {"x-vercel-signature": _hex(secret, body)},
        "typeform": {"Typeform-Signature": "sha1=" + _hex(secret, body, hashlib.sha1)},
        # Hex where base64 is declared.
        "square": {"x-square-hmacsha256-signature": _hex(secret, SQUARE_URL.encode() + body)},
        # Another provider's valid headers, and words that might pick a rule.
        "meta": {
            "X-Hub-Signature": "sha1=" + _hex(secret, body, hashlib.sha1),
            "X-Signature-Scheme": "intercom",
            "X-Signature-Algorithm": "sha1",
        },
        # Paddle without its ts, or with an old ts beside a fresh one.
        "paddle": {"Paddle-Signature": "h1=" + _hex(secret, f"{now}:".encode() + body)},
        # Linear's time is in the body: a header cannot stand in for it.
        "linear": {"Linear-Signature": _hex(secret, body), "Linear-Timestamp": str(now * 1000)},
        # HubSpot in seconds where milliseconds are declared: 1970, stale.
        "hubspot": {
            "X-HubSpot-Request-Timestamp": str(now),
            "X-HubSpot-Signature-v3": _b64(
                secret, b"POST" + LOCAL_URL.encode() + body + b"%d" % now
            ),
        },
        # GitLab's token as an HMAC, or an HMAC as its token.
        "gitlab": {"X-Gitlab-Token": _hex(secret, body)},
    }
    for name, headers in attempts.items():
        with pytest.raises(SignatureError):
            signatures.verify(
                name,
                body=body,
                headers=headers,
                secrets=[secret],
                options=OPTIONS.get(name),
                url=LOCAL_URL,
            )
    stale = now - 60
    two = f"ts={now};ts={stale};h1={_hex(secret, f'{stale}:'.encode() + body)}"
    with pytest.raises(SignatureError):
        signatures.verify("paddle", body=body, headers={"Paddle-Signature": two}, secrets=[secret])


def test_a_route_option_cannot_be_smuggled_in_a_header_or_the_body():
    """Square's URL comes from the route (or the request), never from what the sender says."""
    secret = "sq"
    forged_url = "https://attacker.example/x"
    body = json.dumps({"text": "x", "url": forged_url, "event_id": "e"}).encode()
    headers = {
        "x-square-hmacsha256-signature": _b64(secret, forged_url.encode() + body),
        "X-Forwarded-Host": "attacker.example",
        "X-Original-URL": forged_url,
    }
    with pytest.raises(SignatureError):
        signatures.verify(
            "square", body=body, headers=headers, secrets=[secret], options=OPTIONS["square"]
        )


# --- what the declarations gained ---


def test_a_static_token_is_compared_as_digests_so_its_length_does_not_show(compared):
    """GitLab's token: every configured secret is compared, as SHA-256 digests of equal
    length, never the bytes themselves."""
    request = SignedRequest(b"{}", {"X-Gitlab-Token": "tok-b"})
    signatures.check(providers.get("gitlab"), request, ["tok-a", "tok-b"])
    assert len(compared) == 2 and all(len(a) == len(b) == 32 for a, b, _ in compared)
    for bad in ("tok-", "tok-bb", "TOK-B", ""):
        with pytest.raises(SignatureError):
            signatures.check(
                providers.get("gitlab"), SignedRequest(b"{}", {"X-Gitlab-Token": bad}), ["tok-b"]
            )
    assert signatures.sign("gitlab", body=b"{}", secret="tok-b") == {"X-Gitlab-Token": "tok-b"}


def test_a_signature_in_the_body_is_read_from_its_field_and_missing_parts_say_which():
    gitless = providers.get("mailgun")
    body, _ = send("mailgun", "key")
    signatures.check(gitless, SignedRequest(body, {}), ["key"])
    data = json.loads(body)
    for path, reason in (
        ("signature", "missing signature signature.signature in the body"),
        ("timestamp", "missing timestamp signature.timestamp in the body"),
        ("token", "missing signed field signature.token in the body"),
    ):
        broken = json.loads(body)
        del broken["signature"][path]
        with pytest.raises(SignatureError) as refused:
            signatures.check(gitless, SignedRequest(json.dumps(broken).encode(), {}), ["key"])
        assert refused.value.reason == reason
    assert data["signature"]["signature"]
    with pytest.raises(SignatureError, match="Invalid signature"):
        signatures.check(gitless, SignedRequest(b"not json", {}), ["key"])
    with pytest.raises(ValueError, match="signs inside its JSON body"):
        signatures.sign("mailgun", body=body, secret="key")


def test_a_timestamp_in_milliseconds_is_held_to_its_own_tolerance():
    """Linear: a minute. A body stamped 70 s ago is stale; 30 s ago is fresh."""
    secret = "lin"
    now = time.time()
    for age, fresh in ((30, True), (70, False), (-70, False)):
        body, headers = send("linear", secret, ts=int(now - age))
        request = SignedRequest(body, headers)
        if fresh:
            signatures.check(providers.get("linear"), request, [secret], now=now)
        else:
            with pytest.raises(StaleSignatureError):
                signatures.check(providers.get("linear"), request, [secret], now=now)


def test_pagerduty_s_several_signatures_during_a_rotation_pass_if_one_matches():
    body, _ = send("pagerduty", "new")
    header = f"v1={_hex('old', body)},v1={_hex('new', body)}"
    signatures.verify(
        "pagerduty", body=body, headers={"X-PagerDuty-Signature": header}, secrets=["new"]
    )
    with pytest.raises(SignatureError):
        signatures.verify(
            "pagerduty", body=body, headers={"X-PagerDuty-Signature": header}, secrets=["other"]
        )


def test_a_paddle_header_with_two_h1_during_a_rotation_passes_and_paddle_s_sdk_agrees():
    body, _ = send("paddle", "new")
    ts = int(time.time())
    signed = f"{ts}:".encode() + body
    value = f"ts={ts};h1={_hex('old', signed)};h1={_hex('new', signed)}"
    signatures.verify("paddle", body=body, headers={"Paddle-Signature": value}, secrets=["new"])
    request = SimpleNamespace(headers={"Paddle-Signature": value}, body=body)
    assert Verifier().verify(request, Secret("new"))


def test_paddle_s_signed_event_id_names_the_delivery(client, db, add_route):
    assert providers.get("paddle").id_field == "event_id"
    add_route("pd", SHOUT, verify=spec("paddle", SECRETS["paddle"][:1]), dedup_window=60)
    body, headers = send("paddle", SECRETS["paddle"][0], delivery="evt_01")
    client.post("/hooks/pd", data=body, headers={**JSON, **headers})
    assert events(db)[-1].dedup_key == "evt_01"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"signature_headers": ()}, "one of them"),
        ({"signature_field": "signature.sig"}, "one of them"),
        ({"algorithm": "token", "signed_content": "{timestamp}.{body}"}, "token provider"),
        ({"signed_content": "{json:a b}"}, "not a JSON path"),
        ({"id_field": "../etc"}, "not a JSON path"),
        ({"signed_content": "{jsn:a}"}, "{json:path}"),
    ],
)
def test_a_declaration_that_cannot_work_is_refused(fields, message):
    base = {
        "name": "acme",
        "title": "Acme",
        "docs_url": "https://acme.example",
        "setup": "the secret",
        "signature_headers": ("X-Acme",),
    }
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Provider(**{**base, **fields})


# --- a URL the sender signs: the route's url option, or HUB_PUBLIC_URL and the path ---


def test_square_signs_the_url_the_route_names(client, add_route):
    add_route("in", SHOUT, verify=spec("square", ["sq-key"]))
    body, headers = send("square", "sq-key")
    # The hub is reached at http://localhost, Square was given SQUARE_URL: the option wins.
    answer = client.post("/hooks/in", data=body, headers={**JSON, **headers})
    assert answer.status_code == 200, answer.json


def test_without_a_url_option_the_url_is_hub_public_url_never_the_request_s_host(app, add_route):
    public = other_app(app, PUBLIC_URL="https://hooks.example.com", TRUSTED_PROXIES=1)
    try:
        add_route("in", SHOUT, verify={"scheme": "square", "secrets": ["sq-key"]})
        client = public.test_client()
        body = json.dumps({"text": "signed hello", "event_id": "e-1"}).encode()
        headers = {
            **JSON,
            "x-square-hmacsha256-signature": _b64("sq-key", SQUARE_URL.encode() + body),
        }
        good = client.post("/hooks/in", data=body, headers=headers)
        assert good.status_code == 200, good.json
        # Signed over the host the request names (and a proxy header agrees): not the URL
        # the operator gave, so refused, trusted proxy or not.
        forged = "https://attacker.example/hooks/in"
        other = {
            **JSON,
            "x-square-hmacsha256-signature": _b64("sq-key", forged.encode() + body),
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "attacker.example",
        }
        refused = client.post(
            "/hooks/in", data=body, headers=other, base_url="https://attacker.example"
        )
        assert refused.status_code == 401
    finally:
        public.extensions["hub.db"].dispose()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "must be an http"),
        ("https://a b", "must be an http"),
        (7, "must be an http"),
        ("https://hooks.example.com/in?x=1", "without a query"),
    ],
)
def test_a_bad_url_option_is_refused_when_the_route_is_saved(url, message):
    with pytest.raises(ValueError, match=message):
        signatures.validate_options("square", {"url": url})
    with pytest.raises(ValueError, match="takes no options"):
        signatures.validate_options("github", {"url": SQUARE_URL})
    assert signatures.validate_options("hubspot", {"url": SQUARE_URL})["url"] == SQUARE_URL
