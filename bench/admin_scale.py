"""The admin listing at scale: every filter of the events listing, timed through the API.

Fills the events table with bulk Core inserts (SQLite) or COPY (PostgreSQL), over 20 routes,
50 keys, the statuses and refusal reasons in realistic shares, received over the last 30
days; then times each filter of `GET /admin/api/events` (the cases below name each one with
a common value and a value that matches nothing, the worst case for a filter without an
index) through the Flask app (the view, the models, the SQL) with p50/p95 over repeated
calls, and prints a table. Target: each under 60 ms at 300,000 events.

``--unindexed`` then drops the reason index (migration 0009) and times the reason filter
again, which is what it cost before. The key listing is timed too, over ``--keys``
keys: one page, and its size.

    .venv/bin/python -m bench.admin_scale --events 300000          # a temporary SQLite file
    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1/hub_bench_admin \\
        .venv/bin/python -m bench.admin_scale --events 300000
"""

from __future__ import annotations

import argparse
import math
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
from hub.services.keys import create_key
from hub.store.db import Database, upgrade
from hub.store.models import Event, new_event_id
from hub.web.schemas import EventQuery

STATUS_SHARES = [("delivered", 80), ("failed", 5), ("dead", 2), ("rejected", 10), ("duplicate", 3)]
ROUTES = [f"route-{i:02d}" for i in range(20)]
# Refusals by reason, in shares of the rejected events; "rate_limited" is the rare one.
REASON_SHARES = [
    ("unauthorized", 70),
    ("forbidden", 15),
    ("bad_signature", 14),
    ("rate_limited", 1),
]
# One request id in 1,000 is a sender that sends the same X-Request-ID every time.
SHARED_REQUEST_ID = "the-same-every-time"
WINDOWS = (1_000, 2_000, 5_000, 10_000)
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
    "request_id",
    "attempts",
    "retries",
    "completed_at",
)


def rows(count: int, seed: int = 7, pad: int = 0):
    """``count`` event rows, ids ascending with received_at, as an ingest would write them;
    ``pad`` bytes more in each body make rows the size of real webhooks."""
    rng = random.Random(seed)
    statuses = [s for s, share in STATUS_SHARES for _ in range(share)]
    reasons = [r for r, share in REASON_SHARES for _ in range(share)]
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / count
    note = "x" * pad
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
            "body": f'{{"order": {i}, "total": {rng.randrange(10000)}, "note": "{note}"}}'.encode(),
            "status": status,
            "reason": rng.choice(reasons) if status == "rejected" else None,
            "request_id": SHARED_REQUEST_ID if i % 1000 == 0 else f"req-{i}",
            "attempts": 1,
            "retries": 0,
            "completed_at": received + timedelta(milliseconds=rng.randrange(5, 900)),
        }


def fill(db: Database, count: int, batch: int = 20_000, pad: int = 0) -> float:
    started = time.perf_counter()
    if db.dialect == "postgresql":
        import json

        with db.engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()
            with cursor.copy(f"COPY events ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                for row in rows(count, pad=pad):
                    copy.write_row(
                        [json.dumps(row[c]) if c == "headers" else row[c] for c in COLUMNS]
                    )
            conn.exec_driver_sql("ANALYZE events")
    else:
        chunk = []
        with db.engine.begin() as conn:
            for row in rows(count, pad=pad):
                chunk.append(row)
                if len(chunk) == batch:
                    conn.execute(insert(Event.__table__), chunk)
                    chunk = []
            if chunk:
                conn.execute(insert(Event.__table__), chunk)
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def measure(client, headers, query: dict, repeat: int) -> tuple[float, float, int]:
    """p50 and p95 milliseconds of a page of 50, and how many events the page held."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        response = client.get(
            "/admin/api/events", query_string={"limit": 50, **query}, headers=headers
        )
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.get_json()
    times.sort()
    p95 = times[math.ceil(len(times) * 0.95) - 1]  # the nearest rank
    return statistics.median(times), p95, len(response.get_json()["events"])


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


def cases(cursor: str, count: int) -> list[tuple[str, dict]]:
    """Every filter of the listing, alone (a common value, and one matching nothing) and in
    a few combinations; the newest page and the next one for reference."""
    now = datetime.now(UTC)
    day = (now - timedelta(days=15)).isoformat(), (now - timedelta(days=14)).isoformat()
    return [
        ("newest 50", {}),
        ("next page (cursor)", {"cursor": cursor}),
        ("route", {"route": "route-07"}),
        ("route (no such route)", {"route": "route-none"}),
        ("status failed (5 %)", {"status": "failed"}),
        ("status dead (2 %)", {"status": "dead"}),
        ("status pending (none)", {"status": "pending"}),
        ("reason unauthorized (7 %)", {"reason": "unauthorized"}),
        ("reason rate_limited (0.1 %)", {"reason": "rate_limited"}),
        ("reason (matching none)", {"reason": "no_such_reason"}),
        ("key prefix", {"key": f"{7:08x}"}),
        ("key prefix (no such key)", {"key": "ffffffff"}),
        ("since (the last day)", {"since": (now - timedelta(days=1)).isoformat()}),
        ("until (15 days ago)", {"until": day[0]}),
        ("since + until (one day)", {"since": day[0], "until": day[1]}),
        ("request_id (one event)", {"request_id": f"req-{count // 2 + 1}"}),
        (f"request_id (shared by {count // 1000:,})", {"request_id": SHARED_REQUEST_ID}),
        ("request_id (none)", {"request_id": "no-such-request"}),
        ("route + status dead", {"route": "route-07", "status": "dead"}),
        ("route + reason", {"route": "route-07", "reason": "forbidden"}),
        ("route + time window", {"route": "route-07", "since": day[0], "until": day[1]}),
        # Two common values never seen together: one index walked to its end, the worst case.
        ("status + reason (never together)", {"status": "delivered", "reason": "unauthorized"}),
        ("q over the default window (bounded)", {"q": '"total": 4242'}),
    ]


def add_keys(db: Database, count: int) -> None:
    """``count`` keys as `keys create` writes them (the digests need not match a secret)."""
    from hub.store.models import ApiKey

    now = datetime.now(UTC)
    with db.engine.begin() as conn:
        conn.execute(
            insert(ApiKey.__table__),
            [
                {
                    "name": f"partner-{i}",
                    "prefix": f"b{i:07x}",
                    "digest": f"{i:064x}",
                    "scopes": [f"route-{i % 20:02d}"],
                    "is_admin": False,
                    "created_at": now,
                }
                for i in range(count)
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--keys", type=int, default=3_000)
    parser.add_argument("--body-bytes", type=int, default=0, help="pad each body by this much")
    parser.add_argument(
        "--unindexed", action="store_true", help="time the reason filter without its index too"
    )
    args = parser.parse_args()
    app, tmp = scale_app()
    db = app.extensions["hub.db"]
    seconds = fill(db, args.events, pad=args.body_bytes)
    print(
        f"{db.dialect}: {args.events:,} events (bodies padded by {args.body_bytes:,} bytes) "
        f"filled in {seconds:.1f} s"
    )
    with db.session() as session:
        _, key = create_key(session, "bench", admin=True)
    headers = {"X-API-Key": key}
    client = app.test_client()
    first = client.get("/admin/api/events", query_string={"limit": 50}, headers=headers)
    timed = cases(first.get_json()["next_cursor"], args.events)
    default_window = app.config["ADMIN_SEARCH_WINDOW"]
    untimed = set(EventQuery.model_fields) - {"limit"} - {k for _, q in timed for k in q}
    if untimed:  # a filter added to the API without a case here
        raise SystemExit(f"no case times these filters: {', '.join(sorted(untimed))}")
    print(f"{'GET /admin/api/events?':36} {'p50 ms':>8} {'p95 ms':>8} {'rows':>5}")
    for name, query in timed:
        p50, p95, found = measure(client, headers, query, args.repeat)
        print(f"{name:36} {p50:8.1f} {p95:8.1f} {found:5d}")
    # The body search's bound: what a call costs at each scan window (HUB_ADMIN_SEARCH_WINDOW).
    for window in WINDOWS:
        app.config["ADMIN_SEARCH_WINDOW"] = window
        p50, p95, found = measure(client, headers, {"q": '"total": 4242'}, args.repeat)
        print(f"{f'q over {window:,} rows':36} {p50:8.1f} {p95:8.1f} {found:5d}")
    app.config["ADMIN_SEARCH_WINDOW"] = default_window
    if args.unindexed:
        with db.engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX ix_events_reason_received_at_id")
            conn.exec_driver_sql("ANALYZE")
        print("without ix_events_reason_received_at_id:")
        for name, query in timed:
            if "reason" in query and "route" not in query:
                p50, p95, found = measure(client, headers, query, max(args.repeat // 8, 3))
                print(f"{name:36} {p50:8.1f} {p95:8.1f} {found:5d}")
    add_keys(db, args.keys)
    started = time.perf_counter()
    page = client.get("/admin/api/keys", headers=headers)
    ms = (time.perf_counter() - started) * 1000
    data = page.get_json()
    print(
        f"GET /admin/api/keys ({args.keys + 1:,} keys): {len(data['keys'])} keys, "
        f"{len(page.data) / 1024:.1f} KiB, {ms:.1f} ms, next_cursor "
        f"{'given' if data['next_cursor'] else 'null'}"
    )
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
