"""Counts the SQL statements and commits of a hub process, for bench/drain.py.

Put on PYTHONPATH of a worker process with HUB_BENCH_SQL_COUNT set to a path: at the
process's exit it writes to that path + ``.<pid>.json`` how many statements of each kind
(their first word) and how many commits its engines ran. An executemany counts once.
"""

import atexit
import collections
import json
import os

_path = os.environ.get("HUB_BENCH_SQL_COUNT")
if _path:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    _counts: collections.Counter[str] = collections.Counter()

    @event.listens_for(Engine, "before_cursor_execute")
    def _statement(conn, cursor, statement, parameters, context, executemany):
        _counts[statement.lstrip().split(None, 1)[0].upper()] += 1

    @event.listens_for(Engine, "commit")
    def _commit(conn):
        _counts["COMMIT"] += 1

    @atexit.register
    def _write():
        with open(f"{_path}.{os.getpid()}.json", "w") as out:
            json.dump(dict(_counts), out)
