"""What recording an attempt's headers costs a delivery: N events through a sync route whose
one step is the http connector, to a receiver on 127.0.0.1 answering with a dozen headers
(a Set-Cookie among them); each event's call and its attempt row, in the request.

    .venv/bin/python -m bench.attempt_headers --events 2000 --runs 3 [--database URL]

Prints, per run, the wall time and this process's CPU time (the receiver's threads
included) per delivery. Run it on the code before and after a change, alternated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench.common import fresh_postgres
from hub import create_app
from hub.services.keys import create_key
from hub.services.routes import save_routes
from hub.store.db import upgrade
from tests.servers import Receiver, Reply

ANSWER_HEADERS = {
    "X-Receiver-Trace": "trace-7f3e9a",
    "Set-Cookie": "sid=0123456789abcdef; Path=/; HttpOnly; Secure",
    "Cache-Control": "no-store",
    "X-RateLimit-Limit": "1000",
    "X-RateLimit-Remaining": "999",
    "Vary": "Accept-Encoding",
    "Strict-Transport-Security": "max-age=31536000",
}


def one_run(database_url: str, events: int) -> tuple[float, float]:
    app = create_app(
        {"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEY": "bench-secret-key-0123"}
    )
    db = app.extensions["hub.db"]
    upgrade(db)
    with Receiver() as receiver:
        receiver.script(*[Reply(200, {"ok": True}, ANSWER_HEADERS)] * (events + 20))
        route = {
            "name": "fwd",
            "mode": "sync",
            "steps": [{"connector": "http", "config": {"url": receiver.url + "/in"}}],
        }
        with db.session() as session:
            save_routes(
                session, [route], app.extensions["hub.connectors"], app.extensions["hub.secrets"]
            )
            _, key = create_key(session, "bench", None, None, None)
        client = app.test_client()
        headers = {"X-API-Key": key}
        for n in range(20):  # warm: connections, caches
            client.post("/hooks/fwd", json={"warm": n}, headers=headers)
        wall, cpu = time.perf_counter(), time.process_time()
        for n in range(events):
            answer = client.post("/hooks/fwd", json={"order": n, "total": 12}, headers=headers)
            assert answer.status_code == 200, answer.get_json()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    db.dispose()
    return wall / events * 1000, cpu / events * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--database", help="a PostgreSQL URL (dropped and made again)")
    args = parser.parse_args()
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"
    walls, cpus = [], []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as scratch:
            url = fresh_postgres(args.database) if args.database else f"sqlite:///{scratch}/b.db"
            wall, cpu = one_run(url, args.events)
        walls.append(wall)
        cpus.append(cpu)
        print(f"run {run + 1}: {wall:.3f} ms wall, {cpu:.3f} ms CPU a delivery", flush=True)
    print(
        f"median of {args.runs}: {statistics.median(walls):.3f} ms wall, "
        f"{statistics.median(cpus):.3f} ms CPU a delivery ({args.events} deliveries a run)"
    )


if __name__ == "__main__":
    main()
