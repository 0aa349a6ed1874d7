"""The dashboard's pages with 1,000,000 events stored: each page's time through Flask.

Fills the events table as bench/admin_scale.py does (bulk inserts on SQLite, COPY on
PostgreSQL; 20 routes, realistic statuses, received over the last 30 days), plus a burst
in the last hour so the overview has a busy hour to chart; then signs in and times every
page (the view, the queries, the template) with p50/p95 over repeated loads. Target: every
page under 200 ms. Writes its section of bench/RESULTS.md.

    .venv/bin/python -m bench.dashboard                      # a temporary SQLite file
    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/hub_bench_dashboard \\
        .venv/bin/python -m bench.dashboard
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import statistics
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import insert, select

from bench.admin_scale import ROUTES, fill, scale_app
from bench.common import write_section
from hub.services.keys import create_key
from hub.services.routes import save_routes
from hub.store.db import Database
from hub.store.models import Attempt, Event, new_event_id

TARGET_MS = 200.0
BURST_STATUSES = ["delivered"] * 85 + ["failed"] * 4 + ["dead"] * 2 + ["rejected"] * 9


def add_burst(db: Database, count: int) -> None:
    """``count`` events received over the last hour, and a queue of due ones."""
    rng = random.Random(11)
    now = datetime.now(UTC)
    rows = []
    for i in range(count):
        received = now - timedelta(seconds=3600 * (count - i) / count)
        status = rng.choice(BURST_STATUSES)
        rows.append(
            {
                "id": new_event_id(),
                "route": rng.choice(ROUTES),
                "key_prefix": f"{rng.randrange(50):08x}",
                "method": "POST",
                "path": "/hooks/x",
                "received_at": received,
                "headers": {"content-type": "application/json"},
                "body": f'{{"burst": {i}}}'.encode(),
                "status": status,
                "reason": "unauthorized" if status == "rejected" else None,
                "attempts": 1,
                "retries": 0,
                "completed_at": received + timedelta(milliseconds=rng.randrange(5, 900)),
                "next_attempt_at": None,
            }
        )
    for i in range(2000):  # waiting for a worker, the oldest due 5 minutes ago
        rows.append(
            {
                "id": new_event_id(),
                "route": ROUTES[i % len(ROUTES)],
                "key_prefix": None,
                "method": "POST",
                "path": "/hooks/x",
                "received_at": now - timedelta(seconds=300 - i * 0.1),
                "headers": {},
                "body": b"{}",
                "status": "pending" if i % 2 else "retrying",
                "reason": None,
                "attempts": 0,
                "retries": 0,
                "completed_at": None,
                "next_attempt_at": now - timedelta(seconds=300 - i * 0.1),
            }
        )
    with db.engine.begin() as conn:
        for start in range(0, len(rows), 10_000):
            conn.execute(insert(Event.__table__), rows[start : start + 10_000])


def add_attempts(db: Database, event_id: str, count: int) -> None:
    """A long attempt history for one event (its page shows the newest 200)."""
    now = datetime.now(UTC)
    rows = [
        {
            "event_id": event_id,
            "run": 1 + i // 3,
            "step_index": 0,
            "connector": "http",
            "try_number": 1 + i % 3,
            "started_at": now - timedelta(seconds=count - i),
            "duration_ms": 40 + i % 50,
            "outcome": "retryable" if i % 3 < 2 else "ok",
            "http_status": 503 if i % 3 < 2 else 200,
            "error": "HTTP 503 from the receiver" if i % 3 < 2 else None,
            "request": '{"order": 1}' * 40,
            "response": '{"error": "busy"}' * 40,
        }
        for i in range(count)
    ]
    with db.engine.begin() as conn:
        conn.execute(insert(Attempt.__table__), rows)


def sign_in(client, key: str) -> None:
    page = client.get("/dashboard/sign-in").get_data(as_text=True)
    token = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
    answer = client.post("/dashboard/sign-in", data={"key": key, "csrf_token": token})
    assert answer.status_code == 303, answer.status_code


def measure(client, path: str, repeat: int) -> tuple[float, float, int]:
    times = []
    size = 0
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(path)
        body = response.get_data()
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code in (200, 204), (path, response.status_code, body[:300])
        size = len(body)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--burst", type=int, default=20_000, help="events in the last hour")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="don't update RESULTS.md")
    args = parser.parse_args()
    app, tmp = scale_app()
    db = app.extensions["hub.db"]
    seconds = fill(db, args.events)
    add_burst(db, args.burst)
    total = args.events + args.burst + 2000
    print(f"{db.dialect}: {total:,} events filled in {seconds:.1f} s (+ the last hour)")
    with db.session() as session:
        _, key = create_key(session, "bench", admin=True)
        save_routes(
            session,
            [{"name": r, "mode": "async", "steps": [{"connector": "text"}]} for r in ROUTES],
            app.extensions["hub.connectors"],
        )
        event_id = session.scalar(
            select(Event.id).where(Event.status == "delivered").order_by(Event.id).limit(1)
        )
    add_attempts(db, event_id, 600)
    if db.dialect == "postgresql":
        with db.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    client = app.test_client()
    sign_in(client, key)
    first = client.get("/dashboard/events").get_data(as_text=True)
    cursor = re.search(r"cursor=([A-Za-z0-9_-]+)", first).group(1)
    after = re.search(r'data-tail-after="([^"]+)"', first).group(1)
    day = (datetime.now(UTC) - timedelta(days=15)).strftime("%Y-%m-%dT%H:%M")
    pages = [
        ("overview (last hour: charts, counts, reasons, queue)", "/dashboard/"),
        ("overview refresh (fragment)", "/dashboard/?fragment=1"),
        ("events, newest 50", "/dashboard/events"),
        ("events, next page (cursor)", f"/dashboard/events?cursor={cursor}"),
        ("events, route + status", "/dashboard/events?route=route-07&status=dead"),
        ("events, key prefix", f"/dashboard/events?key={7:08x}"),
        ("events, time window (15 days ago)", f"/dashboard/events?since={day}&until=14d"),
        ("events, body text (bounded scan)", "/dashboard/events?q=%22total%22%3A+4242"),
        ("live tail poll", f"/dashboard/events/tail?after={after}"),
        ("event detail (600 attempts, 200 shown)", f"/dashboard/events/{event_id}"),
        ("bulk replay confirmation (status failed)", "/dashboard/events/replay?status=failed"),
        ("routes", "/dashboard/routes"),
        ("route detail", "/dashboard/routes/route-07"),
        ("route form", "/dashboard/routes/route-07/edit"),
        ("keys", "/dashboard/keys"),
        ("connectors", "/dashboard/connectors"),
    ]
    lines = []
    worst = 0.0
    print(f"{'page':52} {'p50 ms':>8} {'p95 ms':>8} {'KiB':>6}")
    for name, path in pages:
        p50, p95, size = measure(client, path, args.repeat)
        worst = max(worst, p95)
        print(f"{name:52} {p50:8.1f} {p95:8.1f} {size / 1024:6.0f}")
        lines.append(f"| {name} | {p50:.1f} | {p95:.1f} | {size / 1024:.0f} |")
    verdict = "PASS" if worst < TARGET_MS else "FAIL"
    load = os.getloadavg()[0]
    print(f"slowest p95 {worst:.1f} ms: {verdict} (target {TARGET_MS:.0f} ms)")
    db.dispose()
    if tmp:
        tmp.cleanup()
    if args.no_write:
        return
    heading = f"## Dashboard pages at {args.events:,} events ({db.dialect})"
    report = "\n".join(
        [
            heading,
            "",
            f"`python -m bench.dashboard` on {platform.machine()}, Python "
            f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}: {total:,} events "
            f"({args.events:,} over 30 days, {args.burst:,} in the last hour, 2,000 queued), "
            f"20 routes; each page loaded {args.repeat} times through Flask's test client "
            "(view, queries, template; no network), signed in as an admin. Load average "
            f"during the run: {load:.1f} on {os.cpu_count()} cores (a shared machine). "
            f"Target: under {TARGET_MS:.0f} ms. Slowest p95: {worst:.1f} ms, **{verdict}**.",
            "",
            "| page | p50 ms | p95 ms | KiB |",
            "| --- | --- | --- | --- |",
            *lines,
        ]
    )
    write_section(report)


if __name__ == "__main__":
    main()
