"""Alerts: channels and rules, one alert per condition while it lasts, one "resolved"
notice when it clears, evaluated once across processes, sent over real HTTP and SMTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from email import message_from_bytes, policy

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from alembic import command
from sqlalchemy import select, update

from hub import http
from hub.services import alerts
from hub.services.delivery import Worker
from hub.store.db import alembic_config, upgrade
from hub.store.models import Alert, AlertChannel, AlertSend, AlertState, Delivery
from hub.testing_servers import Receiver, Reply
from tests import rows
from tests.conftest import PG_URL
from tests.procs import closed_port, stop, wait_until, worker

TINY = 0.01  # the evaluator's interval in these tests: every call of evaluate() is a turn


class Inbox:
    """An SMTP server's handler that keeps every message it is given."""

    def __init__(self):
        self.messages: list = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's name
        with self.lock:
            self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        return "250 OK"


@pytest.fixture
def smtp():
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=closed_port())
    controller.start()
    inbox.port = controller.port
    try:
        yield inbox
    finally:
        controller.stop()


@pytest.fixture
def admin(make_key):
    return {"X-API-Key": make_key(admin=True, name="admin")}


def evaluate(app):
    time.sleep(TINY)  # the turn taken by the previous call is over
    return alerts.evaluate(app.extensions["hub.db"], TINY)


def send(app) -> int:
    return alerts.send_pending(app.extensions["hub.db"], app.extensions["hub.secrets"], 5.0)


def add_channel(client, admin, **channel):
    answer = client.post("/admin/api/alert-channels", json=channel, headers=admin)
    assert answer.status_code == 201, answer.json
    return answer.json


def add_rule(client, admin, **rule):
    answer = client.post("/admin/api/alert-rules", json=rule, headers=admin)
    assert answer.status_code == 201, answer.json
    return answer.json


def past_commit_lag():
    time.sleep(alerts.COMMIT_LAG + 0.1)


def alert_rows(db) -> list[Alert]:
    with db.session() as session:
        return list(session.scalars(select(Alert).order_by(Alert.id)))


def test_a_storm_of_dead_deliveries_is_one_alert_that_counts_them_and_one_resolved(
    app, client, admin, receiver, db
):
    """10,000 dead deliveries in two bursts: one firing message that says 5,000 (what the
    first look saw), one alert that counts 10,000, and one resolved notice that says so."""
    add_channel(client, admin, name="ops", kind="webhook", url=receiver.url + "/alerts")
    add_rule(client, admin, name="dead-deliveries", kind="delivery_dead", window=1)
    evaluate(app)  # the first look starts the cursors: nothing before it is news
    rows.insert_events(db, "orders", 5000, status="dead")
    past_commit_lag()
    assert [n.kind for n in evaluate(app).notices] == ["firing"]
    rows.insert_events(db, "orders", 5000, status="dead")
    past_commit_lag()
    assert evaluate(app).notices == []  # still the same condition: counted, not sent again
    assert send(app) == 1
    (firing,) = receiver.wait_for(1)
    sent = firing.json()
    assert sent["alert"]["state"] == "firing" and sent["alert"]["subject"] == "orders/default"
    assert "5,000 deliveries to destination default of route orders went dead" in sent["text"]
    (alert,) = alert_rows(db)
    assert (alert.state, alert.count) == ("firing", 10000)

    time.sleep(1.1)  # a window without a dead delivery: the condition cleared
    assert [n.kind for n in evaluate(app).notices] == ["resolved"]
    assert evaluate(app).notices == []
    send(app)
    resolved = receiver.wait_for(2)[1].json()
    assert resolved["alert"]["state"] == "resolved"
    assert "10,000 deliveries went dead" in resolved["text"]
    (alert,) = alert_rows(db)
    assert (alert.state, alert.count) == ("resolved", 10000)
    listed = client.get("/admin/api/alerts", headers=admin).json["alerts"]
    assert [s["kind"] for s in listed[0]["sends"]] == ["firing", "resolved"]
    assert {s["status"] for s in listed[0]["sends"]} == {"sent"}


def test_with_one_channel_and_no_rule_dead_deliveries_and_open_circuits_alert(
    app, client, admin, receiver, db
):
    """The built-in rules: a fresh hub with one channel alerts on both, with no rule made."""
    add_channel(client, admin, name="ops", kind="slack", url=receiver.url + "/slack")
    names = {
        r["name"]: r for r in client.get("/admin/api/alert-rules", headers=admin).json["rules"]
    }
    assert names["dead-deliveries"]["builtin"] and names["open-circuits"]["builtin"]
    route = {
        "name": "shop",
        "destinations": [
            {
                "name": "crm",
                "steps": [{"connector": "http", "config": {"url": receiver.url}}],
                "breaker": {"failures": 3, "cool_down": 60, "max_cool_down": 60},
            }
        ],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    evaluate(app)
    opened = client.post("/admin/api/routes/shop/destinations/crm/open", headers=admin)
    assert opened.status_code == 200
    rows.insert_events(db, "orders", 3, status="dead")
    past_commit_lag()
    assert sorted(n.alert.rule for n in evaluate(app).notices) == [
        "dead-deliveries",
        "open-circuits",
    ]
    send(app)
    texts = sorted(r.json()["text"] for r in receiver.wait_for(2))
    assert "3 deliveries to destination default of route orders went dead" in texts[0]
    assert "the circuit of destination crm of route shop opened" in texts[1]


def test_each_rule_fires_once_and_resolves_once_by_email(app, client, admin, smtp, db):
    channel = {
        "name": "mail",
        "kind": "email",
        "host": "127.0.0.1",
        "port": smtp.port,
        "sender": "hub@example.com",
        "to": ["ops@example.com"],
        "username": None,
    }
    add_channel(client, admin, **channel)
    route = {
        "name": "shop",
        "destinations": [
            {
                "name": "crm",
                "steps": [{"connector": "text"}],
                "breaker": {"failures": 3, "cool_down": 60, "max_cool_down": 60},
            }
        ],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    for name in ("dead-deliveries", "open-circuits"):  # built-ins off: one rule of each kind
        assert client.delete(f"/admin/api/alert-rules/{name}", headers=admin).status_code == 200
    add_rule(client, admin, name="circuit", kind="circuit_open", route="shop")
    add_rule(client, admin, name="dead", kind="delivery_dead", route="ratio", window=2)
    add_rule(
        client, admin, name="ratio", kind="failure_ratio", route="ratio", threshold=0.5, window=2
    )
    add_rule(client, admin, name="late", kind="oldest_due", route="late", threshold=0.5)
    add_rule(
        client, admin, name="refused", kind="refusal_rate", route="spam", threshold=10, window=2
    )
    evaluate(app)

    client.post("/admin/api/routes/shop/destinations/crm/open", headers=admin)
    rows.insert_events(db, "ratio", 5, status="dead")
    rows.insert_events(db, "late", 1, status="pending")
    rows.insert_events(db, "spam", 3, status="rejected")  # 90 a minute over 2 s
    past_commit_lag()
    fired = evaluate(app).notices
    assert sorted((n.alert.rule, n.kind) for n in fired) == [
        ("circuit", "firing"),
        ("dead", "firing"),
        ("late", "firing"),
        ("ratio", "firing"),
        ("refused", "firing"),
    ]
    assert evaluate(app).notices == []  # while they last: no second message

    client.post("/admin/api/routes/shop/destinations/crm/close", headers=admin)
    with db.session() as session:  # the late delivery is delivered at last
        session.execute(update(Delivery).where(Delivery.route == "late").values(status="delivered"))
    time.sleep(2.1)  # the ratio's, the refusals' and the dead deliveries' windows pass
    cleared = evaluate(app).notices
    assert sorted((n.alert.rule, n.kind) for n in cleared) == [
        ("circuit", "resolved"),
        ("dead", "resolved"),
        ("late", "resolved"),
        ("ratio", "resolved"),
        ("refused", "resolved"),
    ]
    assert evaluate(app).notices == []

    while send(app):
        pass
    wait_until(lambda: len(smtp.messages) >= 10, 5, what="ten messages")
    time.sleep(0.2)
    subjects = sorted(m["Subject"].split(":")[0] for m in smtp.messages)
    assert subjects == sorted(
        f"[{notice}] {rule}"
        for rule in ("circuit", "dead", "late", "ratio", "refused")
        for notice in ("firing", "resolved")
    )
    assert all(m["To"] == "ops@example.com" for m in smtp.messages)
    bodies = {m["Subject"].split(":")[0]: m.get_content() for m in smtp.messages}
    assert "5 of the 5 deliveries to destination default of route ratio" in bodies["[firing] ratio"]
    assert "route spam refused 3 requests" in bodies["[firing] refused"]
    assert "destination crm of route shop is active again" in bodies["[resolved] circuit"]


def test_a_channel_answering_500_gets_three_tries_and_ends_failed_with_no_secret_shown(
    app, client, admin, receiver, db
):
    """A channel that answers 500 gets its three tries and ends failed with the error;
    the token in its URL is in neither the channel's listing, its row, nor the error."""
    receiver.script(*[Reply(500)] * 3)
    add_channel(client, admin, name="broken", kind="webhook", url=receiver.url + "/x?token=s3cr3t")
    listed = client.get("/admin/api/alert-channels", headers=admin).json["channels"]
    assert "s3cr3t" not in json.dumps(listed)
    with db.session() as session:  # sealed at rest too
        assert "s3cr3t" not in json.dumps(session.scalar(select(AlertChannel.config)))
    evaluate(app)
    rows.insert_events(db, "orders", 1, status="dead")
    past_commit_lag()
    evaluate(app)
    send(app)
    with db.session() as session:
        (row,) = session.scalars(select(AlertSend))
    assert (row.status, row.attempts) == ("failed", 3)
    assert "500" in row.error and "s3cr3t" not in row.error


def test_a_test_alert_is_queued_by_the_api_and_sent_by_the_worker_thread(
    app, client, admin, receiver
):
    add_channel(client, admin, name="ops", kind="webhook", url=receiver.url)
    answer = client.post("/admin/api/alert-channels/ops/test", headers=admin)
    assert answer.status_code == 202 and answer.json["status"] == "pending"
    app.config["ALERT_INTERVAL"] = 0.05
    runner = alerts.AlertRunner(app.extensions["hub.db"], app.extensions["hub.secrets"], app.config)
    runner.start()
    try:
        (got,) = receiver.wait_for(1)
    finally:
        runner.stop()
    assert "a test alert" in got.json()["text"]
    tests = client.get("/admin/api/alerts", headers=admin).json["tests"]
    assert tests[0]["status"] == "sent"


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
def test_two_worker_processes_on_postgresql_send_one_alert_and_one_resolved(
    pg_database, tmp_path, receiver, monkeypatch
):
    """Both processes evaluate every 20 ms; a burst of dead deliveries every 0.15 s for a
    second is one alert, sent once, resolved once, its count exact (a window counted by
    both would count it twice)."""
    from hub import create_app

    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")
    engine_url = pg_database
    app = create_app(
        {"TESTING": True, "DATABASE_URL": engine_url, "SECRET_KEY": "test-secret-key-for-the-hub"}
    )
    db = app.extensions["hub.db"]
    from sqlalchemy import text

    from tests.conftest import TABLES

    with db.engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    with db.session() as session:
        alerts.add_channel(
            session,
            app.extensions["hub.secrets"],
            {"name": "ops", "kind": "webhook", "url": receiver.url},
        )
        alerts.add_rule(session, {"name": "dead-deliveries", "kind": "delivery_dead", "window": 1})
    env = {"HUB_ALERT_INTERVAL": "0.02"}
    procs = [worker(engine_url, tmp_path / f"w{i}.log", **env) for i in range(2)]
    evaluators: set[str] = set()  # the processes seen taking a turn

    def evaluating() -> bool:
        with db.session() as session:
            ran_by = session.scalar(select(AlertState.ran_by))
        if ran_by:
            evaluators.add(ran_by)
        return ran_by is not None

    try:
        wait_until(evaluating, 15, what="a worker's first evaluation")  # what follows is news
        for _ in range(8):
            rows.insert_events(db, "orders", 125, status="dead")
            deadline = time.monotonic() + 0.15
            while time.monotonic() < deadline:
                evaluating()
                time.sleep(0.02)
        wait_until(
            lambda: evaluating() and len(receiver.requests) >= 2, 10, what="the resolved notice"
        )
        time.sleep(1.0)  # room for a second copy, were there one
    finally:
        for proc in procs:
            stop(proc)
    try:
        logs = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
        states = [r.json()["alert"]["state"] for r in receiver.requests]
        assert states == ["firing", "resolved"], logs[-3000:]
        (alert,) = alert_rows(db)
        assert (alert.state, alert.count) == ("resolved", 1000)
        assert len(evaluators) == 2  # both processes took turns: neither was idle
    finally:
        db.dispose()


def test_the_cli_adds_lists_tests_and_removes_channels_and_rules(runner, receiver, smtp):
    ok = runner.invoke(
        args=["alerts", "channels", "add", "hook", "webhook", "--url", receiver.url + "/t?k=s3cr3t"]
    )
    assert ok.exit_code == 0, ok.output
    mail = [
        "alerts", "channels", "add", "mail", "email", "--host", "127.0.0.1",
        "--port", str(smtp.port), "--sender", "hub@example.com", "--to", "ops@example.com",
    ]  # fmt: skip
    assert runner.invoke(args=mail).exit_code == 0
    bad = runner.invoke(args=["alerts", "channels", "add", "x", "email"])
    assert bad.exit_code == 1 and "host: an email channel needs its SMTP server" in bad.output
    listed = runner.invoke(args=["alerts", "channels", "list", "--json"])
    assert [c["name"] for c in json.loads(listed.output)] == ["hook", "mail"]
    assert "s3cr3t" not in listed.output
    tested = runner.invoke(args=["alerts", "channels", "test", "hook"])
    assert tested.exit_code == 0 and "sent a test alert to hook" in tested.output
    assert "a test alert" in receiver.wait_for(1)[0].json()["text"]
    assert runner.invoke(args=["alerts", "channels", "test", "mail"]).exit_code == 0
    wait_until(lambda: smtp.messages, 5, what="the test email")
    assert smtp.messages[0]["Subject"] == "[test] mail"

    rule = [
        "alerts",
        "rules",
        "add",
        "late",
        "oldest_due",
        "--threshold",
        "60",
        "--channel",
        "mail",
    ]
    assert runner.invoke(args=rule).exit_code == 0
    assert runner.invoke(args=["alerts", "rules", "remove", "open-circuits"]).exit_code == 0
    rules_out = runner.invoke(args=["alerts", "rules", "list"]).output
    assert "late" in rules_out and "on (built-in)" in rules_out and "open-circuits" in rules_out
    assert "off" in rules_out.splitlines()[-1]  # open-circuits, turned off
    again = ["alerts", "rules", "add", "open-circuits", "circuit_open", "--route", "shop"]
    assert runner.invoke(args=again).exit_code == 0  # a built-in turned off can be replaced
    assert runner.invoke(args=again).exit_code == 1  # then the name is taken
    missing = runner.invoke(args=["alerts", "rules", "remove", "nope"])
    assert missing.exit_code == 1 and "No alert rule is named 'nope'" in missing.output
    assert runner.invoke(args=["alerts", "channels", "remove", "hook"]).exit_code == 0
    assert runner.invoke(args=["alerts", "list"]).exit_code == 0


def test_migration_0015_adds_the_alert_tables_and_keeps_every_delivery(db):
    """On a database 0014 filled: the alert tables and the index of ended deliveries come,
    every delivery stays; and back."""
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0014")
    try:
        assert not sa.inspect(db.engine).has_table("alerts")
        rows.insert_events(db, "orders", 3, status="dead")
        upgrade(db)
        inspector = sa.inspect(db.engine)
        for table in ("alert_channels", "alert_rules", "alerts", "alert_sends", "alert_state"):
            assert inspector.has_table(table)
        assert "ix_deliveries_ended_at" in {i["name"] for i in inspector.get_indexes("deliveries")}
        with db.session() as session:
            assert session.scalar(select(sa.func.count()).select_from(Delivery)) == 3
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0014")
        assert not sa.inspect(db.engine).has_table("alert_channels")
        with db.session() as session:
            assert session.scalar(select(sa.func.count()).select_from(Delivery)) == 3
    finally:
        upgrade(db)


@pytest.mark.serial  # seconds a delivery takes beside a hanging channel: run alone
def test_a_channel_that_hangs_slows_no_delivery_and_its_message_ends_failed(
    app, client, admin, receiver, add_route, key, db
):
    """The alert sender waits on a channel that never answers in time while the worker's
    delivery thread delivers five events at once; the message ends failed after its three
    bounded tries, the timeout recorded."""
    add_route("orders", [{"connector": "http", "config": {"url": receiver.url}}], mode="async")
    app.config.update(ALERT_INTERVAL=0.05, ALERT_SEND_TIMEOUT=0.3)
    with Receiver(delay=5) as hanging:
        add_channel(client, admin, name="slow", kind="webhook", url=hanging.url)
        assert client.post("/admin/api/alert-channels/slow/test", headers=admin).status_code == 202
        running = Worker(app, name="isolation")
        running.start(1)
        try:

            def message_status():
                with db.session() as session:
                    return session.scalar(select(AlertSend.status))

            wait_until(lambda: message_status() == "sending", 5, what="the send to start")
            started = time.monotonic()
            for n in range(5):
                answer = client.post("/hooks/orders", json={"n": n}, headers={"X-API-Key": key})
                assert answer.status_code == 202
            receiver.wait_for(5, timeout=5)
            assert time.monotonic() - started < 2.0
            wait_until(lambda: message_status() == "failed", 10, what="the send to give up")
        finally:
            running.stop(grace=2)
    with db.session() as session:
        (row,) = session.scalars(select(AlertSend))
    assert row.attempts == alerts.SEND_TRIES and "timed out" in row.error.lower(), row.error


def test_a_private_address_is_refused_when_saved_and_when_sent(
    app, client, admin, receiver, db, monkeypatch
):
    """Without HUB_ALLOW_PRIVATE_TARGETS, a loopback URL is a 422 naming the setting, and a
    host name that resolves to loopback is refused by hub.http's guard at the send: the
    receiver never sees it."""
    monkeypatch.delenv("HUB_ALLOW_PRIVATE_TARGETS")
    refused = client.post(
        "/admin/api/alert-channels",
        json={"name": "local", "kind": "webhook", "url": receiver.url},
        headers=admin,
    )
    assert refused.status_code == 422 and "HUB_ALLOW_PRIVATE_TARGETS" in refused.json["error"]
    host = socket.gethostname()
    if not all(http.is_forbidden_address(str(info[4][0])) for info in socket.getaddrinfo(host, 80)):
        pytest.skip("this machine's name does not resolve to a local address")
    add_channel(client, admin, name="named", kind="slack", url=f"http://{host}:{receiver.port}/")
    client.post("/admin/api/alert-channels/named/test", headers=admin)
    send(app)
    with db.session() as session:
        (row,) = session.scalars(select(AlertSend))
    assert row.status == "failed" and "private" in row.error.lower(), row.error
    assert receiver.requests == []


def test_channels_and_rules_are_bounded_and_the_next_one_is_refused_in_a_sentence(
    app, client, admin, receiver
):
    app.config.update(ALERT_MAX_CHANNELS=2, ALERT_MAX_RULES=1)
    for name in ("one", "two"):
        add_channel(client, admin, name=name, kind="webhook", url=receiver.url + "/a")
    third = {"name": "three", "kind": "webhook", "url": receiver.url + "/a"}
    answer = client.post("/admin/api/alert-channels", json=third, headers=admin)
    assert answer.status_code == 422
    assert "at most 2 alert channels; remove one first" in answer.get_json()["error"]
    late = {"name": "late", "kind": "oldest_due", "threshold": 60}
    assert client.post("/admin/api/alert-rules", json=late, headers=admin).status_code == 201
    again = {**late, "name": "later"}
    answer = client.post("/admin/api/alert-rules", json=again, headers=admin)
    assert answer.status_code == 422
    assert "at most 1 alert rules" in answer.get_json()["error"]
    with app.extensions["hub.db"].session() as session:
        channels = [c.name for c in alerts.list_channels(session)]
    assert sorted(channels) == ["one", "two"]  # nothing stored by the refusals


def test_turning_a_rule_off_and_on_keeps_it_and_a_built_in_comes_back_as_it_was(db):
    with db.session() as session:
        alerts.add_rule(session, {"name": "slow", "kind": "oldest_due", "threshold": 300})
        alerts.add_rule(session, {"name": "dead-deliveries", "kind": "delivery_dead", "window": 60})
    with db.session() as session:
        off = alerts.set_rule_enabled(session, "slow", False)
        assert (off.enabled, off.threshold) == (False, 300)
        # A built-in rule replaced by a row: turned off and on, it stays the replacement.
        alerts.set_rule_enabled(session, "dead-deliveries", False)
        back = alerts.set_rule_enabled(session, "dead-deliveries", True)
        assert (back.enabled, back.window, back.builtin) == (True, 60, False)
        # A plain built-in rule: off is a disabled row of its name, on removes it.
        assert not alerts.set_rule_enabled(session, "open-circuits", False).enabled
        again = alerts.set_rule_enabled(session, "open-circuits", True)
        assert again.enabled and again.builtin
        with pytest.raises(alerts.NoSuchAlertThing):
            alerts.set_rule_enabled(session, "nope", True)


def test_the_board_lists_every_firing_alert_before_the_resolved_ones_and_counts_past_its_cap(db):
    now = alerts.utcnow()
    with db.session() as session:
        for i in range(5):
            state = "resolved" if i % 2 else "firing"
            session.add(
                Alert(
                    rule="open-circuits",
                    kind="circuit_open",
                    subject=f"shop/d{i}",
                    state=state,
                    count=1,
                    message=f"alert {i}",
                    opened_at=now + alerts.timedelta(seconds=i),
                    last_seen_at=now,
                    resolved_at=now + alerts.timedelta(seconds=20 - 2 * i) if i % 2 else None,
                )
            )
    with db.session() as session:
        shown = alerts.board(session, firing_limit=2, resolved_limit=5)
        assert alerts.firing_count(session) == 3
    assert [a["message"] for a in shown["firing"]] == ["alert 4", "alert 2"]
    assert shown["firing_total"] == 3
    # The most recently resolved first, though it opened earlier.
    assert [a["message"] for a in shown["resolved"]] == ["alert 1", "alert 3"]


def test_a_rule_is_turned_off_and_on_from_the_api_and_the_cli_with_its_thresholds_kept(
    client, admin, runner
):
    added = client.post(
        "/admin/api/alert-rules",
        json={"name": "slow", "kind": "oldest_due", "threshold": 300},
        headers=admin,
    )
    assert added.status_code == 201
    off = client.patch("/admin/api/alert-rules/slow", json={"enabled": False}, headers=admin)
    assert off.status_code == 200
    assert (off.json["enabled"], off.json["threshold"]) == (False, 300)
    builtin = client.patch(
        "/admin/api/alert-rules/open-circuits", json={"enabled": False}, headers=admin
    )
    assert builtin.status_code == 200 and builtin.json["enabled"] is False
    listed = {
        r["name"]: r for r in client.get("/admin/api/alert-rules", headers=admin).json["rules"]
    }
    assert not listed["open-circuits"]["enabled"] and listed["open-circuits"]["builtin"]
    missing = client.patch("/admin/api/alert-rules/nope", json={"enabled": True}, headers=admin)
    assert missing.status_code == 404 and missing.json["error"] == "No alert rule is named 'nope'"
    bad = client.patch("/admin/api/alert-rules/slow", json={"enabled": "yes please"}, headers=admin)
    assert bad.status_code == 422 and "enabled" in bad.json["error"]

    on = runner.invoke(args=["alerts", "rules", "enable", "open-circuits"])
    assert on.exit_code == 0 and "alert rule open-circuits is on" in on.output
    assert runner.invoke(args=["alerts", "rules", "enable", "slow"]).exit_code == 0
    listed = {
        r["name"]: r for r in client.get("/admin/api/alert-rules", headers=admin).json["rules"]
    }
    assert listed["open-circuits"]["enabled"] and listed["slow"]["enabled"]
    assert listed["slow"]["threshold"] == 300
    off = runner.invoke(args=["alerts", "rules", "disable", "slow"])
    assert off.exit_code == 0 and "alert rule slow is off" in off.output
    nope = runner.invoke(args=["alerts", "rules", "disable", "nope"])
    assert nope.exit_code == 1 and "No alert rule is named 'nope'" in nope.output
