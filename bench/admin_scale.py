"""The admin listing at scale: 1,000,000 events, listing and filtering through the API.

Fills the events table with bulk Core inserts (SQLite) or COPY (PostgreSQL), over 20 routes,
the statuses in realistic shares, received over the last 30 days; then times each query
through the Flask app (the view, the models, the SQL) with p50/p95 over repeated calls.
Target: under 50 ms each.

    .venv/bin/python -m bench.admin_scale                      # a temporary SQLite file
    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/hub_bench_admin \\
        .venv/bin/python -m bench.admin_scale
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from bench.wakeup import fresh_postgres
from hub import create_app
from hub.db import Database, upgrade
from hub.keys import create_key
from hub.models import Event, new_event_id

STATUS_SHARES = [("delivered", 80), ("failed", 5), ("dead", 2), ("rejected", 10), ("duplicate", 3)]
ROUTES = [f"route-{i:02d}" for i in range(20)]
COLUMNS = (
    "id",
    "route",
    "key_prefix",
    "method",
    "path",
    "received_at",
    "headers",
    "body",
    "status",
    "reason",
    "attempts",
    "retries",
    "completed_at",
)


def rows(count: int, seed: int = 7):
    """``count`` event rows, ids ascending with received_at, as an ingest would write them."""
    rng = random.Random(seed)
    statuses = [s for s, share in STATUS_SHARES for _ in range(share)]
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / count
    for i in range(count):
        received = start + step * i
        status = rng.choice(statuses)
        route = rng.choice(ROUTES)
        yield {
            "id": new_event_id(),
            "route": route,
            "key_prefix": f"{rng.randrange(50):08x}",
            "method": "POST",
            "path": f"/hooks/{route}",
            "received_at": received,
            "headers": {"content-type": "application/json"},
            "body": f'{{"order": {i}, "total": {rng.randrange(10000)}}}'.encode(),
            "status": status,
            "reason": "unauthorized" if status == "rejected" else None,
            "attempts": 1,
            "retries": 0,
            "completed_at": received + timedelta(milliseconds=rng.randrange(5, 900)),
        }


def fill(db: Database, count: int, batch: int = 20_000) -> float:
    started = time.perf_counter()
    if db.dialect == "postgresql":
        import json

        with db.engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()
            with cursor.copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows(count):
                    copy.write_row(
                        [json.dumps(row[c]) if c == "headers" else row[c] for c in COLUMNS]
                    )
            conn.exec_driver_sql("ANALYZE events")
    else:
        chunk = []
        with db.engine.begin() as conn:
            for row in rows(count):
                chunk.append(row)
                if len(chunk) == batch:
                    conn.execute(insert(Event.__table__), chunk)
                    chunk = []
            if chunk:
                conn.execute(insert(Event.__table__), chunk)
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def measure(client, headers, query: dict, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get("/admin/api/events", query_string=query, headers=headers)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.get_json()
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def scale_app():
    """The hub on a fresh, migrated database (HUB_BENCH_DATABASE_URL, or a SQLite file in a
    temporary directory): (app, the directory to clean up or None)."""
    url = os.environ.get("HUB_BENCH_DATABASE_URL")
    tmp = None
    if url:
        url = fresh_postgres(url)
    else:
        tmp = tempfile.TemporaryDirectory()
        url = f"sqlite:///{Path(tmp.name) / 'hub.db'}"
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench" * 8, "EMBEDDED_WORKER": False})
    upgrade(app.extensions["hub.db"])
    return app, tmp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    args = parser.parse_args()
    app, tmp = scale_app()
    db = app.extensions["hub.db"]
    seconds = fill(db, args.events)
    print(f"{db.dialect}: {args.events:,} events filled in {seconds:.1f} s")
    with db.session() as session:
        _, key = create_key(session, "bench", admin=True)
    headers = {"X-API-Key": key}
    client = app.test_client()
    first = client.get("/admin/api/events", query_string={"limit": 50}, headers=headers)
    cursor = first.get_json()["next_cursor"]
    now = datetime.now(UTC)
    day = (now - timedelta(days=15)).isoformat(), (now - timedelta(days=14)).isoformat()
    cases = [
        ("newest 50", {"limit": 50}),
        ("next page (cursor)", {"limit": 50, "cursor": cursor}),
        ("route", {"route": "route-07"}),
        ("status failed", {"status": "failed"}),
        ("status dead (2 %)", {"status": "dead"}),
        ("key prefix", {"key": f"{7:08x}"}),
        ("time window (1 day, 15 days ago)", {"since": day[0], "until": day[1]}),
        ("route + status", {"route": "route-07", "status": "dead"}),
        ("route + time window", {"route": "route-07", "since": day[0], "until": day[1]}),
        ("q over the 10,000 newest", {"q": '"total": 4242'}),
    ]
    print(f"{'query':36} {'p50 ms':>8} {'p95 ms':>8}")
    for name, query in cases:
        p50, p95 = measure(client, headers, query, args.repeat)
        print(f"{name:36} {p50:8.1f} {p95:8.1f}")
    started = time.perf_counter()
    stats = client.get("/admin/api/stats", query_string={"since": "1d"}, headers=headers)
    print(
        f"stats over the last day ({stats.get_json()['events']:,} events): "
        f"{(time.perf_counter() - started) * 1000:.0f} ms"
    )
    db.dispose()
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
