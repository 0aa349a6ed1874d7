"""Async delivery in one process: 202s, workers, the retry schedule, dedup, replay, purge."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, update
from werkzeug.serving import make_server

from hub.connectors import Connector, PermanentError, RetryableError
from hub.services import delivery as delivery_module
from hub.services.delivery import Worker
from hub.store.models import Attempt, Delivery, Event, first_delivery_id, utcnow
from tests.conftest import PG_URL
from tests.rows import delivery_row, event_row, events, insert_events
from tests.servers import Reply
from tests.test_dashboard import sign_in, token


class Script(BaseModel):
    fail: list[str] = []  # per call: "retry", "retry-after", "permanent" or "ok"


CALLS: list[str] = []


class ScriptedConnector(Connector):
    """Fails as its config says, call by call (counted across the test), then succeeds."""

    name = "scripted"
    description = "test connector"
    Config = Script

    def run(self, payload, ctx):
        CALLS.append(ctx.event_id)
        plan = self.config.fail
        step = plan[len(CALLS) - 1] if len(CALLS) <= len(plan) else "ok"
        if step == "retry":
            raise RetryableError("receiver answered 503", status=503)
        if step == "retry-after":
            raise RetryableError("receiver answered 429", retry_after=120, status=429)
        if step == "permanent":
            raise PermanentError("receiver answered 400", status=400)
        return {"echo": payload}


@pytest.fixture
def scripted(app):
    CALLS.clear()
    app.extensions["hub.connectors"].register(ScriptedConnector)
    app.config["STEP_TRIES"] = 1
    yield CALLS
    app.extensions["hub.connectors"].unregister("scripted")


@pytest.fixture
def worker(app):
    return Worker(app, name="test-worker")


def attempt_rows(db, event_id) -> list[Attempt]:
    with db.session() as session:
        return list(
            session.scalars(
                select(Attempt).where(Attempt.event_id == event_id).order_by(Attempt.id)
            )
        )


def make_due(db, event_id) -> None:
    """Skip the wait of the retry schedule (of the event's deliveries that wait)."""
    with db.session() as session:
        session.execute(update(Event).where(Event.id == event_id).values(next_attempt_at=utcnow()))
        session.execute(
            update(Delivery)
            .where(Delivery.event_id == event_id, Delivery.next_attempt_at.is_not(None))
            .values(next_attempt_at=utcnow())
        )


def run_and_put_off(worker, db, event_id) -> tuple[float, float]:
    """Run the due event once; the least and most seconds its next attempt was put off.

    The run fell between two readings of the clock, so the bounds hold however slow the
    machine is (one second more each way for how the database stores times).
    """
    before = utcnow()
    assert worker.run_once() == 1
    after = utcnow()
    due = event_row(db, event_id).next_attempt_at
    return (due - after).total_seconds() - 1, (due - before).total_seconds() + 1


def post(client, key, route="later", body=None, **headers):
    return client.post(
        f"/hooks/{route}", json=body or {"input": "x"}, headers={"X-API-Key": key, **headers}
    )


def test_async_route_answers_202_after_commit_and_a_worker_delivers(
    client, db, key, add_route, worker, make_key
):
    add_route("later", [{"connector": "text"}], mode="async")
    response = post(client, key, body={"input": "queued"})
    assert response.status_code == 202
    body = response.json
    assert body["status"] == "pending"
    assert body["status_url"].endswith(f"/events/{body['id']}")
    assert event_row(db, body["id"]).status == "pending"  # committed before the answer

    status = client.get(f"/events/{body['id']}", headers={"X-API-Key": key})
    assert (status.status_code, status.json["status"]) == (200, "pending")
    stranger = make_key(name="someone else")
    assert client.get(f"/events/{body['id']}", headers={"X-API-Key": stranger}).status_code == 404
    assert client.get(f"/events/{body['id']}").status_code == 401

    assert worker.run_once() == 1
    shown = client.get(f"/events/{body['id']}", headers={"X-API-Key": key}).json
    assert shown["status"] == "delivered"
    assert shown["attempts"] == 1 and shown["accepted"] is True
    assert "result" not in shown and "attempt_log" not in shown  # the sender's view
    admin = make_key(admin=True, name="admin")
    full = client.get(f"/events/{body['id']}", headers={"X-API-Key": admin}).json
    assert full["result"] == {"processed": "QUEUED", "length": 6, "words": 1}
    assert [a["outcome"] for a in full["attempt_log"]] == ["ok"]


def test_each_call_is_on_record_before_the_next_starts_and_the_last_with_the_outcome(
    client, db, key, add_route, worker, receiver
):
    """A delivery's calls are written before the next call starts; the last one shares the
    outcome's commit, so a one-step delivery costs one commit."""
    forward = {"connector": "http", "config": {"url": receiver.url + "/in"}}
    add_route("two", [{"connector": "text"}, forward], mode="async")
    receiver.script(Reply(200, {"ok": True}, delay=1.0))
    event_id = client.post("/hooks/two", json={"input": "x"}, headers={"X-API-Key": key}).json["id"]
    delivering = threading.Thread(target=worker.run_once)
    delivering.start()
    receiver.wait_for(1)  # the second call has started; its answer is a second away
    assert [(a.step_index, a.outcome) for a in attempt_rows(db, event_id)] == [(0, "ok")]
    assert event_row(db, event_id).status == "processing"
    delivering.join(10)
    assert [(a.step_index, a.outcome) for a in attempt_rows(db, event_id)] == [
        (0, "ok"),
        (1, "ok"),
    ]
    assert event_row(db, event_id).status == "delivered"

    add_route("one", [{"connector": "text"}], mode="async")
    one = client.post("/hooks/one", json={"input": "x"}, headers={"X-API-Key": key}).json["id"]
    before = worker.commits.batches
    assert worker.run_once() == 1
    assert worker.commits.batches - before == 1  # the call's row and the outcome together
    assert [a.outcome for a in attempt_rows(db, one)] == ["ok"]
    assert event_row(db, one).status == "delivered"


def test_seed_process_in_async_mode_answers_like_a_celery_task(client, key, add_route, worker):
    add_route("process", [{"connector": "text"}], mode="async")
    response = client.post("/api/process", json={"input": "later"}, headers={"X-API-Key": key})
    assert response.status_code == 202
    assert response.json["task_id"] == response.json["id"]


def test_retryable_failures_follow_the_schedule_then_dead(
    client, db, key, add_route, worker, scripted
):
    add_route(
        "later",
        [{"connector": "scripted", "config": {"fail": ["retry"] * 10}}],
        mode="async",
        retry_schedule=[60, 600],
    )
    event_id = post(client, key).json["id"]

    low, high = run_and_put_off(worker, db, event_id)
    event = event_row(db, event_id)
    assert (event.status, event.retries, event.attempts) == ("retrying", 1, 1)
    assert low <= 60 <= high
    assert worker.run_once() == 0  # not due yet

    make_due(db, event_id)
    low, high = run_and_put_off(worker, db, event_id)
    event = event_row(db, event_id)
    assert (event.status, event.retries) == ("retrying", 2)
    assert low <= 600 <= high

    make_due(db, event_id)
    worker.run_once()
    event = event_row(db, event_id)
    assert (event.status, event.attempts) == ("dead", 3)
    assert event.completed_at is not None and "503" in event.last_error
    assert [a.outcome for a in attempt_rows(db, event_id)] == ["retryable"] * 3
    assert [a.run for a in attempt_rows(db, event_id)] == [1, 2, 3]


def test_a_scheduled_retry_is_not_counted_as_an_end_state_in_the_metrics(
    client, db, key, make_key, add_route, worker, scripted
):
    add_route(
        "later",
        [{"connector": "scripted", "config": {"fail": ["retry"] * 10}}],
        mode="async",
        retry_schedule=[60],
    )
    admin = make_key(admin=True)

    def ended() -> dict[str, float]:
        """hub_events_total of the route, by status."""
        text = client.get("/metrics", headers={"X-API-Key": admin}).text
        return {
            sample.labels["status"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "hub_events_total" and sample.labels["route"] == "later"
        }

    before = ended()
    event_id = post(client, key).json["id"]
    worker.run_once()
    assert event_row(db, event_id).status == "retrying"
    assert ended() == before

    make_due(db, event_id)
    worker.run_once()
    assert event_row(db, event_id).status == "dead"
    after = ended()
    assert after.get("dead", 0) - before.get("dead", 0) == 1
    assert "retrying" not in after


def test_retry_after_from_the_far_side_stretches_the_delay(
    client, db, key, add_route, worker, scripted
):
    add_route(
        "later",
        [{"connector": "scripted", "config": {"fail": ["retry-after"]}}],
        mode="async",
        retry_schedule=[1],
    )
    event_id = post(client, key).json["id"]
    worker.run_once()
    event = event_row(db, event_id)
    assert event.status == "retrying"
    assert event.next_attempt_at - utcnow() > timedelta(seconds=60)  # 120, not the 1 s schedule


def test_permanent_error_fails_at_once(client, db, key, add_route, worker, scripted):
    add_route("later", [{"connector": "scripted", "config": {"fail": ["permanent"]}}], mode="async")
    event_id = post(client, key).json["id"]
    worker.run_once()
    event = event_row(db, event_id)
    assert (event.status, event.attempts) == ("failed", 1)
    assert [a.outcome for a in attempt_rows(db, event_id)] == ["permanent"]
    assert worker.run_once() == 0


def test_quick_retries_inside_one_attempt_are_each_logged(
    app, client, db, key, add_route, worker, scripted
):
    app.config["STEP_TRIES"] = 3
    add_route(
        "later", [{"connector": "scripted", "config": {"fail": ["retry", "retry"]}}], mode="async"
    )
    event_id = post(client, key).json["id"]
    worker.run_once()
    assert event_row(db, event_id).status == "delivered"
    rows = attempt_rows(db, event_id)
    assert [(a.outcome, a.try_number, a.run) for a in rows] == [
        ("retryable", 1, 1),
        ("retryable", 2, 1),
        ("ok", 3, 1),
    ]


def test_replay_requeues_and_keeps_the_attempt_history(
    client, db, key, add_route, worker, scripted, runner
):
    add_route("later", [{"connector": "scripted", "config": {"fail": ["permanent"]}}], mode="async")
    event_id = post(client, key).json["id"]
    worker.run_once()
    assert event_row(db, event_id).status == "failed"

    result = runner.invoke(args=["events", "replay", event_id])
    assert result.exit_code == 0 and f"replayed {event_id}" in result.output
    event = event_row(db, event_id)
    assert (event.status, event.completed_at) == ("pending", None)
    worker.run_once()
    event = event_row(db, event_id)
    assert (event.status, event.attempts) == ("delivered", 2)
    assert [(a.outcome, a.run) for a in attempt_rows(db, event_id)] == [("permanent", 1), ("ok", 2)]
    pending = post(client, key).json["id"]
    refused = runner.invoke(args=["events", "replay", pending])
    assert "skipped" in refused.output
    assert event_row(db, pending).status == "pending"


def test_a_replay_starts_the_retry_schedule_again(
    client, db, key, add_route, worker, scripted, runner
):
    add_route(
        "later",
        [{"connector": "scripted", "config": {"fail": ["retry"] * 5}}],
        mode="async",
        retry_schedule=[60, 600],
    )
    event_id = post(client, key).json["id"]
    for _ in range(2):
        worker.run_once()
        make_due(db, event_id)
    worker.run_once()
    event = event_row(db, event_id)
    assert (event.status, event.retries, event.attempts) == ("dead", 2, 3)

    assert runner.invoke(args=["events", "replay", event_id]).exit_code == 0
    event = event_row(db, event_id)
    assert (event.status, event.retries) == ("pending", 0)
    low, high = run_and_put_off(worker, db, event_id)  # fails again: the first delay, not dead
    event = event_row(db, event_id)
    assert (event.status, event.retries, event.attempts) == ("retrying", 1, 4)
    assert low <= 60 <= high
    make_due(db, event_id)
    low, high = run_and_put_off(worker, db, event_id)
    assert event_row(db, event_id).status == "retrying"
    assert low <= 600 <= high  # the second delay, in its turn
    make_due(db, event_id)
    worker.run_once()  # the sixth call succeeds
    assert event_row(db, event_id).status == "delivered"


def test_bulk_replay_by_status_and_route(client, db, key, add_route, worker, scripted, runner):
    # Calls are counted across routes, and routes take turns: four entries cover the three
    # `later` calls whichever turn the `other` event's call takes.
    add_route(
        "later", [{"connector": "scripted", "config": {"fail": ["permanent"] * 4}}], mode="async"
    )
    add_route("other", [{"connector": "scripted", "config": {}}], mode="async")
    ids = [post(client, key).json["id"] for _ in range(3)]
    other = post(client, key, route="other").json["id"]
    worker.run_once()
    with db.session() as session:  # make the `other` event failed too
        session.execute(update(Event).where(Event.id == other).values(status="failed"))

    result = runner.invoke(args=["events", "replay", "--status", "failed", "--route", "later"])
    assert result.exit_code == 0, result.output
    assert "replayed 3 event(s)" in result.output
    assert {event_row(db, i).status for i in ids} == {"pending"}
    assert event_row(db, other).status == "failed"


@pytest.mark.parametrize(
    "headers, body",
    [
        ({"Idempotency-Key": "abc-1"}, {"input": "x"}),
        ({"webhook-id": "msg_2"}, {"input": "x"}),
        ({"X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}, {"input": "x"}),
        ({"X-Shopify-Webhook-Id": "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"}, {"input": "x"}),
        ({}, {"id": "evt_stripe_1", "input": "x"}),
    ],
)
def test_duplicates_are_answered_with_the_first_event_and_never_delivered_twice(
    client, db, key, add_route, worker, headers, body
):
    add_route("later", [{"connector": "text"}], mode="async", dedup_path="id")
    first = post(client, key, body=body, **headers)
    second = post(client, key, body=body, **headers)
    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json == {"id": first.json["id"], "duplicate": True}
    assert worker.run_once() == 1
    with db.session() as session:
        rows = list(session.scalars(select(Event).order_by(Event.received_at)))
        delivered = session.scalars(select(Attempt.event_id)).all()
    assert [r.status for r in rows] == ["delivered", "duplicate"]
    assert rows[1].duplicate_of == rows[0].id
    assert delivered == [rows[0].id]


def test_concurrent_copies_of_one_delivery_are_accepted_once(app, db, key, add_route):
    """4 threads post the same Idempotency-Key at once, 20 times over, to a real threaded
    server: each time exactly one copy is accepted (PostgreSQL serialises the look-up with
    an advisory lock, SQLite with its write lock)."""
    add_route("later", [{"connector": "text"}], mode="async")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    url = f"http://127.0.0.1:{server.server_port}/hooks/later"
    rounds, senders = 20, 4
    start = threading.Barrier(senders)
    sessions = [requests.Session() for _ in range(senders)]

    def send(sender: int, delivery: str) -> int:
        start.wait(timeout=30)
        answer = sessions[sender].post(
            url,
            json={"input": "x"},
            headers={"X-API-Key": key, "Idempotency-Key": delivery},
            timeout=30,
        )
        return answer.status_code

    deliveries = [f"delivery-{n}" for n in range(rounds)]
    try:
        with ThreadPoolExecutor(senders) as pool:
            codes = [
                sorted(pool.map(send, range(senders), [delivery] * senders))
                for delivery in deliveries
            ]
    finally:
        server.shutdown()
        serving.join(10)
        server.server_close()
        for session in sessions:
            session.close()
    assert codes == [[200, 200, 200, 202]] * rounds
    with db.session() as session:
        accepted = session.execute(
            select(Event.dedup_key, func.count())
            .where(Event.status != "duplicate")
            .group_by(Event.dedup_key)
        ).all()
    assert sorted(accepted) == sorted((delivery, 1) for delivery in deliveries)


def test_dedup_window_and_opt_out(client, db, key, add_route):
    add_route("later", [{"connector": "text"}], mode="async", dedup_window=3600)
    first = post(client, key, **{"Idempotency-Key": "k1"}).json["id"]
    with db.session() as session:  # the first copy is now older than the window
        session.execute(
            update(Event).where(Event.id == first).values(received_at=utcnow() - timedelta(hours=2))
        )
    assert post(client, key, **{"Idempotency-Key": "k1"}).status_code == 202
    add_route("nodedup", [{"connector": "text"}], mode="async", dedup_window=0)
    assert post(client, key, route="nodedup", **{"Idempotency-Key": "k2"}).status_code == 202
    assert post(client, key, route="nodedup", **{"Idempotency-Key": "k2"}).status_code == 202


def test_sync_routes_dedup_too(client, key, add_route):
    add_route("now", [{"connector": "text"}])
    first = post(client, key, route="now", **{"Idempotency-Key": "s1"})
    again = post(client, key, route="now", **{"Idempotency-Key": "s1"})
    assert first.status_code == 200
    assert again.json == {"id": first.json["id"], "duplicate": True}


def test_an_expired_lease_is_claimed_again_and_the_old_owner_cannot_overwrite(
    app, client, db, key, add_route
):
    add_route("later", [{"connector": "text"}], mode="async")
    event_id = post(client, key).json["id"]
    app.config["LEASE_SECONDS"] = 60
    crashed = Worker(app, name="crashed")
    delivery_id = first_delivery_id(event_id)  # what workers claim: the event's delivery
    assert crashed.claim() == [delivery_id]
    rescuer = Worker(app, name="rescuer")
    assert rescuer.claim() == []  # the lease still holds
    with db.session() as session:  # the crashed worker's lease runs out
        session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    assert rescuer.claim() == [delivery_id]
    assert event_row(db, event_id).attempts == 2
    assert rescuer.process(delivery_id) == "delivered"
    # A late write by the first owner changes nothing.
    assert crashed.process(delivery_id) == "lease_lost"
    assert event_row(db, event_id).status == "delivered"


def test_an_events_only_delivery_ends_without_reading_its_deliveries_back(
    app, client, db, key, add_route
):
    """The claim counts each event's deliveries; an event's only one is rolled up from
    what the worker holds, with no read of the deliveries and no lock of the event."""
    add_route("later", [{"connector": "text"}], mode="async")
    event_id = post(client, key).json["id"]
    worker = Worker(app, name="ender")
    (delivery_id,) = worker.claim()
    sent: list[str] = []
    listen = sa_event.listens_for(db.engine, "before_cursor_execute")

    @listen
    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(" ".join(statement.split()))

    try:
        assert worker.process(delivery_id) == "delivered"
    finally:
        sa_event.remove(db.engine, "before_cursor_execute", record)
    assert event_row(db, event_id).status == "delivered"
    reads = [s for s in sent if s.startswith("SELECT") and "deliveries.event_id" in s]
    locks = [s for s in sent if s.startswith("SELECT events.id") and "FOR UPDATE" in s]
    assert (reads, locks) == ([], [])


def test_a_quick_routes_deliveries_are_claimed_and_ended_in_groups(app, db, add_route):
    """Once its deliveries are known quick, a delivery thread takes a group of them, runs
    them and commits their attempts and outcomes together: a few commits for 300
    deliveries, each delivered once, each with its attempt row."""
    add_route("later", [{"connector": "text"}], mode="async")
    insert_events(db, "later", 300, body=b'{"input": "x"}')
    commits = []

    def count(conn):  # the delivery threads' commits, not this test's reads
        if threading.current_thread().name.startswith("hub-worker"):
            commits.append(conn)

    sa_event.listen(db.engine, "commit", count)
    worker = Worker(app, name="grouper")
    worker.start(4)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if {e.status for e in events(db)} == {"delivered"}:
                break
            time.sleep(0.05)
    finally:
        worker.stop(grace=5)
        sa_event.remove(db.engine, "commit", count)
    assert {e.status for e in events(db)} == {"delivered"}
    with db.session() as session:
        per_event = session.execute(
            select(Attempt.event_id, func.count()).group_by(Attempt.event_id)
        ).all()
    assert len(per_event) == 300 and {n for _, n in per_event} == {1}
    # Taken one a thread, they cost more than one commit each (348 here); in groups, 67.
    assert len(commits) < 150, len(commits)


def test_an_idle_worker_leaves_an_event_whose_lease_is_still_live_alone(
    app, client, db, key, add_route
):
    add_route("later", [{"connector": "text"}], mode="async")
    event_id = post(client, key).json["id"]
    app.config["LEASE_SECONDS"] = 60
    delivery_id = first_delivery_id(event_id)
    assert Worker(app, name="busy").claim() == [delivery_id]  # delivering it, for a minute
    app.config["WORKER_MAX_IDLE"] = 0.05  # the idle one looks often, expired leases too
    idle = Worker(app, name="idle")
    idle.start(2)
    try:
        time.sleep(1.0)
    finally:
        idle.stop(grace=1)
    delivery = delivery_row(db, delivery_id)  # the lease is the delivery's
    assert (delivery.status, delivery.lease_owner, delivery.attempts) == ("processing", "busy", 1)
    assert (event_row(db, event_id).status, event_row(db, event_id).attempts) == ("processing", 1)


def test_events_list_and_show(client, db, key, add_route, worker, runner):
    add_route("later", [{"connector": "text"}], mode="async")
    event_id = post(client, key, body={"input": "look at me"}).json["id"]
    post(client, "wrong-key")
    worker.run_once()
    listing = runner.invoke(args=["events", "list", "--route", "later"]).output
    assert event_id in listing and "delivered" in listing
    rejected = json.loads(
        runner.invoke(args=["events", "list", "--status", "rejected", "--json"]).output
    )
    assert [e["reason"] for e in rejected] == ["unauthorized"]
    shown = json.loads(runner.invoke(args=["events", "show", event_id]).output)
    assert json.loads(shown["body"]) == {"input": "look at me"}
    assert shown["headers"]["x-api-key"] == "[redacted]"
    assert shown["attempt_log"][0]["connector"] == "text"


def test_purge_deletes_old_finished_events_with_their_attempts(
    client, db, key, add_route, worker, runner
):
    add_route("later", [{"connector": "text"}], mode="async")
    old = [post(client, key).json["id"] for _ in range(3)]
    worker.run_once()
    waiting = post(client, key).json["id"]
    recent = post(client, key, route="ghost").status_code  # a rejected one, recent
    assert recent == 404
    with db.session() as session:
        session.execute(
            update(Event)
            .where(Event.id.in_(old + [waiting]))
            .values(received_at=utcnow() - timedelta(days=40))
        )
    result = runner.invoke(args=["events", "purge", "--older-than", "30d", "--yes"])
    assert result.exit_code == 0 and "purged 3 event(s)" in result.output
    with db.session() as session:
        left = set(session.scalars(select(Event.status)))
        assert session.scalars(select(Attempt)).all() == []
    assert left == {"pending", "rejected"}


def test_stop_hands_back_what_is_in_flight(app, client, db, key, add_route):
    add_route("later", [{"connector": "text"}], mode="async")
    event_id = post(client, key).json["id"]
    worker = Worker(app, name="stopping")
    delivery_id = first_delivery_id(event_id)
    assert worker.claim() == [delivery_id]
    worker.in_flight.add(delivery_id)  # as if a delivery thread were inside it
    worker.stop(grace=0)
    event = event_row(db, event_id)
    assert (event.status, event.lease_owner) == ("retrying", None)
    assert event.next_attempt_at <= utcnow()


def test_a_delivery_thread_survives_an_error_while_recording(app, client, key, add_route):
    add_route("later", [{"connector": "text"}], mode="async")
    post(client, key)
    app.config["WORKER_MAX_IDLE"] = 0.05
    worker = Worker(app, name="unlucky")
    calls = []

    def broken_process(event_id):
        calls.append(event_id)
        if len(calls) > 1:
            worker.stopping.set()
        raise RuntimeError("database went away")

    worker.process = broken_process
    worker.lease = 0.0  # the failed claim is due again at once
    thread = threading.Thread(target=worker.loop)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    assert len(calls) == 2  # it went on claiming after the first error


def test_an_idle_worker_backs_off_instead_of_hammering_the_database(app):
    app.config["WORKER_MAX_IDLE"] = 0.4
    worker = Worker(app, name="idle")
    looks = []
    claim = worker.claim
    worker.claim = lambda limit=1: looks.append(1) or claim(limit)
    thread = threading.Thread(target=worker.loop)
    thread.start()
    worker.stopping.wait(2.0)
    worker.stopping.set()
    worker.wakeup.set()
    thread.join(5)
    # Backing off 0.05 s, 0.1, 0.2, then 0.4 s at most: about 8 looks in 2 s, where a
    # worker polling every 0.05 s would make 40 (a busy machine makes fewer, never more).
    assert 2 <= len(looks) <= 12


@pytest.fixture
def listener(database_url_for_test):
    """A worker of another process, listening only: a second app that shares the database,
    not the in-process wake-up, so only PostgreSQL's NOTIFY can reach it."""
    from hub import create_app

    other = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url_for_test,
            "SECRET_KEY": "x",
            "WORKER_MAX_IDLE": 60,
        }
    )
    worker = Worker(other, name="listener")
    worker.start(0)  # the LISTEN thread only
    yield worker
    # Stopped whole: its alert threads would otherwise go on evaluating the shared database
    # (with another secret key) and take the turns of later tests' evaluators.
    worker.stop(grace=1)
    other.extensions["hub.db"].dispose()


def heard(worker: Worker, act) -> bool:
    """Act until the listener hears it (its LISTEN connection comes up in its own time)."""
    for _ in range(50):
        worker.wakeup.clear()
        act()
        if worker.wakeup.wait(0.2):
            return True
    return False


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_a_new_event_wakes_a_worker_in_another_process_by_notify(client, key, add_route, listener):
    add_route("later", [{"connector": "text"}], mode="async")

    def new_event():
        assert post(client, key).status_code == 202

    assert heard(listener, new_event)


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_an_idle_notifier_gives_its_connection_back_and_a_new_event_still_wakes(
    app, client, key, add_route, listener, monkeypatch
):
    """A web process that stops taking webhooks holds no database connection for NOTIFY."""
    monkeypatch.setattr(delivery_module, "NOTIFIER_IDLE", 0.3)
    add_route("later", [{"connector": "text"}], mode="async")
    notifier = app.extensions["hub.notifier"]

    def new_event():
        assert post(client, key).status_code == 202

    assert heard(listener, new_event)
    thread = notifier._thread
    assert thread is not None
    thread.join(5)
    assert not thread.is_alive() and notifier._thread is None  # ended, its connection closed
    assert heard(listener, new_event)  # and started again by the next webhook


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_a_replay_on_any_face_wakes_a_worker_in_another_process(
    app, client, runner, db, make_key, listener
):
    """The admin API, the dashboard and `events replay` all wake the workers of other
    processes."""
    insert_events(db, "orders", 1, status="dead")
    event_id = events(db)[0].id

    def dead_again() -> None:
        with db.session() as session:
            session.get(Event, event_id).status = "dead"

    admin = {"X-API-Key": make_key(admin=True)}
    dashboard = app.test_client()
    assert sign_in(dashboard, make_key(admin=True)).status_code == 303

    def by_api():
        dead_again()
        assert client.post(f"/admin/api/events/{event_id}/replay", headers=admin).status_code == 200

    def by_dashboard():
        dead_again()
        replayed = dashboard.post(
            f"/dashboard/events/{event_id}/replay",
            data={"csrf_token": token(dashboard, "/dashboard/")},
        )
        assert replayed.status_code == 303

    def by_command():
        dead_again()
        assert runner.invoke(args=["events", "replay", event_id]).exit_code == 0

    assert heard(listener, by_api)
    assert heard(listener, by_dashboard)
    assert heard(listener, by_command)


def test_purge_also_drops_rate_limit_windows_of_quiet_buckets(db, runner):
    from hub.store.models import RateCounter

    now = utcnow()
    with db.session() as session:
        session.add_all(
            [
                RateCounter(
                    bucket="key:gone", window_start=0, count=5, expires_at=now - timedelta(hours=3)
                ),
                RateCounter(
                    bucket="route:live",
                    window_start=1,
                    count=1,
                    expires_at=now + timedelta(seconds=30),
                ),
            ]
        )
    result = runner.invoke(args=["events", "purge", "--older-than", "30d", "--yes"])
    assert "dropped 1 expired rate-limit window(s)" in result.output
    with db.session() as session:
        assert list(session.scalars(select(RateCounter.bucket))) == ["route:live"]


def test_a_claims_list_of_ids_is_one_parameter_on_postgresql(db):
    """The claim's and the group ending's lists of ids: on PostgreSQL one array parameter,
    the same SQL whatever the count; on SQLite an IN list. Either finds the same rows."""
    from sqlalchemy.dialects import postgresql

    column = Event.__table__.c.id
    sql = {
        n: str(
            select(column)
            .where(delivery_module.one_of(column, [f"evt_{i}" for i in range(n)], "postgresql"))
            .compile(dialect=postgresql.dialect())
        )
        for n in (2, 32)
    }
    assert sql[2] == sql[32] and "= ANY (" in sql[2]
    insert_events(db, "r", 3)
    with db.session() as session:
        ids = sorted(session.scalars(select(column)))[:2]
        found = session.scalars(
            select(column).where(delivery_module.one_of(column, ids, db.dialect))
        ).all()
    assert sorted(found) == ids
