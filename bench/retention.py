"""Retention purge: does the workers' purge hold up ingest? 1,000,000 finished events on
PostgreSQL, purged by `hub worker` processes while webhooks keep coming.

    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/hub_bench_retention \\
        .venv/bin/python -m bench.retention [--events 1000000] [--rate 100] [--seconds 30]

1. Fill: the events written by INSERT ... SELECT on the server, each with its delivery and
   its attempt, in chunks of 100,000: 60 % of route ``ci`` (retention_days 1, received 2 to 9
   days ago, each with a delivery id; its dedup window is 3 days, so the youngest keep
   their dedup keys), 30 % of ``orders`` (no retention of its own: HUB_RETENTION_DAYS=30;
   31 to 60 days old) and 10 % of ``payments`` (retention_days 365, as old: kept).
2. The hub under gunicorn (2 processes, no embedded worker) takes ``--rate`` async webhooks
   a second from 8 client threads, each request timed, and ``--workers`` `hub worker`
   processes deliver them. The purge's turn is held back (its state row not due) for the
   first ``--seconds``: the figures without a purge. Then the turn comes: the workers purge
   (one pass at a time across them, batches of HUB_RETENTION_BATCH), and the load goes on
   until every purgeable event is gone, then ``--seconds`` more.
3. Meanwhile a sampler reads pg_stat_activity every 5 ms: each backend waiting on a
   heavyweight lock (wait_event_type Lock) and for how long, and the age of each purge
   transaction (a statement of the purge running: its xact_start).

Prints the table and writes it to bench/RESULTS.md ("Retention purge").
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from sqlalchemy import create_engine, make_url, text, update

from bench.common import fresh_postgres, write_section
from bench.throughput import Hub, serve, versions
from hub.services.routes import save_routes
from tests.procs import stop, wait_until, worker

SECTION = "## Retention purge"
BODY = b'{"action": "opened", "number": 42, "input": "hello hub", "repo": "hub/x"}'
JSON = {"Content-Type": "application/json"}
CHUNK = 100_000
CLIENTS = 8
SAMPLE_S = 0.005
# What the sampler counts as waiting: on a heavyweight lock (a row, a transaction), on an
# internal lock (LWLock: the WAL's, a buffer's) or on I/O.
HEAVY, LIGHT = ("Lock",), ("LWLock", "IO")
WAIT_KINDS = HEAVY + LIGHT
# The application_name of each side's connections, so the sampler tells them apart.
INGEST, WORKERS = "hub-ingest", "hub-workers"
# What a purge batch runs (pg_stat_activity.query of a purging backend).
PURGE_MARKS = ("FOR UPDATE OF events SKIP LOCKED", "DELETE FROM events", "INSERT INTO dedup_keys")
PURGE_MARKS += ("DELETE FROM attempts", "DELETE FROM deliveries WHERE deliveries.event_id")

FILL = """
INSERT INTO events (id, route, key_prefix, method, path, received_at, headers, content_type,
                    body, body_size, dedup_key, status, response_status, attempts, retries,
                    completed_at)
SELECT 'evt_' || lpad(to_hex(g), 26, '0'), p.route, p.prefix, 'POST', '/hooks/' || p.route,
       now() - make_interval(secs => p.oldest - (g - p.lo) * p.step),
       '{"content-type": "application/json", "user-agent": "bench"}'::jsonb,
       'application/json',
       convert_to('{"id": ' || g || ', "input": "order ' || g || ' paid", "amount": 1250}',
                  'UTF8'),
       60, CASE WHEN p.dedup THEN p.route || '-' || g END, 'delivered', 202, 1, 0,
       now() - make_interval(secs => p.oldest - (g - p.lo) * p.step - 0.05)
FROM PARAMS AS p, generate_series(p.lo, p.hi) AS g;
INSERT INTO deliveries (id, event_id, route, destination, lane, position, status, attempts,
                        retries, completed_at, created_at, result)
SELECT 'dlv_' || substr(e.id, 5), e.id, e.route, 'default', e.route || '/default', 0,
       'delivered', 1, 0, e.completed_at, e.received_at, '{"ok": true}'::jsonb
FROM events AS e, PARAMS AS p
WHERE e.id BETWEEN 'evt_' || lpad(to_hex(p.lo), 26, '0') AND 'evt_' || lpad(to_hex(p.hi), 26, '0');
INSERT INTO attempts (event_id, delivery_id, run, step_index, connector, try_number, started_at,
                      duration_ms, outcome, http_status, request, response)
SELECT e.id, 'dlv_' || substr(e.id, 5), 1, 0, 'http', 1, e.received_at, 40, 'ok', 200,
       '{"method": "POST", "url": "https://example.com/in"}', '{"status": 200}'
FROM events AS e, PARAMS AS p
WHERE e.id BETWEEN 'evt_' || lpad(to_hex(p.lo), 26, '0') AND 'evt_' || lpad(to_hex(p.hi), 26, '0');
""".replace(
    "PARAMS",
    "(SELECT CAST(:route AS text) AS route, CAST(:prefix AS text) AS prefix,"
    " CAST(:oldest AS float8) AS oldest, CAST(:step AS float8) AS step, CAST(:lo AS int) AS lo,"
    " CAST(:hi AS int) AS hi, CAST(:dedup AS boolean) AS dedup)",
)


@dataclass
class Share:
    route: str
    fraction: float
    oldest_days: float
    newest_days: float
    dedup: bool = False


SHARES = [
    Share("ci", 0.6, 9, 2, dedup=True),
    Share("orders", 0.3, 60, 31),
    Share("payments", 0.1, 60, 31),
]


def fill(url: str, total: int, prefix: str) -> float:
    """Write the events, deliveries and attempts; the seconds it took."""
    engine = create_engine(url)
    started = time.monotonic()
    first = 1
    for share in SHARES:
        count = int(total * share.fraction)
        span = (share.oldest_days - share.newest_days) * 86400
        step = span / max(1, count - 1)
        for lo in range(first, first + count, CHUNK):
            hi = min(lo + CHUNK - 1, first + count - 1)
            with engine.begin() as conn:
                for statement in FILL.split(";\n")[:3]:
                    conn.execute(
                        text(statement),
                        {
                            "route": share.route,
                            "prefix": prefix,
                            "oldest": share.oldest_days * 86400 - (lo - first) * step,
                            "lo": lo,
                            "hi": hi,
                            "step": step,
                            "dedup": share.dedup,
                        },
                    )
            print(f"  filled {share.route} up to {hi - first + 1:,} of {count:,}", flush=True)
        first += count
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE events, deliveries, attempts"))
    engine.dispose()
    return time.monotonic() - started


@dataclass
class Request:
    at: float  # time.monotonic() when sent
    ms: float
    status: int


class Load:
    """``rate`` webhooks a second from CLIENTS threads, each on its own schedule."""

    def __init__(self, url: str, key: str, rate: float):
        self.url, self.key, self.rate = url, key, rate
        self.done: list[Request] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)
        ]
        self._lock = threading.Lock()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        every = CLIENTS / self.rate
        session = requests.Session()
        headers = {"X-API-Key": self.key} | JSON
        next_at = time.monotonic() + index * every / CLIENTS
        while not self.stopping.is_set():
            wait = next_at - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            next_at += every
            sent = time.monotonic()
            try:
                status = session.post(self.url, data=BODY, headers=headers, timeout=30).status_code
            except requests.RequestException:
                status = 0
            with self._lock:
                self.done.append(Request(sent, (time.monotonic() - sent) * 1000, status))

    def between(self, start: float, end: float) -> list[Request]:
        with self._lock:
            return [r for r in self.done if start <= r.at < end]


@dataclass
class Sampler:
    """pg_stat_activity every SAMPLE_S: each wait of a backend on a lock (heavyweight: Lock;
    internal: LWLock) or on I/O, by the consecutive samples it was seen in, and the age of
    each purge transaction (a statement of the purge running: its xact_start)."""

    url: str
    # (pid, query start, wait type, wait event) -> first and last seen, application, what
    waits: dict[tuple, tuple[float, float, str, str]] = field(default_factory=dict)
    purge_xacts: dict[tuple[int, str], float] = field(default_factory=dict)
    samples: int = 0

    def __post_init__(self):
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)

    def _run(self) -> None:
        engine = create_engine(self.url)
        query = text(
            "SELECT pid, application_name, wait_event_type, wait_event, query,"
            " query_start::text, xact_start::text,"
            " extract(epoch FROM clock_timestamp() - xact_start) * 1000"
            " FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND state <> 'idle'"
        )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not self.stopping.wait(SAMPLE_S):
                now = time.monotonic()
                self.samples += 1
                for pid, app, kind, event, sql, since, xact, xact_ms in conn.execute(query):
                    sql = sql or ""
                    if kind in WAIT_KINDS:
                        key = (pid, since, kind, event)
                        first = self.waits.get(key, (now,))[0]
                        self.waits[key] = (first, now, app, f"{kind} {event}: {sql[:70]}")
                    if xact and any(mark in sql for mark in PURGE_MARKS):
                        key = (pid, xact)
                        self.purge_xacts[key] = max(self.purge_xacts.get(key, 0.0), xact_ms or 0)
        engine.dispose()

    def lock_waits(
        self, start: float, end: float, app: str, kinds: tuple[str, ...]
    ) -> list[tuple[float, str]]:
        """``app``'s waits of these kinds seen from start to end: (ms, what), each as long
        as the samples it was seen in (a wait seen once counts SAMPLE_S)."""
        return [
            ((last - first + SAMPLE_S) * 1000, what)
            for (_, _, kind, _), (first, last, a, what) in self.waits.items()
            if start <= first < end and a == app and kind in kinds
        ]

    def purge_xact_ms(self) -> list[float]:
        return sorted(self.purge_xacts.values())


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(len(ranked) * p / 100 + 0.999999) - 1))]


def row(name: str, load: Load, sampler: Sampler, start: float, end: float) -> str:
    done = load.between(start, end)
    ms = [r.ms for r in done]
    bad = sum(1 for r in done if not 200 <= r.status < 300)
    cells = []
    for app, kinds in ((INGEST, HEAVY), (INGEST, LIGHT), (WORKERS, HEAVY)):
        waits = sampler.lock_waits(start, end, app, kinds)
        cells.append(f"{len(waits)} ({max((w for w, _ in waits), default=0.0):.0f})")
    return (
        f"| {name} | {end - start:.0f} s | {len(done):,} | {len(done) / (end - start):.0f} | "
        f"{statistics.median(ms) if ms else 0:.1f} | {percentile(ms, 99):.1f} | "
        f"{max(ms, default=0):.1f} | {bad} | {' | '.join(cells)} |"
    )


def batch_plan(engine) -> str:
    """PostgreSQL's plan of a purge batch of ``ci`` past a cursor, as the workers send it."""
    from sqlalchemy.dialects import postgresql

    from hub.services import retention
    from hub.store.models import utcnow

    now = utcnow()
    scope = retention.Scope("ci", now - timedelta(days=1), 1, "route")
    query = retention.next_batch(scope, (now - timedelta(days=8), "evt_"), 500)
    compiled = query.with_for_update(skip_locked=True, of=retention.Event).compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}
    )
    with engine.connect() as conn:
        return "\n".join(conn.exec_driver_sql("EXPLAIN " + str(compiled)).scalars())


def plant_a_lock_wait(engine, base: str, key: str, sampler: Sampler) -> tuple[float, float]:
    """Check the sampler: hold the dedup lock a webhook with a delivery id takes (an
    advisory lock on route, sender and id) while one is posted, until the sampler has seen
    it waiting and 200 ms more; (how long the webhook's answer took, the longest wait the
    sampler saw), in ms."""
    lock = f"bench\x1f{key.split('_')[1]}\x1fplanted"
    started = time.monotonic()
    took: list[float] = []

    def post() -> None:
        headers = {"X-API-Key": key, "Idempotency-Key": "planted"} | JSON
        sent = time.monotonic()
        requests.post(base + "/hooks/bench", data=BODY, headers=headers, timeout=30)
        took.append((time.monotonic() - sent) * 1000)

    def seen() -> float:
        waits = sampler.lock_waits(started, time.monotonic(), INGEST, HEAVY)
        return max((ms for ms, _ in waits), default=0.0)

    with engine.connect() as conn, conn.begin():
        conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"), {"k": lock})
        poster = threading.Thread(target=post)
        poster.start()
        try:
            wait_until(seen, 10, interval=0.01, what="the sampler to see the planted wait")
        except AssertionError:
            activity = engine.connect().execute(
                text(
                    "SELECT application_name, state, wait_event_type, wait_event, left(query, 60)"
                    " FROM pg_stat_activity WHERE datname = current_database()"
                )
            )
            raise SystemExit(
                f"the sampler ({sampler.samples} samples) did not see the planted wait; "
                f"waits seen: {list(sampler.waits.values())[-5:]}; now: {activity.all()}"
            ) from None
        time.sleep(0.2)
    poster.join(10)
    time.sleep(0.05)
    return took[0], seen()


def sqlite_batches(workdir: Path, count: int, batch: int) -> str:
    """SQLite, where a batch is the one writer while it runs: ``count`` finished events
    of ``ci`` (each with its delivery, each keeping its dedup key: the most a batch
    writes) purged ``batch`` at a time; how long the batches held the write lock."""
    from hub import create_app
    from hub.services import retention
    from hub.store.db import upgrade
    from hub.store.models import Event, utcnow
    from tests.rows import insert_events

    app = create_app(
        {"DATABASE_URL": f"sqlite:///{workdir / 'retention.db'}", "SECRET_KEY": "bench-secret-key"}
    )
    db = app.extensions["hub.db"]
    upgrade(db)
    with db.session() as session:
        save_routes(
            session,
            [{"name": "ci", "retention_days": 1, "dedup_window": 3 * 86400}],
            app.extensions["hub.connectors"],
            app.extensions["hub.secrets"],
        )
    for _ in range(0, count, 10_000):
        insert_events(db, "ci", 10_000, status="delivered")
    with db.session() as session:
        old = utcnow() - timedelta(days=2)
        session.execute(update(Event).values(received_at=old, dedup_key=Event.id))
    with db.read_session() as session:
        (walk,) = retention.scopes(session, 0)
    windows, now, after, took = {"ci": 3 * 86400}, utcnow(), None, []
    started = time.monotonic()
    while True:
        begun = time.monotonic()
        with db.session() as session:
            after, _, _ = retention.purge_batch(session, walk, after, batch, windows, now)
        took.append((time.monotonic() - begun) * 1000)
        if after is None:
            break
    rate = count / (time.monotonic() - started)
    db.dispose()
    return (
        f"On SQLite (the same machine, synchronous=FULL), {count:,} such events of `ci`, each "
        f"keeping its dedup key, went at {rate:,.0f} events/s in batches of {batch}; a batch "
        f"held the one write lock (what a webhook arriving then waits for) "
        f"{percentile(took, 50):.0f} ms at the median, {percentile(took, 99):.0f} ms at the "
        f"99th percentile, {max(took):.0f} ms at most."
    )


def named(url: str, application: str) -> str:
    """``url`` whose connections tell PostgreSQL they are ``application``'s."""
    return (
        make_url(url)
        .update_query_dict({"application_name": application})
        .render_as_string(hide_password=False)
    )


def count(engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(sql)).scalar() or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", default=os.environ.get("HUB_BENCH_DATABASE_URL", ""))
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=100.0, help="webhooks a second")
    parser.add_argument("--seconds", type=float, default=30.0, help="each phase without purge")
    parser.add_argument("--workers", type=int, default=2, help="`hub worker` processes")
    parser.add_argument("--batch", type=int, default=500, help="HUB_RETENTION_BATCH")
    parser.add_argument("--no-report", action="store_true", help="leave RESULTS.md alone")
    args = parser.parse_args()
    if not args.database.startswith("postgresql"):
        raise SystemExit("give --database or HUB_BENCH_DATABASE_URL: a PostgreSQL URL")
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"  # the bench hub's unused forward route
    workdir = Path(tempfile.mkdtemp(prefix="hub-retention-"))
    url = fresh_postgres(args.database)
    hub = Hub(url, "http://127.0.0.1:9/unused")
    prefix = hub.key.split("_")[1]
    with hub.db.session() as session:
        save_routes(
            session,
            [
                {"name": "ci", "mode": "async", "retention_days": 1, "dedup_window": 3 * 86400},
                {"name": "orders", "mode": "async"},
                {"name": "payments", "mode": "async", "retention_days": 365},
            ],
            hub.app.extensions["hub.connectors"],
            hub.app.extensions["hub.secrets"],
        )
    print(f"filling {args.events:,} events ...", flush=True)
    fill_s = fill(url, args.events, prefix)
    engine = create_engine(url)
    purgeable = count(engine, "SELECT count(*) FROM events WHERE route IN ('ci', 'orders')")
    in_window = count(
        engine,
        "SELECT count(*) FROM events"
        " WHERE route = 'ci' AND received_at > now() - interval '3 days'",
    )
    kept_before = count(engine, "SELECT count(*) FROM events WHERE route = 'payments'")
    plan = batch_plan(engine)
    print(f"filled in {fill_s:.0f} s; the batch's plan:\n{plan}", flush=True)
    # The purge's turn, held back until the figures without it are taken.
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO retention_state (id, next_run_at, purged)"
                " VALUES (1, now() + interval '1 day', 0)"
            )
        )
    settings = {
        "HUB_RETENTION_DAYS": "30",
        "HUB_RETENTION_INTERVAL": "2",
        "HUB_RETENTION_BATCH": str(args.batch),
    }
    sampler = Sampler(url)
    workers = [
        worker(named(url, WORKERS), workdir / f"worker-{i}.log", concurrency=2, **settings)
        for i in range(args.workers)
    ]
    try:
        web = named(url, INGEST)
        with serve(
            "hub:create_app()", web, workdir / "gunicorn.log", HUB_EMBEDDED_WORKER="false"
        ) as (_proc, base):
            load = Load(base + "/hooks/bench", hub.key, args.rate)
            load.start()
            time.sleep(3)  # connections, caches
            sampler.start()
            wait_until(lambda: sampler.samples > 10, 30, what="the sampler")
            planted = plant_a_lock_wait(engine, base, hub.key, sampler)
            t0 = time.monotonic()
            time.sleep(args.seconds)
            t1 = time.monotonic()
            with engine.begin() as conn:
                conn.execute(text("UPDATE retention_state SET next_run_at = now()"))
            wait_until(
                lambda: (
                    count(engine, "SELECT count(*) FROM events WHERE route IN ('ci', 'orders')")
                    == 0
                ),
                3600,
                interval=0.5,
                what="the purge",
            )
            t2 = time.monotonic()
            time.sleep(args.seconds)
            t3 = time.monotonic()
            load.stop()
            sampler.stop()
    finally:
        for proc in workers:
            stop(proc)
    kept_keys = count(engine, "SELECT count(*) FROM dedup_keys")
    kept_after = count(engine, "SELECT count(*) FROM events WHERE route = 'payments'")
    accepted = sum(1 for r in load.done if 200 <= r.status < 300)
    stored = count(engine, "SELECT count(*) FROM events WHERE route = 'bench'")
    if kept_after != kept_before or stored < accepted:
        raise SystemExit(f"kept {kept_after} of {kept_before}; {stored} stored of {accepted}")
    purge_s = t2 - t1
    logs = "".join((workdir / f"worker-{i}.log").read_text() for i in range(args.workers))
    if "retention pass failed" in logs:
        raise SystemExit(f"a pass failed; see {workdir}")
    xacts = sampler.purge_xact_ms()
    passes = re.findall(r"in (\d+) batch\(es\), the longest (\d+) ms", logs)
    batches = sum(int(n) for n, _ in passes)
    longest_batch = max((float(ms) for _, ms in passes), default=0.0)
    report = [
        SECTION,
        "",
        f"`python -m bench.retention` on {datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, "
        f"shared with other work; {versions(url)}. "
        f"{args.events:,} finished events (each with its delivery and its attempt) written in "
        f"{fill_s:.0f} s; {purgeable:,} of them past their route's retention (`ci` 1 day, "
        f"`orders` the default 30), {kept_before:,} of `payments` kept (365 days). The hub "
        f"under gunicorn (2 processes) took {args.rate:.0f} async webhooks a second from "
        f"{CLIENTS} client threads throughout; {args.workers} `hub worker --concurrency 2` "
        f"processes delivered them and purged, batches of {args.batch}, "
        f"HUB_RETENTION_PAUSE 0.01 s. Waits: pg_stat_activity read every "
        f"{SAMPLE_S * 1000:.0f} ms, each wait as long as the samples it was seen in (once: "
        f"{SAMPLE_S * 1000:.0f} ms); lock: a heavyweight lock (a row, a transaction). "
        f"The sampler's check, first: a webhook held on purpose on the lock it takes for "
        f"its delivery id answered in {planted[0]:.0f} ms, and was seen waiting "
        f"{planted[1]:.0f} ms.",
        "",
        "| phase | length | webhooks | req/s | p50 ms | p99 ms | max ms | non-2xx | "
        "ingest's lock waits (longest ms) | ingest's LWLock and I/O waits (longest ms) | "
        "workers' lock waits (longest ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        row("before the purge", load, sampler, t0, t1),
        row("during the purge", load, sampler, t1, t2),
        row("after the purge", load, sampler, t2, t3),
        "",
        f"The purge: {purgeable:,} events with their deliveries and attempts in "
        f"{purge_s:.0f} s, **{purgeable / purge_s:,.0f} events/s**, in {batches:,} batches; "
        f"the longest batch's transaction lasted {longest_batch:.0f} ms as the workers timed "
        f"it; as the sampler saw them, the median lasted {percentile(xacts, 50):.0f} ms and "
        f"99 % under {percentile(xacts, 99):.0f} ms. {kept_keys:,} dedup "
        f"keys kept for their window ({in_window:,} `ci` events were inside it). Every "
        f"webhook answered 2xx was stored.",
    ]
    for app, kinds, who in (
        (INGEST, HEAVY, "ingest's longest lock wait"),
        (INGEST, LIGHT, "ingest's longest LWLock or I/O wait"),
        (WORKERS, HEAVY, "the workers' longest lock wait"),
    ):
        waits = sampler.lock_waits(t1, t2, app, kinds)
        if waits:
            ms, what = max(waits)
            report.append(f"During the purge, {who}: {ms:.0f} ms (`{what.strip()}`).")
    report += ["", sqlite_batches(workdir, 100_000, args.batch)]
    text_out = "\n".join(report) + "\n"
    print(text_out)
    if not args.no_report:
        write_section(text_out)
    engine.dispose()


if __name__ == "__main__":
    main()
