"""The database: one engine per app, sessions per request, SQLite tuned for a web server.

Two kinds of session. ``session()`` / ``get_session()`` may write: on SQLite its transaction
takes the write lock up front (``BEGIN IMMEDIATE``). ``read_session()`` /
``get_read_session()`` only reads: on SQLite its transaction starts deferred (``BEGIN``),
reads the WAL snapshot of its first statement and never takes the write lock, so an admin
reading statistics over 300,000 events for a second does not hold up a single sender (WAL
lets any number of readers run beside the one writer). A write through a read session (a
flush, or an insert, update or delete statement) is a bug and is refused on both databases
(``ReadOnlySession``) before it reaches SQL: on SQLite a deferred transaction that starts
writing fails with SQLITE_BUSY instead of waiting for the lock. On PostgreSQL both kinds
are the same plain transaction.

Through a pooler in transaction mode (PgBouncer, ``HUB_DATABASE_POOLER=transaction``) a
connection of the pool is a different server connection at each transaction: the engine
prepares no statement on the server, and workers LISTEN on ``listen_url`` (docs/scaling.md).
"""

from __future__ import annotations

import importlib.util
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from flask import Flask, current_app, g
from sqlalchemy import Connection, Engine, create_engine, event, exc, make_url
from sqlalchemy.orm import Session, sessionmaker

from hub.config import database_url
from hub.store import writerlock

# The execution option that makes a SQLite transaction start deferred (see make_engine).
READ_ONLY = "hub_read_only"
# PostgreSQL's channel on which workers hear that committed events are due: web processes
# and the writer process send NOTIFY on it, worker processes LISTEN (hub.services.delivery).
NOTIFY_CHANNEL = "hub_events"


class ReadOnlySession(Exception):
    """A write through a read session: the hub's bug, caught before any SQL runs."""


class Database:
    """An engine and its session factories; usable without Flask (workers, migrations)."""

    def __init__(
        self,
        url: str,
        connect_timeout: float | None = None,
        *,
        pooler: str = "none",
        listen_url: str | None = None,
    ):
        self.url = url
        self.pooler = pooler
        self._listen_url = listen_url
        self.engine = make_engine(url, connect_timeout, pooler)
        self._closers: list[Callable[[], None]] = []
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)
        # Per thread: untouched sessions of its last requests, to be used again.
        self.spare = _Spare()
        # The same engine and pool, its connections marked for a deferred BEGIN.
        self.read_sessionmaker = sessionmaker(
            self.engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        event.listen(self.read_sessionmaker, "before_flush", _refuse_flush)
        event.listen(self.read_sessionmaker, "do_orm_execute", _refuse_write_statement)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def notify_workers(self, conn: Connection | None) -> Connection:
        """NOTIFY on NOTIFY_CHANNEL (PostgreSQL) on ``conn``, an autocommit connection kept
        between calls and made when None: the connection to keep. On a failure the
        connection is invalidated and the exception raised (workers poll meanwhile)."""
        try:
            if conn is None:
                conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")
            return conn
        except Exception:
            if conn is not None:
                with suppress(Exception):
                    conn.invalidate()
            raise

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        with self.sessionmaker() as session, session.begin():
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """A session for reads only: on SQLite it never takes the write lock (nor waits
        for it); it ends with a rollback, having nothing to commit."""
        with self.read_sessionmaker() as session:  # closing it rolls the reads back
            yield session

    def on_dispose(self, close: Callable[[], None]) -> None:
        """Have ``close`` called by ``dispose``: it gives back a connection it keeps."""
        self._closers.append(close)

    @property
    def listen_url(self) -> str | None:
        """The libpq URL a worker LISTENs on (``hub.services.delivery``), or None when it
        can't: SQLite, or a transaction pooler without HUB_DATABASE_LISTEN_URL. A pooler in
        transaction mode hands the server connection that ran LISTEN to other clients once
        the statement ends, so the notifications never reach the listener (it just hears
        nothing); a NOTIFY, sent in a transaction, goes through it fine."""
        if self._listen_url:
            url = make_url(database_url(self._listen_url))
        elif self.dialect != "postgresql" or self.pooler == "transaction":
            return None
        else:
            url = self.engine.url
        return url.set(drivername="postgresql").render_as_string(hide_password=False)

    def dispose(self) -> None:
        for close in self._closers:
            close()
        self.engine.dispose()


def make_engine(url: str, connect_timeout: float | None = None, pooler: str = "none") -> Engine:
    if url.startswith("sqlite"):
        connect_args = {"timeout": 30, **writerlock.connect_args(make_url(url))}
        engine = create_engine(url, connect_args=connect_args)
        writerlock.install(engine)  # writers queue at a lock file, not in the busy handler
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take it over so that a
        # transaction that may write takes the write lock up front: a read that later
        # writes would otherwise fail with SQLITE_BUSY instead of waiting its turn. A read
        # session's transaction starts deferred and never holds the lock: two threads
        # looping on a 0.66 s statistics read kept a sender's ingest waiting 30 s when
        # they took it too.
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # A server that vanished must not hold a request thread for the kernel's TCP timeout.
    connect_args: dict = (
        {"connect_timeout": max(1, round(connect_timeout))} if connect_timeout else {}
    )
    if pooler == "transaction":
        # psycopg prepares a statement on the server once a connection has run it 5 times;
        # through a pooler in transaction mode the next transaction runs on another server
        # connection, which answers "prepared statement "_pg3_0" does not exist" (or
        # "already exists", prepared there by another client). Each statement is then
        # parsed anew; with the pooler's own hop, 4 workers drained 222 events/s through
        # PgBouncer against 254 straight (bench/scaling.py; the parse was not measured apart).
        connect_args["prepare_threshold"] = None
    # No ping before each checkout: it cost a round trip per request (a third of an async
    # ingest). A connection the server dropped fails on first use instead; that request is
    # answered 503 with Retry-After, and SQLAlchemy then discards every pooled connection
    # made before the failure, so the next requests connect afresh.
    return create_engine(url, pool_size=10, max_overflow=20, connect_args=connect_args)


# SQLite's own words for a database it can't use now (busy, missing, failing disk), as
# opposed to a mistake in a statement, which is the hub's bug.
_SQLITE_UNAVAILABLE = ("locked", "unable to open", "disk i/o error", "busy")


def is_unavailable(error: BaseException) -> bool:
    """True when ``error`` means the database can't be reached or used right now: a server
    that is down or dropped the connection, an exhausted pool, a locked SQLite file.

    Such a failure is the sender's cue to try again (503), not a bug of the hub (500).
    """
    if isinstance(error, exc.TimeoutError | exc.DisconnectionError):
        return True
    if not isinstance(error, exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    if not isinstance(error, exc.OperationalError | exc.InterfaceError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        message = str(error.orig).lower()
        return any(word in message for word in _SQLITE_UNAVAILABLE)
    return True


def _sqlite_begin(conn) -> None:
    reading = conn.get_execution_options().get(READ_ONLY)
    driver = conn.connection.driver_connection
    if reading:
        driver.execute("BEGIN")
        return
    # On the driver's connection itself: through exec_driver_sql, SQLAlchemy's execution of
    # this one statement cost as much as the INSERTs of a batch of webhooks.
    writerlock.acquire(driver)
    try:
        driver.execute("BEGIN IMMEDIATE")
    except BaseException:
        writerlock.release(driver)
        raise


def _refuse_flush(session: Session, _context, _instances) -> None:
    if session.new or session.dirty or session.deleted:
        raise ReadOnlySession("a read session may not write (use Database.session())")


def _refuse_write_statement(state) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        raise ReadOnlySession("a read session may not write (use Database.session())")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before the answer leaves, so it survives power loss too.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def init_app(app: Flask) -> None:
    url = database_url(app.config.get("DATABASE_URL"), app.instance_path)
    app.config["DATABASE_URL"] = url
    app.extensions["hub.db"] = Database(
        url,
        float(app.config["DB_CONNECT_TIMEOUT"]),
        pooler=app.config["DATABASE_POOLER"],
        listen_url=app.config["DATABASE_LISTEN_URL"],
    )
    app.teardown_appcontext(_close_session)


def get_db() -> Database:
    return current_app.extensions["hub.db"]


def get_session() -> Session:
    """The request's session, opened on first use and closed at teardown (or, untouched,
    kept for the thread's next request: see ``_close_session``)."""
    if "db_session" not in g:
        db = get_db()
        spare = db.spare.sessions
        g.db_session = spare.pop() if spare else db.sessionmaker()
    return g.db_session


def get_read_session() -> Session:
    """The request's read session (``Database.read_session``), opened on first use and
    closed at teardown; for views that only read."""
    if "db_read_session" not in g:
        g.db_read_session = get_db().read_sessionmaker()
    return g.db_read_session


# Untouched sessions a thread keeps for its next requests.
SPARE_SESSIONS = 32


class _Spare(threading.local):
    """A thread's untouched sessions (``Database.spare``)."""

    def __init__(self):
        self.sessions: list[Session] = []


def _close_session(_exc: BaseException | None) -> None:
    for name in ("db_session", "db_read_session"):
        session = g.pop(name, None)
        if session is None:
            continue
        if name == "db_session" and untouched(session):
            # Nothing to end or forget: the thread's next request takes it as it is. An
            # accepted webhook's session is usually this (its event is group committed),
            # and making and closing one was 6 % of its CPU. A few are kept: the thread of
            # a web process's loop answers several webhooks at once (hub.web.loop).
            spare = get_db().spare.sessions
            if len(spare) < SPARE_SESSIONS:
                spare.append(session)
        else:
            session.close()


def untouched(session: Session) -> bool:
    """No transaction open, no object held: as a new session is."""
    return not (session.in_transaction() or session.identity_map or session.new or session.deleted)


#: The migrations ship inside the package as hub.migrations, so an installed hub finds them
#: wherever it runs. In the checkout they are the top-level migrations/ folder, mapped into hub
#: by pyproject.toml: the import system, not a path beside this file, says where they are.
MIGRATIONS = Path(importlib.util.find_spec("hub.migrations").origin).resolve().parent


def alembic_config(db: Database, connection=None):
    """An Alembic config for this database, used by `db upgrade` and /ready.

    Built in code rather than read from alembic.ini, which exists only in the checkout.
    """
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["url"] = db.url
    cfg.attributes["configure_logger"] = False
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def upgrade(db: Database) -> None:
    from alembic import command

    with db.engine.begin() as conn:
        command.upgrade(alembic_config(db, conn), "head")


def head_revision(db: Database) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(db)).get_current_head()


def current_revision(db: Database) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with db.engine.execution_options(**{READ_ONLY: True}).connect() as conn:  # /ready: a read
        return MigrationContext.configure(conn).get_current_revision()


# --- a database the migrations have not reached ---

#: What an admin runs when the schema is behind the code; every face says it.
UPGRADE_COMMAND = "flask --app hub db upgrade"
SCHEMA_OUTDATED = f"The database schema is not up to date: run `{UPGRADE_COMMAND}`"
# SQLite's words, and PostgreSQL's SQLSTATEs (undefined_table, undefined_column), for a
# statement naming a table or column the database lacks.
_SQLITE_MISSING = ("no such table", "no such column", "has no column named")
_PG_MISSING = {"42P01", "42703"}


def is_schema_outdated(error: BaseException, db: Database) -> bool:
    """True when ``error`` is a table or column missing because ``db`` was never migrated or
    is behind: a new install whose admin skipped `db upgrade`, or an upgrade of the code
    without it. A 503 naming the command, not a 500: nothing is wrong with the request.

    A missing table in a migrated database is a bug of the hub's and stays a 500, so the
    schema's revision is read to tell the two apart: one more query, on this error only.
    """
    if not isinstance(error, exc.DBAPIError):
        return False
    if isinstance(error.orig, sqlite3.Error):
        message = str(error.orig).lower()
        if not any(words in message for words in _SQLITE_MISSING):
            return False
    elif getattr(error.orig, "sqlstate", None) not in _PG_MISSING:
        return False
    try:
        return current_revision(db) != head_revision(db)
    except Exception:  # unreachable now: the first error is the one to report
        return False


def end_request_session() -> None:
    """End the request's session now rather than at teardown: an error handler about to
    query (``is_schema_outdated``) must not wait 30 s behind the SQLite write lock that
    the failed request's own transaction still holds."""
    _close_session(None)
