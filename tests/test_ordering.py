"""A destination with an ordering key delivers one key's events one after another, in the
order the hub accepted them; different keys go in parallel; an admin can skip a delivery
that blocks its key."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select, update

from hub.services import events as event_store
from hub.services.delivery import Worker
from hub.store.models import Delivery, Event, EventStatus
from tests import procs, test_destinations
from tests.conftest import PG_URL
from tests.rows import event_row

admin = test_destinations.admin  # fixture

CUSTOMER = "{{ payload.customer }}"


class KeyedReceiver:
    """A receiver on 127.0.0.1 that answers each request as ``decide(payload)`` says (its
    status) and records, in arrival order, (customer, n, status) of every request."""

    def __init__(self, decide: Callable[[dict], int]):
        self.decide = decide
        self.seen: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    status = owner.decide(body)
                    owner.seen.append((body["customer"], body["n"], status))
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/in"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self, customer: str) -> list[int]:
        with self.lock:
            return [n for c, n, status in self.seen if c == customer and status == 200]

    def calls(self, customer: str) -> list[tuple[int, int]]:
        with self.lock:
            return [(n, status) for c, n, status in self.seen if c == customer]


@pytest.fixture
def keyed():
    made: list[KeyedReceiver] = []

    def make(decide: Callable[[dict], int]) -> KeyedReceiver:
        made.append(KeyedReceiver(decide))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def ordered_route(client, admin, url: str, schedule=(1,) * 8, key: str = CUSTOMER) -> None:
    route = {
        "name": "orders",
        "mode": "async",
        "destinations": [
            {
                "name": "a",
                "steps": [{"connector": "http", "config": {"url": url}}],
                "retry_schedule": list(schedule),
                "ordering_key": key,
            }
        ],
    }
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.json


def post(client, key: str, customer: str, n: int) -> dict:
    answer = client.post(
        "/hooks/orders", json={"customer": customer, "n": n}, headers={"X-API-Key": key}
    )
    assert answer.status_code == 202, answer.json
    return answer.json


def assert_in_order(receiver: KeyedReceiver, customer: str, count: int) -> None:
    """Every delivery of ``customer`` arrived in posting order, and none was called before
    the one before it had succeeded: each call is the next one's retry or its successor."""
    expected = 0
    for n, status in receiver.calls(customer):
        assert n == expected, f"{customer}: call of #{n} while #{expected} was not delivered"
        if status == 200:
            expected += 1
    assert expected == count, receiver.calls(customer)


def delivery_of(db, event_id: str) -> Delivery:
    with db.session() as session:
        return session.scalars(select(Delivery).where(Delivery.event_id == event_id)).one()


def wait_until(check, timeout: float = 20.0, what: str = "condition"):
    return procs.wait_until(check, timeout, 0.05, what)


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (worker processes share it)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_each_key_arrives_in_order_across_worker_processes_with_a_failing_receiver(
    app, client, db, key, admin, keyed, tmp_path, database_url_for_test
):
    """Three worker processes of four threads each, a receiver that answers 500 at random
    (25%, seeded): every key's deliveries arrive in the order they were posted, none
    starting before the one before it was delivered, and every event ends delivered."""
    chance = random.Random(20261206)
    receiver = keyed(lambda body: 500 if chance.random() < 0.25 else 200)
    ordered_route(client, admin, receiver.url)
    customers = [f"c{i}" for i in range(4)]
    env = {"HUB_STEP_TRIES": "1", "HUB_WORKER_MAX_IDLE": "0.1"}
    logs = [tmp_path / f"w{i}.log" for i in range(3)]
    workers = [procs.worker(database_url_for_test, log, concurrency=4, **env) for log in logs]
    try:

        def running() -> bool:
            for worker, log in zip(workers, logs, strict=True):
                assert worker.poll() is None, log.read_text()[-2000:]
            return all("delivering with" in log.read_text() for log in logs)

        wait_until(running, 30, "the workers to start")
        # Posted one after another (each answered before the next is sent) while the
        # workers deliver: the order of receipt of each key is n = 0, 1, 2 ...
        ids = [post(client, key, c, n)["id"] for n in range(5) for c in customers]

        def all_ended():
            with db.session() as session:
                statuses = session.scalars(select(Event.status).where(Event.id.in_(ids))).all()
            return statuses.count(EventStatus.DELIVERED) == len(ids)

        wait_until(all_ended, 30, "every event delivered")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            procs.stop(worker)
    for customer in customers:
        assert_in_order(receiver, customer, 5)
    assert any(status == 500 for _, _, status in receiver.seen)  # the receiver did fail


def test_a_key_blocked_by_a_retrying_head_holds_no_other_key(app, client, db, key, admin, keyed):
    """Customer "stuck" always fails: its head is retried and its next waits, queued,
    while customer "free" is delivered whole."""
    app.config["STEP_TRIES"] = 1
    receiver = keyed(lambda body: 500 if body["customer"] == "stuck" else 200)
    ordered_route(client, admin, receiver.url, schedule=[60])
    stuck = [post(client, key, "stuck", n) for n in range(2)]
    free = [post(client, key, "free", n) for n in range(3)]
    # The sender hears where each stands: the first of a key is on its way, the rest wait.
    assert [a["status"] for a in stuck] == ["pending", "queued"]
    assert [a["status"] for a in free] == ["pending", "queued", "queued"]

    worker = Worker(app, name="parallel")
    worker.start(2)
    try:
        wait_until(lambda: receiver.delivered("free") == [0, 1, 2], what="free delivered")
        wait_until(lambda: delivery_of(db, stuck[0]["id"]).status == EventStatus.RETRYING)
    finally:
        worker.stop(grace=5)
    assert receiver.calls("stuck") == [(0, 500)]
    assert delivery_of(db, stuck[1]["id"]).status == EventStatus.QUEUED
    assert event_row(db, stuck[1]["id"]).status == EventStatus.QUEUED
    assert [event_row(db, a["id"]).status for a in free] == ["delivered"] * 3


def test_an_admin_skips_the_delivery_that_blocks_its_key(
    app, client, db, key, admin, keyed, runner
):
    app.config["STEP_TRIES"] = 1
    receiver = keyed(lambda body: 500 if body["n"] == 0 else 200)
    ordered_route(client, admin, receiver.url, schedule=[60])
    first, second, third = (post(client, key, "c", n)["id"] for n in range(3))
    worker = Worker(app, name="skip")
    worker.run_once()
    head = delivery_of(db, first)
    assert head.status == EventStatus.RETRYING
    assert receiver.calls("c") == [(0, 500)]
    worker.run_once()
    assert receiver.calls("c") == [(0, 500)]  # the next waits behind the retrying head

    skipped = client.post(f"/admin/api/deliveries/{head.id}/skip", headers=admin)
    assert skipped.status_code == 200, skipped.json
    assert skipped.json["status"] == "failed"
    assert skipped.json["last_error"] == "skipped by an admin"
    assert skipped.json["event_status"] == "failed"
    shown = client.get(f"/admin/api/events/{first}", headers=admin).json
    assert shown["status"] == "failed" and shown["last_error"] == "skipped by an admin"
    assert delivery_of(db, second).status == EventStatus.PENDING

    while worker.run_once():
        pass
    assert receiver.calls("c") == [(0, 500), (1, 200), (2, 200)]
    assert [event_row(db, i).status for i in (first, second, third)] == [
        "failed",
        "delivered",
        "delivered",
    ]

    again = client.post(f"/admin/api/deliveries/{head.id}/skip", headers=admin)
    assert again.status_code == 409
    assert again.json["code"] == "not_skippable"
    assert "already ended (failed)" in again.json["error"]
    unknown = client.post("/admin/api/deliveries/dlv_nope/skip", headers=admin)
    assert unknown.status_code == 404 and unknown.json["error"] == "No such delivery"

    # The CLI does the same: 3 (nothing to do) for an ended delivery, 1 for an unknown one.
    ended = runner.invoke(args=["events", "skip", head.id])
    assert ended.exit_code == 3 and "already ended" in ended.output
    missing = runner.invoke(args=["events", "skip", "dlv_nope"])
    assert missing.exit_code == 1 and "No delivery has the id 'dlv_nope'" in missing.output


def test_the_cli_skips_a_blocking_delivery(app, client, db, key, admin, keyed, runner):
    app.config["STEP_TRIES"] = 1
    receiver = keyed(lambda body: 500 if body["n"] == 0 else 200)
    ordered_route(client, admin, receiver.url, schedule=[60])
    first, second = (post(client, key, "c", n)["id"] for n in range(2))
    Worker(app, name="cli-skip").run_once()
    head = delivery_of(db, first)
    result = runner.invoke(args=["events", "skip", head.id])
    assert result.exit_code == 0, result.output
    assert f"skipped {head.id}" in result.output
    assert delivery_of(db, second).status == EventStatus.PENDING


def test_one_process_delivers_a_key_in_order_when_its_first_delivery_is_retried(
    app, client, db, key, admin, keyed
):
    """The first delivery fails once and is retried a second later; the second, posted
    after it, waits for it (without the key it would arrive first)."""
    app.config["STEP_TRIES"] = 1
    failed = set()

    def decide(body):
        if body["n"] == 0 and not failed:
            failed.add(0)
            return 500
        return 200

    receiver = keyed(decide)
    ordered_route(client, admin, receiver.url, schedule=[1])
    ids = [post(client, key, "c", n)["id"] for n in range(3)]
    worker = Worker(app, name="one")
    worker.start(2)
    try:
        wait_until(
            lambda: all(event_row(db, i).status == EventStatus.DELIVERED for i in ids),
            what="all delivered",
        )
    finally:
        worker.stop(grace=5)
    assert receiver.calls("c") == [(0, 500), (0, 200), (1, 200), (2, 200)]


def test_a_queued_head_with_nothing_ahead_is_promoted_by_a_worker_pass(
    app, client, db, key, admin, keyed
):
    """A web process that died between its commit and its promotion leaves its key's head
    queued: a worker's periodic pass starts it, so every event reaches an end state."""
    receiver = keyed(lambda body: 200)
    ordered_route(client, admin, receiver.url)
    ids = [post(client, key, "c", n)["id"] for n in range(2)]
    with db.session() as session:  # as if the promotion after the intake never ran
        session.execute(
            update(Delivery).where(Delivery.event_id == ids[0]).values(status=EventStatus.QUEUED)
        )
    worker = Worker(app, name="net")
    while worker.run_once():
        pass
    assert receiver.delivered("c") == [0, 1]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 2


def test_a_key_that_renders_empty_or_missing_is_unordered_and_long_keys_are_hashed(
    app, client, db, key, admin, keyed
):
    receiver = keyed(lambda body: 200)
    ordered_route(client, admin, receiver.url)
    blank = post(client, key, "", 0)["id"]
    answer = client.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
    missing = answer.json["id"]
    long = post(client, key, "x" * 300, 2)["id"]
    nul = post(client, key, "a\u0000b", 3)["id"]
    assert delivery_of(db, blank).order_key is None
    assert delivery_of(db, blank).status == EventStatus.PENDING
    assert delivery_of(db, missing).order_key is None
    hashed = delivery_of(db, long).order_key
    assert hashed.startswith("sha256:") and len(hashed) == 71
    assert delivery_of(db, nul).order_key == "a\\u0000b"  # storable on PostgreSQL too


def test_an_ordering_key_is_checked_when_the_route_is_saved(client, admin, keyed):
    url = "http://127.0.0.1:9/in"
    bad = {
        "name": "bad",
        "mode": "async",
        "destinations": [{"name": "a", "steps": [], "ordering_key": "{{ payload.customer"}],
    }
    answer = client.post("/admin/api/routes", json=bad, headers=admin)
    assert answer.status_code == 422
    assert "destinations[0].ordering_key: template does not parse" in str(answer.json)
    sync = {
        "name": "sync",
        "mode": "sync",
        "destinations": [
            {"name": "a", "steps": [{"connector": "http", "config": {"url": url}}]},
            {"name": "b", "steps": [], "ordering_key": CUSTOMER},
        ],
    }
    assert client.post("/admin/api/routes", json=sync, headers=admin).status_code == 201
    sync["name"], sync["destinations"][0]["ordering_key"] = "sync2", CUSTOMER
    answer = client.post("/admin/api/routes", json=sync, headers=admin)
    assert answer.status_code == 422
    assert "a sync route's first destination runs inside the request" in str(answer.json)


def test_a_paused_ordered_destination_holds_the_head_and_resume_lets_the_key_go_on(
    app, client, db, key, admin, keyed
):
    receiver = keyed(lambda body: 200)
    ordered_route(client, admin, receiver.url)
    paused = client.post("/admin/api/routes/orders/destinations/a/pause", headers=admin)
    assert paused.status_code == 200
    ids = [post(client, key, "c", n)["id"] for n in range(3)]
    worker = Worker(app, name="pause")
    while worker.run_once():
        pass
    assert receiver.seen == []
    assert [delivery_of(db, i).status for i in ids] == ["held", "queued", "queued"]
    resumed = client.post("/admin/api/routes/orders/destinations/a/resume", headers=admin)
    assert resumed.status_code == 200
    while worker.run_once():
        pass
    assert receiver.delivered("c") == [0, 1, 2]


def test_a_replayed_delivery_waits_behind_its_key(app, client, db, key, admin, keyed):
    """A replayed delivery goes back to its key's queue: behind the delivery of the key on
    its way, and ahead of later ones (its place is its id, the order it was accepted)."""
    app.config["STEP_TRIES"] = 1
    blocking = {"on": False}
    receiver = keyed(lambda body: 500 if blocking["on"] and body["n"] == 1 else 200)
    ordered_route(client, admin, receiver.url, schedule=[60])
    first = post(client, key, "c", 0)["id"]
    worker = Worker(app, name="replay")
    worker.run_once()
    blocking["on"] = True
    second, third = (post(client, key, "c", n)["id"] for n in (1, 2))
    worker.run_once()
    assert delivery_of(db, second).status == EventStatus.RETRYING
    replayed = client.post(f"/admin/api/events/{first}/replay", headers=admin)
    assert replayed.status_code == 200
    assert replayed.json["status"] == "queued"  # the answer says where it stands
    assert delivery_of(db, first).status == EventStatus.QUEUED
    assert event_row(db, first).status == EventStatus.QUEUED
    blocking["on"] = False
    client.post(f"/admin/api/deliveries/{delivery_of(db, second).id}/skip", headers=admin)
    while worker.run_once():
        pass
    assert receiver.calls("c") == [(0, 200), (1, 500), (0, 200), (2, 200)]


def test_one_replayed_delivery_waits_behind_its_key_too(app, client, db, key, admin, keyed):
    """Replaying one delivery (not its event) keeps the key's order as well."""
    app.config["STEP_TRIES"] = 1
    blocking = {"on": False}
    receiver = keyed(lambda body: 500 if blocking["on"] and body["n"] == 1 else 200)
    ordered_route(client, admin, receiver.url, schedule=[60])
    first = post(client, key, "c", 0)["id"]
    worker = Worker(app, name="replay-one")
    worker.run_once()
    blocking["on"] = True
    second = post(client, key, "c", 1)["id"]
    worker.run_once()
    assert delivery_of(db, second).status == EventStatus.RETRYING
    one = delivery_of(db, first).id
    replayed = client.post(f"/admin/api/deliveries/{one}/replay", headers=admin)
    assert replayed.status_code == 200, replayed.json
    assert replayed.json["status"] == "queued"
    assert delivery_of(db, first).status == EventStatus.QUEUED  # behind the retrying one
    blocking["on"] = False
    client.post(f"/admin/api/deliveries/{delivery_of(db, second).id}/skip", headers=admin)
    while worker.run_once():
        pass
    assert receiver.calls("c") == [(0, 200), (1, 500), (0, 200)]


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_two_promotions_of_one_key_follow_one_another(app, client, db, key, admin, keyed):
    """A replay puts a delivery back in its key's queue and promotes it, not yet committed;
    meanwhile another request of the same key is accepted. Its promotion waits for the
    replay's commit and then sees the replayed delivery on its way: one delivery of the key
    is pending, not two (each transaction alone would have seen the key free)."""
    receiver = keyed(lambda body: 200)
    ordered_route(client, admin, receiver.url)
    first = post(client, key, "c", 0)["id"]
    Worker(app, name="lock").run_once()
    assert event_row(db, first).status == EventStatus.DELIVERED
    answers: list[dict] = []
    with db.session() as session:
        assert event_store.replay(session, [first]) == [first]
        second = threading.Thread(target=lambda: answers.append(post(client, key, "c", 1)))
        second.start()
        second.join(1.0)
        assert second.is_alive()  # its promotion waits for this transaction's key lock
    second.join(10)
    assert answers[0]["status"] == "queued"
    assert delivery_of(db, first).status == EventStatus.PENDING
    assert delivery_of(db, answers[0]["id"]).status == EventStatus.QUEUED
