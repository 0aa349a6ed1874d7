"""SQLite's writers queue at a lock file, not in SQLite's busy handler.

SQLite lets one transaction write at a time. A connection that finds the write lock taken
retries from its busy handler, which sleeps between tries (1, 2, 5, 10, 15, 20, 25, 25, 25,
50, 50, 100 ms, then 100 ms each): between two gunicorn processes each writing a batch of
webhooks every few ms, a writer often slept 25 to 100 ms past the moment the lock was free,
and those sleeps were SQLite ingest's p99 (334 ms with 2 processes, 98 ms with one process
of as many threads; `make bench` on 2026-12-07).

So before its ``BEGIN IMMEDIATE`` a write transaction takes an exclusive ``flock`` on
``<database>-writer.lock``, trying again every 0.1 to 2 ms, and gives it back once SQLite has
committed or rolled back. Every connection opens the file itself, so connections of one
process exclude each other as those of two processes do. The kernel drops the lock of a
process that dies. A writer that has waited ``WAIT_SECONDS`` goes on without it, to SQLite's
own lock and busy timeout as before: a lock file that can't be taken never stops a writer.
Read transactions (``BEGIN``, deferred) never take it.

The lock is given back in the dialect's ``do_commit``, ``do_rollback`` and ``do_close``:
after the commit itself (SQLAlchemy's ``commit`` event comes before it), and also when the
pool rolls back a connection returned with its transaction open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from typing import Any

from sqlalchemy import URL, Engine

# How long a writer waits for the lock file before going on to SQLite's own lock.
WAIT_SECONDS = 30.0
FIRST_PAUSE, LONGEST_PAUSE = 0.0001, 0.002


class LockingConnection(sqlite3.Connection):
    """A pysqlite connection that knows its lock file (``install`` makes every connection
    of an engine one)."""

    hub_lock_path: str | None = None
    hub_lock_fd: int | None = None
    hub_lock_held = False


def lock_path(database: str | None) -> str | None:
    """The lock file beside a database file; None for an in-memory database."""
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        return None
    return f"{database}-writer.lock"


def connect_args(url: URL) -> dict[str, Any]:
    """What pysqlite's connect needs for connections that know their lock file: the
    connection class (none for an in-memory database)."""
    path = lock_path(url.database)
    if path is None:
        return {}
    return {"factory": type("HubSQLiteConnection", (LockingConnection,), {"hub_lock_path": path})}


def install(engine: Engine) -> None:
    """Give the lock file back after each commit, rollback and close of ``engine`` (made
    with ``connect_args``); ``acquire`` takes it."""
    dialect = engine.dialect
    commit, rollback, close = dialect.do_commit, dialect.do_rollback, dialect.do_close

    def do_commit(dbapi_connection: Any) -> None:
        try:
            commit(dbapi_connection)
        finally:
            release(dbapi_connection)

    def do_rollback(dbapi_connection: Any) -> None:
        try:
            rollback(dbapi_connection)
        finally:
            release(dbapi_connection)

    def do_close(dbapi_connection: Any) -> None:
        try:
            close(dbapi_connection)
        finally:
            conn = driver(dbapi_connection)
            release(conn)
            fd = getattr(conn, "hub_lock_fd", None)
            if fd is not None:
                conn.hub_lock_fd = None
                with contextlib.suppress(OSError):
                    os.close(fd)

    dialect.do_commit, dialect.do_rollback, dialect.do_close = do_commit, do_rollback, do_close


def driver(connection: Any) -> Any:
    """The pysqlite connection itself, under the pool's proxy when given one."""
    return getattr(connection, "dbapi_connection", connection)


def acquire(connection: Any) -> None:
    """Take the lock file for a write transaction about to begin (nothing for a connection
    without one); after WAIT_SECONDS, go on without it."""
    dbapi_connection = driver(connection)
    if not isinstance(dbapi_connection, LockingConnection) or dbapi_connection.hub_lock_held:
        return
    fd = dbapi_connection.hub_lock_fd
    if fd is None:
        try:
            # Read-only is enough to flock: another user who may read the file (a CLI run by
            # an admin beside the server's user) queues at the same lock.
            fd = os.open(dbapi_connection.hub_lock_path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:  # a directory it can't write: SQLite's own lock still serialises
            return
        dbapi_connection.hub_lock_fd = fd
    pause, deadline = FIRST_PAUSE, None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            now = time.monotonic()
            if deadline is None:
                deadline = now + WAIT_SECONDS
            elif now >= deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)
            continue
        except OSError:
            return
        dbapi_connection.hub_lock_held = True
        return


def release(connection: Any) -> None:
    """Give the lock file back, if this connection holds it."""
    dbapi_connection = driver(connection)
    if getattr(dbapi_connection, "hub_lock_held", False):
        dbapi_connection.hub_lock_held = False
        with contextlib.suppress(OSError):
            fcntl.flock(dbapi_connection.hub_lock_fd, fcntl.LOCK_UN)
