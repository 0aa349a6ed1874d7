"""The promises of async delivery, proved with real processes and real HTTP on 127.0.0.1.

- a worker SIGKILLed mid-delivery: the event is delivered again after its lease expires;
- four worker processes, 200 events, PostgreSQL: every event delivered exactly once, the
  idle workers taking no live lease;
- the web server SIGKILLed under load: every id that got a 202 is stored and delivered;
- a receiver failing 503, 503 then 200: two retryable attempts, one ok, `delivered`;
- a receiver answering 400: one attempt, `failed`;
- SIGTERM: a worker finishes its in-flight delivery before it exits.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import pytest
import requests
from sqlalchemy import func, select

from hub.services.delivery import Worker
from hub.store.models import Attempt, Event
from tests.conftest import PG_URL
from tests.procs import gunicorn, stop, wait_until, worker
from tests.rows import event_row, insert_events
from tests.servers import Reply

pytestmark = pytest.mark.slow


def forward_to(receiver, **config):
    """A step that forwards the payload and names the event in a header."""
    return [
        {
            "connector": "http",
            "config": {
                "url": receiver.url + "/in",
                "headers": {"X-Event-Id": "{{ event.id }}"},
                **config,
            },
        }
    ]


def statuses(db) -> Counter:
    with db.session() as session:
        return Counter(session.scalars(select(Event.status)))


def test_receiver_failing_twice_then_ok(app, client, db, key, add_route, receiver):
    receiver.script(Reply(status=503), Reply(status=503), Reply(body=None))
    add_route("flaky", forward_to(receiver), mode="async")
    event_id = client.post("/hooks/flaky", json={"n": 1}, headers={"X-API-Key": key}).json["id"]
    assert Worker(app).run_once() == 1
    with db.session() as session:
        rows = session.scalars(select(Attempt).order_by(Attempt.id)).all()
    assert [(a.outcome, a.http_status) for a in rows] == [
        ("retryable", 503),
        ("retryable", 503),
        ("ok", 200),
    ]
    assert event_row(db, event_id).status == "delivered"
    assert len(receiver.requests) == 3


def test_receiver_answering_400_fails_after_one_attempt(app, client, db, key, add_route, receiver):
    receiver.script(Reply(status=400, body={"error": "bad"}))
    add_route("strict", forward_to(receiver), mode="async")
    event_id = client.post("/hooks/strict", json={"n": 1}, headers={"X-API-Key": key}).json["id"]
    Worker(app).run_once()
    with db.session() as session:
        rows = session.scalars(select(Attempt)).all()
    assert [(a.outcome, a.http_status) for a in rows] == [("permanent", 400)]
    event = event_row(db, event_id)
    assert event.status == "failed" and "400" in event.last_error
    assert len(receiver.requests) == 1


def test_worker_killed_mid_delivery_is_redelivered_after_the_lease(
    client, db, key, add_route, receiver, database_url_for_test, tmp_path
):
    receiver.script(Reply(body=None, delay=30))  # the first delivery hangs
    add_route("crash", forward_to(receiver, timeout=60), mode="async")
    event_id = client.post("/hooks/crash", json={"n": 1}, headers={"X-API-Key": key}).json["id"]
    env = {"HUB_LEASE_SECONDS": "3", "HUB_WORKER_MAX_IDLE": "0.2", "HUB_STEP_TRIES": "1"}

    doomed = worker(database_url_for_test, tmp_path / "doomed.log", **env)
    receiver.wait_for(1, timeout=20)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(5)
    assert event_row(db, event_id).status == "processing"  # its lease is still held

    rescuer = worker(database_url_for_test, tmp_path / "rescuer.log", **env)
    try:
        wait_until(
            lambda: event_row(db, event_id).status == "delivered", 30, what="the rescuer to deliver"
        )
    finally:
        stop(rescuer)
    event = event_row(db, event_id)
    assert event.attempts == 2  # the killed run counts
    ids = [r.headers["x-event-id"] for r in receiver.requests]
    assert ids == [event_id, event_id]
    assert rescuer.returncode == 0


def test_sigterm_lets_a_worker_finish_its_delivery(
    client, db, key, add_route, receiver, database_url_for_test, tmp_path
):
    receiver.script(Reply(body=None, delay=2))
    add_route("slow", forward_to(receiver), mode="async")
    event_id = client.post("/hooks/slow", json={"n": 1}, headers={"X-API-Key": key}).json["id"]
    proc = worker(database_url_for_test, tmp_path / "worker.log", HUB_WORKER_MAX_IDLE="0.2")
    receiver.wait_for(1, timeout=20)
    assert stop(proc, signal.SIGTERM, timeout=20) == 0
    assert event_row(db, event_id).status == "delivered"
    assert len(receiver.requests) == 1


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_four_workers_deliver_200_events_exactly_once(
    db, add_route, receiver, database_url_for_test, tmp_path
):
    """Many workers sharing one database is the PostgreSQL deployment. Each delivery takes
    0.1 s, so the queue empties while deliveries are still in flight: idle workers then look
    for expired leases again and again, and must leave the live ones alone."""
    receiver.delay = 0.1
    add_route("bulk", forward_to(receiver), mode="async")
    insert_events(db, "bulk", 200)
    with db.session() as session:
        ids = set(session.scalars(select(Event.id)))
    procs = [
        worker(
            database_url_for_test, tmp_path / f"w{i}.log", concurrency=4, HUB_WORKER_MAX_IDLE="0.2"
        )
        for i in range(4)
    ]

    def delivered_or_repeated() -> bool:
        seen = Counter(r.headers["x-event-id"] for r in receiver.requests)
        return statuses(db)["delivered"] == 200 or max(seen.values(), default=0) > 1

    try:
        wait_until(delivered_or_repeated, 60, interval=0.2, what="200 deliveries")
        time.sleep(1.0)  # idle workers keep looking: no live lease may be taken meanwhile
    finally:
        for proc in procs:
            stop(proc)
    seen = Counter(r.headers["x-event-id"] for r in receiver.requests)
    assert set(seen) == ids
    assert max(seen.values()) == 1, [i for i, n in seen.items() if n > 1][:5]
    with db.session() as session:
        owners = session.scalar(select(func.count(func.distinct(Attempt.event_id))))
    assert owners == 200
    assert all(p.returncode == 0 for p in procs)


def test_web_server_killed_under_load_loses_no_acknowledged_event(
    app, db, make_key, add_route, receiver, database_url_for_test, tmp_path
):
    add_route("load", forward_to(receiver), mode="async")
    key = make_key()
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop_sending = threading.Event()

    def send(base: str) -> None:
        with requests.Session() as http:
            while not stop_sending.is_set():
                try:
                    r = http.post(
                        f"{base}/hooks/load",
                        json={"t": time.time()},
                        headers={"X-API-Key": key},
                        timeout=5,
                    )
                except requests.RequestException:
                    return  # the server is gone
                if r.status_code == 202:
                    with lock:
                        acknowledged.append(r.json()["id"])

    with gunicorn(database_url_for_test, tmp_path / "web.log", HUB_EMBEDDED_WORKER="false") as (
        proc,
        base,
    ):
        senders = [threading.Thread(target=send, args=(base,)) for _ in range(8)]
        for t in senders:
            t.start()
        wait_until(lambda: len(acknowledged) >= 200, 60, what="200 acknowledged webhooks")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        stop_sending.set()
        for t in senders:
            t.join(10)

    with db.session() as session:
        stored = set(session.scalars(select(Event.id).where(Event.route == "load")))
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} acknowledged events were lost"
    Worker(app).run_once(limit=10**6)
    delivered = {r.headers["x-event-id"] for r in receiver.requests}
    assert set(acknowledged) <= delivered


def test_embedded_worker_delivers_in_the_web_process(
    database_url_for_test, make_key, add_route, receiver, tmp_path
):
    add_route("embedded", forward_to(receiver), mode="async")
    key = make_key()
    with gunicorn(database_url_for_test, tmp_path / "web.log", workers=1) as (_, base):
        answer = requests.post(
            f"{base}/hooks/embedded", json={"hello": "x"}, headers={"X-API-Key": key}, timeout=5
        )
        assert answer.status_code == 202
        status_url = answer.json()["status_url"]

        def delivered():
            shown = requests.get(status_url, headers={"X-API-Key": key}, timeout=5).json()
            return shown["status"] == "delivered" and shown

        shown = wait_until(delivered, 20, what="the embedded worker")
    assert shown["attempts"] == 1
    assert receiver.requests[0].json() == {"hello": "x"}
