"""Every event reaches an end state or holds a live lease.

- an outcome the database refuses to record is a failed attempt: the retry schedule, then `dead`;
- a delivery that keeps dying (its lease runs out each time) counts against the schedule too;
- a sync request whose process died: its event is marked `failed` by a worker's reaper, never
  redelivered on its own, and replayable;
- `events replay` takes any event that is not in flight, and never a rejected or duplicate one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from datetime import timedelta

import pytest
import requests
from sqlalchemy import text, update

from hub.services.delivery import SYNC_LEASE_PREFIX, Worker
from hub.store.models import Delivery, Event, first_delivery_id, utcnow
from tests.procs import gunicorn, stop, wait_until, worker
from tests.rows import attempts, event_row, events
from tests.servers import Reply

TRIGGER_SQL = {
    "sqlite": [
        "CREATE TRIGGER refuse_{name} BEFORE {op} ON {table} WHEN {when} "
        "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION refuse_{name}() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
        "CREATE TRIGGER refuse_{name} BEFORE {op} ON {table} FOR EACH ROW WHEN ({when}) "
        "EXECUTE FUNCTION refuse_{name}()",
    ],
}
DROP_SQL = {
    "sqlite": ["DROP TRIGGER IF EXISTS refuse_{name}"],
    "postgresql": [
        "DROP TRIGGER IF EXISTS refuse_{name} ON {table}",
        "DROP FUNCTION IF EXISTS refuse_{name}()",
    ],
}


@pytest.fixture
def refuse(db):
    """``refuse(table, op, when)``: the database itself refuses such writes (a trigger), as a
    failing disk or a constraint would; dropped after the test."""
    made = []

    def make(table: str, op: str, when: str) -> None:
        name = f"{table}_{len(made)}"
        with db.engine.begin() as conn:
            for sql in TRIGGER_SQL[db.dialect]:
                conn.execute(text(sql.format(name=name, op=op, table=table, when=when)))
        made.append((name, table))

    yield make
    with db.engine.begin() as conn:
        for name, table in made:
            for sql in DROP_SQL[db.dialect]:
                conn.execute(text(sql.format(name=name, table=table)))


def make_due(db, event_id: str) -> None:
    """Skip the wait of the retry schedule (of the event's deliveries that wait)."""
    with db.session() as session:
        session.execute(update(Event).where(Event.id == event_id).values(next_attempt_at=utcnow()))
        session.execute(
            update(Delivery)
            .where(Delivery.event_id == event_id, Delivery.next_attempt_at.is_not(None))
            .values(next_attempt_at=utcnow())
        )


def expire_lease(db, event_id: str) -> None:
    """The lease of the event's delivery runs out (its worker died)."""
    past = utcnow() - timedelta(seconds=1)
    with db.session() as session:
        session.execute(
            update(Delivery).where(Delivery.event_id == event_id).values(lease_until=past)
        )


def post(client, key, route: str, body=None):
    return client.post(f"/hooks/{route}", json=body or {"input": "x"}, headers={"X-API-Key": key})


# --- recording fails ---


def test_an_outcome_the_database_refuses_follows_the_schedule_to_dead(
    app, client, db, key, add_route, refuse
):
    add_route("later", [{"connector": "text"}], mode="async", retry_schedule=[60, 600])
    event_id = post(client, key, "later").json["id"]
    refuse("events", "UPDATE", "NEW.status = 'delivered'")
    hub = Worker(app)

    for run, expected in [(1, "retrying"), (2, "retrying"), (3, "dead")]:
        assert hub.run_once() == 1
        event = event_row(db, event_id)
        assert (event.status, event.attempts) == (expected, run)
        assert event.last_error.startswith("the outcome could not be recorded (")
        assert event.lease_until is None
        make_due(db, event_id)
    assert hub.run_once() == 0
    assert event.completed_at is not None
    assert [a.outcome for a in attempts(db)] == ["ok"] * 3  # each call is on record


def test_an_attempt_the_database_refuses_to_record_is_a_failed_attempt(
    app, client, db, key, add_route, refuse
):
    add_route("later", [{"connector": "text"}], mode="async", retry_schedule=[60])
    event_id = post(client, key, "later").json["id"]
    refuse("attempts", "INSERT", "NEW.outcome = 'ok'")
    hub = Worker(app)
    hub.run_once()
    event = event_row(db, event_id)
    assert (event.status, event.retries) == ("retrying", 1)
    assert event.last_error.startswith("hub error:")
    make_due(db, event_id)
    hub.run_once()
    assert event_row(db, event_id).status == "dead"


def test_a_sync_outcome_the_database_refuses_ends_the_event_failed(
    client, db, key, add_route, refuse
):
    add_route("shout", [{"connector": "text"}])
    refuse("events", "UPDATE", "NEW.status = 'delivered'")
    response = post(client, key, "shout")
    assert response.status_code == 500
    assert response.json["code"] == "internal_error"
    assert "refused" not in response.get_data(as_text=True)  # no SQL or database message
    [event] = events(db)
    assert event.status == "failed"
    assert "could not be recorded" in event.last_error
    assert (event.lease_owner, event.lease_until) == (None, None)


# --- deliveries that keep dying ---


def test_a_delivery_that_keeps_dying_ends_dead_after_the_schedule(
    app, client, db, key, add_route, receiver
):
    add_route(
        "later",
        [{"connector": "http", "config": {"url": receiver.url}}],
        mode="async",
        retry_schedule=[60, 600],
    )
    event_id = post(client, key, "later").json["id"]
    doomed = Worker(app, name="doomed")
    for run in (1, 2, 3):  # claimed, then the worker dies: the lease runs out
        assert doomed.claim(1) == [first_delivery_id(event_id)]
        event = event_row(db, event_id)
        assert (event.status, event.attempts, event.retries) == ("processing", run, run - 1)
        expire_lease(db, event_id)

    assert Worker(app, name="rescuer").run_once() == 1
    event = event_row(db, event_id)
    assert event.status == "dead"
    assert "lease ran out" in event.last_error
    assert event.completed_at is not None and event.lease_until is None
    assert receiver.requests == []  # the poison event is not delivered a fourth time
    assert Worker(app).run_once() == 0


@pytest.mark.slow
def test_a_poison_event_that_kills_its_workers_ends_dead(
    client, db, key, add_route, receiver, database_url_for_test, tmp_path
):
    receiver.script(Reply(body=None, delay=30), Reply(body=None, delay=30))  # each run hangs
    steps = [{"connector": "http", "config": {"url": receiver.url, "timeout": 60}}]
    add_route("poison", steps, mode="async", retry_schedule=[1])
    event_id = post(client, key, "poison").json["id"]
    env = {"HUB_LEASE_SECONDS": "2", "HUB_WORKER_MAX_IDLE": "0.2", "HUB_STEP_TRIES": "1"}
    for run in (1, 2):  # each delivery kills its worker (SIGKILL while it is delivering)
        doomed = worker(database_url_for_test, tmp_path / f"doomed{run}.log", **env)
        receiver.wait_for(run, timeout=20)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(5)

    last = worker(database_url_for_test, tmp_path / "last.log", **env)
    try:
        wait_until(lambda: event_row(db, event_id).status == "dead", 20, what="dead")
    finally:
        stop(last)
    event = event_row(db, event_id)
    assert "lease ran out" in event.last_error
    assert len(receiver.requests) == 2  # the schedule's one retry, then no more deliveries


def test_a_delivery_that_died_once_is_delivered_and_counted(
    app, client, db, key, add_route, receiver
):
    add_route("later", [{"connector": "http", "config": {"url": receiver.url}}], mode="async")
    event_id = post(client, key, "later").json["id"]
    assert Worker(app, name="doomed").claim(1) == [first_delivery_id(event_id)]
    expire_lease(db, event_id)
    assert Worker(app).run_once() == 1
    event = event_row(db, event_id)
    assert (event.status, event.attempts, event.retries) == ("delivered", 2, 1)
    assert len(receiver.requests) == 1


# --- sync requests whose process died ---


def sync_event(db, *, expired: bool) -> str:
    """A sync event as a request in flight leaves it (its lease expired or not)."""
    now = utcnow()
    event = Event(
        route="shout",
        method="POST",
        path="/hooks/shout",
        status="processing",
        attempts=1,
        received_at=now,
        body=b'{"input": "x"}',
        content_type="application/json",
        lease_owner=SYNC_LEASE_PREFIX + "web:1",
        lease_until=now + timedelta(seconds=-1 if expired else 60),
    )
    with db.session() as session:
        session.add(event)
        session.flush()
        session.add(  # its delivery to the route's first destination, running in the request
            Delivery(
                id=first_delivery_id(event.id),
                event_id=event.id,
                route=event.route,
                destination="default",
                status=event.status,
                attempts=1,
                lease_owner=event.lease_owner,
                lease_until=event.lease_until,
            )
        )
    return event.id


def test_the_reaper_fails_a_sync_event_whose_lease_ran_out_and_never_delivers_it(
    app, db, add_route, runner
):
    add_route("shout", [{"connector": "text"}])
    dead_request = sync_event(db, expired=True)
    live_request = sync_event(db, expired=False)
    assert Worker(app).run_once() == 0  # nothing claimed: sync events are not the worker's
    event = event_row(db, dead_request)
    assert event.status == "failed"
    assert "the process handling the sync request died" in event.last_error
    assert (event.lease_owner, event.attempts) == (None, 1)
    assert event_row(db, live_request).status == "processing"
    assert attempts(db) == []

    result = runner.invoke(args=["events", "replay", dead_request])
    assert f"replayed {dead_request}" in result.output
    assert Worker(app).run_once() == 1
    assert event_row(db, dead_request).status == "delivered"


def test_a_sync_event_holds_a_lease_while_it_runs(client, db, key, add_route, receiver):
    seen = {}

    def look(_recorded):
        [event] = events(db)
        seen.update(status=event.status, owner=event.lease_owner, until=event.lease_until)

    receiver.on_request = look
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url}}])
    started = utcnow()
    assert post(client, key, "fwd").status_code == 200
    assert seen["status"] == "processing" and seen["owner"].startswith(SYNC_LEASE_PREFIX)
    # HUB_SYNC_TIMEOUT (25) + HUB_SYNC_LEASE_MARGIN (30)
    assert timedelta(seconds=50) < seen["until"] - started < timedelta(seconds=60)
    [event] = events(db)
    assert (event.status, event.lease_owner, event.lease_until) == ("delivered", None, None)


@pytest.mark.slow
def test_a_sync_request_whose_server_was_killed_is_recovered_by_a_worker(
    database_url_for_test, db, make_key, add_route, receiver, runner, tmp_path
):
    receiver.script(Reply(body=None, delay=30))  # the receiver hangs: the request is in flight
    add_route("slow", [{"connector": "http", "config": {"url": receiver.url, "timeout": 60}}])
    key = make_key()
    env = {"HUB_SYNC_TIMEOUT": "2", "HUB_SYNC_LEASE_MARGIN": "1", "HUB_EMBEDDED_WORKER": "false"}
    with gunicorn(database_url_for_test, tmp_path / "web.log", workers=1, **env) as (proc, base):

        def send():
            with contextlib.suppress(requests.RequestException):  # the server is killed
                requests.post(
                    f"{base}/hooks/slow", json={"n": 1}, headers={"X-API-Key": key}, timeout=10
                )

        sender = threading.Thread(target=send)
        sender.start()
        receiver.wait_for(1, timeout=20)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        sender.join(10)
    [event] = events(db)
    assert event.status == "processing"  # stranded, but leased

    rescuer = worker(database_url_for_test, tmp_path / "worker.log", HUB_WORKER_MAX_IDLE="0.2")
    try:
        wait_until(lambda: event_row(db, event.id).status == "failed", 20, what="the reaper")
    finally:
        stop(rescuer)
    recovered = event_row(db, event.id)
    assert "the process handling the sync request died" in recovered.last_error
    assert recovered.completed_at is not None
    assert len(receiver.requests) == 1  # not redelivered on its own
    assert rescuer.returncode == 0
    result = runner.invoke(args=["events", "replay", event.id])
    assert f"replayed {event.id}" in result.output


# --- replay ---


@pytest.fixture
def one_of_each(app, client, db, key, add_route):
    """An event in every state a replay meets; their ids by a name for the state."""
    add_route("later", [{"connector": "text"}], mode="async", dedup_path="id")
    ids = {}
    for name in (
        "delivered",
        "failed",
        "dead",
        "filtered",
        "retrying",
        "processing_no_lease",
        "processing_expired",
        "processing_leased",
        "pending",
    ):
        ids[name] = post(client, key, "later", {"input": name}).json["id"]
    original = post(client, key, "later", {"input": "x", "id": 1}).json["id"]
    assert post(client, key, "later", {"input": "x", "id": 1}).json["id"] == original
    [ids["duplicate"]] = [e.id for e in events(db) if e.status == "duplicate"]
    client.post("/hooks/later", json={"input": "x"}, headers={"X-API-Key": "hk_wrong"})
    [ids["rejected"]] = [e.id for e in events(db) if e.status == "rejected"]
    now = utcnow()
    columns = {
        "delivered": {"status": "delivered", "completed_at": now},
        "failed": {"status": "failed", "completed_at": now},
        "dead": {"status": "dead", "completed_at": now},
        "filtered": {"status": "filtered", "completed_at": now},
        "retrying": {
            "status": "retrying",
            "retries": 2,
            "next_attempt_at": now + timedelta(hours=1),
        },
        "processing_no_lease": {"status": "processing"},
        "processing_expired": {
            "status": "processing",
            "lease_owner": "w",
            "lease_until": now - timedelta(seconds=5),
        },
        "processing_leased": {
            "status": "processing",
            "lease_owner": "w",
            "lease_until": now + timedelta(minutes=5),
        },
    }
    with db.session() as session:
        for name, values in columns.items():
            session.execute(update(Event).where(Event.id == ids[name]).values(**values))
    return ids


REPLAYED = (
    "delivered",
    "failed",
    "dead",
    "filtered",
    "retrying",
    "processing_no_lease",
    "processing_expired",
)


def test_replay_takes_every_event_not_in_flight(db, runner, one_of_each):
    ids = one_of_each
    result = runner.invoke(args=["events", "replay", *ids.values(), "evt_nosuch"])
    assert result.exit_code == 1, result.output  # an id that names no event is a failure
    for name in REPLAYED:
        assert f"replayed {ids[name]}" in result.output, name
        event = event_row(db, ids[name])
        assert (event.status, event.retries, event.lease_until) == ("pending", 0, None)
    assert f"skipped {ids['processing_leased']}: processing: in flight" in result.output
    assert event_row(db, ids["processing_leased"]).status == "processing"
    assert f"skipped {ids['pending']}: pending: already waiting" in result.output
    for name in ("rejected", "duplicate"):
        assert f"skipped {ids[name]}: {name}: never accepted" in result.output
        assert event_row(db, ids[name]).status == name
    assert "skipped evt_nosuch: no such event" in result.output
    assert "Error: no such event: evt_nosuch" in result.stderr


def test_bulk_replay_of_processing_events_leaves_live_leases_alone(db, runner, one_of_each):
    ids = one_of_each
    result = runner.invoke(args=["events", "replay", "--status", "processing"])
    assert result.exit_code == 0, result.output
    assert "replayed 2 event(s)" in result.output
    assert event_row(db, ids["processing_expired"]).status == "pending"
    assert event_row(db, ids["processing_leased"]).status == "processing"


@pytest.mark.parametrize("status", ["rejected", "duplicate"])
def test_bulk_replay_refuses_events_that_were_never_accepted(runner, one_of_each, status):
    result = runner.invoke(args=["events", "replay", "--status", status])
    assert result.exit_code != 0
    assert "Invalid value for '--status'" in result.output
