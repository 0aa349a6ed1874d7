"""The hub through PgBouncer in transaction mode (HUB_DATABASE_POOLER=transaction).

Debian's pgbouncer runs between the hub and the test database with a pool of 4 server
connections. Webhooks are taken through it by an app and delivered through it by 4 worker
processes of 4 threads each (as docs/scaling.md deploys them): every event reaches the receiver
exactly once, no worker logs a warning or an error, and PostgreSQL never sees more than the
pool's 4 connections from them, plus each worker's one LISTEN connection, made to the server
itself (HUB_DATABASE_LISTEN_URL), since PgBouncer drops notifications in transaction mode.

PostgreSQL only (HUB_TEST_DATABASE_URL). With it set, a missing pgbouncer fails these tests
rather than skip them, as an unreachable server does: .ci/run installs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import func, make_url, select

from hub import create_app
from hub.services.delivery import Worker
from hub.store.models import Event
from hub.testing_servers import Receiver
from tests.conftest import PG_URL
from tests.procs import closed_port, stop, wait_until, worker

pytestmark = [
    pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True),
]

PGBOUNCER = Path("/usr/sbin/pgbouncer")
POOL_SIZE = 4
WORKERS = 4
THREADS = 4
EVENTS = 300


def libpq(url: str) -> str:
    """A SQLAlchemy URL (postgresql+psycopg://) as psycopg itself takes it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Bouncer:
    """A running pgbouncer: the URL of the test database through it, and its admin console."""

    def __init__(self, url: str, port: int):
        self.url = url
        self.admin = libpq(url).rsplit("/", 1)[0] + "/pgbouncer"
        self.port = port

    def show(self, what: str, database: str) -> list[dict]:
        """The rows of ``SHOW <what>`` about ``database`` (the console speaks only the simple
        query protocol: a client-side cursor)."""
        with psycopg.connect(
            self.admin, autocommit=True, cursor_factory=psycopg.ClientCursor
        ) as conn:
            cursor = conn.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor]
        return [row for row in rows if row.get("database") == database]


@contextmanager
def pgbouncer(direct: str, folder: Path) -> Iterator[Bouncer]:
    """Debian's pgbouncer in transaction mode on a free port of 127.0.0.1, in front of the
    database of ``direct``, with POOL_SIZE server connections at most."""
    assert PGBOUNCER.exists(), "pgbouncer is not installed: apt-get install pgbouncer"
    target = make_url(direct)
    user = target.username or "postgres"
    (folder / "users.txt").write_text(f'"{user}" ""\n')
    log_path = folder / "pgbouncer.log"
    for _ in range(5):  # another process may take the free port first
        port = closed_port()
        ini = folder / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"{target.database} = host={target.host or '127.0.0.1'} "
            f"port={target.port or 5432} dbname={target.database}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
            f"admin_users = {user}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {POOL_SIZE}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
            "max_client_conn = 1000\n"
        )
        log_path.write_bytes(b"")
        # It refuses to run as root: as root it reads its files, then runs as nobody (it
        # logs to stderr, opened here, and keeps no pid file).
        user_switch = ["-u", "nobody"] if os.geteuid() == 0 else []
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(PGBOUNCER), *user_switch, str(ini)], stdout=log, stderr=subprocess.STDOUT
            )

        def up(proc=proc, port=port) -> bool:
            text = log_path.read_text()
            return f"listening on 127.0.0.1:{port}" in text or proc.poll() is not None

        wait_until(up, 10, what="pgbouncer to listen")
        if proc.poll() is None:
            break
        if "in use" not in log_path.read_text():
            raise AssertionError(f"pgbouncer exited: {log_path.read_text()[-2000:]}")
    else:
        raise AssertionError("pgbouncer found no free port")
    url = target.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    try:
        yield Bouncer(url, port)
    finally:
        stop(proc)


@pytest.fixture
def bouncer(database_url_for_test, tmp_path) -> Iterator[Bouncer]:
    with pgbouncer(database_url_for_test, tmp_path) as running:
        yield running


def pooled_settings(bouncer: Bouncer, direct: str) -> dict[str, str]:
    """The hub's settings through PgBouncer, its LISTEN on the server itself."""
    return {
        "HUB_DATABASE_URL": bouncer.url,
        "HUB_DATABASE_POOLER": "transaction",
        "HUB_DATABASE_LISTEN_URL": direct,
    }


@pytest.fixture
def pooled_app(bouncer, database_url_for_test):
    """The hub as a web process through PgBouncer."""
    settings = pooled_settings(bouncer, database_url_for_test)
    app = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "test-secret-key-for-the-hub",
            "ROUTE_CACHE_SECONDS": 0,
            **{name.removeprefix("HUB_"): value for name, value in settings.items()},
        }
    )
    yield app
    app.extensions["hub.db"].dispose()


class Sampler:
    """Samples, every 0.1 s until stopped, PgBouncer's server connections for the hub's
    database (SHOW POOLS) and its clients, and the connections PostgreSQL counts to the
    database (pg_stat_activity, read on a connection of its own, not counted), leaving out
    the backends of ``before``: connections to this test process's database that were
    there before the hub's processes started (an earlier test's pool not yet collected)."""

    def __init__(self, bouncer: Bouncer, direct: str, before: set[int]):
        self.bouncer = bouncer
        self.direct = libpq(direct)
        self.database = make_url(direct).database
        self.before = before
        self.servers: list[int] = []
        self.clients: list[int] = []
        self.backends: list[int] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with psycopg.connect(self.direct, autocommit=True) as conn:
            while not self.stopping.wait(0.1):
                (pool,) = self.bouncer.show("POOLS", self.database)
                self.servers.append(
                    sum(pool[k] for k in ("sv_active", "sv_idle", "sv_used", "sv_tested"))
                    + pool["sv_login"]
                )
                self.clients.append(pool["cl_active"] + pool["cl_waiting"])
                pids = backend_pids(conn, self.database) - self.before
                self.backends.append(len(pids))

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopping.set()
        self.thread.join(5)


def backend_pids(conn: psycopg.Connection, database: str) -> set[int]:
    """The backends PostgreSQL has for ``database``, but the one asking."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
        (database,),
    )
    return {pid for (pid,) in rows}


def complaints(log: Path) -> list[str]:
    """The worker's log lines at WARNING or above (it logs JSON, one object a line)."""
    lines = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            lines.append(line)  # not the hub's: a traceback, a crash
            continue
        if record.get("level") not in ("DEBUG", "INFO"):
            lines.append(line)
    return lines


def send(app, key: str, numbers: range, answers: list) -> None:
    """Post an event for each of ``numbers`` to the route ``orders``, one after another;
    each answer's status goes to ``answers``."""
    client = app.test_client()
    for n in numbers:
        answer = client.post("/hooks/orders", json={"n": n}, headers={"X-API-Key": key})
        answers.append(answer.status_code)


def test_four_workers_deliver_each_event_once_through_pgbouncer_in_transaction_mode(
    db, add_route, make_key, bouncer, pooled_app, database_url_for_test, tmp_path
):
    database = make_url(database_url_for_test).database
    settings = pooled_settings(bouncer, database_url_for_test)
    with Receiver() as receiver:
        add_route(
            "orders",
            [{"connector": "http", "config": {"url": receiver.url + "/in"}}],
            mode="async",
        )
        key = make_key()
        db.dispose()  # the test's own connections (the route, the key): not the hub's
        with psycopg.connect(libpq(database_url_for_test), autocommit=True) as conn:
            before = backend_pids(conn, make_url(database_url_for_test).database)
        logs = [tmp_path / f"worker{i}.log" for i in range(WORKERS)]
        procs = [
            worker(
                bouncer.url,
                log,
                concurrency=THREADS,
                HUB_LOG_FORMAT="json",
                **settings,
            )
            for log in logs
        ]
        try:
            for log in logs:
                wait_until(
                    lambda log=log: b"delivering with" in log.read_bytes(), 30, what=log.name
                )
            started = time.monotonic()
            with Sampler(bouncer, database_url_for_test, before) as sampler:
                answers: list[int] = []
                senders = [
                    threading.Thread(
                        target=send, args=(pooled_app, key, range(i, EVENTS, 4), answers)
                    )
                    for i in range(4)
                ]
                for sender in senders:
                    sender.start()
                for sender in senders:
                    sender.join(30)
                posted = time.monotonic() - started
                assert answers == [202] * EVENTS
                receiver.wait_for(EVENTS, timeout=40)  # about 9 s alone on 2 cores
                drained = time.monotonic() - started
                time.sleep(0.5)  # a second delivery of any of them would come now
        finally:
            for proc in procs:
                stop(proc)

        delivered = Counter(request.json()["n"] for request in receiver.requests)
    assert delivered == Counter(range(EVENTS))  # each event once, and no other call
    with db.session() as session:
        ended = session.execute(
            select(Event.status, func.count(), func.sum(Event.attempts)).group_by(Event.status)
        ).all()
    assert [tuple(row) for row in ended] == [("delivered", EVENTS, EVENTS)]
    for log in logs:
        assert complaints(log) == [], log.name
        assert "delivering with 4 thread(s)" in log.read_text()

    # The workers' 16 threads, their alert runners and the app's group commit shared the
    # pool's 4 server connections: many clients, never more than 4 servers.
    assert max(sampler.servers) <= POOL_SIZE
    assert max(sampler.clients) > POOL_SIZE
    # PostgreSQL saw those 4 and each worker's LISTEN connection: nothing else.
    assert max(sampler.backends) <= POOL_SIZE + WORKERS
    (stats,) = bouncer.show("STATS", database)
    assert stats["total_xact_count"] >= 2 * EVENTS  # the events' writes went through it
    print(
        f"{EVENTS} events, {WORKERS}x{THREADS} threads: at most {max(sampler.servers)} "
        f"server connections, {max(sampler.clients)} clients, {max(sampler.backends)} "
        f"backends; {stats['total_xact_count']} transactions through PgBouncer; posted in "
        f"{posted:.1f} s, delivered in {drained:.1f} s"
    )


def test_a_webhook_taken_through_pgbouncer_wakes_a_worker_listening_on_the_server(
    add_route, make_key, pooled_app, bouncer, database_url_for_test
):
    """The NOTIFY goes through PgBouncer in the web process's transaction; the worker of
    another process hears it on its LISTEN connection to the server itself. Through
    PgBouncer it would hear nothing, and find the event at its next poll only."""
    add_route("later", [{"connector": "text"}], mode="async")
    key = make_key()
    other = create_app(
        {
            "TESTING": True,
            "SECRET_KEY": "x",
            "WORKER_MAX_IDLE": 60,
            **{
                name.removeprefix("HUB_"): value
                for name, value in pooled_settings(bouncer, database_url_for_test).items()
            },
        }
    )
    listener = Worker(other, name="listener")
    listener.start(0)  # the LISTEN thread only
    client = pooled_app.test_client()
    try:
        for _ in range(50):  # its LISTEN connection comes up in its own time
            listener.wakeup.clear()
            answer = client.post("/hooks/later", json={}, headers={"X-API-Key": key})
            assert answer.status_code == 202
            if listener.wakeup.wait(0.2):
                break
        else:
            raise AssertionError("no NOTIFY reached the worker's LISTEN connection")
    finally:
        listener.stop(grace=1)
        other.extensions["hub.db"].dispose()
