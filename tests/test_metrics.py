"""GET /metrics: refused without credentials, label values bounded, and, under real gunicorn
(2 workers x 4 threads) beside a real `flask --app hub worker` process, counters that add up
exactly to what was sent, whichever process answers the scrape, and that survive a web
process being killed and replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from hub import create_app
from hub.config import SettingsError
from hub.ops.metrics import (
    HOST,
    QUEUE_CACHE_SECONDS,
    ProcessFiles,
    make_directory,
    process_identifier,
    remove_ended,
)
from hub.store.models import Attempt, Event
from tests.procs import gunicorn, stop, wait_until, web_processes, worker
from tests.servers import Receiver, Reply

TOKEN = "metrics-token-for-the-test-0123456789"


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by (sample name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: dict, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample, labels in samples if sample == name}


# --- in-process: who may read, and bounded labels ---


def test_metrics_refused_without_credentials(app, client, make_key):
    missing = client.get("/metrics")
    assert missing.status_code == 401
    assert missing.json == {
        "error": "No API key was given: this needs an admin key",
        "code": "unauthorized",
    }
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and wrong.json["code"] == "unauthorized"
    sender = client.get("/metrics", headers={"X-API-Key": make_key()})
    assert sender.status_code == 403 and sender.json["code"] == "forbidden"
    admin = client.get("/metrics", headers={"Authorization": f"Bearer {make_key(admin=True)}"})
    assert admin.status_code == 200
    assert admin.content_type.startswith("text/plain")
    assert "hub_queue_due_events" in admin.text


def test_metrics_token_opens_metrics_and_is_checked_at_start(app, database_url_for_test):
    config = {"TESTING": True, "DATABASE_URL": database_url_for_test, "SECRET_KEY": "x" * 32}
    with_token = create_app({**config, "METRICS_TOKEN": TOKEN})
    try:
        http = with_token.test_client()
        assert http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        near = http.get("/metrics", headers={"Authorization": f"Bearer {TOKEN[:-1]}"})
        assert near.status_code == 401 and near.json["code"] == "unauthorized"
    finally:
        with_token.extensions["hub.db"].dispose()
    with pytest.raises(SettingsError, match="HUB_METRICS_TOKEN.*at least 16 characters"):
        create_app({**config, "METRICS_TOKEN": "short"})


def test_unknown_routes_share_one_label(client, make_key, add_route):
    add_route("known", [{"connector": "text"}])
    key, admin = make_key(), make_key(admin=True)

    def scrape() -> dict:
        return parse(client.get("/metrics", headers={"X-API-Key": admin}).text)

    before = scrape()
    for i in range(25):
        name = f"nope-{i}-" + "x" * 300
        assert client.post(f"/hooks/{name}", json={}, headers={"X-API-Key": key}).status_code == 404
    known = client.post("/hooks/known", json={"input": "hi"}, headers={"X-API-Key": key})
    assert known.status_code == 200
    after = scrape()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    routes = label_values(after, "hub_http_requests_total", "route")
    assert not [r for r in routes if r.startswith("nope")], routes
    assert all(len(r) <= 64 for r in routes)
    assert grew("hub_http_requests_total", route="(unknown)", status="404") == 25
    assert grew("hub_http_requests_total", route="known", status="200") == 1
    assert grew("hub_refusals_total", reason="unknown_route") == 25
    assert grew("hub_events_total", route="(unknown)", status="rejected") == 25
    assert grew("hub_events_total", route="known", status="delivered") == 1
    assert grew("hub_attempts_total", connector="text", outcome="ok") == 1


def test_rejected_events_counted_match_the_rows_when_an_address_is_throttled(
    app, client, db, make_key, add_route
):
    """A request throttled for its address's refusals (429, no row) is a refusal, never a
    rejected event: hub_events_total{status="rejected"} counts the rows an admin can list."""
    app.config["REFUSAL_LIMIT"] = "3/minute"
    add_route("known", [{"connector": "text"}])
    admin = make_key(admin=True)

    def scrape() -> dict:
        return parse(client.get("/metrics", headers={"X-API-Key": admin}).text)

    def rejected(samples: dict) -> float:
        return sum(
            v
            for (name, labels), v in samples.items()
            if name == "hub_events_total" and dict(labels)["status"] == "rejected"
        )

    before = scrape()
    wrong_key = {"X-API-Key": "hk_00000000_" + "y" * 43}
    answers = [client.post("/hooks/known", json={}, headers=wrong_key) for _ in range(5)]
    after = scrape()
    assert [a.status_code for a in answers] == [401, 401, 401, 429, 429]
    with db.session() as session:
        rows = session.scalar(select(func.count()).where(Event.status == "rejected"))
    assert rows == 3
    assert rejected(after) - rejected(before) == rows
    grew = value(after, "hub_refusals_total", reason="too_many_refusals") - value(
        before, "hub_refusals_total", reason="too_many_refusals"
    )
    assert grew == 2


def test_an_unusable_metrics_directory_stops_the_start(tmp_path):
    taken = tmp_path / "a-file"
    taken.write_text("not a directory")
    with pytest.raises(ValueError, match="HUB_METRICS_DIR: expected a directory"):
        make_directory(str(taken / "metrics"))


def test_a_file_being_created_does_not_fail_the_scrape(tmp_path):
    """A process creates its file empty, then sizes it: a scrape in between must still add
    up everything else (prometheus_client alone fails with struct.error)."""
    (tmp_path / "counter_h-4000001.db").touch()
    writer = MmapedDict(str(tmp_path / "counter_h-4000002.db"))
    writer.write_value(mmap_key("hub_refusals", "hub_refusals_total", ["reason"], ["x"], "h"), 3, 0)
    writer.close()
    samples = {
        (s.name, tuple(s.labels.items())): s.value
        for family in ProcessFiles(None, str(tmp_path)).collect()
        for s in family.samples
    }
    assert samples == {("hub_refusals_total", (("reason", "x"),)): 3.0}


def test_files_of_ended_processes_of_this_host_are_removed(tmp_path):
    """At a server's start every file of this host's ended processes goes; at a scrape only
    their live gauges. Running processes' files, and other hosts', stay."""
    ended = ended_pid()
    names = {
        "counter": f"counter_{HOST}-{ended}.db",
        "gauge": f"gauge_livesum_{HOST}-{ended}.db",
        "running": f"gauge_livesum_{HOST}-{os.getpid()}.db",
        "elsewhere": f"gauge_livesum_other-host-{ended}.db",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    remove_ended(str(tmp_path), live_gauges_only=True)
    assert {p.name for p in tmp_path.iterdir()} == set(names.values()) - {names["gauge"]}
    remove_ended(str(tmp_path))
    assert {p.name for p in tmp_path.iterdir()} == {names["running"], names["elsewhere"]}


def ended_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- across processes: gunicorn's workers and a worker process share one directory ---


# The counters live in each process's files (PROMETHEUS_MULTIPROC_DIR), whatever the
# database: SQLite alone.
@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_counters_add_up_across_gunicorn_workers_and_a_worker_process(
    database_url_for_test, db, make_key, add_route, tmp_path
):
    n_ok, n_failing, n_sync, n_bad_key, n_unknown = 20, 10, 15, 12, 10
    with Receiver() as good, Receiver() as bad:
        bad.script(*[Reply(400, {"error": "no"}) for _ in range(n_failing)])
        add_route("fwd", [{"connector": "http", "config": {"url": good.url}}], mode="async")
        add_route("broken", [{"connector": "http", "config": {"url": bad.url}}], mode="async")
        add_route("sync", [{"connector": "text", "config": {"field": "text"}}])
        key = make_key()
        env = {
            "HUB_METRICS_DIR": str(tmp_path / "metrics"),
            "HUB_METRICS_TOKEN": TOKEN,
            "HUB_REFUSAL_LIMIT": "0",
        }
        with gunicorn(
            database_url_for_test, tmp_path / "web.log", 2, HUB_EMBEDDED_WORKER="false", **env
        ) as (server, base):

            def post(path: str, sender: str = key, body: dict | None = None) -> requests.Response:
                headers = {"X-API-Key": sender}
                return requests.post(base + path, json=body or {}, headers=headers, timeout=10)

            def scrape() -> dict:
                # A new connection each time: either web process may answer.
                answer = requests.get(
                    base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
                )
                assert answer.status_code == 200, answer.text
                return parse(answer.text)

            def send_all(calls) -> list[int]:
                with ThreadPoolExecutor(8) as pool:
                    return [r.status_code for r in pool.map(lambda c: post(*c), calls)]

            # Async events, and no worker running yet: they wait, due.
            first_sent = time.time()
            statuses = send_all([("/hooks/fwd",)] * n_ok + [("/hooks/broken",)] * n_failing)
            last_sent = time.time()
            assert statuses == [202] * (n_ok + n_failing)
            statuses = send_all(
                [("/hooks/sync", key, {"text": "hi"})] * n_sync
                + [("/hooks/fwd", "hk_bogus_key")] * n_bad_key
                + [(f"/hooks/no-such-route-{i}",) for i in range(n_unknown)]
            )
            assert sorted(statuses) == sorted(
                [200] * n_sync + [401] * n_bad_key + [404] * n_unknown
            )
            time.sleep(1.0)
            began = time.time()
            queued = scrape()
            assert value(queued, "hub_queue_due_events") == n_ok + n_failing
            assert value(queued, "hub_queue_waiting_events") == n_ok + n_failing
            age = value(queued, "hub_queue_oldest_due_age_seconds")
            assert began - last_sent <= age <= time.time() - first_sent, age
            assert value(queued, "hub_processes", kind="web") == 2

            # A worker process delivers them; its counts join the web processes'.
            delivering = worker(database_url_for_test, tmp_path / "worker.log", 2, **env)
            try:
                good.wait_for(n_ok, timeout=20)
                bad.wait_for(n_failing, timeout=20)

                def delivered() -> dict | None:
                    samples = scrape()
                    done = value(samples, "hub_events_total", route="fwd", status="delivered")
                    failed = value(samples, "hub_events_total", route="broken", status="failed")
                    queue = value(samples, "hub_queue_waiting_events")
                    return samples if (done, failed, queue) == (n_ok, n_failing, 0) else None

                wait_until(delivered, 20, 0.2, what="the worker's counts in /metrics")
                # Each web process remembers the queue gauges it read for a moment.
                time.sleep(QUEUE_CACHE_SECONDS)
                expected = {
                    ("hub_http_requests_total", "fwd", "202"): n_ok,
                    ("hub_http_requests_total", "broken", "202"): n_failing,
                    ("hub_http_requests_total", "sync", "200"): n_sync,
                    ("hub_http_requests_total", "fwd", "401"): n_bad_key,
                    ("hub_http_requests_total", "(unknown)", "404"): n_unknown,
                    ("hub_events_total", "fwd", "delivered"): n_ok,
                    ("hub_events_total", "broken", "failed"): n_failing,
                    ("hub_events_total", "sync", "delivered"): n_sync,
                    ("hub_events_total", "fwd", "rejected"): n_bad_key,
                    ("hub_events_total", "(unknown)", "rejected"): n_unknown,
                }

                def check(samples: dict, sync_sent: int) -> None:
                    want = {**expected, ("hub_http_requests_total", "sync", "200"): sync_sent}
                    want[("hub_events_total", "sync", "delivered")] = sync_sent
                    for (name, route, status), count in want.items():
                        got = value(samples, name, route=route, status=status)
                        assert got == count, (name, route, status, got, count)
                    for name in ("hub_http_requests_total", "hub_events_total"):
                        total = sum(v for (s, _), v in samples.items() if s == name)
                        assert total == sum(c for (n, _, _), c in want.items() if n == name)
                    assert label_values(samples, "hub_http_requests_total", "route") == {
                        "fwd",
                        "broken",
                        "sync",
                        "(unknown)",
                    }
                    assert value(samples, "hub_refusals_total", reason="unauthorized") == n_bad_key
                    assert value(samples, "hub_refusals_total", reason="unknown_route") == n_unknown
                    attempts = {
                        ("http", "ok"): n_ok,
                        ("http", "permanent"): n_failing,
                        ("text", "ok"): sync_sent,
                    }
                    with db.session() as session:
                        rows = session.execute(
                            select(Attempt.connector, Attempt.outcome, func.count()).group_by(
                                Attempt.connector, Attempt.outcome
                            )
                        )
                        assert {(c, o): n for c, o, n in rows} == attempts
                    for (connector, outcome), count in attempts.items():
                        got = value(
                            samples, "hub_attempts_total", connector=connector, outcome=outcome
                        )
                        assert got == count, (connector, outcome, got)
                    for connector in ("http", "text"):
                        calls = sum(c for (name, _), c in attempts.items() if name == connector)
                        histogram = "hub_attempt_duration_seconds_count"
                        assert value(samples, histogram, connector=connector) == calls
                        inf = value(
                            samples,
                            "hub_attempt_duration_seconds_bucket",
                            connector=connector,
                            le="+Inf",
                        )
                        assert inf == calls
                    assert value(samples, "hub_queue_due_events") == 0
                    assert value(samples, "hub_queue_oldest_due_age_seconds") == 0

                for _ in range(6):
                    samples = scrape()
                    check(samples, n_sync)
                    assert value(samples, "hub_processes", kind="web") == 2
                    assert value(samples, "hub_processes", kind="worker") == 1

                # A web process killed and replaced: its counts stay, its live gauge goes.
                web = web_processes(server.pid)
                assert len(web) == 2
                os.kill(min(web), signal.SIGKILL)
                wait_until(
                    lambda: len((now := web_processes(server.pid)) - web) == 1 and len(now) == 2,
                    20,
                    what="gunicorn to replace the killed worker",
                )
                wait_until(
                    lambda: value(scrape(), "hub_processes", kind="web") == 2,
                    20,
                    0.2,
                    what="the new worker to count itself",
                )
                for _ in range(4):
                    check(scrape(), n_sync)
                more = send_all([("/hooks/sync", key, {"text": "again"})] * 5)
                assert more == [200] * 5
                for _ in range(4):
                    samples = scrape()
                    check(samples, n_sync + 5)
                    assert value(samples, "hub_processes", kind="web") == 2
            finally:
                assert stop(delivering) == 0
            # The worker process stopped: it no longer counts as running; its counts stay.
            samples = scrape()
            assert value(samples, "hub_processes", kind="worker") == 0
            check(samples, n_sync + 5)


def test_a_forked_process_counts_under_its_own_identifier():
    """prometheus_client names a process's files after ``process_identifier()``, which the
    hub keeps rather than makes at every count: a forked child (a gunicorn web process)
    must still get its own, or two processes would write one file."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: say what it is called, and go
        os.write(write, process_identifier().encode())
        os._exit(0)
    os.close(write)
    try:
        said = os.read(read, 256).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert said == f"{HOST}-{pid}" != process_identifier()
    assert process_identifier() == f"{HOST}-{os.getpid()}"
