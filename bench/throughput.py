"""Throughput: the hub beside a bare Flask endpoint, under the same gunicorn, driven by wrk.

One run, one after the other on 127.0.0.1 (this machine is shared and noisy, so bare Flask
runs first and again last, and every ratio divides by the better of the two):

- bare Flask: parse JSON, answer 202; and the seed's /api/process written bare;
- the hub's async route with no worker running (ingest alone), on SQLite and PostgreSQL;
- the hub's sync /api/process (text step), on SQLite and PostgreSQL, every thread allowed to run
  it (HUB_SYNC_RUNS_PER_ROUTE as HUB_WEB_THREADS, as bare Flask's threads all may);
- the embedded default as ``make run`` starts it (SQLite, a delivery thread per web process),
  with the time from the end of the load to the last delivery;
- the drain: 2 ``flask --app hub worker --concurrency 4`` processes delivering the events the
  ingest runs left pending, through the text connector and through the http connector to a
  receiver on 127.0.0.1 (nginx: bench/receiver.py);
- the peak RSS of every process;
- the CPU time each request (or delivered event) cost: user and system time of gunicorn's
  master and workers (or of the worker processes), and of the PostgreSQL backends of the
  run's database, read from /proc before and after the load. Requests per second follow
  whatever else this shared machine runs; CPU per request holds.

Afterwards it checks that every 202 is an event in the database and that the drain delivered
each event exactly once, then prints the table and writes it to bench/RESULTS.md.

    make bench                                   # SQLite; PostgreSQL too with:
    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/hub_bench make bench
    make bench BENCH_ARGS="--only bare,async-sqlite,async-pg --seconds 4 --no-report"
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine, func, select, text

from bench.common import CpuMeter, children, cpu_s, fresh_postgres, rss_kb, write_section
from bench.receiver import missing, nginx_receiver
from hub import create_app
from hub.config import Settings
from hub.services.keys import create_key
from hub.services.routes import ensure_demo_routes, save_routes
from hub.store.db import upgrade
from hub.store.models import Attempt, Event
from tests.procs import gunicorn, worker

ROOT = Path(__file__).resolve().parent.parent
# What --only can pick; every one by default.
RUNS = ("bare", "async-sqlite", "sync-sqlite", "async-pg", "sync-pg", "embedded", "drain")
BIN = Path(sys.executable).parent
CONF = Path(__file__).resolve().parent / "gunicorn_bench.py"
SECTION = "## Throughput"
BODY = json.dumps({"action": "opened", "number": 42, "input": "hello hub", "repo": "hub/x"})

# Issue 22's targets, printed beside each figure: ``ratio`` of bare Flask's req/s, ``p99``
# as a multiple of bare's, ``cpu`` ms of gunicorn's CPU a request (the web side, as the
# 1.84 ms it started from), ``lag`` seconds from the load's end to the last delivery,
# ``rate`` deliveries a second once delivering (the workers' start-up left out).
TARGETS: dict[str, dict[str, float]] = {
    "async ingest, SQLite": {"ratio": 0.40, "p99": 3, "cpu": 0.9},
    "async ingest, PostgreSQL": {"ratio": 0.40, "p99": 3, "cpu": 0.9},
    "sync /api/process, SQLite": {"ratio": 0.30},
    "sync /api/process, PostgreSQL": {"ratio": 0.30},
    "embedded default (make run), SQLite": {"lag": 5.0},
    "drain, 2 workers × 4, PostgreSQL, text": {"rate": 2500.0},
    "drain, 2 workers × 4, PostgreSQL, http": {"rate": 1000.0},
}


@dataclass
class Load:
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    total: int
    non_2xx: int


@dataclass
class Row:
    name: str
    load: Load | None = None
    baseline: str = "bare"  # which bare figure the ratio divides by
    rate: float | None = None  # events/s for drains
    note: str = ""
    rss_mb: float | None = None  # the largest process of the run
    cpu: tuple[float, float | None] | None = None  # (web, database) CPU ms per request
    lag: float | None = None  # seconds from the load's end to the last delivery
    steady: float | None = None  # a drain's deliveries a second once delivering


def per_request(meter: CpuMeter, count: int) -> tuple[float, float | None] | None:
    """The meter's CPU in ms per request (or event): (web side, database side or None)."""
    if not count:
        return None
    db = meter.db_s * 1000 / count if meter.db_s is not None else None
    return meter.web_s * 1000 / count, db


def wrk(url: str, *, headers: dict[str, str], seconds: int, connections: int) -> Load:
    """Drive ``url`` with POSTs of BODY; wrk's own figures, parsed."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(BODY)}"]
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            script.name,
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)

    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not match:
            raise RuntimeError(f"wrk printed no {label}% latency:\n{out}")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    total = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Load(
        requests_per_s=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        p50_ms=latency("50"),
        p99_ms=latency("99"),
        total=total,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def warm_up(url: str, headers: dict[str, str], args) -> None:
    """A second of load, not measured: imports, connection pools and caches warm up on
    both sides before the figures are taken."""
    wrk(url, headers=headers, seconds=1, connections=args.connections)


class Peak:
    """The peak RSS of a process tree, sampled every 100 ms while it runs."""

    def __init__(self):
        self.peaks: dict[str, int] = collections.defaultdict(int)
        self.watched: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int) -> None:
        self.watched[name] = pid

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for name, pid in list(self.watched.items()):
                for i, p in enumerate([pid, *children(pid)]):
                    kb = rss_kb(p)
                    label = name if i == 0 else f"{name} worker {i}"
                    if kb:
                        self.peaks[label] = max(self.peaks[label], kb)

    def of(self, name: str) -> float | None:
        """The largest peak, in MB, of the processes watched under ``name``."""
        sizes = [kb for label, kb in self.peaks.items() if label.startswith(name)]
        return max(sizes) / 1024 if sizes else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# Settings given with --set: every hub server of the run has them (an A/B of one setting).
SETTINGS: dict[str, str] = {}


def serve(app: str, database_url: str, log: Path, **env: str):
    """gunicorn (the project's settings, no access log) serving ``app``: (process, URL)."""
    return gunicorn(database_url, log, 2, conf=CONF, app=app, **{**SETTINGS, **env})


class Hub:
    """One database prepared for the benchmark: migrated, a key, the routes it drives."""

    def __init__(self, url: str, receiver_url: str):
        self.url = url
        self.app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench-secret-key"})
        self.db = self.app.extensions["hub.db"]
        upgrade(self.db)
        registry = self.app.extensions["hub.connectors"]
        text_step = {"connector": "text", "config": {"field": "input"}}
        http_step = {"connector": "http", "config": {"url": receiver_url + "/in"}}
        with self.db.session() as session:
            _, self.key = create_key(session, "bench")
            ensure_demo_routes(session, registry)
            save_routes(
                session,
                [
                    {"name": "bench", "mode": "async", "steps": [text_step]},
                    {"name": "forward", "mode": "async", "steps": [http_step]},
                ],
                registry,
                self.app.extensions["hub.secrets"],
            )

    def count(self, *conditions) -> int:
        with self.db.session() as session:
            return int(
                session.scalar(select(func.count()).select_from(Event).where(*conditions)) or 0
            )


def fresh_sqlite(workdir: Path, name: str) -> str:
    path = workdir / f"{name}.db"
    return f"sqlite:///{path}"


def run_ingest(hub: Hub, name: str, path: str, args, workdir: Path, peak: Peak, **env) -> Row:
    """Drive the hub's ``path`` with wrk and check that every 2xx left an event."""
    log = workdir / f"{slug(name)}.log"
    with serve("hub:create_app()", hub.url, log, HUB_EMBEDDED_WORKER="false", **env) as (
        proc,
        base,
    ):
        peak.watch(name, proc.pid)
        warm_up(base + path, {"X-API-Key": hub.key}, args)
        before = hub.count()
        meter = CpuMeter(proc.pid, hub.url)
        meter.start()
        load = wrk(
            base + path,
            headers={"X-API-Key": hub.key},
            seconds=args.seconds,
            connections=args.connections,
        )
        meter.stop()
        peak.watched.pop(name, None)
    ok = load.total - load.non_2xx
    stored = hub.count() - before
    # wrk stops counting at its deadline: requests in flight then (of the warm-up's end
    # too) may still be stored.
    if not ok <= stored <= ok + 2 * args.connections:
        raise SystemExit(f"{name}: {ok} answers 2xx but {stored} new events")
    if load.non_2xx:
        raise SystemExit(f"{name}: {load.non_2xx} answers were not 2xx; see {workdir}")
    return Row(
        name, load, note=f"{ok:,} 2xx = {stored:,} events", cpu=per_request(meter, load.total)
    )


def run_embedded(hub: Hub, args, workdir: Path, peak: Peak) -> Row:
    """``make run``'s shape: SQLite, a delivery thread in each web process."""
    name = "embedded default (make run), SQLite"
    with serve("hub:create_app()", hub.url, workdir / "embedded.log") as (proc, base):
        peak.watch(name, proc.pid)
        warm_up(base + "/hooks/bench", {"X-API-Key": hub.key}, args)
        meter = CpuMeter(proc.pid)
        meter.start()
        load = wrk(
            base + "/hooks/bench",
            headers={"X-API-Key": hub.key},
            seconds=args.seconds,
            connections=args.connections,
        )
        meter.stop()  # the delivery threads' share during the load counts too
        ended = time.monotonic()
        due = (Event.route == "bench", Event.status.in_(("pending", "processing", "retrying")))
        while hub.count(*due) and time.monotonic() - ended < 120:
            time.sleep(0.05)
        lag = time.monotonic() - ended
        peak.watched.pop(name, None)
    left = hub.count(*due)
    note = f"last delivery {lag:.1f} s after the load" + (f", {left} left" if left else "")
    return Row(name, load, note=note, cpu=per_request(meter, load.total), lag=lag)


@dataclass
class Usage:
    """What the drain's processes had spent at one moment: CPU of the workers and of their
    PostgreSQL backends, commits of the database, deliveries ended."""

    workers: float
    backends: float
    commits: int
    delivered: int
    at: float  # time.monotonic() of the reading


def usage(hub: Hub, pids: list[int]) -> Usage:
    with hub.db.engine.connect() as conn:
        backends = conn.scalars(
            text(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        ).all()
        commits = conn.scalar(
            text("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        )
        delivered = conn.scalar(
            select(func.count()).select_from(Event).where(Event.status == "delivered")
        )
    return Usage(
        workers=sum(cpu_s(pid) for pid in pids),
        backends=sum(cpu_s(pid) for pid in backends),
        commits=int(commits or 0),
        delivered=int(delivered or 0),
        at=time.monotonic(),
    )


def run_drain(
    hub: Hub, name: str, route: str, workers: int, workdir: Path, peak: Peak, **env: str
) -> Row:
    """Start ``workers`` worker processes on the pending events of ``route``; events/s.

    On PostgreSQL the note gives, from the first delivery to the last, the CPU time a
    delivery cost the worker processes and their database backends, and the commits a
    delivery cost the database (the backends of the workers only: the ones that ended
    meanwhile are not counted)."""
    pending = (Event.route == route, Event.status == "pending")
    total = hub.count(*pending)
    procs = []
    database = CpuMeter(None, hub.url)  # the backends; the workers' own CPU is read at the end
    database.start()
    started = datetime.now(UTC)
    for i in range(workers):
        log = workdir / f"{slug(name)}-{i}.log"
        procs.append(worker(hub.url, log, concurrency=4, HUB_EMBEDDED_WORKER="false", **env))
        peak.watch(f"{name} #{i + 1}", procs[-1].pid)
    pids = [proc.pid for proc in procs]
    postgres = hub.db.dialect == "postgresql"
    first: Usage | None = None
    # Waiting costs the database little: one undone row looked for along the status index
    # (every event undone is this drain's, one drain running at a time), where counting the
    # route's rows took 4 ms of PostgreSQL's CPU at 13,000 events, 50 times a second, beside
    # the workers measured. The end is the last delivery's own time.
    undone = select(Event.id).where(Event.status.in_(("pending", "processing", "retrying")))
    done = select(Event.id).where(Event.status == "delivered")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with hub.db.session() as session:
            if postgres and first is None and session.scalar(done.limit(1)) is not None:
                first = usage(hub, pids)  # start-up is behind the processes now
            if session.scalar(undone.limit(1)) is None:
                break
        time.sleep(0.05)
    last = usage(hub, pids) if postgres else None
    with hub.db.session() as session:
        finished = session.scalar(select(func.max(Event.completed_at)).where(Event.route == route))
    seconds = ((finished or datetime.now(UTC)) - started).total_seconds()
    database.stop()
    workers_s = sum(cpu_s(proc.pid) for proc in procs)  # start-up included, as in the rate
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for i, proc in enumerate(procs):
        proc.wait(60)
        peak.watched.pop(f"{name} #{i + 1}", None)
    with hub.db.session() as session:
        runs = collections.Counter(
            session.scalars(
                select(Attempt.event_id)
                .join(Event, Event.id == Attempt.event_id)
                .where(Event.route == route)
            )
        )
    delivered = hub.count(Event.route == route, Event.status == "delivered")
    twice = sum(1 for n in runs.values() if n > 1)
    if delivered != total or twice:
        raise SystemExit(f"{name}: {delivered}/{total} delivered, {twice} more than once")
    # Start-up of the processes is part of the figure: it is what a burst waits for.
    note = f"{total:,} events in {seconds:.1f} s, once each"
    if first is not None and last is not None and last.delivered > first.delivered:
        n = last.delivered - first.delivered
        note += (
            f"; {n / (last.at - first.at):,.0f}/s once delivering"
            f"; a delivery: {1000 * (last.workers - first.workers) / n:.2f} ms worker CPU, "
            f"{1000 * (last.backends - first.backends) / n:.2f} ms PostgreSQL CPU, "
            f"{(last.commits - first.commits) / n:.2f} commits"
        )
    cpu = None
    if total:
        db = database.db_s * 1000 / total if database.db_s is not None else None
        cpu = (workers_s * 1000 / total, db)
    steady = None
    if first is not None and last is not None and last.delivered > first.delivered:
        steady = (last.delivered - first.delivered) / (last.at - first.at)
    return Row(name, rate=total / seconds, note=note, cpu=cpu, steady=steady)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions(pg_url: str | None) -> str:
    parts = [
        f"{os.cpu_count()} cores",
        f"Python {platform.python_version()}",
        f"SQLite {sqlite3.sqlite_version}",
    ]
    if pg_url:
        engine = create_engine(pg_url)
        with engine.connect() as conn:
            parts.append(f"PostgreSQL {conn.scalar(text('SHOW server_version'))}")
        engine.dispose()
    return ", ".join(parts)


def mb(row: Row) -> str:
    return f"{row.rss_mb:.0f} MB" if row.rss_mb else ""


def cpu_cell(row: Row) -> str:
    """CPU ms per request: the sum, and its web and database parts where both were read."""
    if row.cpu is None:
        return ""
    web, db = row.cpu
    if db is None:
        return f"{web:.2f}"
    return f"{web + db:.2f} ({web:.2f} + {db:.2f} db)"


def met(ok: bool) -> str:
    return "met" if ok else "missed"


def table(rows: list[Row], bare: dict[str, float], bare_p99: dict[str, float]) -> list[str]:
    out = [
        "| run | req/s | CPU ms/req | p50 | p99 | / bare | target | peak RSS | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        target = TARGETS.get(row.name, {})
        if row.load is not None:
            ratio = row.load.requests_per_s / bare[row.baseline] if row.baseline in bare else None
            marks = []
            if ratio is not None and "ratio" in target:
                marks.append(f"≥ {target['ratio']:.2f} {met(ratio >= target['ratio'])}")
            if "p99" in target and row.baseline in bare_p99:
                limit = target["p99"] * bare_p99[row.baseline]
                marks.append(f"p99 ≤ {limit:.0f} ms {met(row.load.p99_ms <= limit)}")
            if "cpu" in target and row.cpu is not None:
                marks.append(f"CPU ≤ {target['cpu']} ms {met(row.cpu[0] <= target['cpu'])}")
            if "lag" in target and row.lag is not None:
                within = met(row.lag <= target["lag"])
                marks.append(f"all delivered ≤ {target['lag']:.0f} s {within}")
            out.append(
                f"| {row.name} | {row.load.requests_per_s:,.0f} | {cpu_cell(row)} | "
                f"{row.load.p50_ms:.1f} ms | {row.load.p99_ms:.1f} ms | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {'; '.join(marks)} | {mb(row)} | "
                f"{row.note} |"
            )
        else:
            mark = ""
            if "rate" in target:
                steady = row.steady if row.steady is not None else row.rate
                mark = f"≥ {target['rate']:,.0f}/s once delivering {met(steady >= target['rate'])}"
            out.append(
                f"| {row.name} | {row.rate:,.0f} events/s | {cpu_cell(row)} | | | | {mark} | "
                f"{mb(row)} | {row.note} |"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-report", action="store_true", help="don't write RESULTS.md")
    parser.add_argument(
        "--only",
        type=lambda value: set(value.split(",")),
        default=set(RUNS),
        help=f"comma-separated runs to make, of: {','.join(RUNS)} (all by default)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="HUB_NAME=VALUE",
        help="a setting of every hub server of the run, e.g. HUB_WRITER_PROCESS=false",
    )
    args = parser.parse_args()
    for given in args.set:
        name, is_set, value = given.partition("=")
        if not (is_set and name.startswith("HUB_")):
            parser.error(f"--set takes HUB_NAME=VALUE; not {given!r}")
        SETTINGS[name] = value
    if args.only - set(RUNS):
        parser.error(
            f"--only takes {','.join(RUNS)}; not {','.join(sorted(args.only - set(RUNS)))}"
        )
    only = args.only
    if not shutil.which("wrk"):
        raise SystemExit("wrk is missing: install Debian's package (apt-get install wrk)")
    if problem := missing():
        raise SystemExit(problem)
    pg = os.environ.get("HUB_BENCH_DATABASE_URL")
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"
    peak = Peak()
    rows: list[Row] = []
    bare: dict[str, float] = {}
    bare_p99: dict[str, float] = {}

    def run_bare(label: str) -> None:
        url = fresh_sqlite(workdir, "unused")  # the bare app has no database
        with serve("bench.bare:create_app()", url, workdir / "bare.log") as (proc, base):
            peak.watch("bare Flask", proc.pid)
            warm_up(base + "/hooks/bare", {}, args)
            meter = CpuMeter(proc.pid)
            meter.start()
            hook = wrk(
                base + "/hooks/bare",
                headers={},
                seconds=args.seconds,
                connections=args.connections,
            )
            meter.stop()
            hook_cpu = per_request(meter, hook.total)
            meter.start()
            seed = wrk(
                base + "/api/process",
                headers={"X-API-Key": "bench-bare-key"},
                seconds=args.seconds,
                connections=args.connections,
            )
            meter.stop()
            peak.watched.pop("bare Flask", None)
        name = f"bare Flask, parse JSON, answer 202 ({label})"
        rows.append(Row(name, hook, note="baseline", cpu=hook_cpu))
        name = f"bare seed /api/process ({label})"
        rows.append(Row(name, seed, "bare_process", note="", cpu=per_request(meter, seed.total)))
        bare["bare"] = max(bare.get("bare", 0.0), hook.requests_per_s)
        bare["bare_process"] = max(bare.get("bare_process", 0.0), seed.requests_per_s)
        bare_p99["bare"] = min(bare_p99.get("bare", 1e9), hook.p99_ms)

    with nginx_receiver() as receiver_url:
        if "bare" in only:
            run_bare("first")
        databases = [("SQLite", "sqlite", fresh_sqlite(workdir, "hub"))]
        if pg and only & {"async-pg", "sync-pg", "drain"}:
            databases.append(("PostgreSQL", "pg", fresh_postgres(pg)))
        hubs = {label: Hub(url, receiver_url) for label, _, url in databases}
        for label, short, _ in databases:
            hub = hubs[label]
            if f"async-{short}" in only:
                rows.append(
                    run_ingest(hub, f"async ingest, {label}", "/hooks/bench", args, workdir, peak)
                )
            if f"sync-{short}" in only:
                # Every thread may run the route, as every thread of bare Flask does: the
                # default (half of them) guards against a slow receiver, and under wrk's 16
                # clients a run now and then waited past HUB_SYNC_BUSY_WAIT for a slot (503).
                row = run_ingest(
                    hub,
                    f"sync /api/process, {label}",
                    "/api/process",
                    args,
                    workdir,
                    peak,
                    HUB_SYNC_RUNS_PER_ROUTE=str(Settings.model_fields["web_threads"].default),
                )
                row.baseline = "bare_process"
                rows.append(row)
        if "embedded" in only:
            embedded = Hub(fresh_sqlite(workdir, "embedded"), receiver_url)
            rows.append(run_embedded(embedded, args, workdir, peak))
        # A worker claims every due event whatever its route: one drain at a time, each over
        # the events one ingest run left pending.
        for label, hub in hubs.items() if "drain" in only else ():
            name = f"drain, 2 workers × 4, {label}"
            if not hub.count(Event.route == "bench", Event.status == "pending"):
                run_ingest(hub, f"async ingest, {label}", "/hooks/bench", args, workdir, peak)
            rows.append(run_drain(hub, f"{name}, text", "bench", 2, workdir, peak))
            run_ingest(hub, f"async ingest forward, {label}", "/hooks/forward", args, workdir, peak)
            rows.append(run_drain(hub, f"{name}, http", "forward", 2, workdir, peak))
        if "bare" in only:
            run_bare("last")
    peak.stop()
    for row in rows:
        row.rss_mb = peak.of("bare Flask" if row.name.startswith("bare") else row.name)
    largest = max(row.rss_mb or 0 for row in rows)
    pg_url = hubs["PostgreSQL"].url if "PostgreSQL" in hubs else None
    # Every server here runs in a clean environment: with the hub's default web settings.
    workers, threads = (Settings.model_fields[f].default for f in ("web_workers", "web_threads"))
    lines = [
        SECTION,
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {versions(pg_url)}.",
        f"Command: `{'HUB_BENCH_DATABASE_URL=… ' if pg else ''}make bench"
        f"{'' if only == set(RUNS) else ' BENCH_ARGS=--only ' + ','.join(sorted(only))}"
        f"{''.join(f' --set {k}={v}' for k, v in SETTINGS.items())}` "
        f"(wrk -t2 -c{args.connections} -d{args.seconds}s; gunicorn gthread {workers} "
        f"workers × {threads} threads (the hub's defaults), "
        "no access log, for bare Flask and the hub alike; CPU ms/req is user + system time "
        "of gunicorn's processes, or the worker processes' per event, plus the PostgreSQL "
        "backends' ('db'), from /proc).",
        "",
        *table(rows, bare, bare_p99),
        "",
        f"Largest process: {largest:.0f} MB RSS at its peak (gunicorn's master, a web worker "
        f"or a worker process); target ≤ 120 MB {'met' if largest <= 120 else 'missed'}.",
        "",
        f"Logs of this run: {workdir}",
    ]
    report = "\n".join(lines)
    print(report)
    if not args.no_report and only == set(RUNS):  # a partial run leaves the table as it was
        write_section(report)


if __name__ == "__main__":
    main()
