"""Fair delivery: one destination's backlog or slow receiver does not hold back another.

- in one process: a claim takes turns across routes, and a route holds at most its share
  of a worker's delivery threads (``HUB_WORKER_ROUTE_SHARE``);
- with real processes (2 ``flask --app hub worker --concurrency 4``, as docs/operations.md deploys
  them): a burst of 120 events to a receiver that takes 5 s, or a bulk replay of 5,000
  events, and then one event of another sender on another route, delivered in under 5 s.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import requests
import sqlalchemy as sa
from alembic import command

from hub.services import events as event_store
from hub.services.delivery import Worker
from hub.store.db import alembic_config, upgrade
from hub.store.models import Delivery, Destination, Event, utcnow
from hub.testing_servers import Receiver
from tests.procs import gunicorn, stop, wait_until, worker
from tests.rows import delivery_row, event_row, insert_events

# Latency and fairness in seconds: `make test` runs these alone (marker serial).
pytestmark = [pytest.mark.slow, pytest.mark.serial]


def forward_to(receiver: Receiver) -> list[dict]:
    """A step that forwards the payload, with a timeout longer than a slow receiver takes."""
    config = {
        "url": receiver.url + "/in",
        "timeout": 30,
        "headers": {"X-Event-Id": "{{ event.id }}"},
    }
    return [{"connector": "http", "config": config}]


def routes_of(db, ids: list[str]) -> list[str]:
    """The routes of the deliveries claimed."""
    return [delivery_row(db, delivery_id).route for delivery_id in ids]


def test_a_claim_takes_turns_across_routes(app, db, add_route):
    add_route("backlog", [{"connector": "text"}], mode="async")
    add_route("quiet", [{"connector": "text"}], mode="async")
    insert_events(db, "backlog", 50)
    insert_events(db, "quiet", 2)  # due after all fifty
    claimer = Worker(app, name="claimer")
    claimer.threads = [None] * 8  # as if started with 8 delivery threads
    taken = routes_of(db, claimer.claim(4))
    assert taken == ["backlog", "quiet", "backlog", "quiet"]


def test_a_claim_takes_turns_across_the_destinations_of_one_route(
    app, client, db, make_key, add_route
):
    """A destination's backlog does not hold back another destination of the same route."""
    text_step = [{"connector": "text"}]
    add_route("fan", mode="async", destinations=[{"name": "a"}, {"name": "b"}])
    with db.session() as session:  # steps of their own: the route helper gives none
        for destination in session.scalars(sa.select(Destination)):
            destination.steps = text_step
    key = make_key()
    for n in range(10):
        assert (
            client.post("/hooks/fan", json={"n": n}, headers={"X-API-Key": key}).status_code == 202
        )
    with db.session() as session:  # b has caught up but for the last event: a has a backlog
        last_b = session.scalars(
            sa.select(Delivery.id).where(Delivery.destination == "b").order_by(Delivery.id)
        ).all()[-1]
        session.execute(
            sa.update(Delivery)
            .where(Delivery.destination == "b", Delivery.id != last_b)
            .values(status="delivered", next_attempt_at=None)
        )
    claimer = Worker(app, name="claimer")
    claimer.threads = [None] * 8
    taken = [delivery_row(db, delivery_id).destination for delivery_id in claimer.claim(2)]
    assert taken == ["a", "b"]


def test_a_route_not_known_quick_holds_at_most_its_share_of_a_workers_threads(app, db, add_route):
    add_route("slow", [{"connector": "text"}], mode="async")
    insert_events(db, "slow", 20)
    app.config["WORKER_ROUTE_SHARE"] = 0.75
    claimer = Worker(app, name="claimer")
    claimer.threads = [None] * 4
    assert len(claimer.claim(4)) == 3  # three threads of four
    assert claimer.claim(4) == []  # still running: the fourth thread stays free
    add_route("other", [{"connector": "text"}], mode="async")
    insert_events(db, "other", 1)
    assert routes_of(db, claimer.claim(4)) == ["other"]
    first = next(iter(claimer._claimed))
    claimer.process(first)  # a delivery of `slow` ends, quickly: no longer held to a share
    assert routes_of(db, claimer.claim(4)) == ["slow"] * 4


def start_workers(url: str, tmp_path, count: int = 2):
    """``count`` worker processes as the docs run them, once each says it is delivering."""
    procs = [worker(url, tmp_path / f"w{i}.log", concurrency=4) for i in range(count)]
    for i in range(count):
        wait_until(
            lambda i=i: b"delivering with" in (tmp_path / f"w{i}.log").read_bytes(),
            30,
            what=f"worker {i} to start",
        )
    return procs


@pytest.mark.parametrize("backlog", ["burst to a 5 s receiver", "bulk replay of 5,000"])
def test_another_routes_event_is_delivered_within_seconds_behind_a_backlog(
    app, client, db, make_key, add_route, receiver, database_url_for_test, tmp_path, backlog
):
    with Receiver(delay=5.0) as slow:
        add_route("slow", forward_to(slow), mode="async")
        add_route("bulk", forward_to(receiver), mode="async")
        add_route("other", forward_to(receiver), mode="async")
        if backlog.startswith("bulk"):
            insert_events(db, "bulk", 5_000, status="delivered")
        procs = start_workers(database_url_for_test, tmp_path)
        try:
            if backlog.startswith("burst"):
                loud = make_key(name="loud")
                for i in range(120):
                    response = client.post(
                        "/hooks/slow", json={"n": i}, headers={"X-API-Key": loud}
                    )
                    assert response.status_code == 202
                slow.wait_for(6, timeout=15)  # the workers are busy with it
                # Every idle thread has looked for work since (HUB_WORKER_MAX_IDLE is 2 s):
                # each worker holds all the slow route may take of its threads.
                time.sleep(2.5)
            else:
                filters = event_store.Filters(route="bulk", status="delivered")
                replayed, _, _ = event_store.replay_matching(db, filters, examine=5_000)
                assert replayed == 5_000
                wait_until(lambda: len(receiver.requests) >= 100, 15, what="the drain to start")
            quiet = make_key(name="quiet")
            sent = time.monotonic()
            response = client.post("/hooks/other", json={"hello": 1}, headers={"X-API-Key": quiet})
            assert response.status_code == 202
            event_id = response.json["id"]
            wait_until(
                lambda: event_row(db, event_id).status == "delivered",
                5.0,
                what=f"the other route's event behind the {backlog}",
            )
            waited = time.monotonic() - sent
            # The most calls to the slow receiver at once: each lasts 5 s, so those that
            # came within 4.8 s of one another overlapped (on a loaded machine the first
            # ones have ended and others begun by now: counting all would count those).
            times = sorted(r.received_at for r in slow.requests)
            slow_at_once = max(
                (sum(1 for u in times if t - 4.8 < u <= t) for t in times), default=0
            )
        finally:
            for proc in procs:
                stop(proc, signal.SIGKILL)
    print(f"{backlog}: delivered {waited:.2f} s after its 202")
    assert waited < 5.0
    if backlog.startswith("burst"):
        # The slow route held 3 of each worker's 4 threads, not all 8.
        assert slow_at_once == 6


def test_the_migration_adds_the_route_index_to_a_filled_database_and_takes_it_away(
    app, db, add_route
):
    add_route("backlog", [{"connector": "text"}], mode="async")
    add_route("quiet", [{"connector": "text"}], mode="async")
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0009")
    try:
        insert_events(db, "backlog", 30)  # rows the previous schema holds
        insert_events(db, "backlog", 10, status="delivered")
        insert_events(db, "quiet", 1)
        assert "ix_events_due_by_route" not in index_names(db)
        upgrade(db)
        assert "ix_events_due_by_route" in index_names(db)
        claimer = Worker(app, name="claimer")
        claimer.threads = [None] * 4
        assert routes_of(db, claimer.claim(2)) == ["backlog", "quiet"]
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0009")
        assert "ix_events_due_by_route" not in index_names(db)
        assert count_events(db) == 41
    finally:
        upgrade(db)


def index_names(db) -> set[str]:
    return {index["name"] for index in sa.inspect(db.engine).get_indexes("events")}


def count_events(db) -> int:
    with db.session() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(Event))


def test_the_fair_claim_walks_indexes_and_scans_no_table(app, db, add_route):
    insert_events(db, "backlog", 5_000)
    insert_events(db, "backlog", 5_000, status="delivered")
    insert_events(db, "quiet", 1)
    claimer = Worker(app, name="claimer")
    claimer.threads = [None] * 4
    # One of its deliveries in flight: its room is in the statement.
    claimer._busy["backlog/default"] = 1
    claim = (
        sa.update(Delivery)
        .where(claimer._fair_due(None, 4, utcnow(), None))
        .values(status="processing")
    )
    with db.engine.begin() as conn:
        sql = str(claim.compile(conn, compile_kwargs={"literal_binds": True}))
        if db.dialect == "postgresql":
            conn.exec_driver_sql("ANALYZE deliveries")
            steps = [r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql)]
            reads = [s for s in steps if re.search(r"Scan .*\bon deliveries\b", s)]
            used = {
                re.search(r"using (\w+) on deliveries", s).group(1) for s in reads if "using" in s
            }
        else:
            steps = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
            reads = [s for s in steps if re.match(r"(SCAN|SEARCH) (e|x|deliveries)\b", s)]
            used = {re.search(r"INDEX (\w+)", s).group(1) for s in reads if "INDEX" in s}
    plan = "\n".join(steps)
    # Every read of deliveries (what workers claim) goes through the route index or the
    # primary key: none walks another index and sorts what it found, none reads the table.
    assert len(used) == 2 and "ix_deliveries_due_by_lane" in used, plan
    assert all("using" in s or "INDEX" in s for s in reads), plan


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_the_embedded_worker_takes_turns_behind_a_bulk_replay(
    db, make_key, add_route, receiver, database_url_for_test, tmp_path
):
    """``make run``'s shape: SQLite, one delivery thread in each of gunicorn's processes."""
    add_route("bulk", forward_to(receiver), mode="async")
    add_route("other", forward_to(receiver), mode="async")
    insert_events(db, "bulk", 5_000, status="delivered")
    with gunicorn(database_url_for_test, tmp_path / "web.log") as (_, base):
        filters = event_store.Filters(route="bulk", status="delivered")
        assert event_store.replay_matching(db, filters, examine=5_000)[0] == 5_000
        wait_until(lambda: len(receiver.requests) >= 100, 15, what="the drain to start")
        sent = time.monotonic()
        response = requests.post(
            base + "/hooks/other", json={"hello": 1}, headers={"X-API-Key": make_key()}, timeout=5
        )
        assert response.status_code == 202
        event_id = response.json()["id"]
        wait_until(
            lambda: event_row(db, event_id).status == "delivered",
            5.0,
            what="the other route's event behind the bulk replay",
        )
        waited = time.monotonic() - sent
    print(f"embedded: delivered {waited:.2f} s after its 202")
    assert waited < 5.0
