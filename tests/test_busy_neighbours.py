"""One busy sender must not slow the others down: under real gunicorn as docs/operations.md deploys
it (2 processes x 4 threads), a sync route whose receiver takes 5 s can't take every request
thread (HUB_SYNC_RUNS_PER_ROUTE), and on SQLite an admin's heavy reads never take the write
lock a sender's ingest needs (read sessions begin deferred)."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select, text, update

from hub.store.db import Database, ReadOnlySession
from hub.store.models import ApiKey, Event
from tests.procs import gunicorn
from tests.servers import Receiver

# Latency, rates or fairness in seconds: `make test` runs these alone (marker serial).
pytestmark = pytest.mark.serial

SLOW_SECONDS = 5.0


def p99(samples: list[float]) -> float:
    """The nearest-rank 99th percentile (the largest of fewer than 100 samples)."""
    ordered = sorted(samples)
    return ordered[-(-len(ordered) * 99 // 100) - 1]


def post_async_while(base: str, route: str, key: str, busy: threading.Event) -> list[float]:
    """Post to an async route one request after another while ``busy`` is set; each answer's
    seconds (every one must be 202)."""
    took: list[float] = []
    with requests.Session() as http:
        while busy.is_set():
            started = time.perf_counter()
            answer = http.post(
                f"{base}/hooks/{route}", json={"n": len(took)}, headers={"X-API-Key": key}
            )
            took.append(time.perf_counter() - started)
            assert answer.status_code == 202, answer.text
    return took


# --- a slow sync receiver can't take the web threads ---


# The sync slots are the web process's own: the database does not take part (SQLite only).
@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_eight_requests_to_a_slow_sync_receiver_leave_other_senders_fast(
    database_url_for_test, add_route, make_key, tmp_path
):
    with Receiver(delay=SLOW_SECONDS) as slow:
        add_route("slow", [{"connector": "http", "config": {"url": slow.url + "/in"}}])
        add_route("quick", [{"connector": "text", "config": {"field": "text"}}], mode="async")
        slow_key, other_key = make_key(["slow"]), make_key(["quick"])
        log = tmp_path / "gunicorn.log"
        # 2 processes of 4 threads: 8 slow requests are more than the route's slots (half of
        # each process's threads) and as many as all the threads there are.
        threads = {"HUB_WEB_THREADS": "4", "HUB_EMBEDDED_WORKER": "false"}
        with gunicorn(database_url_for_test, log, **threads) as (_, base):

            def post_slow(n: int) -> requests.Response:
                return requests.post(
                    f"{base}/hooks/slow", json={"n": n}, headers={"X-API-Key": slow_key}, timeout=30
                )

            busy = threading.Event()
            busy.set()
            with ThreadPoolExecutor(9) as pool:
                sync = [pool.submit(post_slow, n) for n in range(8)]
                time.sleep(0.5)  # the sync requests have reached the hub
                other = pool.submit(post_async_while, base, "quick", other_key, busy)
                time.sleep(SLOW_SECONDS - 1.5)
                busy.clear()
                took = other.result()
                answers = [future.result() for future in sync]
    assert p99(took) < 0.1, (
        f"{len(took)} async requests beside 8 sync ones to a {SLOW_SECONDS:.0f} s receiver: "
        f"median {statistics.median(took) * 1000:.0f} ms, p99 {p99(took) * 1000:.0f} ms"
    )
    ran = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 503]
    assert len(ran) + len(refused) == 8, [a.status_code for a in answers]
    assert 1 <= len(ran) <= 2 * 2  # two processes, half of their 4 threads each
    for answer in refused:
        assert answer.json()["code"] == "sync_busy"
        assert "try again in 2 seconds" in answer.json()["error"]
        assert answer.headers["Retry-After"] == "2"
    db = Database(database_url_for_test)
    with db.session() as session:
        rows = session.execute(
            select(Event.status, Event.reason, func.count())
            .where(Event.route == "slow")
            .group_by(Event.status, Event.reason)
        ).all()
    db.dispose()
    expected = {("delivered", None, len(ran))}
    if refused:
        expected.add(("rejected", "sync_busy", len(refused)))
    assert set(rows) == expected  # every refused request is on record, with its cause


@pytest.mark.parametrize(("wait", "second"), [(3.0, 200), (0.0, 503)])
def test_a_request_over_the_sync_cap_waits_for_a_run_to_end_then_is_turned_away(
    app, db, add_route, key, wait, second
):
    """HUB_SYNC_BUSY_WAIT: a burst to a fast route queues; past the wait, 503 sync_busy."""
    app.config.update(SYNC_RUNS_PER_ROUTE=1, SYNC_BUSY_WAIT=wait)
    with Receiver(delay=0.5) as slowish:
        add_route("slowish", [{"connector": "http", "config": {"url": slowish.url}}])

        def post(n: int) -> tuple[int, str | None]:
            answer = app.test_client().post(
                "/hooks/slowish", json={"n": n}, headers={"X-API-Key": key}
            )
            return answer.status_code, answer.json.get("code")

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, 1)
            time.sleep(0.2)  # the first one runs
            second_one = pool.submit(post, 2)
            answers = [first.result(), second_one.result()]
    assert answers == [(200, None), (second, None if second == 200 else "sync_busy")]
    assert len(slowish.requests) == (2 if second == 200 else 1)
    with db.session() as session:
        rows = session.execute(select(Event.status, Event.reason, Event.body)).all()
    if second == 503:  # on record with its body, the sender told to come back
        assert sorted(rows) == [
            ("delivered", None, b'{"n": 1}'),
            ("rejected", "sync_busy", b'{"n": 2}'),
        ]


@pytest.mark.parametrize(
    ("path", "route", "body"),
    [
        ("/api/process", "process", {"input": "hi"}),
        ("/api/chat", "chat", {"message": "hi"}),
    ],
)
def test_the_seed_routes_answer_sync_busy_while_their_slots_are_taken(
    app, client, key, seed_routes, path, route, body
):
    app.config.update(SYNC_RUNS_PER_ROUTE=1, SYNC_BUSY_WAIT=0)
    slots = app.extensions["hub.sync_slots"]
    assert slots.take(route, 1, 0)  # a request of this route is running
    busy = client.post(path, json=body, headers={"X-API-Key": key})
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "2"
    assert busy.json["code"] == "sync_busy"
    slots.give(route)
    assert client.post(path, json=body, headers={"X-API-Key": key}).status_code == 200


# --- SQLite reads never take the write lock ---


def test_a_read_session_leaves_the_write_lock_free_and_refuses_to_write(db, make_key):
    make_key()
    wrote = threading.Event()

    def write() -> None:
        with db.session() as session:
            session.execute(update(ApiKey).values(name="renamed"))
        wrote.set()

    with db.read_session() as reading:
        assert reading.scalar(select(func.count()).select_from(ApiKey)) == 1
        writer = threading.Thread(target=write)
        writer.start()
        finished = wrote.wait(2)  # on SQLite a lock held by the read would stop it 30 s
    writer.join()
    assert finished, "a write waited for a read session to end"
    with pytest.raises(ReadOnlySession), db.read_session() as reading:
        reading.execute(update(ApiKey).values(name="again"))
    with pytest.raises(ReadOnlySession), db.read_session() as reading:
        reading.get(ApiKey, 1).name = "again"
        reading.flush()
    with db.read_session() as reading:
        assert reading.scalars(select(ApiKey.name)).all() == ["renamed"]


# Events a fill writes: enough that the statistics over them take a good part of a second.
FILLED = 60_000
SECONDS_SPREAD = 30 * 86_400

FILL_SQLITE = """
WITH RECURSIVE n(i, ago) AS (
    SELECT 0, :spread UNION ALL SELECT i + 1, :spread - (i + 1) * :spread / :count FROM n
    WHERE i + 1 < :count
)
INSERT INTO events (id, route, key_prefix, method, path, received_at, headers, status,
                    reason, attempts, retries, completed_at)
SELECT printf('evt_fill%012d', i), 'route-' || (i % 20), 'fill0000', 'POST',
       '/hooks/route-' || (i % 20),
       strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('-%d seconds', ago)),
       '{}', CASE i % 10 WHEN 0 THEN 'rejected' ELSE 'delivered' END,
       CASE i % 10 WHEN 0 THEN 'unauthorized' END, 1, 0,
       strftime('%Y-%m-%d %H:%M:%f000', 'now', printf('-%d seconds', ago), '+0.25 seconds')
FROM n
"""

FILL_POSTGRESQL = """
INSERT INTO events (id, route, key_prefix, method, path, received_at, headers, status,
                    reason, attempts, retries, completed_at)
SELECT 'evt_fill' || lpad(i::text, 12, '0'), 'route-' || (i % 20), 'fill0000', 'POST',
       '/hooks/route-' || (i % 20),
       now() - make_interval(secs => :spread - i::bigint * :spread / :count),
       '{}', CASE i % 10 WHEN 0 THEN 'rejected' ELSE 'delivered' END,
       CASE i % 10 WHEN 0 THEN 'unauthorized' END, 1, 0,
       now() - make_interval(secs => :spread - i::bigint * :spread / :count) + interval '250 ms'
FROM generate_series(0, :count - 1) AS i
"""


def fill_events(url: str, count: int) -> None:
    """``count`` finished events over the last 30 days, written by one SQL statement."""
    db = Database(url)
    fill = FILL_POSTGRESQL if db.dialect == "postgresql" else FILL_SQLITE
    with db.engine.begin() as conn:
        conn.execute(text(fill), {"count": count, "spread": SECONDS_SPREAD})
        conn.exec_driver_sql("ANALYZE")
    db.dispose()


@pytest.mark.slow
def test_admin_reads_looping_on_statistics_do_not_hold_up_a_sender(
    database_url_for_test, add_route, make_key, tmp_path
):
    fill_events(database_url_for_test, FILLED)
    add_route("orders", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    sender, admin = make_key(["orders"]), make_key(admin=True)
    heaviest = ["/admin/api/stats?since=3650d", "/admin/api/events?reason=bad_signature"]
    log = tmp_path / "gunicorn.log"
    with gunicorn(database_url_for_test, log, HUB_EMBEDDED_WORKER="false") as (_, base):
        busy = threading.Event()
        busy.set()
        reads: list[float] = []

        def read_in_a_loop(first: int) -> None:
            with requests.Session() as http:
                turn = first
                while busy.is_set():
                    started = time.perf_counter()
                    answer = http.get(base + heaviest[turn % 2], headers={"X-API-Key": admin})
                    assert answer.status_code == 200, answer.text
                    reads.append(time.perf_counter() - started)
                    turn += 1

        # The sender alone first: what this machine gives it without the readers.
        threading.Timer(1.5, busy.clear).start()
        quiet = post_async_while(base, "orders", sender, busy)
        busy.set()
        with ThreadPoolExecutor(3) as pool:
            readers = [pool.submit(read_in_a_loop, first) for first in (0, 1)]
            time.sleep(0.3)  # both readers are inside a read
            ingest = pool.submit(post_async_while, base, "orders", sender, busy)
            time.sleep(4.0)
            busy.clear()
            took = ingest.result()
            for reader in readers:
                reader.result()
    assert max(reads) > 0.1, f"the admin reads took {max(reads):.3f} s at most: too light a test"
    # The readers add less than 100 ms to the sender's p99. On a quiet machine that is a p99
    # under 100 ms beside them; today's code (every read holding the write lock) made it
    # seconds. A machine loaded by other work slows the sender alone too: that is measured
    # first and not blamed on the readers.
    assert p99(took) < 0.1 + p99(quiet), (
        f"{len(took)} ingests beside {len(reads)} admin reads: median "
        f"{statistics.median(took) * 1000:.0f} ms, p99 {p99(took) * 1000:.0f} ms; "
        f"alone {len(quiet)}: p99 {p99(quiet) * 1000:.0f} ms"
    )
