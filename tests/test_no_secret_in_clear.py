"""No secret in clear: hub keys redacted by shape wherever they land, step-config secrets
sealed at rest and masked in every face, and a sender's view of its own event."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from hub import create_app
from hub.connectors import Connector, Secret, StepContext
from hub.ops import redact
from hub.services.delivery import Worker
from hub.services.keys import generate
from hub.store.models import Route
from tests.procs import gunicorn
from tests.servers import Reply
from tests.test_dashboard import sign_in

BEARER = "Bearer tok-live-5f8a2c7e91d04b36a1e0"  # what an admin types into a header


def secret_of(key: str) -> str:
    """The part of a hub key that is the secret (the prefix is public)."""
    return key.split("_", 2)[2]


def raw(db, sql: str, **params) -> list[tuple]:
    """Rows as the database holds them, past the ORM."""
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


def raw_text(db, sql: str, **params) -> str:
    return json.dumps([[str(v) for v in row] for row in raw(db, sql, **params)])


@pytest.fixture
def worker(app):
    return Worker(app, name="test-worker")


# --- hub keys, by shape ---


def test_a_hub_key_in_the_query_is_stored_redacted_whatever_its_parameter(
    client, db, key, make_key, add_route
):
    add_route("orders", [], mode="async")
    keys = [make_key(name=f"k{i}") for i in range(3)]
    query = f"auth={keys[0]}&sig=c2lnbmF0dXJlLW9mLXRoZS1ib2R5&{keys[1]}&note={keys[2]}&page=2"
    sent = {"X-API-Key": key, "X-Request-ID": keys[0]}  # a key where a request id goes
    answer = client.post(f"/hooks/orders?{query}", json={"n": 1}, headers=sent)
    assert answer.status_code == 202
    assert secret_of(keys[0]) not in answer.headers["X-Request-ID"]
    stored = raw_text(db, "SELECT query, request_id FROM events")
    for k in keys:
        assert secret_of(k) not in stored
    assert "c2lnbmF0dXJl" not in stored  # ?sig= is a credential by its name, whatever it holds
    assert "page=2" in stored and f"hk_{keys[2].split('_')[1]}_[redacted]" in stored


def test_a_hub_key_in_a_refused_requests_headers_and_kept_body_is_redacted(
    client, db, key, make_key, add_route
):
    add_route("orders", [], mode="async")
    pasted, cut = make_key(name="pasted"), make_key(name="cut")
    # Not JSON (a key pasted after it), so refused once read: 400, its first 256 bytes kept
    # (HUB_REFUSED_BODY_BYTES); the second key straddles that cut.
    body = json.dumps({"note": pasted, "pad": "x" * 150}).encode()
    body += b" " * (256 - 20 - len(body)) + cut.encode()
    answer = client.post(
        "/hooks/orders",
        data=body,
        content_type="application/json",
        headers={"X-API-Key": key, "X-Debug": f"sent with {pasted}"},
    )
    assert answer.status_code == 400
    kept = raw_text(db, "SELECT body, headers, route, path FROM events")
    assert "x" * 100 in kept  # the prefix was kept ...
    assert secret_of(pasted) not in kept  # ... without the keys in it
    assert secret_of(cut)[:8] not in kept  # not even what fit before the cut
    assert f"hk_{pasted.split('_')[1]}_[redacted]" in kept


def test_a_hub_key_never_reaches_a_log_line_or_a_row_through_a_real_server(
    database_url_for_test, tmp_path, db, make_key
):
    key = make_key()
    log = tmp_path / "web.log"
    # Each log format once: JSON lines with PostgreSQL, text lines with SQLite.
    fmt = "json" if database_url_for_test.startswith("postgresql") else "text"
    with gunicorn(database_url_for_test, log, workers=1, HUB_LOG_FORMAT=fmt) as (_, base):
        # A sender that put its key where the route's name goes, and in a header.
        answer = requests.post(f"{base}/hooks/{key}", json={}, headers={"X-Note": key}, timeout=5)
        assert answer.status_code == 404
    text = log.read_text(errors="replace")
    assert f"/hooks/hk_{key.split('_')[1]}_[redacted]" in text  # the request was logged
    assert secret_of(key) not in text
    row = raw_text(db, "SELECT route, path, last_error, headers FROM events")
    assert "No route named 'hk_" in row and secret_of(key) not in row


# --- secrets in step configs ---


def http_step(receiver, **headers: str) -> dict[str, Any]:
    return {"connector": "http", "config": {"url": receiver.url + "/in", "headers": headers}}


def test_a_credential_header_is_encrypted_at_rest_and_the_receiver_gets_it(
    app, client, db, key, add_route, receiver
):
    add_route("orders", [http_step(receiver, Authorization=BEARER, **{"X-Tenant": "acme"})])
    (steps,) = raw(db, "SELECT steps FROM routes WHERE name = 'orders'")[0]
    assert "tok-live" not in str(steps) and "hub-sealed:" in str(steps)
    assert "acme" in str(steps)  # a header that is not a credential stays readable

    answer = client.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.json
    (got,) = receiver.wait_for(1)
    assert got.headers["authorization"] == BEARER and got.headers["x-tenant"] == "acme"


def test_step_secrets_are_cut_from_attempt_copies_even_when_the_receiver_echoes_them(
    client, db, key, make_key, add_route, receiver
):
    upstream_key = make_key(name="a key of this hub, forwarded to another")
    step = http_step(receiver, Authorization=BEARER, **{"X-Relay": upstream_key})
    add_route("orders", [step])
    token = BEARER.split()[1]
    receiver.script(Reply(200, f"you sent {token} and {upstream_key}"))
    assert client.post("/hooks/orders", json={}, headers={"X-API-Key": key}).status_code == 200
    (got,) = receiver.wait_for(1)
    assert got.headers["x-relay"] == upstream_key  # the real values went out
    copies = raw_text(db, "SELECT request, response, error FROM attempts")
    assert "you sent" in copies  # the answer was kept ...
    assert token not in copies and secret_of(upstream_key) not in copies  # ... without them
    assert "tok-live" not in raw_text(db, "SELECT steps FROM routes")


def test_step_secrets_are_masked_in_the_api_the_cli_and_the_dashboard(
    app, client, db, make_key, add_route, receiver, runner
):
    add_route("orders", [http_step(receiver, Authorization=BEARER)])
    admin = make_key(admin=True, name="admin")
    faces = {
        "api list": client.get("/admin/api/routes", headers={"X-API-Key": admin}).get_data(True),
        "api one": client.get("/admin/api/routes/orders", headers={"X-API-Key": admin}).get_data(
            True
        ),
        "cli show": runner.invoke(args=["routes", "show", "orders"]).output,
        "cli list": runner.invoke(args=["routes", "list", "--json"]).output,
    }
    assert sign_in(client, admin).status_code == 303
    faces["page"] = client.get("/dashboard/routes/orders").get_data(as_text=True)
    faces["form"] = client.get("/dashboard/routes/orders/edit").get_data(as_text=True)
    for face, text in faces.items():
        text = text.replace("\\u2026", "…")  # JSON's escape of the mask's ellipsis
        assert "tok-live" not in text and "hub-sealed" not in text, face
        assert "…a1e0" in text, face  # masked: its last four characters


def test_an_edit_that_sends_a_mask_back_keeps_the_secret_and_a_new_value_replaces_it(
    app, client, db, make_key, add_route, receiver
):
    add_route("orders", [http_step(receiver, Authorization=BEARER)])
    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    box = app.extensions["hub.secrets"]

    def stored() -> str:
        with db.session() as session:
            route = session.scalars(sa.select(Route).where(Route.name == "orders")).one()
            return box.open_one(route.steps[0]["config"]["headers"]["Authorization"])

    shown = client.get("/admin/api/routes/orders", headers=admin).get_json()
    shown["description"] = "edited"
    put = client.put("/admin/api/routes/orders", json=shown, headers=admin)
    assert put.status_code == 200, put.get_json()
    assert stored() == BEARER

    shown["steps"][0]["config"]["headers"]["Authorization"] = "Bearer rotated-0000000000000"
    assert client.put("/admin/api/routes/orders", json=shown, headers=admin).status_code == 200
    assert stored() == "Bearer rotated-0000000000000"

    # A mask where no secret is stored is not a secret: refused, with the field named.
    shown["steps"][0]["config"]["headers"] = {"X-Api-Key": "…abcd"}
    refused = client.put("/admin/api/routes/orders", json=shown, headers=admin)
    assert refused.status_code == 422
    assert "headers.X-Api-Key: this is a masked secret" in refused.get_json()["error"]
    assert stored() == "Bearer rotated-0000000000000"


class PinConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: str = Field(description="Which account.")
    pin: Secret = Field(description="The account's PIN.")


class PinConnector(Connector):
    """A third-party connector whose config declares a secret field."""

    name = "pinned"
    description = "Logs in with a PIN."
    Config = PinConfig

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: PinConfig = self.config
        ctx.record(request=f"login {cfg.account} with {cfg.pin}", response="welcome", status=200)
        return {"pin_sha256": hashlib.sha256(cfg.pin.encode()).hexdigest()}


@pytest.fixture
def pinned(app):
    registry = app.extensions["hub.connectors"]
    registry.register(PinConnector)
    try:
        yield
    finally:
        registry.unregister("pinned")


def test_a_connectors_declared_secret_field_is_sealed_masked_and_cut_from_copies(
    app, client, db, key, make_key, add_route, runner, pinned
):
    pin = "pin-93817465-zq"
    add_route("bank", [{"connector": "pinned", "config": {"account": "ops", "pin": pin}}])
    assert pin not in raw_text(db, "SELECT steps FROM routes")
    answer = client.post("/hooks/bank", json={}, headers={"X-API-Key": key})
    assert answer.json["result"] == {"pin_sha256": hashlib.sha256(pin.encode()).hexdigest()}
    copies = raw_text(db, "SELECT request, response FROM attempts")
    assert "login ops with [redacted]" in copies and pin not in copies
    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    shown = client.get("/admin/api/routes/bank", headers=admin).get_json()
    assert shown["steps"][0]["config"] == {"account": "ops", "pin": "…"}  # short: no last four
    listed = runner.invoke(args=["connectors", "list"]).output
    assert "pin: string (required) (secret)" in listed


def test_a_route_saved_before_sealing_is_masked_and_sealed_on_its_next_save(
    client, db, key, make_key, receiver
):
    with db.session() as session:  # as the previous release stored it
        session.add(
            Route(
                name="legacy",
                mode="sync",
                steps=[http_step(receiver, **{"X-Api-Key": "legacy-credential-123"})],
            )
        )
    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    shown = client.get("/admin/api/routes/legacy", headers=admin).get_json()
    assert shown["steps"][0]["config"]["headers"] == {"X-Api-Key": "…-123"}
    assert client.post("/hooks/legacy", json={}, headers={"X-API-Key": key}).status_code == 200
    assert receiver.wait_for(1)[0].headers["x-api-key"] == "legacy-credential-123"
    assert "legacy-credential-123" not in raw_text(db, "SELECT request FROM attempts")

    patched = client.patch("/admin/api/routes/legacy", json={"description": "x"}, headers=admin)
    assert patched.status_code == 200
    assert "legacy-credential-123" not in raw_text(db, "SELECT steps FROM routes")
    assert client.post("/hooks/legacy", json={}, headers={"X-API-Key": key}).status_code == 200
    assert receiver.wait_for(2)[1].headers["x-api-key"] == "legacy-credential-123"


# --- what a sender sees of its own event ---


def test_a_sender_sees_its_events_acceptance_and_status_never_where_it_went(
    client, key, make_key, add_route, receiver, worker
):
    step = {"connector": "http", "config": {"url": receiver.url + "/billing-7"}}
    add_route("orders", [step], mode="async")
    receiver.script(Reply(400, "rejected by db-host-7.internal"))
    event_id = client.post("/hooks/orders", json={}, headers={"X-API-Key": key}).json["id"]
    assert worker.run_once() == 1

    mine = client.get(f"/events/{event_id}", headers={"X-API-Key": key})
    assert mine.status_code == 200
    seen = mine.get_json()
    assert (seen["accepted"], seen["status"], seen["attempts"]) == (True, "failed", 1)
    assert seen["received_at"] and seen["completed_at"]
    text = mine.get_data(as_text=True)
    for hidden in (str(receiver.port), "billing-7", "db-host-7", "attempt_log", "last_error"):
        assert hidden not in text

    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    full = client.get(f"/events/{event_id}", headers=admin).get_json()
    assert full["attempt_log"][0]["http_status"] == 400
    assert "billing-7" in full["attempt_log"][0]["request"]
    assert "db-host-7" in full["last_error"] or "db-host-7" in full["attempt_log"][0]["response"]


def test_db_upgrade_encrypts_the_step_secrets_an_older_release_stored_in_clear(
    app, client, db, key, receiver, runner
):
    with db.session() as session:  # as the previous release stored it
        steps = [http_step(receiver, Authorization="Bearer old-release-0123456789")]
        session.add(Route(name="legacy", mode="sync", steps=steps))
    result = runner.invoke(args=["db", "upgrade"])
    assert result.exit_code == 0, result.output
    assert "route 'legacy': step secrets stored in clear are now encrypted" in result.output
    stored = raw_text(db, "SELECT steps FROM routes")
    assert "old-release" not in stored and "hub-sealed:" in stored
    assert client.post("/hooks/legacy", json={}, headers={"X-API-Key": key}).status_code == 200
    assert receiver.wait_for(1)[0].headers["authorization"] == "Bearer old-release-0123456789"
    again = runner.invoke(args=["db", "upgrade"])  # nothing left to do: says nothing of it
    assert again.exit_code == 0 and "encrypted" not in again.output


def test_the_redaction_knows_the_key_format_the_hub_issues():
    for _ in range(50):
        prefix, key = generate()
        assert redact.keys_in_text(f"x {key} y") == f"x hk_{prefix}_[redacted] y"
        assert redact.keys_in_bytes(key.encode()) == f"hk_{prefix}_[redacted]".encode()


def test_a_step_secret_that_no_longer_opens_fails_the_step_saying_why(
    app, client, db, key, add_route, receiver
):
    add_route("orders", [http_step(receiver, Authorization=BEARER)])
    rekeyed = create_app({**app.config, "SECRET_KEY": "another-secret-key-after-a-rotation"})
    try:
        answer = rekeyed.test_client().post("/hooks/orders", json={}, headers={"X-API-Key": key})
    finally:
        rekeyed.extensions["hub.db"].dispose()
    assert answer.status_code == 500
    assert answer.json["code"] == "bad_config"
    assert "does not open with this HUB_SECRET_KEY" in answer.json["error"]
    assert receiver.requests == []  # nothing went out without its credential
