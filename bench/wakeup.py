"""How soon an idle worker starts on a new async event (target: within 100 ms on PostgreSQL).

Posts events one at a time, spaced past the worker's idle back-off, to a route that forwards
to a receiver on 127.0.0.1, and measures from the 202 to the receiver seeing the request.

    .venv/bin/python -m bench.wakeup --database-url postgresql://postgres@127.0.0.1/hub_bench
    .venv/bin/python -m bench.wakeup            # a temporary SQLite file
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import requests
from sqlalchemy import make_url

from bench.common import fresh_postgres
from hub import create_app
from hub.services.keys import create_key
from hub.services.routes import save_routes
from hub.store.db import upgrade
from tests.procs import gunicorn, stop, wait_until, worker
from tests.servers import Receiver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--events", type=int, default=30)
    parser.add_argument("--gap", type=float, default=2.5, help="seconds between events")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hub-bench-"))
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"  # the receiver is on 127.0.0.1
    url = fresh_postgres(args.database_url) if args.database_url else f"sqlite:///{workdir}/hub.db"
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench"})
    db = app.extensions["hub.db"]
    upgrade(db)
    with Receiver() as receiver:
        step = {"connector": "http", "config": {"url": receiver.url + "/in"}}
        with db.session() as session:
            _, key = create_key(session, "bench")
            save_routes(
                session,
                [{"name": "wake", "mode": "async", "steps": [step]}],
                app.extensions["hub.connectors"],
            )
        proc = worker(url, workdir / "worker.log")
        latencies = []
        with gunicorn(url, workdir / "web.log", workers=1, HUB_EMBEDDED_WORKER="false") as (
            _,
            base,
        ):
            time.sleep(2)
            for n in range(args.events):
                time.sleep(args.gap)  # let the worker go idle and back off fully
                sent = time.time()
                r = requests.post(
                    f"{base}/hooks/wake", json={"n": n}, headers={"X-API-Key": key}, timeout=5
                )
                assert r.status_code == 202, r.text
                got = wait_until(
                    lambda n=n: len(receiver.requests) > n and receiver.requests[n],
                    10,
                    interval=0.002,
                    what="delivery",
                )
                latencies.append((got.received_at - sent) * 1000)
        stop(proc)
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95) - 1]
    print(f"database: {make_url(url).get_backend_name()}, events: {len(latencies)}")
    print(
        f"202 -> receiver: median {statistics.median(latencies):.1f} ms, "
        f"p95 {p95:.1f} ms, max {latencies[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
