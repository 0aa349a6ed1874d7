"""A soak: mixed traffic for many minutes against gunicorn and two worker processes on
PostgreSQL, with the database cut in the middle, then a check that nothing was lost.

Traffic (from a few sender threads, all on 127.0.0.1): valid async webhooks, requests with a
bad key, repeats of an earlier delivery (duplicates), GitHub-signed webhooks, and sync
``/api/process`` calls. Async events go to a receiver that answers 503 to every third
request, so retries and the occasional ``dead`` are part of the run. Halfway through, every
connection of the hub is terminated and the database is unreachable for some seconds.

Afterwards it checks that every event that got a 2xx is in the database and ended
``delivered``, ``failed`` or ``dead`` with a reason, that none is left in flight, that the
only 5xx were 503s during the cut, and reports the memory of each process after warm-up and
at the end. The report is printed and written to bench/RESULTS.md.

    .venv/bin/python -m bench.soak --minutes 10
    .venv/bin/python -m bench.soak --minutes 1 --database-url postgresql://postgres@127.0.0.1/x
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import hmac
import json
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests
from sqlalchemy import func, make_url, select, text

from bench.common import children, fresh_postgres, rss_kb, write_section
from hub import create_app
from hub.services.keys import create_key
from hub.services.routes import ensure_demo_routes, save_routes
from hub.store.db import upgrade
from hub.store.models import Event
from tests.procs import gunicorn, stop, wait_until, worker
from tests.servers import Receiver, Reply
from tests.tcpproxy import TcpProxy

SIGNING_SECRET = "soak-github-secret"
SECTION = "## Soak"
END_STATES = ("delivered", "failed", "dead")
IN_FLIGHT = ("pending", "processing", "retrying")


class FlakyReceiver(Receiver):
    """Answers 503 to every third request, 200 otherwise; counts deliveries per event."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.seen: collections.Counter[str] = collections.Counter()
        self.on_request = self._count

    def _count(self, recorded) -> None:
        with self._cond:
            self.seen[recorded.headers.get("x-event-id")] += 1

    def default_reply(self) -> Reply:
        self.calls += 1  # under the server's lock (called from _record_and_pick)
        return Reply(status=503) if self.calls % 3 == 0 else Reply(body=None)

    def _record_and_pick(self, recorded):
        reply = super()._record_and_pick(recorded)
        with self._cond:
            self._requests.clear()  # hours of traffic: keep counts, not every request
        return reply


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    accepted: dict[str, str] = field(default_factory=dict)  # event id -> kind
    unplanned: list[str] = field(default_factory=list)
    # (when, kind, status or exception, answer): 5xx and dropped calls, judged at the end.
    server_errors: list[tuple] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    signature = hmac.new(SIGNING_SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": f"sha256={signature}",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
    }


def sender(base: str, key: str, stop_at: float, tally: Tally) -> None:
    """One sender: a mix of every kind of request until ``stop_at``."""
    http = requests.Session()
    rng = random.Random()
    sent_keys: collections.deque[str] = collections.deque(maxlen=50)
    sent_deliveries: collections.deque[tuple[bytes, str]] = collections.deque(maxlen=50)
    while time.monotonic() < stop_at:
        roll = rng.random()
        n = rng.randrange(1_000_000)
        if roll < 0.40:
            kind, idem = "valid", uuid.uuid4().hex
            sent_keys.append(idem)
            path, kwargs = "/hooks/soak", {"json": {"n": n}}
            kwargs["headers"] = {"X-API-Key": key, "Idempotency-Key": idem}
        elif roll < 0.55 and sent_keys:
            kind, idem = "duplicate", rng.choice(sent_keys)
            path, kwargs = "/hooks/soak", {"json": {"n": n}}
            kwargs["headers"] = {"X-API-Key": key, "Idempotency-Key": idem}
        elif roll < 0.70:
            kind, path = "refused", "/hooks/soak"
            kwargs = {
                "data": b"x" * rng.randrange(10, 5000),
                "headers": {"X-API-Key": f"hk_{key[3:11]}_{'A' * 43}"},
            }
        elif roll < 0.85:
            kind, path = "signed", "/hooks/gh"
            if sent_deliveries and rng.random() < 0.2:
                body, delivery = rng.choice(sent_deliveries)
                kind = "signed_repeat"
            else:
                body, delivery = json.dumps({"ref": f"r{n}"}).encode(), str(uuid.uuid4())
                sent_deliveries.append((body, delivery))
            kwargs = {"data": body, "headers": github_headers(body, delivery)}
        else:
            kind, path = "sync", "/api/process"
            kwargs = {"json": {"input": f"soak {n}"}, "headers": {"X-API-Key": key}}
        at = time.monotonic()
        try:
            response = http.post(base + path, timeout=30, **kwargs)
        except requests.RequestException as exc:
            with tally.lock:
                tally.by_kind[(kind, type(exc).__name__)] += 1
                tally.server_errors.append((at, kind, type(exc).__name__, ""))
            continue
        status = response.status_code
        with tally.lock:
            tally.by_kind[(kind, status)] += 1
            if status >= 500:  # judged after the run, when the cut's end is known
                tally.server_errors.append((at, kind, status, response.text[:200]))
            if status == 503 and "Retry-After" not in response.headers:
                tally.unplanned.append(f"{kind}: 503 without Retry-After")
            if 200 <= status < 300 and kind in ("valid", "signed", "sync"):
                body = response.json()
                event_id = body.get("id") or body.get("task_id")
                if event_id and not body.get("duplicate"):
                    tally.accepted[event_id] = kind
        time.sleep(rng.uniform(0.0, 0.02))


def in_flight_count(db) -> int:
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Event).where(Event.status.in_(IN_FLIGHT))
            )
            or 0
        )


def in_window(at: float, window: list[float], grace: float = 15.0) -> bool:
    """True when ``at`` falls in the cut (and the seconds it takes the hub to notice)."""
    return len(window) == 2 and window[0] - 1.0 <= at <= window[1] + grace


def sample_memory(pids: dict[str, int], samples: dict[str, list], stop_event: threading.Event):
    while not stop_event.wait(5.0):
        for name, pid in pids.items():
            kb = rss_kb(pid)
            if kb is not None:
                samples[name].append((time.monotonic(), kb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("HUB_BENCH_DATABASE_URL")
        or "postgresql://postgres@127.0.0.1:5432/hub_soak",
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--cut-seconds", type=float, default=8.0)
    parser.add_argument("--no-report", action="store_true", help="don't write RESULTS.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="hub-soak-"))
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"  # the receiver is on 127.0.0.1
    direct = fresh_postgres(args.database_url)
    parsed = make_url(direct)
    # The hub's processes reach PostgreSQL through a proxy the soak cuts; its checks don't.
    stack = contextlib.ExitStack()
    proxy = stack.enter_context(TcpProxy(parsed.host or "127.0.0.1", parsed.port or 5432))
    via_proxy = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)

    app = create_app({"DATABASE_URL": direct, "SECRET_KEY": "soak-secret-key"})
    db = app.extensions["hub.db"]
    upgrade(db)
    receiver = FlakyReceiver().start()
    forward = {
        "connector": "http",
        "config": {"url": receiver.url + "/in", "headers": {"X-Event-Id": "{{ event.id }}"}},
    }
    with db.session() as session:
        _, key = create_key(session, "soak")
        registry = app.extensions["hub.connectors"]
        ensure_demo_routes(session, registry)
        save_routes(
            session,
            [
                {"name": "soak", "mode": "async", "steps": [forward], "retry_schedule": [1, 2, 4]},
                {
                    "name": "gh",
                    "mode": "async",
                    "steps": [forward],
                    "retry_schedule": [1, 2, 4],
                    "verify": {"scheme": "github", "secrets": [SIGNING_SECRET]},
                },
            ],
            registry,
            app.extensions["hub.secrets"],
        )

    # A short lease: a delivery whose outcome could not be written during the cut is
    # claimed again within a minute instead of five.
    # One try per delivery: a 503 goes to the route's durable schedule (1, 2, 4 s) instead of
    # holding a delivery thread in quick back-offs, as a busy production route would be set.
    env = {
        "HUB_EMBEDDED_WORKER": "false",
        "HUB_SECRET_KEY": "soak-secret-key",
        "HUB_LEASE_SECONDS": "60",
        "HUB_STEP_TRIES": "1",
    }
    workers = [
        worker(via_proxy, workdir / f"worker{i}.log", concurrency=4, **env) for i in range(2)
    ]
    tally = Tally()
    cut_window: list[float] = []
    samples: dict[str, list] = collections.defaultdict(list)
    duration = args.minutes * 60
    with gunicorn(via_proxy, workdir / "web.log", workers=2, **env) as (web, base):
        pids = {"gunicorn master": web.pid}
        # /health answers once one web worker is up; wait for both to be sampled.
        wait_until(lambda: len(children(web.pid)) >= 2, 30, what="both gunicorn workers")
        for i, pid in enumerate(children(web.pid)):
            pids[f"gunicorn worker {i + 1}"] = pid
        for i, proc in enumerate(workers):
            pids[f"hub worker {i + 1}"] = proc.pid
        stop_sampling = threading.Event()
        threading.Thread(
            target=sample_memory, args=(pids, samples, stop_sampling), daemon=True
        ).start()
        stop_at = time.monotonic() + duration
        threads = [
            threading.Thread(target=sender, args=(base, key, stop_at, tally))
            for _ in range(args.senders)
        ]
        for thread in threads:
            thread.start()
        time.sleep(duration / 2)
        print(f"cutting the database for {args.cut_seconds:.0f} s")
        cut_window.append(time.monotonic())
        with db.engine.connect() as conn:  # terminate every hub connection, then refuse
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND pid <> pg_backend_pid()"
                ),
                {"d": parsed.database},
            )
        proxy.cut()
        time.sleep(args.cut_seconds)
        proxy.restore()
        cut_window.append(time.monotonic())
        for thread in threads:
            thread.join()
        traffic_seconds = time.monotonic() - tally.started

        def drained():
            return not in_flight_count(db)

        backlog = in_flight_count(db)
        print(f"traffic over; {backlog} events in flight, draining")
        wait_until(drained, 900, interval=1.0, what="every event to reach an end state")
        stop_sampling.set()
    for proc in workers:
        stop(proc)
    receiver.stop()
    stack.close()
    report = check(
        db, tally, samples, receiver, traffic_seconds, backlog, cut_window, args, workdir
    )
    print(report)
    if not args.no_report:
        write_section(report)


def check(
    db,
    tally: Tally,
    samples,
    receiver,
    seconds: float,
    backlog: int,
    cut_window: list[float],
    args,
    workdir: Path,
) -> str:
    with db.session() as session:
        rows = {
            r.id: r
            for r in session.execute(
                select(Event.id, Event.status, Event.last_error, Event.reason, Event.route)
            )
        }
        by_status = collections.Counter(
            dict(session.execute(select(Event.status, func.count()).group_by(Event.status)).all())
        )
        pg_version = session.scalar(text("SHOW server_version"))
    for at, kind, status, answer in tally.server_errors:
        if not (status == 503 and in_window(at, cut_window)):
            tally.unplanned.append(f"{kind}: {status} {answer}")
    problems: list[str] = list(tally.unplanned[:20])
    if len(tally.unplanned) > 20:
        problems.append(f"... and {len(tally.unplanned) - 20} more unplanned answers")
    missing = [i for i in tally.accepted if i not in rows]
    if missing:
        problems.append(f"{len(missing)} acknowledged events are missing, e.g. {missing[:3]}")
    stuck = [i for i, r in rows.items() if r.status in IN_FLIGHT]
    if stuck:
        problems.append(f"{len(stuck)} events left in flight, e.g. {stuck[:3]}")
    unexplained = [
        i
        for i in tally.accepted
        if i in rows and rows[i].status in ("failed", "dead") and not rows[i].last_error
    ]
    if unexplained:
        problems.append(f"{len(unexplained)} failed/dead events without a reason")
    not_ended = [
        i
        for i, kind in tally.accepted.items()
        if i in rows and rows[i].status not in END_STATES + ("filtered",)
    ]
    if not_ended:
        problems.append(f"{len(not_ended)} acknowledged events not in an end state")
    forwarded = [i for i, r in rows.items() if r.status == "delivered" and r.route != "process"]
    never_seen = [i for i in forwarded if receiver.seen[i] == 0]
    if never_seen:
        problems.append(f"{len(never_seen)} delivered events the receiver never saw")
    repeats = sum(1 for i in forwarded if receiver.seen[i] > 1)

    warmup = tally.started + min(120.0, seconds * 0.2)
    memory_rows = []
    for name, series in samples.items():
        after = [kb for t, kb in series if t >= warmup]
        if not after:
            continue
        growth = (after[-1] - after[0]) / 1024
        memory_rows.append(
            f"| {name} | {after[0] / 1024:.1f} | {max(after) / 1024:.1f} | "
            f"{after[-1] / 1024:.1f} | {growth:+.1f} |"
        )
    answers = collections.Counter()
    for (kind, status), n in tally.by_kind.items():
        answers[f"{kind} → {status}"] += n
    total = sum(answers.values())
    lines = [
        SECTION,
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, PostgreSQL {pg_version}; "
        f"`python -m bench.soak --minutes {args.minutes:g} --senders {args.senders} "
        f"--cut-seconds {args.cut_seconds:g}`.",
        "gunicorn (2 workers × 4 threads, no embedded worker) and 2 `flask --app hub worker "
        "--concurrency 4` processes, all connected to PostgreSQL through a proxy the soak cuts.",
        "",
        f"- Traffic: {total:,} requests in {seconds:.0f} s ({total / seconds:.0f}/s) from "
        f"{args.senders} senders; database cut for {args.cut_seconds:g} s halfway "
        "(every hub connection terminated, new ones refused).",
        f"- When the traffic stopped, {backlog:,} events were still pending or "
        "retrying; the workers then drained them.",
        f"- Acknowledged events: {len(tally.accepted):,}; in the database: "
        f"{len(tally.accepted) - len(missing):,}; left in flight: {len(stuck)}.",
        "- Events by status: "
        + ", ".join(f"{s} {n:,}" for s, n in sorted(by_status.items(), key=lambda x: -x[1])),
        f"- Receiver: {receiver.calls:,} calls (every third answered 503); "
        f"{repeats} delivered events reached it more than once (at-least-once).",
        f"- Result: {'PASS' if not problems else 'FAIL'}"
        + ("" if not problems else ": " + "; ".join(problems)),
        "",
        "| answer | count |",
        "|---|---|",
        *[f"| {k} | {n:,} |" for k, n in sorted(answers.items())],
        "",
        "Memory (RSS, MB) from the end of warm-up to the end of traffic:",
        "",
        "| process | after warm-up | peak | end | growth |",
        "|---|---|---|---|---|",
        *memory_rows,
        "",
        f"Logs of this run: {workdir}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
