"""The drain alone: 2 ``flask --app hub worker --concurrency 4`` processes delivering a
backlog of events written in bulk (no wrk, no ingest run), through the text connector.

    HUB_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/hub_bench \\
        .venv/bin/python -m bench.drain --events 10000 --runs 3 [--controlled]

It prints one events/s figure per run; bench/throughput.py measures the same drain after
its ingest runs, as part of ``make bench``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

from bench.common import fresh_postgres
from bench.receiver import missing, nginx_receiver
from bench.throughput import Hub, Peak, run_drain
from hub.services.routes import save_routes
from tests.rows import insert_events


def add_controlled_route(hub: Hub) -> None:
    """A route whose one destination has a cap and a rate: the claims' controlled path."""
    route = {
        "name": "paced",
        "mode": "async",
        "destinations": [
            {
                "name": "default",
                "steps": [{"connector": "text"}],
                "max_in_flight": 5,
                "rate": "10/second",
            }
        ],
    }
    with hub.db.session() as session:
        save_routes(
            session,
            [route],
            hub.app.extensions["hub.connectors"],
            hub.app.extensions["hub.secrets"],
        )


SQL_COUNT = Path(__file__).resolve().parent / "sqlcount"


def per_delivery(prefix: Path, deliveries: int) -> str:
    """The statements of each kind and the commits the worker processes wrote to files
    named ``prefix.<pid>.json`` (bench/sqlcount), per delivery; the files are removed."""
    total: collections.Counter[str] = collections.Counter()
    for path in prefix.parent.glob(prefix.name + ".*.json"):
        total.update(json.loads(path.read_text()))
        path.unlink()
    statements = sum(n for kind, n in total.items() if kind != "COMMIT")
    kinds = ", ".join(f"{n / deliveries:.2f} {kind}" for kind, n in sorted(total.items()))
    return f"{statements / deliveries:.2f} statements ({kinds})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--routes", type=int, default=1, help="routes sharing the backlog")
    parser.add_argument(
        "--connector",
        choices=("text", "http"),
        default="text",
        help="the step of the route drained (http: a POST to nginx on 127.0.0.1)",
    )
    parser.add_argument(
        "--count-sql",
        action="store_true",
        help="print the statements and commits a delivery cost the worker processes",
    )
    parser.add_argument(
        "--controlled",
        action="store_true",
        help="add a route whose destination has a max_in_flight and a rate (no events): "
        "every claim then reads and locks it",
    )
    args = parser.parse_args()
    url = os.environ.get("HUB_BENCH_DATABASE_URL")
    if not url:
        raise SystemExit("set HUB_BENCH_DATABASE_URL to a PostgreSQL database to drop and fill")
    if problem := missing():
        raise SystemExit(problem)
    os.environ["HUB_ALLOW_PRIVATE_TARGETS"] = "true"
    workdir = Path(tempfile.mkdtemp(prefix="hub-drain-"))
    peak = Peak()
    with nginx_receiver() as receiver_url:
        for run in range(args.runs):
            hub = Hub(fresh_postgres(url), receiver_url)
            body = b'{"input": "hello hub"}'
            route = {"text": "bench", "http": "forward"}[args.connector]
            insert_events(hub.db, route, args.events, body=body)
            if args.controlled:
                add_controlled_route(hub)
            env = {}
            if args.count_sql:
                env = {"PYTHONPATH": str(SQL_COUNT), "HUB_BENCH_SQL_COUNT": str(workdir / "sql")}
            row = run_drain(hub, f"drain run {run + 1}", route, 2, workdir, peak, **env)
            print(f"{row.name}: {row.rate:,.0f} events/s ({row.note})", flush=True)
            if args.count_sql:
                print(f"  per delivery: {per_delivery(workdir / 'sql', args.events)}", flush=True)
            hub.db.engine.dispose()
    peak.stop()


if __name__ == "__main__":
    main()
