"""Providers as declarations: each built-in end to end through /hooks/<route>, signed where it
can be by the sender's own SDK; Standard Webhooks' v1a (Ed25519) beside v1; the shapes of
providers still to come (Twilio's published example, Svix's SDK) as a few lines each; a
third-party provider installed by entry point; the faces that list them; the docs' table."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import standardwebhooks.webhooks
import stripe
import svix.webhooks
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from hub import create_app, providers, signatures
from hub.providers import Provider
from hub.signatures import SignatureError, SignedRequest
from tests.procs import ROOT
from tests.rows import events
from tests.test_dashboard import sign_in
from tests.test_signatures import OTHER_SECRETS
from tests.test_signatures import SECRETS as SIGNATURE_SECRETS

BODY = b'{"text": "signed hello", "id": 7}'
JSON = {"Content-Type": "application/json"}
SHOUT = [{"connector": "text", "config": {"field": "text"}}]
HMAC_OPTIONS = {"header": "X-Signature", "prefix": "sha256="}
# The same secrets as the signature tests', so a vector signed there verifies here.
SECRETS, OTHER = SIGNATURE_SECRETS, OTHER_SECRETS
BUILTINS = tuple(providers.BUILTIN_PROVIDERS)
# The ones signed here; the others are tests/test_providers_hmac.py's and
# tests/test_providers_keys.py's.
SIGNED_HERE = tuple(SECRETS)


def _hmac(secret: str, message: bytes, algo=hashlib.sha256) -> bytes:
    return hmac.new(secret.encode(), message, algo).digest()


def sender_headers(name: str, body: bytes, secret: str, ts: int, delivery: str = "d-1") -> dict:
    """What each sender sends, made by its own SDK where it has one that signs, else by the
    rule its documentation gives (linked), never by the hub's own signer."""
    if name == "stripe":
        value = stripe.WebhookSignature.generate_signature_header(
            body.decode(), secret, timestamp=ts
        )
        return {"Stripe-Signature": value}
    if name == "standard-webhooks":
        when = datetime.fromtimestamp(ts, UTC)
        value = standardwebhooks.webhooks.Webhook(secret).sign(delivery, when, body)
        return {"webhook-id": delivery, "webhook-timestamp": str(ts), "webhook-signature": value}
    if name == "github":
        # https://docs.github.com/en/webhooks/using-webhooks/validating-webhook-deliveries
        digest = _hmac(secret, body).hex()
        return {"X-Hub-Signature-256": "sha256=" + digest, "X-GitHub-Delivery": delivery}
    if name == "slack":
        # https://api.slack.com/authentication/verifying-requests-from-slack
        digest = _hmac(secret, f"v0:{ts}:".encode() + body).hex()
        return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": "v0=" + digest}
    if name == "shopify":
        # https://shopify.dev/docs/apps/build/webhooks/subscribe/https (base64 HMAC-SHA256)
        digest = base64.b64encode(_hmac(secret, body)).decode()
        return {"X-Shopify-Hmac-Sha256": digest, "X-Shopify-Webhook-Id": delivery}
    digest = _hmac(secret, body).hex()  # the generic hmac, as its options say
    return {"X-Signature": "sha256=" + digest}


def shopify_events(headers: dict) -> dict:
    """Shopify Events' spelling of a classic webhook's headers: the same, without X-."""
    return {name.removeprefix("X-"): value for name, value in headers.items()}


def verify_spec(name: str, secrets: list[str]) -> dict:
    return {"scheme": name, "options": HMAC_OPTIONS if name == "hmac" else {}, "secrets": secrets}


def last_event(db):
    return events(db)[-1]


# --- each built-in provider, end to end, on both databases ---


@pytest.mark.parametrize("name", SIGNED_HERE)
def test_each_provider_accepts_either_secret_of_a_rotation_and_redacts_its_signature(
    client, db, add_route, name
):
    add_route("in", SHOUT, verify=verify_spec(name, [SECRETS[name], OTHER[name]]))
    for n, secret in enumerate((SECRETS[name], OTHER[name])):
        headers = sender_headers(name, BODY, secret, int(time.time()), f"delivery-{n}")
        response = client.post("/hooks/in", data=BODY, headers={**JSON, **headers})
        assert response.status_code == 200, response.json
        assert response.json["result"]["processed"] == "SIGNED HELLO"
        event = last_event(db)
        signature_header = {"hmac": "X-Signature"}.get(
            name, providers.get(name).signature_headers[0]
        )
        assert event.headers[signature_header.lower()] == "[redacted]"
        assert headers[signature_header] not in json.dumps(event.headers)


@pytest.mark.parametrize("name", SIGNED_HERE)
def test_each_provider_refuses_a_tampered_body_and_a_stranger_s_secret(client, db, add_route, name):
    add_route("in", SHOUT, verify=verify_spec(name, [SECRETS[name]]))
    now = int(time.time())
    tampered = BODY.replace(b"hello", b"HELLO")
    stranger = sender_headers(name, BODY, OTHER[name], now)
    for body, headers in (
        (tampered, sender_headers(name, BODY, SECRETS[name], now)),
        (BODY, stranger),
    ):
        response = client.post("/hooks/in", data=body, headers={**JSON, **headers})
        assert response.status_code == 401
        assert response.json == {"error": "Invalid signature", "code": "bad_signature"}
        assert last_event(db).last_error == "no signature matched"


@pytest.mark.parametrize("name", [p for p in SIGNED_HERE if providers.get(p).timestamp])
def test_each_timestamped_provider_refuses_a_stale_signature(client, db, add_route, name):
    add_route("in", SHOUT, verify=verify_spec(name, [SECRETS[name]]))
    headers = sender_headers(name, BODY, SECRETS[name], int(time.time()) - 301)
    response = client.post("/hooks/in", data=BODY, headers={**JSON, **headers})
    assert (response.status_code, response.json["code"]) == (401, "stale_signature")


def test_the_timestamped_providers_are_the_three_that_sign_a_time():
    stamped = {p for p in SIGNED_HERE if providers.get(p).timestamp}
    assert stamped == {"standard-webhooks", "stripe", "slack"}


@pytest.mark.parametrize(
    ("name", "first", "again"),
    [
        ("github", False, False),
        ("standard-webhooks", False, False),
        # Classic webhooks and Shopify Events spell the headers differently: either names it.
        ("shopify", False, True),
        ("shopify", True, False),
    ],
)
def test_each_provider_with_a_delivery_id_dedups_by_it(client, db, add_route, name, first, again):
    add_route("in", SHOUT, verify=verify_spec(name, [SECRETS[name]]), dedup_window=3600)

    def send(delivery: str, events_spelling: bool) -> dict:
        headers = sender_headers(name, BODY, SECRETS[name], int(time.time()), delivery)
        if events_spelling:
            headers = shopify_events(headers)
        response = client.post("/hooks/in", data=BODY, headers={**JSON, **headers})
        assert response.status_code == 200, response.json
        return response.json

    original = send("delivery-1", first)
    assert send("delivery-1", again) == {"id": original["id"], "duplicate": True}
    assert send("delivery-2", again)["status"] == "delivered"
    assert [e.dedup_key for e in events(db)] == ["delivery-1", "delivery-1", "delivery-2"]


def test_shopify_events_unprefixed_signature_header_verifies_and_is_redacted(client, db, add_route):
    add_route("shop", SHOUT, verify=verify_spec("shopify", [SECRETS["shopify"]]))
    digest = base64.b64encode(_hmac(SECRETS["shopify"], BODY)).decode()
    response = client.post(
        "/hooks/shop", data=BODY, headers={**JSON, "Shopify-Hmac-Sha256": digest}
    )
    assert response.status_code == 200, response.json
    assert last_event(db).headers["shopify-hmac-sha256"] == "[redacted]"


def test_slack_s_handshake_is_the_declared_challenge_kind():
    assert providers.get("slack").challenge == "slack-url-verification"
    payload = {"type": "url_verification", "challenge": "abc"}
    assert providers.answer_challenge(providers.get("slack"), payload) == {"challenge": "abc"}
    assert providers.answer_challenge(providers.get("github"), payload) is None
    assert providers.answer_challenge(providers.get("slack"), {"type": "event_callback"}) is None


# --- nothing the sender sends can switch verification off ---


SW_KEY = SECRETS["standard-webhooks"]


def test_a_sender_cannot_choose_the_algorithm_or_the_scheme(client, db, add_route):
    add_route("gh", SHOUT, verify=verify_spec("github", [SECRETS["github"]]))
    secret = SECRETS["github"]
    attempts = [
        # A valid SHA-1 signature (GitHub's old header) where SHA-256 is declared.
        {"X-Hub-Signature-256": "sha1=" + _hmac(secret, BODY, hashlib.sha1).hex()},
        {"X-Hub-Signature": "sha1=" + _hmac(secret, BODY, hashlib.sha1).hex()},
        # Another scheme's valid headers, with words that might pick a rule.
        {
            **signatures.sign("stripe", body=BODY, secret=secret),
            "X-Signature-Scheme": "stripe",
            "X-Signature-Algorithm": "none",
            "X-Hub-Signature-256": "sha256=",
        },
    ]
    for headers in attempts:
        response = client.post("/hooks/gh", data=BODY, headers={**JSON, **headers})
        assert response.status_code == 401, headers
    assert [e.status for e in events(db)] == ["rejected"] * 3


def test_a_sender_cannot_drop_the_timestamp_or_relabel_a_signature():
    stripe_secret = SECRETS["stripe"]
    old = int(time.time()) - 3600
    mac = _hmac(stripe_secret, f"{old}.".encode() + BODY).hex()
    for value in (f"v1={mac}", f"t={old},v1={mac}", f"t={int(time.time())},t={old},v1={mac}"):
        with pytest.raises(SignatureError):
            signatures.verify(
                "stripe", body=BODY, headers={"Stripe-Signature": value}, secrets=[stripe_secret]
            )
    # A v1 HMAC relabelled v1a is no Ed25519 signature, and v1a is not read for a whsec_ key.
    good = signatures.sign("standard-webhooks", body=BODY, secret=SW_KEY, msg_id="m")
    relabelled = {**good, "webhook-signature": good["webhook-signature"].replace("v1,", "v1a,")}
    with pytest.raises(SignatureError, match="Invalid signature"):
        signatures.verify("standard-webhooks", body=BODY, headers=relabelled, secrets=[SW_KEY])


# --- Standard Webhooks v1a: Ed25519, code where a declaration cannot be ---


def ed25519_pair() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, "whpk_" + base64.b64encode(raw).decode()


def v1a_headers(private: Ed25519PrivateKey, body: bytes, msg_id: str = "msg_a", ts=None) -> dict:
    """Standard Webhooks' asymmetric signature: Ed25519 over ``id.timestamp.body``, base64,
    labelled v1a (https://github.com/standard-webhooks/standard-webhooks, the spec)."""
    ts = int(time.time()) if ts is None else ts
    signature = private.sign(f"{msg_id}.{ts}.".encode() + body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": "v1a," + base64.b64encode(signature).decode(),
    }


def test_a_v1a_only_sender_is_verified_with_its_public_key(client, db, add_route):
    private, public = ed25519_pair()
    add_route("sw", SHOUT, verify=verify_spec("standard-webhooks", [public]))
    response = client.post("/hooks/sw", data=BODY, headers={**JSON, **v1a_headers(private, BODY)})
    assert response.status_code == 200, response.json
    tampered = client.post(
        "/hooks/sw", data=BODY + b" ", headers={**JSON, **v1a_headers(private, BODY)}
    )
    assert (tampered.status_code, last_event(db).last_error) == (401, "no signature matched")
    stranger, _ = ed25519_pair()
    refused = client.post("/hooks/sw", data=BODY, headers={**JSON, **v1a_headers(stranger, BODY)})
    assert refused.status_code == 401
    stale = v1a_headers(private, BODY, ts=int(time.time()) - 301)
    answer = client.post("/hooks/sw", data=BODY, headers={**JSON, **stale})
    assert (answer.status_code, answer.json["code"]) == (401, "stale_signature")


def test_a_header_with_v1_and_v1a_passes_when_any_secret_matches_its_kind():
    private, public = ed25519_pair()
    ts = int(time.time())
    asym = v1a_headers(private, BODY, "msg_b", ts)
    sym = signatures.sign(
        "standard-webhooks", body=BODY, secret=SW_KEY, msg_id="msg_b", timestamp=ts
    )
    both = {**asym, "webhook-signature": f"{sym['webhook-signature']} {asym['webhook-signature']}"}

    def check(secrets, headers=both):
        signatures.verify("standard-webhooks", body=BODY, headers=headers, secrets=secrets)

    check([public])  # the v1a signature, by the public key
    check([SW_KEY])  # the v1 signature, by the shared secret
    check([OTHER["standard-webhooks"], public])  # rotation across kinds
    _, other_public = ed25519_pair()
    with pytest.raises(SignatureError) as refused:
        check([other_public, OTHER["standard-webhooks"]])
    assert refused.value.reason == "no signature matched"
    with pytest.raises(SignatureError) as only_v1:
        check([public], sym)
    assert only_v1.value.reason == "no v1a signature in webhook-signature header"
    with pytest.raises(SignatureError) as none:
        check([public, SW_KEY], {**sym, "webhook-signature": "v2,abc"})
    assert none.value.reason == "no v1 or v1a signature in webhook-signature header"


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("whpk_" + base64.b64encode(b"short").decode(), "is 32 bytes after 'whpk_'"),
        ("whpk_not*base64", "not valid base64"),
    ],
)
def test_an_unusable_public_key_is_refused_when_the_route_is_saved(secret, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        signatures.validate_secret("standard-webhooks", secret)


# --- later providers are a few lines each: Twilio, Svix and Linear as declared ---


# The catalog's own declarations: each the few lines it promised to be.
TWILIO = providers.get("twilio")
SVIX = providers.get("svix")
LINEAR = providers.get("linear")


def test_twilio_s_published_example_verifies_as_a_declaration():
    """Twilio's documented example (https://www.twilio.com/docs/usage/security, "Validating
    requests"): the URL, then each POST field's name and value sorted by name, HMAC-SHA1."""
    body = (
        b"CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234"
        b"&From=%2B12349013030&To=%2B18005551212"
    )
    request = SignedRequest(
        body,
        {"X-Twilio-Signature": "0/KCTR6DLpKmkAf8muzZqo1nDgQ="},
        url="https://mycompany.com/myapp.php?foo=1&bar=2",
    )
    signatures.check(TWILIO, request, ["12345"])
    with pytest.raises(SignatureError):
        signatures.check(TWILIO, request._replace(url="https://mycompany.com/other"), ["12345"])


def test_a_svix_sdk_signature_verifies_as_a_declaration():
    secret = SW_KEY
    ts = int(time.time())
    value = svix.webhooks.Webhook(secret).sign(
        "msg_svix", datetime.fromtimestamp(ts, UTC), BODY.decode()
    )
    headers = {"svix-id": "msg_svix", "svix-timestamp": str(ts), "svix-signature": value}
    signatures.check(SVIX, SignedRequest(BODY, headers), [secret])
    # And svix's own verifier (it raises on a mismatch) accepts what the hub signs with the
    # same declaration.
    ours = signatures.sign_with(SVIX, body=BODY, secret=secret, msg_id="msg_hub", timestamp=ts)
    svix.webhooks.Webhook(secret).verify(BODY, ours)
    with pytest.raises(svix.webhooks.WebhookVerificationError):
        svix.webhooks.Webhook(OTHER["standard-webhooks"]).verify(BODY, ours)


def test_a_timestamp_in_the_body_in_milliseconds_is_checked():
    secret = "lin_wh_secret"
    fresh = json.dumps({"action": "create", "webhookTimestamp": int(time.time() * 1000)}).encode()
    stale = json.dumps({"action": "create", "webhookTimestamp": int(time.time() - 120) * 1000})
    for body, ok in ((fresh, True), (stale.encode(), False)):
        headers = {"Linear-Signature": _hmac(secret, body).hex()}
        if ok:
            signatures.check(LINEAR, SignedRequest(body, headers), [secret])
        else:
            with pytest.raises(signatures.StaleSignatureError):
                signatures.check(LINEAR, SignedRequest(body, headers), [secret])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"signed_content": "{body}{nonce}"}, "names {nonce}"),
        ({"signed_content": "{timestamp}.{body}"}, "has no timestamp"),
        ({"signed_content": "{id}.{body}"}, "has no id_headers"),
        ({"signature_headers": ("X Bad",)}, "not a valid HTTP header name"),
        ({"name": "GitHub"}, "lower-case"),
        ({"algorithm": None}, "needs code"),
        ({"challenge": "telepathy"}, "unknown challenge"),
        ({"timestamp": {"header": "X-T", "tolerance": 86401}}, "less than or equal to 86400"),
    ],
)
def test_a_declaration_that_cannot_work_is_refused_when_it_is_made(fields, message):
    base = {
        "name": "acme",
        "title": "Acme",
        "docs_url": "https://acme.example",
        "setup": "the secret",
        "signature_headers": ("X-Acme",),
    }
    with pytest.raises(ValidationError, match=re.escape(message)):
        Provider(**{**base, **fields})


# --- a third-party provider, installed by entry point ---


ACME_MODULE = """
from hub.providers import Provider, Timestamp

ACME = Provider(
    name="{name}",
    title="Acme",
    docs_url="https://acme.example/docs/webhooks",
    setup="Settings, Webhooks, Signing key",
    signature_headers=("X-Acme-Proof",),
    signed_content="{{timestamp}}.{{body}}",
    algorithm="sha512",
    encoding="base64",
    timestamp=Timestamp(header="X-Acme-Time"),
    id_headers=("X-Acme-Delivery",),
    redact=("X-Acme-Seal",),
)
"""


KEYED_MODULE = """
from hub.providers import CodeRule, Provider

KEYED = Provider(
    name="keyed",
    title="Keyed",
    docs_url="https://keyed.example",
    setup="its public key",
    signature_headers=("X-Keyed-Signature",),
    algorithm=None,
    code=CodeRule(verifier="nowhere:VERIFIER", secret_text="a public key"),
)
"""


class ProviderPlugins:
    """Throwaway distributions as pip leaves them: a module beside a ``*.dist-info`` whose
    ``entry_points.txt`` names it under ``hub.providers``."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []
        sys.path.insert(0, str(root))

    def install(self, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        info = self.root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{providers.ENTRY_POINT_GROUP}]\n{lines}\n")

    def cleanup(self) -> None:
        sys.path.remove(str(self.root))
        for module in self.modules:
            sys.modules.pop(module, None)
        providers.reload()  # what is installed again


@pytest.fixture
def provider_plugins(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    installed = ProviderPlugins(site)
    try:
        yield installed
    finally:
        installed.cleanup()


@pytest.fixture
def acme_app(provider_plugins, database_url_for_test):
    provider_plugins.install(
        "hub-provider-acme",
        {"acme": "hub_acme:ACME"},
        {"hub_acme": ACME_MODULE.format(name="acme")},
    )
    app = create_app(
        {"TESTING": True, "DATABASE_URL": database_url_for_test, "SECRET_KEY": "k" * 32}
    )
    yield app
    app.extensions["hub.db"].dispose()


def acme_headers(body: bytes, secret: str, delivery: str = "a-1") -> dict:
    """Acme's rule as its (imaginary) docs would give it: base64 HMAC-SHA512 of ts.body."""
    ts = str(int(time.time()))
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha512).digest()
    return {
        "X-Acme-Proof": base64.b64encode(mac).decode(),
        "X-Acme-Time": ts,
        "X-Acme-Delivery": delivery,
        "X-Acme-Seal": "sealed-by-acme",
    }


def test_a_provider_from_a_package_verifies_requests_end_to_end(acme_app, add_route_to):
    client = acme_app.test_client()
    add_route_to(acme_app, "acme-in", verify=verify_spec("acme", ["acme-secret"]), dedup_window=60)
    good = client.post(
        "/hooks/acme-in", data=BODY, headers={**JSON, **acme_headers(BODY, "acme-secret")}
    )
    assert good.status_code == 200, good.json
    db = acme_app.extensions["hub.db"]
    stored = last_event(db).headers
    assert stored["x-acme-proof"] == "[redacted]" and stored["x-acme-seal"] == "[redacted]"
    assert "sealed-by-acme" not in json.dumps(stored)
    copy = client.post(
        "/hooks/acme-in", data=BODY, headers={**JSON, **acme_headers(BODY, "acme-secret")}
    )
    assert copy.json == {"id": good.json["id"], "duplicate": True}  # its declared delivery id
    forged = client.post(
        "/hooks/acme-in",
        data=BODY + b" ",
        headers={**JSON, **acme_headers(BODY, "acme-secret", "a-2")},
    )
    assert (forged.status_code, forged.json["code"]) == (401, "bad_signature")
    stranger = client.post(
        "/hooks/acme-in", data=BODY, headers={**JSON, **acme_headers(BODY, "not-it", "a-3")}
    )
    assert stranger.status_code == 401


def test_a_provider_from_a_package_is_listed_by_every_face(acme_app, make_admin_key):
    listing = acme_app.test_cli_runner().invoke(args=["providers", "list"])
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.output.splitlines() if line.startswith("acme "))
    assert "X-Acme-Proof" in row and "X-Acme-Delivery" in row
    admin = {"X-API-Key": make_admin_key(acme_app)}
    shown = acme_app.test_client().get("/admin/api/providers", headers=admin).get_json()
    names = [p["name"] for p in shown["providers"]]
    assert names == [*BUILTINS, "acme"]
    acme = shown["providers"][-1]
    assert acme["signature_headers"] == ["X-Acme-Proof"] and acme["timestamp"] == "X-Acme-Time"
    added = acme_app.test_cli_runner().invoke(
        args=["routes", "add", "by-cli", "--verify", "acme", "--secret", "acme-secret"]
    )
    assert added.exit_code == 0, added.output
    browser = acme_app.test_client()
    assert sign_in(browser, admin["X-API-Key"]).status_code == 303
    form = browser.get("/dashboard/routes/new").get_data(as_text=True)
    offered = re.findall(r'<option value="([a-z0-9-]+)"', form.split('id="verify_scheme"')[1])
    assert offered[: len(BUILTINS) + 1] == [*BUILTINS, "acme"]


def test_a_provider_whose_name_is_taken_is_refused_with_a_sentence(provider_plugins, caplog):
    provider_plugins.install(
        "hub-provider-shadow",
        {
            "github": "hub_shadow:ACME",
            "broken": "hub_missing_module:ACME",
            "keyed": "hub_keyed:KEYED",
        },
        {
            "hub_shadow": ACME_MODULE.format(name="github"),
            "hub_keyed": KEYED_MODULE,
        },
    )
    with caplog.at_level(logging.ERROR, logger="hub.providers"):
        loaded = providers.reload()
    assert (
        "provider 'github' from hub_shadow:ACME is not loaded: the name is taken by "
        "hub.provider_catalog:GITHUB" in caplog.text
    )
    assert "provider broken (hub_missing_module:ACME) failed to load" in caplog.text
    assert (
        "provider 'keyed' (hub_keyed:KEYED) is not loaded: its verifier nowhere:VERIFIER is "
        "not a KeyVerifier that imports" in caplog.text
    )
    assert loaded.get("github").signature_headers == ("X-Hub-Signature-256",)
    assert loaded.names() == BUILTINS


@pytest.fixture
def add_route_to():
    from hub.services.routes import save_routes

    def add(app, name: str, steps=None, **fields):
        db = app.extensions["hub.db"]
        with db.session() as session:
            save_routes(
                session,
                [{"name": name, "steps": steps or SHOUT, **fields}],
                app.extensions["hub.connectors"],
                app.extensions["hub.secrets"],
            )

    return add


@pytest.fixture
def make_admin_key():
    from hub.services.keys import create_key

    def make(app) -> str:
        with app.extensions["hub.db"].session() as session:
            _, key = create_key(session, "admin", None, admin=True)
        return key

    return make


# --- the docs' table is the declarations' ---


def test_the_providers_page_table_is_generated_from_the_declarations():
    page = (ROOT / "docs" / "providers.md").read_text()
    expected = providers.readme_section(providers.load_providers(plugins=False))
    assert expected in page, (
        "docs/providers.md is stale: run python -m hub.providers --readme docs/providers.md"
    )
    for name in BUILTINS:
        assert f"[`{name}`]" in expected


def test_the_senders_page_and_the_site_link_the_providers_page():
    assert "(providers.md)" in (ROOT / "docs" / "senders.md").read_text()
    assert "providers.md" in (ROOT / "mkdocs.yml").read_text()
