"""A destination's max_in_flight and rate hold across every worker process sharing the
database: never more of its deliveries called at once than its cap, never more started in
a period than its rate (plus its small burst), and a capped destination's backlog never
slows another's drain."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select, update

from hub.rates import Rate
from hub.services.delivery import Worker, rate_tokens
from hub.store.db import alembic_config, upgrade
from hub.store.models import Delivery, Destination, EventStatus, utcnow
from hub.testing_servers import Receiver
from tests.conftest import PG_URL
from tests.procs import stop, wait_until, worker
from tests.rows import insert_events

# Latency, rates or fairness in seconds: `make test` runs these alone (marker serial).
pytestmark = pytest.mark.serial


class Counting(Receiver):
    """A receiver that answers after ``delay`` and records how many requests it was
    answering at once (``peak``): a request counts from its arrival until its answer is
    made, a span inside the hub's own call of it."""

    def __init__(self, delay: float = 0.0):
        super().__init__(delay=delay)
        self.active = 0
        self.peak = 0
        self._count_lock = threading.Lock()

    def _record_and_pick(self, recorded):
        with self._count_lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        return super()._record_and_pick(recorded)

    def answer(self, recorded, reply):
        with self._count_lock:
            self.active -= 1
        return super().answer(recorded, reply)


@pytest.fixture
def slow():
    with Counting(delay=0.2) as server:
        yield server


@pytest.fixture
def fast():
    with Counting() as server:
        yield server


def to(receiver) -> list[dict]:
    return [{"connector": "http", "config": {"url": receiver.url + "/in"}}]


def counts(db, route: str) -> dict[str, int]:
    with db.session() as session:
        statuses = session.scalars(select(Delivery.status).where(Delivery.route == route)).all()
    return {status: statuses.count(status) for status in set(statuses)}


def most_in_any_second(times: list[float]) -> int:
    """The most of ``times`` (seconds) that fall in one window [t, t + 1 s)."""
    times = sorted(times)
    return max(sum(1 for u in times if t <= u < t + 1.0) for t in times)


def test_the_rate_lets_a_burst_then_one_start_each_interval():
    """GCRA: a destination idle for long has its burst; each delivery taken moves the
    destination's next start by one interval (period / limit)."""
    now = utcnow()
    rate = Rate(5, 1)  # one start each 0.2 s, a burst of 1
    assert rate_tokens(rate, None, now) == 1
    assert rate_tokens(rate, now - timedelta(hours=1), now) == 1
    assert rate_tokens(rate, now + timedelta(seconds=0.1), now) == 0
    fast = Rate(100, 1)  # each 0.01 s, a burst of 10
    assert rate_tokens(fast, None, now) == 10
    assert rate_tokens(fast, now + timedelta(seconds=0.05), now) == 5
    assert rate_tokens(fast, now + timedelta(seconds=0.1), now) == 0


def capped_route(add_route, receiver, **controls) -> None:
    add_route(
        "capped",
        mode="async",
        destinations=[{"name": "slow", "steps": to(receiver), **controls}],
    )


def test_a_claim_takes_no_delivery_past_its_destinations_cap(app, db, add_route, receiver):
    """Claims by different workers (one lock-step process): two of five due deliveries of a
    destination capped at 2; the others stay due, no run counted, until one ends."""
    capped_route(add_route, receiver, max_in_flight=2)
    insert_events(db, "capped", 5)
    workers = [Worker(app, name=f"w{i}") for i in range(5)]
    taken = [len(w.claim(1)) for w in workers]
    assert taken == [1, 1, 0, 0, 0]
    assert counts(db, "capped") == {"processing": 2, "pending": 3}
    with db.session() as session:
        waiting = session.scalars(select(Delivery).where(Delivery.status == "pending")).all()
    assert [d.attempts for d in waiting] == [0, 0, 0]
    # One ends: its place is free for the next claim.
    assert workers[0].process(next(iter(workers[0]._claimed))) == EventStatus.DELIVERED
    assert len(Worker(app, name="next").claim(1)) == 1
    assert counts(db, "capped") == {"processing": 2, "pending": 2, "delivered": 1}


def test_deliveries_whose_lease_ran_out_are_claimed_again_within_the_cap(
    app, db, add_route, receiver
):
    """Three deliveries left ``processing`` by a worker that died (their leases ran out):
    a destination capped at 1 gets one of them back at a time."""
    capped_route(add_route, receiver, max_in_flight=1)
    insert_events(db, "capped", 3)
    with db.session() as session:
        session.execute(
            update(Delivery)
            .values(
                status=EventStatus.PROCESSING,
                lease_owner="died",
                lease_until=utcnow() - timedelta(seconds=1),
                attempts=1,
            )
            .execution_options(synchronize_session=False)
        )
    assert len(Worker(app, name="first").claim(3)) == 1
    assert Worker(app, name="second").claim(3) == []
    with db.session() as session:
        owners = session.scalars(select(Delivery.lease_owner)).all()
    assert sorted(owners) == ["died", "died", "first"]


def test_a_rated_destination_starts_no_more_than_its_burst_at_once(app, db, add_route, receiver):
    """A rate of 2/second: one claim takes one delivery (the burst), the next claim, at once, none;
    the destination's row holds when the next may start."""
    capped_route(add_route, receiver, rate="2/second")
    insert_events(db, "capped", 3)
    before = utcnow()
    assert len(Worker(app, name="a").claim(1)) == 1
    assert Worker(app, name="b").claim(1) == []
    with db.session() as session:
        next_at = session.scalar(select(Destination.rate_next_at))
    assert before + timedelta(seconds=0.5) <= next_at <= utcnow() + timedelta(seconds=0.5)
    assert counts(db, "capped") == {"processing": 1, "pending": 2}


def test_worker_threads_of_two_processes_never_call_a_capped_destination_past_its_cap(
    app, db, add_route
):
    """Two workers of 4 threads each (as two processes would), a receiver taking 0.3 s, a
    cap of 2: all 6 delivered, never more than 2 at once, and 2 at once (the cap, not
    slowness, is what held them)."""
    with Counting(delay=0.3) as receiver:
        capped_route(add_route, receiver, max_in_flight=2)
        insert_events(db, "capped", 6)
        workers = [Worker(app, name=f"w{i}") for i in range(2)]
        for w in workers:
            w.start(4)
        try:
            wait_until(lambda: counts(db, "capped") == {"delivered": 6}, 20, what="6 deliveries")
        finally:
            for w in workers:
                w.stop(grace=5)
        assert len(receiver.requests) == 6
        assert receiver.peak == 2


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_four_worker_processes_keep_a_destination_to_its_cap_and_others_drain_meanwhile(
    db, add_route, slow, fast, database_url_for_test, tmp_path
):
    """4 worker processes x 8 threads on PostgreSQL, 40 events to a destination capped at 3
    whose receiver takes 0.2 s, and 40 to another route's uncapped one: the capped receiver
    never sees more than 3 requests at once (and sees 3), and the other route's events are
    all delivered while the capped one still has a backlog."""
    capped_route(add_route, slow, max_in_flight=3)
    add_route("open", to(fast), mode="async")
    insert_events(db, "capped", 40)
    insert_events(db, "open", 40)
    procs = [
        worker(
            database_url_for_test, tmp_path / f"w{i}.log", concurrency=8, HUB_WORKER_MAX_IDLE="0.2"
        )
        for i in range(4)
    ]
    try:
        wait_until(
            lambda: counts(db, "capped") == {"delivered": 40} and len(fast.requests) == 40,
            40,
            interval=0.2,
            what="80 deliveries",
        )
    finally:
        for proc in procs:
            stop(proc)
    assert counts(db, "open") == {"delivered": 40}
    assert len(slow.requests) == 40
    assert slow.peak == 3
    # The open route was drained while the capped one still had 10 deliveries waiting.
    last_open = max(r.received_at for r in fast.requests)
    capped_starts = sorted(r.received_at for r in slow.requests)
    assert last_open < capped_starts[-10], (last_open, capped_starts[-10])
    assert all(p.returncode == 0 for p in procs)


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_two_worker_processes_start_a_rated_destinations_deliveries_at_its_rate(
    db, add_route, fast, database_url_for_test, tmp_path
):
    """A rate of 5/second (burst 1), 12 events, 2 worker processes x 4 threads: in no second do
    more than 5 + 1 start, and the 12 take about 11 intervals of 0.2 s."""
    capped_route(add_route, fast, rate="5/second")
    insert_events(db, "capped", 12)
    procs = [
        worker(
            database_url_for_test, tmp_path / f"w{i}.log", concurrency=4, HUB_WORKER_MAX_IDLE="0.2"
        )
        for i in range(2)
    ]
    try:
        wait_until(
            lambda: counts(db, "capped") == {"delivered": 12}, 30, interval=0.2, what="12 events"
        )
    finally:
        for proc in procs:
            stop(proc)
    starts = [r.received_at for r in fast.requests]
    assert len(starts) == 12
    assert most_in_any_second(starts) <= 5 + 1, sorted(b - min(starts) for b in starts)
    assert max(starts) - min(starts) >= 11 * 0.2 - 0.2


def test_migration_0013_indexes_the_deliveries_in_flight_and_keeps_every_row(
    db, add_route, receiver
):
    """On a database 0012 filled: the partial index of deliveries in flight comes, every
    row stays; and back. The rows are written by the models (the newest schema), then the
    database is taken down to 0012 with them."""
    capped_route(add_route, receiver, max_in_flight=2)
    insert_events(db, "capped", 3)
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0012")
    try:
        indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("deliveries")}
        assert "ix_deliveries_in_flight" not in indexes
        upgrade(db)
        indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("deliveries")}
        assert "ix_deliveries_in_flight" in indexes
        assert counts(db, "capped") == {"pending": 3}
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0012")
        indexes = {i["name"] for i in sa.inspect(db.engine).get_indexes("deliveries")}
        assert "ix_deliveries_in_flight" not in indexes
        assert counts(db, "capped") == {"pending": 3}
    finally:
        upgrade(db)
