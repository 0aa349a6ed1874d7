"""A destination's circuit breaker: after consecutive retryable failures its deliveries are
held instead of burning through their retry schedules; after a cool-down one probe is
tried, and its success lets the held deliveries go in their order. Admins open and close
it by hand; every change is recorded with its cause and actor, and /metrics shows it."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select

from hub.services.delivery import Worker
from hub.store.models import Attempt, Delivery, Destination
from hub.testing_servers import Reply
from tests import test_destinations
from tests.conftest import PG_URL
from tests.procs import stop, wait_until, worker
from tests.rows import event_row

admin = test_destinations.admin  # fixture
http = test_destinations.http

BREAKER = {"failures": 3, "cool_down": 1, "max_cool_down": 2}


def breaker_route(client, admin, receiver, breaker=BREAKER, schedule=(60,)) -> None:
    """Route "orders", async, to one destination "b" with ``breaker`` and ``schedule``."""
    route = {
        "name": "orders",
        "mode": "async",
        "destinations": [
            {
                "name": "b",
                "steps": http(receiver),
                "retry_schedule": list(schedule),
                "breaker": breaker,
            }
        ],
    }
    answer = client.post("/admin/api/routes", json=route, headers=admin)
    assert answer.status_code == 201, answer.json


def post(client, key, n: int, start: int = 0) -> list[str]:
    ids = []
    for i in range(start, start + n):
        answer = client.post("/hooks/orders", json={"n": i}, headers={"X-API-Key": key})
        assert answer.status_code == 202, answer.json
        ids.append(answer.json["id"])
    return ids


def drain(app, looks: int | None = None) -> None:
    """Deliver what is due until nothing is; with ``looks``, the worker looks at the open
    circuits (breaker.tick) only in its first ``looks`` passes."""
    worker = Worker(app, name="drain")
    passes = 0
    while True:
        if looks is not None and passes >= looks:
            worker.breaker_tick = lambda: None
        passes += 1
        if not worker.run_once():
            return


def destination(db) -> Destination:
    with db.session() as session:
        return session.scalar(select(Destination).where(Destination.name == "b"))


def changes(client, admin) -> list[dict]:
    answer = client.get("/admin/api/routes/orders/destinations/b/changes", headers=admin)
    assert answer.status_code == 200, answer.json
    return answer.json["changes"]


def down(receiver, status: int = 503) -> None:
    """Every request answered ``status`` until ``up``."""
    receiver.default_reply = lambda: Reply(status, {"down": True})


def up(receiver) -> None:
    receiver.__dict__.pop("default_reply", None)


def sleep_until(at: str | datetime) -> None:
    if isinstance(at, str):
        at = datetime.fromisoformat(at.replace("Z", "+00:00"))
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    time.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()) + 0.05)


def attempts(db) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Attempt))


def test_a_failing_probe_doubles_the_cool_down_and_a_delivered_one_lets_the_held_go_in_order(
    app, client, db, key, admin, receiver
):
    app.config["STEP_TRIES"] = 1
    breaker_route(client, admin, receiver, {"failures": 2, "cool_down": 1, "max_cool_down": 4})
    down(receiver)
    ids = post(client, key, 4)
    # One look at the circuits, before the first delivery: a slow machine may take longer
    # than the 1 s cool-down to drain, and a later look would rightly let the probe go.
    drain(app, looks=1)
    # Two failures opened it: no run of the other two, all four held, no retry spent by
    # the one that opened it.
    assert len(receiver.requests) == 2
    row = destination(db)
    assert (row.state, row.breaker_failures, row.breaker_cool_down) == ("open", 2, 1)
    assert [event_row(db, i).status for i in ids] == ["held"] * 4
    assert "2 consecutive failures; last: POST 127.0.0.1 answered 503" in row.state_reason
    shown = client.post("/admin/api/routes/orders/destinations/b/open", headers=admin).json
    assert shown["state"] == "open" and shown["held"] == 4 and shown["failures"] == 2

    sleep_until(shown["retry_at"])
    drain(app, looks=1)  # the probe (the oldest event) fails: open again, for twice as long
    assert [r.json()["n"] for r in receiver.requests] == [0, 1, 0]
    row = destination(db)
    assert (row.state, row.breaker_cool_down) == ("open", 2)
    assert 1.5 < (row.breaker_retry_at - row.state_changed_at).total_seconds() <= 2.01
    assert [event_row(db, i).status for i in ids] == ["held"] * 4

    up(receiver)
    sleep_until(row.breaker_retry_at)
    drain(app)  # the probe is delivered: closed, and the held ones go, oldest first
    assert [r.json()["n"] for r in receiver.requests][3:] == [0, 1, 2, 3]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 4
    row = destination(db)
    assert (row.state, row.breaker_failures, row.breaker_cool_down) == ("active", 0, None)
    log = changes(client, admin)
    assert [(c["previous"], c["state"]) for c in log] == [
        ("half_open", "active"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("active", "open"),
    ]
    assert {c["actor"] for c in log} == {"breaker"}
    assert log[0]["cause"] == "the probe was delivered"
    assert log[2]["cause"].startswith("the probe failed: POST 127.0.0.1 answered 503")


def test_an_admin_opens_and_closes_a_circuit_from_the_api_and_the_cli(
    app, client, db, key, admin, receiver
):
    breaker_route(client, admin, receiver, {"failures": 3, "cool_down": 60, "max_cool_down": 60})
    base = "/admin/api/routes/orders/destinations/b"
    opened = client.post(f"{base}/open", json={"reason": "receiver migration"}, headers=admin)
    assert opened.status_code == 200, opened.json
    assert opened.json["state"] == "open" and opened.json["state_reason"] == "receiver migration"
    assert opened.json["retry_at"] and opened.json["failures"] == 0
    ids = post(client, key, 2)
    drain(app)
    assert receiver.requests == []
    assert [event_row(db, i).status for i in ids] == ["held"] * 2

    cli = app.test_cli_runner()
    closed = cli.invoke(args=["routes", "close", "orders", "b", "--reason", "migrated"])
    assert closed.exit_code == 0, closed.output
    assert json.loads(closed.output)["state"] == "active"
    drain(app)
    assert [r.json()["n"] for r in receiver.requests] == [0, 1]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 2

    # An open circuit paused is paused; resumed, it is active with a fresh count.
    assert cli.invoke(args=["routes", "open", "orders", "b"]).exit_code == 0
    paused = client.post(f"{base}/pause", json={"reason": "hands off"}, headers=admin)
    assert paused.json["state"] == "paused"
    refused = client.post(f"{base}/close", headers=admin)
    assert refused.status_code == 409 and "paused" in refused.json["error"]
    resumed = cli.invoke(args=["routes", "resume", "orders", "b"])
    assert json.loads(resumed.output)["state"] == "active"

    log = changes(client, admin)
    prefix = admin["Authorization"].split()[1].split("_")[1]
    assert [(c["previous"], c["state"], c["actor"].split(":")[0]) for c in log] == [
        ("paused", "active", "cli"),
        ("open", "paused", prefix),
        ("active", "open", "cli"),
        ("open", "active", "cli"),
        ("active", "open", prefix),
    ]
    assert log[3]["cause"] == "migrated" and log[4]["cause"] == "receiver migration"
    listed = json.loads(cli.invoke(args=["routes", "changes", "orders", "b"]).output)
    assert [c["state"] for c in listed] == [c["state"] for c in log]

    # Without a breaker there is no circuit to open: a sentence, not a change.
    plain = {"name": "plain", "mode": "async", "steps": http(receiver)}
    assert client.post("/admin/api/routes", json=plain, headers=admin).status_code == 201
    answer = client.post("/admin/api/routes/plain/destinations/default/open", headers=admin)
    assert answer.status_code == 409 and "no circuit breaker" in answer.json["error"]
    unknown = cli.invoke(args=["routes", "open", "orders", "nope"])
    assert unknown.exit_code != 0 and "no destination" in unknown.output


def test_permanent_failures_do_not_open_the_circuit(app, client, db, key, admin, receiver):
    """A 4xx is the payload's fault, not the receiver being down."""
    app.config["STEP_TRIES"] = 1
    breaker_route(client, admin, receiver, {"failures": 2, "cool_down": 60, "max_cool_down": 60})
    down(receiver, 422)
    ids = post(client, key, 4)
    drain(app)
    assert len(receiver.requests) == 4
    assert [event_row(db, i).status for i in ids] == ["failed"] * 4
    row = destination(db)
    assert (row.state, row.breaker_failures) == ("active", 0)
    assert changes(client, admin) == []


def test_metrics_show_the_state_and_count_the_openings(app, client, db, key, admin, receiver):
    breaker_route(client, admin, receiver)

    def openings() -> float:
        scraped = client.get("/metrics", headers=admin).get_data(as_text=True)
        found = re.search(
            r'hub_breaker_openings_total\{destination="b",route="orders"\} ([0-9.]+)', scraped
        )
        return float(found.group(1)) if found else 0.0

    app.extensions["hub.metrics.destinations"].ttl = 0  # each scrape reads the database
    before = openings()
    client.post("/admin/api/routes/orders/destinations/b/open", headers=admin)
    scraped = client.get("/metrics", headers=admin).get_data(as_text=True)
    assert 'hub_destination_state{destination="b",route="orders",state="open"} 1.0' in scraped
    assert openings() == before + 1


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_a_receiver_down_for_a_while_gets_every_event_once_back_with_few_attempts(
    client, db, key, admin, receiver, database_url_for_test, tmp_path
):
    """Two worker processes; 20 events while the receiver answers 503 for 4 seconds. The
    retry schedule alone ([1, 1, 1]: four runs in three seconds) would end every one dead;
    the breaker holds them, probes, and delivers all of them once the receiver is back."""
    breaker_route(client, admin, receiver, BREAKER, schedule=(1, 1, 1))
    down(receiver)
    env = {"HUB_WORKER_MAX_IDLE": "0.2", "HUB_STEP_TRIES": "1"}
    procs = [
        worker(database_url_for_test, tmp_path / f"worker-{n}.log", concurrency=2, **env)
        for n in range(2)
    ]
    try:
        ids = post(client, key, 20)
        receiver.wait_for(3, timeout=15)  # the workers are running
        time.sleep(4)
        up(receiver)
        wait_until(
            lambda: {event_row(db, i).status for i in ids} <= {"delivered", "dead", "failed"},
            timeout=20,
            what="every event to end",
        )
    finally:
        for proc in procs:
            stop(proc)
    statuses = [event_row(db, i).status for i in ids]
    assert statuses == ["delivered"] * 20, statuses
    calls = attempts(db)
    assert calls < 40, calls  # the schedule alone: 20 x 4 runs, every one failing
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Delivery)) == 20
    log = list(reversed(changes(client, admin)))
    assert [(c["previous"], c["state"]) for c in log[:2]] == [
        ("active", "open"),
        ("open", "half_open"),
    ]
    assert (log[-1]["previous"], log[-1]["state"]) == ("half_open", "active")
    assert log[0]["cause"].startswith("3 consecutive failures; last: POST 127.0.0.1 answered 503")


def test_an_admin_opens_and_closes_a_circuit_from_the_dashboard(
    app, client, db, key, admin, receiver
):
    from tests.test_dashboard import sign_in, token

    breaker_route(client, admin, receiver, {"failures": 3, "cool_down": 60, "max_cool_down": 60})
    dashboard = app.test_client()
    assert sign_in(dashboard, admin["Authorization"].split()[1]).status_code == 303
    page = "/dashboard/routes/orders"
    assert 'id="open-b"' in dashboard.get(page).get_data(as_text=True)
    opened = dashboard.post(
        f"{page}/destinations/b/open",
        data={"csrf_token": token(dashboard, page), "reason": "flaky receiver"},
    )
    assert opened.status_code == 303
    ids = post(client, key, 2)
    drain(app)
    assert receiver.requests == []
    shown = dashboard.get(page).get_data(as_text=True)
    assert 'id="close-b"' in shown and "2 held" in shown and "flaky receiver" in shown
    closed = dashboard.post(
        f"{page}/destinations/b/close", data={"csrf_token": token(dashboard, page)}
    )
    assert closed.status_code == 303
    drain(app)
    assert [r.json()["n"] for r in receiver.requests] == [0, 1]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 2
    assert [c["actor"].split(":")[0] for c in changes(client, admin)] == ["dashboard"] * 2
