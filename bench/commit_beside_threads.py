"""How long one group commit's write takes when other threads of the process want the GIL.

The hub's group commit writes a batch (BEGIN, the INSERTs, COMMIT) in a request thread. Each
call into the database driver lets other threads run; in a gunicorn worker those are request
threads parsing and checking webhooks. This writes ``--batches`` batches of 4 events with their
deliveries, one after another through the hub's own group committer, first alone, then beside
1 and 4 threads that only compute, and prints the mean time a batch took.

    python -m bench.commit_beside_threads            # SQLite
    python -m bench.commit_beside_threads --database postgresql://postgres@127.0.0.1:5432/hub_cpu
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.common import fresh_postgres
from hub import create_app
from hub.store.db import upgrade
from hub.store.groupcommit import row_of
from hub.store.models import Delivery, Event, EventStatus, new_delivery_id, new_event_id, utcnow


def batch_rows(route: str) -> list:
    rows = []
    for _ in range(4):
        now = utcnow()
        event = Event(
            id=new_event_id(),
            route=route,
            method="POST",
            path=f"/hooks/{route}",
            received_at=now,
            status=EventStatus.PENDING,
            body=b'{"action": "opened", "number": 42}',
            headers={"Content-Type": "application/json"},
        )
        delivery = Delivery(
            id=new_delivery_id(),
            event_id=event.id,
            route=route,
            destination="default",
            lane=f"{route}/default",
            position=0,
            status=EventStatus.PENDING,
            attempts=0,
            retries=0,
            next_attempt_at=now,
            created_at=now,
        )
        rows += [(Event.__table__, row_of(event)), (Delivery.__table__, row_of(delivery))]
    return rows


def busy(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def mean_ms(app, batches: int, threads: int) -> float:
    committer = app.extensions["hub.inserts"]
    stop = threading.Event()
    others = [threading.Thread(target=busy, args=(stop,)) for _ in range(threads)]
    for thread in others:
        thread.start()
    try:
        start = time.perf_counter()
        for _ in range(batches):
            committer.insert_rows(batch_rows("bench"))
        return (time.perf_counter() - start) * 1000 / batches
    finally:
        stop.set()
        for thread in others:
            thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--database", default="", help="a PostgreSQL URL; SQLite by default")
    args = parser.parse_args()
    if args.database:
        url = fresh_postgres(args.database)
    else:
        url = f"sqlite:///{Path(tempfile.mkdtemp()) / 'commit.db'}"
    app = create_app({"DATABASE_URL": url, "SECRET_KEY": "bench-secret-key"})
    upgrade(app.extensions["hub.db"])
    with app.app_context():
        mean_ms(app, 20, 0)  # warm: connections, statements
        for threads in (0, 1, 4):
            took = mean_ms(app, args.batches, threads)
            print(f"a batch of 4 events beside {threads} busy thread(s): {took:.2f} ms")


if __name__ == "__main__":
    main()
