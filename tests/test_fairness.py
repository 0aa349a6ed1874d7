"""Fair delivery: one route's backlog or slow receiver does not hold back another route.

- in one process: a claim takes turns across routes, and a route holds at most its share
  of a worker's delivery threads (``HUB_WORKER_ROUTE_SHARE``);
- with real processes (2 ``flask --app hub worker --concurrency 4``, as the README deploys
  them): a burst of 120 events to a receiver that takes 5 s, or a bulk replay of 20,000
  events, and then one event of another sender on another route, delivered in under 5 s.
"""

from __future__ import annotations

import signal
import time
from collections import Counter

import pytest

from hub import events as event_store
from hub.testing_servers import Receiver
from hub.worker import Worker
from tests.procs import stop, wait_until, worker
from tests.rows import event_row, insert_events

pytestmark = pytest.mark.slow


def forward_to(receiver: Receiver) -> list[dict]:
    """A step that forwards the payload, with a timeout longer than a slow receiver takes."""
    return [{"connector": "http", "config": {"url": receiver.url + "/in", "timeout": 30}}]


def routes_of(db, ids: list[str]) -> list[str]:
    return [event_row(db, event_id).route for event_id in ids]


def test_a_claim_takes_turns_across_routes(app, db, add_route):
    add_route("backlog", [{"connector": "text"}], mode="async")
    add_route("quiet", [{"connector": "text"}], mode="async")
    insert_events(db, "backlog", 50)
    insert_events(db, "quiet", 2)  # due after all fifty
    claimer = Worker(app, name="claimer")
    claimer.threads = [None] * 8  # as if started with 8 delivery threads
    taken = routes_of(db, claimer.claim(4))
    assert taken == ["backlog", "quiet", "backlog", "quiet"]


def test_a_route_holds_at_most_its_share_of_a_workers_threads(app, db, add_route):
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
    claimer.process(first)  # one delivery of `slow` ends: its room is one again
    assert routes_of(db, claimer.claim(4)) == ["slow"]


def start_workers(url: str, tmp_path, count: int = 2):
    """``count`` worker processes as the README runs them, once each says it is delivering."""
    procs = [worker(url, tmp_path / f"w{i}.log", concurrency=4) for i in range(count)]
    for i in range(count):
        wait_until(
            lambda i=i: b"delivering with" in (tmp_path / f"w{i}.log").read_bytes(),
            30,
            what=f"worker {i} to start",
        )
    return procs


@pytest.mark.parametrize("backlog", ["burst to a 5 s receiver", "bulk replay of 20,000"])
def test_another_routes_event_is_delivered_within_seconds_behind_a_backlog(
    app, client, db, make_key, add_route, receiver, database_url_for_test, tmp_path, backlog
):
    with Receiver(delay=5.0) as slow:
        add_route("slow", forward_to(slow), mode="async")
        add_route("bulk", forward_to(receiver), mode="async")
        add_route("other", forward_to(receiver), mode="async")
        if backlog.startswith("bulk"):
            insert_events(db, "bulk", 20_000, status="delivered")
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
            else:
                filters = event_store.Filters(route="bulk", status="delivered")
                replayed, _, _ = event_store.replay_matching(db, filters, examine=20_000)
                assert replayed == 20_000
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
        finally:
            for proc in procs:
                stop(proc, signal.SIGKILL)
    print(f"{backlog}: delivered {waited:.2f} s after its 202")
    assert waited < 5.0
    if backlog.startswith("burst"):
        # The slow route held at most 3 of each worker's 4 threads.
        assert len(slow.requests) <= 6 + 6, Counter(r.path for r in slow.requests)
