"""The audit log: each face (the admin API, the dashboard, the CLI) drives every admin action
and finds exactly one entry per action, with who, from where, what, on what, and a change
that never holds a secret; the listing's filters and pages on each face; no face can alter
an entry, nor the database through the hub; the retention; the migration. Both databases."""

from __future__ import annotations

import getpass
import json
import re
import socket
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from hub.services import audit
from hub.services.delivery import Worker
from hub.store.db import alembic_config, upgrade
from hub.store.models import (
    ApiKey,
    AuditEntry,
    Delivery,
    Event,
    Route,
    first_delivery_id,
    new_event_id,
    utcnow,
)
from tests.test_schema import fill_0010

SIGNING = "whsec_" + "YXVkaXQtc2lnbmluZy1zZWNyZXQtb25lLTEyMzQ1Ng"
NEW_SIGNING = "whsec_" + "YXVkaXQtc2lnbmluZy1zZWNyZXQtdHdvLTY1NDMyMQ"
STEP_TOKEN = "Bearer step-token-9c1e5b7a3d"
CHANNEL_TOKEN = "T0KEN-channel-4f8a2e6b"
TOKEN_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


# --- helpers ---


def entries(db) -> list[dict]:
    """Every entry, oldest first, as the API shows it."""
    with db.session() as session:
        rows = session.scalars(sa.select(AuditEntry).order_by(AuditEntry.id))
        return [row.to_dict() for row in rows]


def new_entries(db, before: int) -> list[dict]:
    return [e for e in entries(db) if e["id"] > before]


def last_id(db) -> int:
    found = entries(db)
    return found[-1]["id"] if found else 0


def no_secret_in(rows: list[dict], secrets: list[str]) -> None:
    """No entry holds any of ``secrets``, nor any 8 characters running in one (a mask keeps
    the last four, as every face shows them)."""
    for row in rows:
        text = json.dumps(row, ensure_ascii=False)
        for secret in secrets:
            runs = {secret[i : i + 8] for i in range(len(secret) - 7)}
            found = [run for run in runs if run in text]
            assert not found, f"{row['action']} holds part of a secret: {found[:3]}"


def add_event(db, route: str, destination: str, status: str, age: timedelta | None = None):
    """An event of ``route`` with its delivery to ``destination``, both ``status``."""
    now = utcnow() - (age or timedelta(0))
    ended = status not in ("pending", "retrying")
    with db.session() as session:
        event = Event(
            id=new_event_id(),
            route=route,
            method="POST",
            path=f"/hooks/{route}",
            received_at=now,
            headers={"content-type": "application/json"},
            body=b'{"n": 1}',
            status=status,
            attempts=1,
            completed_at=now if ended else None,
            next_attempt_at=None if ended else now,
        )
        session.add(event)
        session.flush()
        session.add(
            Delivery(
                id=first_delivery_id(event.id),
                event_id=event.id,
                route=route,
                destination=destination,
                status=status,
                attempts=1,
                completed_at=event.completed_at,
                next_attempt_at=event.next_attempt_at,
            )
        )
    return event.id


def step(receiver) -> dict:
    return {
        "connector": "http",
        "config": {"url": receiver.url + "/crm", "headers": {"Authorization": STEP_TOKEN}},
    }


def fan_route(receiver, name: str = "fan") -> dict:
    return {
        "name": name,
        "mode": "async",
        "destinations": [{"name": "crm", "steps": [step(receiver)], "breaker": {}}],
    }


@pytest.fixture
def admin_key(make_key) -> str:
    return make_key(admin=True, name="auditor")


def prefix_of(key: str) -> str:
    return key.split("_")[1]


# --- the admin API ---


def test_the_admin_api_records_each_action_once_with_the_key_and_the_address(
    client, db, admin_key, receiver
):
    admin = {"X-API-Key": admin_key}
    me = prefix_of(admin_key)
    channel_url = f"{receiver.url}/{CHANNEL_TOKEN}"

    def ok(response, status=200):
        assert response.status_code == status, response.get_json()
        return response.get_json()

    made = ok(
        client.post("/admin/api/keys", json={"name": "ci", "admin": False}, headers=admin), 201
    )
    ok(client.delete(f"/admin/api/keys/{made['prefix']}", headers=admin))
    route = fan_route(receiver, "orders") | {
        "verify": {"scheme": "standard-webhooks", "secrets": [SIGNING]}
    }
    ok(client.post("/admin/api/routes", json=route, headers=admin), 201)
    bad = {"name": "broken", "steps": [{"connector": "nope"}]}
    assert client.post("/admin/api/routes", json=bad, headers=admin).status_code == 422
    ok(client.patch("/admin/api/routes/orders", json={"description": "nightly"}, headers=admin))
    same = {k: v for k, v in route.items() if k != "name"} | {"description": "nightly"}
    ok(client.put("/admin/api/routes/orders", json=same, headers=admin))  # unchanged
    secrets = "/admin/api/routes/orders/secrets"
    ok(client.post(secrets, json={"secret": NEW_SIGNING}, headers=admin), 201)
    ok(client.delete(secrets + "/1", headers=admin))
    assert client.delete(secrets + "/1", headers=admin).status_code == 422  # the last one
    crm = "/admin/api/routes/orders/destinations/crm"
    ok(client.post(crm + "/pause", json={"reason": "their outage"}, headers=admin))
    ok(client.post(crm + "/pause", headers=admin))  # paused already: no change
    ok(client.post(crm + "/resume", headers=admin))
    ok(client.post(crm + "/open", headers=admin))
    ok(client.post(crm + "/close", headers=admin))
    one, other, *bulk = (add_event(db, "orders", "crm", "failed") for _ in range(4))
    waiting = add_event(db, "orders", "crm", "retrying")
    ok(client.post(f"/admin/api/events/{one}/replay", headers=admin))
    ok(client.post(f"/admin/api/deliveries/{first_delivery_id(other)}/replay", headers=admin))
    replayed = ok(
        client.post(
            "/admin/api/events/replay", json={"route": "orders", "status": "failed"}, headers=admin
        )
    )
    assert replayed["replayed"] == 2
    ok(client.post(f"/admin/api/deliveries/{first_delivery_id(waiting)}/skip", headers=admin))
    hook = {"name": "ops", "kind": "webhook", "url": channel_url}
    ok(client.post("/admin/api/alert-channels", json=hook, headers=admin), 201)
    ok(client.post("/admin/api/alert-channels/ops/test", headers=admin), 202)
    rule = {"name": "late", "kind": "oldest_due", "threshold": 60, "channels": ["ops"]}
    ok(client.post("/admin/api/alert-rules", json=rule, headers=admin), 201)
    ok(client.patch("/admin/api/alert-rules/late", json={"enabled": False}, headers=admin))
    ok(client.delete("/admin/api/alert-rules/late", headers=admin))
    ok(client.delete("/admin/api/alert-channels/ops", headers=admin))
    ok(client.delete("/admin/api/routes/orders", headers=admin))

    found = entries(db)
    assert [(e["action"], e["target"]) for e in found] == [
        ("key.create", made["prefix"]),
        ("key.revoke", made["prefix"]),
        ("route.create", "orders"),
        ("route.update", "orders"),
        ("route.secret_add", "orders"),
        ("route.secret_remove", "orders"),
        ("destination.pause", "orders/crm"),
        ("destination.resume", "orders/crm"),
        ("destination.open", "orders/crm"),
        ("destination.close", "orders/crm"),
        ("events.replay", one),
        ("deliveries.replay", first_delivery_id(other)),
        ("events.replay", "route=orders status=failed"),
        ("delivery.skip", first_delivery_id(waiting)),
        ("alert_channel.add", "ops"),
        ("alert_channel.test", "ops"),
        ("alert_rule.add", "late"),
        ("alert_rule.disable", "late"),
        ("alert_rule.remove", "late"),
        ("alert_channel.remove", "ops"),
        ("route.remove", "orders"),
    ]
    assert {(e["actor"], e["face"], e["origin"]) for e in found} == {(me, "api", "127.0.0.1")}
    assert all(e["request_id"] for e in found)
    by_action = {e["action"]: e["change"] for e in found}
    assert by_action["route.update"] == {"description": {"from": None, "to": "nightly"}}
    assert by_action["key.create"]["name"] == "ci" and by_action["key.create"]["admin"] is False
    assert by_action["destination.pause"]["state"] == {"from": "active", "to": "paused"}
    assert by_action["destination.pause"]["cause"] == "their outage"
    assert by_action["route.secret_add"]["secrets"] == 2
    assert by_action["route.secret_add"]["added"].endswith(NEW_SIGNING[-4:])  # masked
    (bulk_entry,) = [e["change"] for e in found if e["target"] == "route=orders status=failed"]
    assert bulk_entry == {
        "count": 2,
        "examined": 2,
        "filter": {"route": "orders", "status": "failed"},
    }
    removed = by_action["route.remove"]
    assert removed["destinations"][0]["name"] == "crm"  # what was removed, masked
    no_secret_in(found, [SIGNING, NEW_SIGNING, STEP_TOKEN, CHANNEL_TOKEN, made["key"][12:]])


def test_an_action_that_is_refused_or_changes_nothing_records_nothing(client, db, admin_key):
    admin = {"X-API-Key": admin_key}
    assert client.post("/admin/api/keys", json={"name": ""}, headers=admin).status_code == 422
    assert client.delete("/admin/api/keys/ffffffff", headers=admin).status_code == 404
    assert (
        client.post("/admin/api/routes/nope/destinations/x/pause", headers=admin).status_code == 404
    )
    assert (
        client.post("/admin/api/events/replay", json={"route": "nope"}, headers=admin).json[
            "replayed"
        ]
        == 0
    )
    on = {"enabled": True}  # a built-in rule, on already
    assert client.patch("/admin/api/alert-rules/dead-deliveries", json=on, headers=admin).json[
        "enabled"
    ]
    assert entries(db) == []


# --- the dashboard ---


def dashboard_token(client, path: str = "/dashboard/sign-in") -> str:
    return TOKEN_RE.search(client.get(path).get_data(as_text=True)).group(1)


def test_the_dashboard_records_each_action_once_with_the_signed_in_key(
    client, db, admin_key, make_key, add_route, receiver
):
    me = prefix_of(admin_key)
    victim = prefix_of(make_key(name="victim"))
    add_route(**fan_route(receiver))  # set up by code: no admin's action, no entry
    failed = [add_event(db, "fan", "crm", "failed") for _ in range(4)]
    assert entries(db) == []

    def sign_in():
        token = dashboard_token(client)
        answer = client.post("/dashboard/sign-in", data={"key": admin_key, "csrf_token": token})
        assert answer.status_code == 303
        return dashboard_token(client, "/dashboard/")

    token = sign_in()

    def post(path: str, expect: int = 303, **form):
        answer = client.post(path, data={"csrf_token": token, **form})
        assert answer.status_code == expect, (path, answer.get_data(as_text=True)[:500])
        return answer

    made = post("/dashboard/keys", 201, name="ci", form_id="f1")
    secret = re.search(r'<code id="new-key">([^<]+)</code>', made.get_data(as_text=True)).group(1)
    post(f"/dashboard/keys/{victim}/revoke")
    form = {
        "name": "web",
        "mode": "async",
        "steps": json.dumps([step(receiver)]),
        "enabled": "true",
        "verify_scheme": "standard-webhooks",
        "verify_options": "{}",
        "verify_secrets": SIGNING,
    }
    post("/dashboard/routes/new", **form)
    post("/dashboard/routes/web/edit", **(form | {"description": "edited", "verify_secrets": ""}))
    post("/dashboard/routes/web/enabled", enabled="false")
    for action in ("pause", "resume", "open", "close"):
        post(f"/dashboard/routes/fan/destinations/crm/{action}", reason="by hand")
    post(f"/dashboard/events/{failed[0]}/replay")
    post(f"/dashboard/deliveries/{first_delivery_id(failed[1])}/replay")
    assert "2" in client.get("/dashboard/events/replay?route=fan&status=failed").get_data(
        as_text=True
    )
    post("/dashboard/events/replay", route="fan", status="failed")
    post(
        "/dashboard/alerts/channels",
        name="ops",
        kind="webhook",
        url=receiver.url + "/" + CHANNEL_TOKEN,
    )
    post("/dashboard/alerts/channels/ops/test")
    post("/dashboard/alerts/rules", name="late", kind="oldest_due", threshold="60", channels="ops")
    post("/dashboard/alerts/rules/late/enabled", enabled="false")
    post("/dashboard/alerts/rules/late/remove")
    post("/dashboard/alerts/channels/ops/remove")
    post("/dashboard/sign-out-everywhere")
    token = sign_in()
    post("/dashboard/sign-out")

    found = entries(db)
    assert [(e["action"], e["target"]) for e in found] == [
        ("dashboard.sign_in", me),
        ("key.create", prefix_of(secret)),
        ("key.revoke", victim),
        ("route.create", "web"),
        ("route.update", "web"),
        ("route.update", "web"),
        ("destination.pause", "fan/crm"),
        ("destination.resume", "fan/crm"),
        ("destination.open", "fan/crm"),
        ("destination.close", "fan/crm"),
        ("events.replay", failed[0]),
        ("deliveries.replay", first_delivery_id(failed[1])),
        ("events.replay", "route=fan status=failed"),
        ("alert_channel.add", "ops"),
        ("alert_channel.test", "ops"),
        ("alert_rule.add", "late"),
        ("alert_rule.disable", "late"),
        ("alert_rule.remove", "late"),
        ("alert_channel.remove", "ops"),
        ("dashboard.sign_out_everywhere", me),
        ("dashboard.sign_in", me),
        ("dashboard.sign_out", me),
    ]
    assert {(e["actor"], e["face"], e["origin"]) for e in found} == {(me, "dashboard", "127.0.0.1")}
    assert found[5]["change"] == {"enabled": {"from": True, "to": False}}
    assert found[4]["change"]["description"] == {"from": None, "to": "edited"}
    assert found[12]["change"]["count"] == 2
    assert found[19]["change"] == {"sessions": 1}
    no_secret_in(found, [SIGNING, STEP_TOKEN, CHANNEL_TOKEN, secret[12:]])
    # Destination changes still name the dashboard's admin as they did.
    changes = client.application.test_client().get(
        "/admin/api/routes/fan/destinations/crm/changes", headers={"X-API-Key": admin_key}
    )
    assert {c["actor"] for c in changes.get_json()["changes"]} == {f"dashboard:{me}"}


# --- the CLI ---


def test_the_cli_records_each_action_once_as_its_os_user_and_host(runner, db, receiver, tmp_path):
    def run(*args, code: int = 0, input: str | None = None):
        result = runner.invoke(args=list(args), input=input)
        assert result.exit_code == code, (args, result.output)
        return result

    run("init")
    key = run("keys", "create", "ci").stdout.strip().splitlines()[0]
    run("keys", "revoke", prefix_of(key))
    run("keys", "revoke", prefix_of(key), code=3)  # revoked already: no entry
    run(
        "routes", "add", "signed", "--mode", "async", "--verify", "standard-webhooks",
        "--secret", SIGNING, "--step", "http:" + json.dumps(step(receiver)["config"]),
    )  # fmt: skip
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps([fan_route(receiver)]))
    run("routes", "apply", str(routes))
    run("routes", "apply", str(routes))  # unchanged: no entry
    run("routes", "secret", "add", "signed", NEW_SIGNING)
    run("routes", "secret", "remove", "signed", SIGNING)
    for action in ("pause", "resume", "open", "close"):
        run("routes", action, "fan", "crm")
    one, *many = (add_event(db, "fan", "crm", "failed") for _ in range(3))
    aimed, *aimed_many = (add_event(db, "fan", "crm", "dead") for _ in range(3))
    waiting = add_event(db, "fan", "crm", "retrying")
    old = add_event(db, "fan", "crm", "delivered", age=timedelta(days=40))
    run("events", "replay", one)
    run("events", "replay", "--status", "failed", "--route", "fan")
    run("events", "replay", aimed, "--destination", "crm")
    run("events", "replay", "--route", "fan", "--status", "dead", "--destination", "crm")
    run("events", "skip", first_delivery_id(waiting))
    run("events", "purge", "--older-than", "30d", "--yes")
    run("alerts", "channels", "add", "ops", "webhook", "--url", f"{receiver.url}/{CHANNEL_TOKEN}")
    run("alerts", "channels", "test", "ops")
    run("alerts", "rules", "add", "late", "oldest_due", "--threshold", "60")
    run("alerts", "rules", "disable", "late")
    run("alerts", "rules", "enable", "late")
    run("alerts", "rules", "remove", "late")
    run("alerts", "channels", "remove", "ops")
    run("routes", "remove", "signed")

    found = entries(db)
    with db.session() as session:
        first_admin = session.scalar(sa.select(ApiKey.prefix).order_by(ApiKey.id))
    assert [(e["action"], e["target"]) for e in found] == [
        ("route.create", "process"),
        ("route.create", "chat"),
        ("key.create", first_admin),
        ("key.create", prefix_of(key)),
        ("key.revoke", prefix_of(key)),
        ("route.create", "signed"),
        ("route.create", "fan"),
        ("route.secret_add", "signed"),
        ("route.secret_remove", "signed"),
        ("destination.pause", "fan/crm"),
        ("destination.resume", "fan/crm"),
        ("destination.open", "fan/crm"),
        ("destination.close", "fan/crm"),
        ("events.replay", one),
        ("events.replay", "route=fan status=failed"),
        ("deliveries.replay", first_delivery_id(aimed)),
        ("deliveries.replay", "route=fan status=dead destination=crm"),
        ("delivery.skip", first_delivery_id(waiting)),
        ("events.purge", "1 events"),
        ("alert_channel.add", "ops"),
        ("alert_channel.test", "ops"),
        ("alert_rule.add", "late"),
        ("alert_rule.disable", "late"),
        ("alert_rule.enable", "late"),
        ("alert_rule.remove", "late"),
        ("alert_channel.remove", "ops"),
        ("route.remove", "signed"),
    ]
    who = f"cli:{getpass.getuser()}"
    assert {(e["actor"], e["face"], e["origin"]) for e in found} == {
        (who, "cli", f"cli@{socket.gethostname()}")
    }
    assert found[14]["change"] == {
        "count": 2,
        "filter": {"route": "fan", "since": None, "status": "failed"},
    }
    assert found[16]["change"]["count"] == 2
    assert found[18]["change"]["deleted"] == 1 and old
    assert found[8]["change"]["removed"].endswith(SIGNING[-4:])
    no_secret_in(found, [SIGNING, NEW_SIGNING, STEP_TOKEN, CHANNEL_TOKEN, key[12:]])

    listed = json.loads(
        run("audit", "list", "--actor", "cli", "--action", "route", "--json").stdout
    )
    assert [e["action"] for e in listed] == [
        "route.remove",
        "route.secret_remove",
        "route.secret_add",
        "route.create",
        "route.create",
        "route.create",
        "route.create",
    ]
    table = run("audit", "list", "--limit", "3").output
    assert "route.remove" in table and who in table and "older entries: --cursor" in table


def test_db_upgrade_records_the_routes_whose_step_secrets_it_encrypted(runner, db, receiver):
    with db.session() as session:  # as an older release stored it: the token in clear
        session.add(Route(name="legacy", mode="sync", steps=[step(receiver)]))
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0  # nothing left: no entry
    found = entries(db)
    assert [(e["action"], e["target"], e["face"]) for e in found] == [
        ("route.secrets_sealed", "legacy", "cli")
    ]
    no_secret_in(found, [STEP_TOKEN])


def test_a_change_whose_entry_cannot_be_written_is_not_made(client, db, admin_key):
    """The entry is written in the change's transaction: without it, no change."""
    with db.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    try:
        answer = client.post(
            "/admin/api/keys", json={"name": "unrecorded"}, headers={"X-API-Key": admin_key}
        )
        assert answer.status_code >= 500 and "Traceback" not in answer.get_data(as_text=True)
        with db.session() as session:
            names = set(session.scalars(sa.select(ApiKey.name)))
        assert names == {"auditor"}
    finally:
        with db.engine.begin() as conn:
            conn.execute(sa.text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    made = client.post(
        "/admin/api/keys", json={"name": "recorded"}, headers={"X-API-Key": admin_key}
    )
    assert made.status_code == 201 and [e["action"] for e in entries(db)] == ["key.create"]


def test_a_bulk_replay_of_many_events_is_one_entry_with_its_filter_and_count(
    client, runner, db, admin_key, add_route, receiver
):
    from tests.rows import insert_events

    add_route("bulk", [{"connector": "text"}])
    insert_events(db, "bulk", 1_200, status="dead")
    answer = client.post(
        "/admin/api/events/replay", json={"route": "bulk"}, headers={"X-API-Key": admin_key}
    )
    assert answer.json["replayed"] == 1_200
    with db.session() as session:
        session.execute(sa.update(Event).where(Event.route == "bulk").values(status="dead"))
    assert runner.invoke(args=["events", "replay", "--status", "dead"]).exit_code == 0
    found = entries(db)
    assert [(e["action"], e["face"], e["change"]["count"]) for e in found] == [
        ("events.replay", "api", 1_200),
        ("events.replay", "cli", 1_200),
    ]
    assert found[0]["change"]["examined"] == 1_200


def test_a_secret_pasted_where_it_does_not_belong_is_cut_from_the_change(client, db, admin_key):
    """Masking covers the fields meant for secrets; the scrub covers the rest: the route's
    own secrets by value and any hub API key by its shape, wherever an admin pasted them."""
    pasted = f"rotate {SIGNING} next week; ci uses {admin_key}"
    route = {
        "name": "pasted",
        "description": pasted,
        "verify": {"scheme": "standard-webhooks", "secrets": [SIGNING]},
    }
    answer = client.post("/admin/api/routes", json=route, headers={"X-API-Key": admin_key})
    assert answer.status_code == 201
    (entry,) = entries(db)
    assert entry["change"]["description"] == (
        f"rotate [redacted] next week; ci uses hk_{prefix_of(admin_key)}_[redacted]"
    )
    no_secret_in([entry], [SIGNING, admin_key[12:]])


def test_a_change_too_big_keeps_only_the_names_of_its_fields(client, db, admin_key):
    route = {"name": "big", "description": "x" * (audit.CHANGE_MAX_BYTES + 10)}
    answer = client.post("/admin/api/routes", json=route, headers={"X-API-Key": admin_key})
    assert answer.status_code == 201
    (entry,) = entries(db)
    assert entry["change"]["fields"][:3] == ["auth", "dedup_path", "dedup_window"]
    assert entry["change"]["cut"].endswith(" bytes")
    assert "x" * 100 not in json.dumps(entry)


# --- reading it: filters and pages on each face ---


def fill(db, count: int = 5) -> None:
    """Entries of two actors and three actions, one of them a year old."""
    cli = audit.Actor("cli:ops", audit.CLI, "cli@box")
    api = audit.Actor("ab12cd34", audit.API, "10.0.0.7")
    with db.session() as session:
        for n in range(count):
            audit.record(session, api, "route.update", f"r{n}", {"n": n})
        audit.record(session, cli, "key.create", "ffff0000", {"name": "k"})
        audit.record(session, cli, "route.remove", "gone")
    insert_entry(db, "old", timedelta(days=300), actor="cli:ops", action="key.revoke")


def insert_entry(db, target: str, age: timedelta, actor: str = "cli:ops", action="key.create"):
    """An entry written ``age`` ago (the hub writes each at its own time: a test's INSERT)."""
    with db.engine.begin() as conn:
        conn.execute(
            sa.insert(AuditEntry.__table__).values(
                at=utcnow() - age, actor=actor, face="cli", action=action, target=target
            )
        )


def test_the_api_lists_the_log_newest_first_filtered_and_paged(client, db, admin_key, make_key):
    fill(db)
    admin = {"X-API-Key": admin_key}

    def listed(**query):
        answer = client.get("/admin/api/audit", query_string=query, headers=admin)
        assert answer.status_code == 200, answer.json
        return answer.json

    everything = listed()["entries"]
    assert [e["target"] for e in everything] == [
        "old",
        "gone",
        "ffff0000",
        "r4",
        "r3",
        "r2",
        "r1",
        "r0",
    ]
    assert [e["target"] for e in listed(actor="cli")["entries"]] == ["old", "gone", "ffff0000"]
    assert [e["target"] for e in listed(actor="cli:ops", since="30d")["entries"]] == [
        "gone",
        "ffff0000",
    ]
    assert [e["target"] for e in listed(action="route")["entries"]][:2] == ["gone", "r4"]
    assert [e["target"] for e in listed(action="route.remove")["entries"]] == ["gone"]
    assert listed(actor="ab12")["entries"] == []  # a prefix is matched whole
    assert listed(actor="ab12cd34")["entries"][0]["origin"] == "10.0.0.7"
    page = listed(limit=3)
    seen = [e["target"] for e in page["entries"]]
    while page["next_cursor"]:
        page = listed(limit=3, cursor=page["next_cursor"])
        seen += [e["target"] for e in page["entries"]]
    assert seen == [e["target"] for e in everything]

    bad = client.get("/admin/api/audit?since=last-tuesday", headers=admin)
    assert bad.status_code == 422 and bad.json["code"] == "invalid"
    assert bad.json["error"].startswith("Invalid request: query.since:")
    wrong = client.get("/admin/api/audit?cursor=bm9wZQ", headers=admin)
    assert wrong.status_code == 400 and wrong.json["code"] == "bad_cursor"
    make_key(name="second")
    keys_cursor = client.get("/admin/api/keys?limit=1", headers=admin).json["next_cursor"]
    borrowed = client.get("/admin/api/audit", query_string={"cursor": keys_cursor}, headers=admin)
    assert borrowed.status_code == 400  # a cursor of another listing
    assert client.get("/admin/api/audit").status_code == 401


def test_the_cli_lists_the_log_filtered(runner, db):
    fill(db)
    listed = runner.invoke(args=["audit", "list", "--actor", "ab12cd34", "--json"])
    assert listed.exit_code == 0
    assert [e["target"] for e in json.loads(listed.stdout)] == ["r4", "r3", "r2", "r1", "r0"]
    recent = runner.invoke(args=["audit", "list", "--since", "1d", "--action", "key"])
    assert "ffff0000" in recent.output and "old" not in recent.output.split()
    bad = runner.invoke(args=["audit", "list", "--since", "last-tuesday"])
    assert bad.exit_code == 1 and "'last-tuesday'" in bad.output and "Traceback" not in bad.output
    cursor = runner.invoke(args=["audit", "list", "--cursor", "nope"])
    assert cursor.exit_code == 1 and "not a cursor from this hub" in cursor.output


def test_the_dashboard_shows_the_log_filtered_and_paged(client, db, admin_key):
    fill(db, 55)
    token = dashboard_token(client)
    client.post("/dashboard/sign-in", data={"key": admin_key, "csrf_token": token})
    page = client.get("/dashboard/audit")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    assert 'href="/dashboard/audit" aria-current="page"' in html  # in the nav
    assert "10.0.0.7" in html and "route.remove" in html and "dashboard.sign_in" in html
    assert "kept 365 days" in html
    only = client.get("/dashboard/audit?actor=cli&since=30d").get_data(as_text=True)
    assert "gone" in only and "ffff0000" in only
    assert "<td>r4</td>" not in only and ">old<" not in only  # a CSRF token may hold "r4"
    bad = client.get("/dashboard/audit?since=last-tuesday")
    assert bad.status_code == 400 and "since:" in bad.get_data(as_text=True)
    assert client.get("/dashboard/audit?cursor=nope").status_code == 400
    assert 'method="post"' not in html.split("<main", 1)[1].split("</main>")[0]  # read only
    newest = client.get("/dashboard/audit?action=route").get_data(as_text=True)
    assert newest.count('<tr id="audit-') == 50 and ">gone<" in newest and ">r0<" not in newest
    older = re.search(r'href="([^"]+)" rel="next"', newest).group(1).replace("&amp;", "&")
    rest = client.get(older).get_data(as_text=True)
    assert rest.count('<tr id="audit-') == 6 and ">r0<" in rest and 'rel="next"' not in rest


# --- append-only ---


def test_no_face_can_change_or_delete_an_entry(client, runner, db, admin_key):
    fill(db, 1)
    before = entries(db)
    admin = {"X-API-Key": admin_key}
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/admin/api/audit", f"/admin/api/audit/{before[0]['id']}"):
            answer = client.open(path, method=method, json={"actor": "x"}, headers=admin)
            assert answer.status_code in (404, 405), (method, path)
    token = dashboard_token(client)
    client.post("/dashboard/sign-in", data={"key": admin_key, "csrf_token": token})
    token = dashboard_token(client, "/dashboard/")
    for path in ("/dashboard/audit", f"/dashboard/audit/{before[0]['id']}"):
        assert client.post(path, data={"csrf_token": token}).status_code in (404, 405)
    group = runner.invoke(args=["audit", "--help"]).output
    assert re.findall(r"^  (\w+)", group.split("Commands:")[1], re.M) == ["list"]
    assert runner.invoke(args=["audit", "delete"]).exit_code == 2
    after = entries(db)
    assert after[: len(before)] == before  # the sign-in added one; none changed or went
    assert [e["action"] for e in after[len(before) :]] == ["dashboard.sign_in"]


def test_the_database_refuses_to_update_an_entry(db):
    fill(db, 1)
    before = entries(db)
    with pytest.raises(sa.exc.DatabaseError, match="append-only"), db.engine.begin() as conn:
        conn.execute(sa.update(AuditEntry).values(actor="someone-else"))
    assert entries(db) == before


# --- retention ---


def test_the_workers_delete_entries_past_the_retention_once_an_hour(app, db):
    for days in (400, 366, 364, 1):
        insert_entry(db, f"{days}d", timedelta(days=days))
    worker = Worker(app, name="retention")
    worker.reap()
    kept = entries(db)
    assert [(e["action"], e["target"]) for e in kept] == [
        ("key.create", "364d"),
        ("key.create", "1d"),
        ("audit.purge", "2 entries"),
    ]
    assert (kept[-1]["actor"], kept[-1]["face"]) == ("hub", "hub")
    assert kept[-1]["change"]["deleted"] == 2 and kept[-1]["change"]["retention_days"] == 365
    insert_entry(db, "370d", timedelta(days=370))
    worker.reap()  # within the hour: no second look
    assert len(entries(db)) == 4
    worker.next_audit_purge = 0.0
    app.config["AUDIT_RETENTION_DAYS"] = 0  # 0 keeps every entry
    worker.reap()
    assert len(entries(db)) == 4
    app.config["AUDIT_RETENTION_DAYS"] = 365
    worker.next_audit_purge = 0.0
    worker.reap()
    assert [e["target"] for e in entries(db)] == ["364d", "1d", "2 entries", "1 entries"]


def test_the_retention_setting_is_checked_at_start(monkeypatch):
    from hub.config import SettingsError, load_settings

    monkeypatch.setenv("HUB_AUDIT_RETENTION_DAYS", "a year")
    with pytest.raises(SettingsError, match="HUB_AUDIT_RETENTION_DAYS: expected a whole number"):
        load_settings()
    monkeypatch.setenv("HUB_AUDIT_RETENTION_DAYS", "100000")
    with pytest.raises(SettingsError, match="0 \\(keep every one\\) to 36500"):
        load_settings()
    monkeypatch.delenv("HUB_AUDIT_RETENTION_DAYS")
    assert load_settings().audit_retention_days == 365


# --- the migration ---


def test_migration_0017_adds_the_audit_log_to_a_database_0016_filled(db):
    # Filled with SQL as 0010 wrote it (the models are the newest schema's), then 0016.
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0010")
    try:
        fill_0010(db)
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(db, conn), "0016")
        with db.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("audit_log")
            before = {
                t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
                for t in ("api_keys", "routes", "destinations", "events", "deliveries")
            }
            names = conn.execute(sa.text("SELECT name FROM routes ORDER BY name")).scalars().all()
        assert before["events"] > 0 and before["deliveries"] > 0
        upgrade(db)
        with db.session() as session:
            assert session.scalars(sa.select(Route.name).order_by(Route.name)).all() == names
            assert session.scalar(sa.select(sa.func.count()).select_from(Event)) == before["events"]
            audit.record(session, audit.RETENTION_ACTOR, "audit.purge", "test")
        assert [e["action"] for e in entries(db)] == ["audit.purge"]
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), db.engine.begin() as c:
            c.execute(sa.text("UPDATE audit_log SET actor = 'x'"))
        indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("audit_log")}
        assert {"ix_audit_log_at", "ix_audit_log_actor_id", "ix_audit_log_action_id"} <= indexes

        with db.engine.begin() as conn:  # and back: the table goes, every other row stays
            command.downgrade(alembic_config(db, conn), "0016")
        with db.engine.connect() as conn:
            assert not sa.inspect(conn).has_table("audit_log")
            after = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in before}
        assert after == before
    finally:
        upgrade(db)


def test_the_docs_list_every_action_as_the_service_describes_it():
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "audit.md").read_text()
    rows = dict(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| (.+) \|$", page, re.M))
    assert rows == audit.ACTIONS
