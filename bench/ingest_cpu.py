"""CPU per accepted async webhook, in one process, without the noise of a load: the hub's
WSGI app called directly for N requests to an async route (the same key, route, body and
headers as ``make bench``'s), its CPU time read before and after, and the PostgreSQL
backends' from /proc. Requests run one after another, so each commits alone; with
``--threads N`` they run on N threads at once, as a gunicorn worker's request threads do, so
the group commit shares commits between them (the batches' mean size is printed).

    python -m bench.ingest_cpu                                  # SQLite, 5,000 requests
    python -m bench.ingest_cpu --schema          # the route checks the body against SCHEMA
    python -m bench.ingest_cpu --database postgresql://postgres@127.0.0.1:5432/hub_cpu
    python -m bench.ingest_cpu --dedup     # each request with an Idempotency-Key of its own
    python -m bench.ingest_cpu --threads 8 --writer    # new events go to a writer process
    py-spy record -r 500 -f raw -o ingest.txt -- .venv/bin/python -m bench.ingest_cpu

gunicorn's own work (the socket, the HTTP parse, its threads) is not in the figure: compare
changes with it, and confirm with ``make bench``'s CPU ms/req.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import CpuMeter, cpu_s, fresh_postgres

BODY = b'{"action": "opened", "number": 42, "input": "hello hub", "repo": "hub/x"}'
# What --schema gives the route: BODY matches it (a route's JSON Schema, docs/schemas.md).
SCHEMA = {
    "type": "object",
    "required": ["action", "number", "repo"],
    "properties": {
        "action": {"enum": ["opened", "closed"]},
        "number": {"type": "integer", "minimum": 1},
        "input": {"type": "string", "maxLength": 1000},
        "repo": {"type": "string", "pattern": "^[a-z0-9-]+/[a-z0-9-]+$"},
    },
}


def environ(key: str, path: str = "/hooks/bench") -> dict:
    """What gunicorn hands the app for wrk's request (wrk's headers, a keep-alive socket)."""
    return {
        "REQUEST_METHOD": "POST",
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "RAW_URI": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "REMOTE_PORT": "50000",
        "HTTP_HOST": "127.0.0.1:8000",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(BODY)),
        "HTTP_X_API_KEY": key,
        "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0),
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.errors": sys.stderr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--database", default="", help="a PostgreSQL URL; SQLite by default")
    parser.add_argument("--threads", type=int, default=1, help="request threads (default 1)")
    parser.add_argument(
        "--path", default="/hooks/bench", help="/hooks/bench (async) or /api/process (sync)"
    )
    parser.add_argument(
        "--schema", action="store_true", help="give /hooks/bench a JSON Schema (SCHEMA)"
    )
    parser.add_argument(
        "--dedup",
        action="store_true",
        help="give each request an Idempotency-Key of its own: the dedup lookup, a miss each time",
    )
    parser.add_argument(
        "--writer",
        action="store_true",
        help="commit through a writer process, as under gunicorn (its CPU is printed apart)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hub-ingest-cpu-"))
    # Counters in files, as under gunicorn.
    os.environ.setdefault("HUB_METRICS_DIR", str(workdir / "metrics"))
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"  # the bench hub's forward route
    from bench.throughput import Hub  # after the metrics directory is chosen
    from hub.services.routes import save_routes

    url = fresh_postgres(args.database) if args.database else f"sqlite:///{workdir / 'hub.db'}"
    hub = Hub(url, "http://127.0.0.1:9/unused")
    app = hub.app
    if args.schema:
        with hub.db.session() as session:
            step = {"connector": "text", "config": {"field": "input"}}
            route = {"name": "bench", "mode": "async", "steps": [step]}
            save_routes(session, [route | {"schema": SCHEMA}], app.extensions["hub.connectors"])
    writer = None
    if args.writer:
        from hub.services.writer import Supervisor, WriterClient

        writer = Supervisor(url)
        writer.start()
        app.extensions["hub.inserts"] = WriterClient(
            writer.path, app.extensions["hub.inserts"], timeout=30.0
        )
        while not os.path.exists(writer.path):
            time.sleep(0.05)
    base = environ(hub.key, args.path)
    statuses: dict[str, int] = {}
    sent = itertools.count()

    def start_response(status, _headers, _exc_info=None):
        statuses[status] = statuses.get(status, 0) + 1

    def one() -> None:
        env = dict(base)
        env["wsgi.input"] = io.BytesIO(BODY)
        if args.dedup:
            env["HTTP_IDEMPOTENCY_KEY"] = f"delivery-{next(sent)}"
        result = app(env, start_response)
        try:
            for _ in result:
                pass
        finally:
            close = getattr(result, "close", None)
            if close:
                close()

    for _ in range(200):  # imports, pools, caches
        one()
    statuses.clear()
    commits = app.extensions["hub.inserts"]
    commits = getattr(commits, "local", commits)  # a WriterClient's own, for the fallbacks
    batches, pieces = commits.batches, commits.pieces
    writer_s = cpu_s(writer.proc.pid) if writer else 0.0
    meter = CpuMeter(None, url)
    meter.start()
    cpu, wall = time.process_time(), time.perf_counter()
    if args.threads == 1:
        for _ in range(args.requests):
            one()
    else:
        each = args.requests // args.threads
        args.requests = each * args.threads
        threads = [
            threading.Thread(target=lambda: [one() for _ in range(each)])
            for _ in range(args.threads)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    meter.stop()
    if writer:
        writer_s = cpu_s(writer.proc.pid) - writer_s
        writer.stop()
    batch = (commits.pieces - pieces) / max(1, commits.batches - batches)
    if set(statuses) != {"200 OK" if args.path == "/api/process" else "202 ACCEPTED"}:
        raise SystemExit(f"answers: {statuses}")
    per = cpu * 1000 / args.requests
    db = (
        f", PostgreSQL {meter.db_s * 1000 / args.requests:.3f} ms" if meter.db_s is not None else ""
    )
    if writer:
        db += f", writer process {writer_s * 1000 / args.requests:.3f} ms"
        committed = f"{commits.pieces - pieces} committed here"
    else:
        committed = f"{batch:.1f} events a commit"
    print(
        f"{args.requests} requests, {'PostgreSQL' if args.database else 'SQLite'}: "
        f"hub {per:.3f} ms CPU each{db}; {args.requests / wall:.0f} req/s on "
        f"{args.threads} thread(s); {committed}"
        + (" (each with its own Idempotency-Key)" if args.dedup else "")
    )


if __name__ == "__main__":
    main()
