"""The figures of docs/scaling.md: how fast one PostgreSQL takes events, how many connections
4 worker processes hold (straight, or through PgBouncer in transaction mode), and the dead
rows a delivered event leaves for vacuum.

    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/hub_bench_scaling \\
        .venv/bin/python -m bench.scaling [--seconds 5] [--events 2000]

1. writes: 4 threads, each committing transactions of 1 or 16 events with their deliveries
   (16: a group commit's batch under load), for ``--seconds``; events/s and WAL bytes an event.
2. drain: a backlog of ``--events`` delivered by 4 ``hub worker --concurrency 4`` processes
   (text connector), once straight to PostgreSQL and once through pgbouncer (pool of 4): the
   most backends PostgreSQL counted, and the rows updated (HOT or not) and left dead an event.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from sqlalchemy import text

from bench.common import fresh_postgres
from hub import create_app
from hub.services.routes import save_routes
from hub.store.db import upgrade
from tests.procs import stop, wait_until, worker
from tests.rows import insert_events
from tests.test_pgbouncer import libpq, pgbouncer, pooled_settings

BODY = b'{"input": "order 1 paid", "type": "order.paid", "data": {"amount": 1250}}'


def hub_app(url: str, **config):
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench-secret-key", **config})
    upgrade(app.extensions["hub.db"])
    with app.extensions["hub.db"].session() as session:
        save_routes(
            session,
            [{"name": "bench", "mode": "async", "steps": [{"connector": "text"}]}],
            app.extensions["hub.connectors"],
            app.extensions["hub.secrets"],
        )
    return app


def wal_lsn(conn) -> int:
    return conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar_one()


def writes(url: str, batch: int, seconds: float, threads: int = 4) -> str:
    db = hub_app(fresh_postgres(url)).extensions["hub.db"]
    done = [0] * threads
    stopping = threading.Event()

    def write(i: int) -> None:
        while not stopping.is_set():
            insert_events(db, "bench", batch, body=BODY)
            done[i] += batch

    with db.engine.connect() as conn:
        before = wal_lsn(conn)
    started = time.monotonic()
    running = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for thread in running:
        thread.start()
    time.sleep(seconds)
    stopping.set()
    for thread in running:
        thread.join()
    elapsed = time.monotonic() - started
    with db.engine.connect() as conn:
        wal = wal_lsn(conn) - before
    db.dispose()
    events = sum(done)
    return (
        f"| {batch} | {events / elapsed:,.0f} events/s | {wal / events:,.0f} B | "
        f"{events:,} in {elapsed:.1f} s |"
    )


def drain(url: str, events: int, through_pgbouncer: bool) -> str:
    direct = fresh_postgres(url)
    app = hub_app(direct)
    db = app.extensions["hub.db"]
    insert_events(db, "bench", events, body=BODY)
    db.dispose()
    database = db.engine.url.database
    with (
        tempfile.TemporaryDirectory() as folder,
        psycopg.connect(libpq(direct), autocommit=True) as conn,
    ):
        work = Path(folder)
        with pgbouncer(direct, work) if through_pgbouncer else _nothing() as bouncer:
            settings = pooled_settings(bouncer, direct) if bouncer else {}
            target = bouncer.url if bouncer else direct
            logs = [work / f"w{i}.log" for i in range(4)]
            procs = [worker(target, log, concurrency=4, **settings) for log in logs]
            peak = 0
            started = None
            try:
                for log in logs:
                    wait_until(lambda log=log: b"delivering with" in log.read_bytes(), 60)
                started = time.monotonic()

                def left() -> int:
                    nonlocal peak
                    (backends,) = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (database,),
                    ).fetchone()
                    peak = max(peak, backends)
                    (count,) = conn.execute(
                        "SELECT count(*) FROM events WHERE completed_at IS NULL"
                    ).fetchone()
                    return count

                wait_until(lambda: left() == 0, 120, interval=0.1)
                elapsed = time.monotonic() - started
            finally:
                for proc in procs:
                    stop(proc, signal.SIGTERM)
        time.sleep(1.5)  # the backends' statistics reach pg_stat_user_tables
        rows = conn.execute(
            "SELECT relname, n_tup_upd, n_tup_hot_upd, n_dead_tup FROM pg_stat_user_tables "
            "WHERE relname IN ('events', 'deliveries', 'attempts') ORDER BY relname"
        ).fetchall()
    tables = "; ".join(
        f"{name}: {upd / events:.2f} updates ({hot / events:.2f} HOT), {dead / events:.2f} dead"
        for name, upd, hot, dead in rows
    )
    how = "through pgbouncer (pool 4)" if through_pgbouncer else "straight"
    return f"| {how} | {events / elapsed:,.0f} events/s | {peak} | {tables} |"


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *_):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--events", type=int, default=2000)
    args = parser.parse_args()
    url = os.environ["HUB_BENCH_DATABASE_URL"]
    print("| events a transaction | written | WAL an event | run |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 16):
        print(writes(url, batch, args.seconds), flush=True)
    print()
    print("| 4 workers x 4 threads | drain | most backends | rows an event |")
    print("| --- | --- | --- | --- |")
    for through in (False, True):
        print(drain(url, args.events, through), flush=True)


if __name__ == "__main__":
    main()
