"""A database that goes away: senders hear 503 with Retry-After (never 500), the hub takes
webhooks again on its own when it returns, and nothing that was acknowledged is lost."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import requests
from sqlalchemy import create_engine, exc, make_url, select, text

from hub import create_app
from hub.store.db import is_unavailable
from hub.store.models import Event
from tests.conftest import PG_URL
from tests.procs import closed_port, gunicorn, stop, wait_until, worker
from tests.tcpproxy import TcpProxy

BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])


def unreachable_url(backend: str, tmp_path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'no-such-dir' / 'hub.db'}"
    # A port nothing listens on: the server is down.
    return make_url(PG_URL).set(port=closed_port()).render_as_string(hide_password=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unreachable_database_answers_503_with_retry_after(backend, tmp_path, caplog):
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": unreachable_url(backend, tmp_path),
            "SECRET_KEY": "x",
            "DB_RETRY_AFTER": 7,
        }
    )
    client = app.test_client()
    caplog.set_level(logging.INFO)
    key = {"X-API-Key": "hk_0123abcd_" + "k" * 43}  # well-formed: only the database can say
    answers = [
        client.post("/hooks/orders", json={"id": 1}, headers=key),
        client.post("/api/process", json={"input": "x"}),
        client.get("/events/evt_1", headers=key),
        client.get("/ready"),
    ]
    for answer in answers:
        assert answer.status_code == 503, answer.get_data(as_text=True)
        assert answer.headers["Retry-After"] == "7"
        assert answer.json["code"] == "database_unavailable"
        body = answer.get_data(as_text=True).lower()
        assert "select" not in body and "insert" not in body and backend not in body
    logged = caplog.text.lower()
    assert "database unavailable" in logged
    assert "select" not in logged and "insert" not in logged and "traceback" not in logged


@pytest.mark.slow
def test_a_server_that_never_answers_is_a_503_after_the_connect_timeout(tmp_path):
    """A PostgreSQL host that takes the connection and then says nothing (a dead server
    behind a live port) must not hold the request thread: HUB_DB_CONNECT_TIMEOUT ends it."""
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody answers
    port = silent.getsockname()[1]
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/hub",
            "SECRET_KEY": "x",
            "DB_CONNECT_TIMEOUT": 2,
        }
    )
    answers = []
    request = threading.Thread(
        target=lambda: answers.append(app.test_client().post("/hooks/orders", json={})),
        daemon=True,
    )
    try:
        started = time.monotonic()
        request.start()
        request.join(20)
        assert answers, "the request still waits on a server that never answers"
        assert answers[0].status_code == 503
        assert answers[0].json["code"] == "database_unavailable"
        assert time.monotonic() - started < 15
    finally:
        silent.close()
        app.extensions["hub.db"].dispose()


def error_of(engine, statement: str) -> exc.SQLAlchemyError:
    with pytest.raises(exc.SQLAlchemyError) as raised, engine.connect() as conn:
        conn.exec_driver_sql(statement)
    return raised.value


def test_which_database_errors_mean_unavailable(tmp_path):
    """Real errors from the real drivers: the ones a retry can cure are 503s, the rest bugs."""
    path = tmp_path / "locked.db"
    holder = create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    impatient = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    small_pool = create_engine(f"sqlite:///{path}", pool_size=1, max_overflow=0, pool_timeout=0.1)
    try:
        with holder.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x int)")
            conn.exec_driver_sql("BEGIN EXCLUSIVE")
            locked = error_of(impatient, "SELECT * FROM t")
            conn.exec_driver_sql("ROLLBACK")
        assert "locked" in str(locked.orig) and is_unavailable(locked)
        missing = tmp_path / "no-such-dir" / "x.db"
        assert is_unavailable(error_of(create_engine(f"sqlite:///{missing}"), "SELECT 1"))
        with small_pool.connect(), pytest.raises(exc.TimeoutError) as exhausted:
            small_pool.connect()
        assert is_unavailable(exhausted.value)
        assert not is_unavailable(error_of(holder, "SELECT * FROM no_such_table"))
        assert not is_unavailable(error_of(holder, "SELEC 1"))
        assert not is_unavailable(ValueError("not a database error"))
    finally:
        for engine in (holder, impatient, small_pool):
            engine.dispose()


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
def test_a_dropped_postgresql_connection_means_unavailable(pg_database):
    engine = create_engine(pg_database)
    try:
        with engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            with engine.connect() as other:
                other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            with pytest.raises(exc.DBAPIError) as dropped:
                conn.exec_driver_sql("SELECT 1")
        assert is_unavailable(dropped.value)
        assert not is_unavailable(error_of(engine, "SELECT * FROM no_such_table"))
        assert not is_unavailable(error_of(engine, "SELECT 1/0"))
    finally:
        engine.dispose()


@dataclass
class Answer:
    sent_at: float
    status: int
    retry_after: str | None
    code: str | None
    event_id: str | None


class Senders:
    """Threads posting to one async route until stopped; every answer is kept."""

    def __init__(self, url: str, key: str, threads: int = 4):
        self.url, self.key = url, key
        self.answers: list[Answer] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._send, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Senders:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)

    def _send(self, index: int) -> None:
        with requests.Session() as http:
            n = 0
            while not self.stopping.is_set():
                n += 1
                sent_at = time.monotonic()
                r = http.post(
                    self.url,
                    json={"text": f"sender {index} message {n}"},
                    headers={"X-API-Key": self.key},
                    timeout=15,
                )
                body = r.json()
                answer = Answer(
                    sent_at, r.status_code, r.headers.get("Retry-After"), body.get("code"), None
                )
                if r.status_code == 202:
                    answer.event_id = body["id"]
                with self.lock:
                    self.answers.append(answer)
                time.sleep(0.02)

    def acknowledged_since(self, moment: float) -> int:
        with self.lock:
            return sum(1 for a in self.answers if a.status == 202 and a.sent_at >= moment)

    def refused(self) -> int:
        with self.lock:
            return sum(1 for a in self.answers if a.status == 503)


def terminate_backends(database_url: str) -> int:
    """pg_terminate_backend for every connection to the test database but our own."""
    url = make_url(database_url)
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return len(
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": url.database},
                ).all()
            )
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.serial  # under load, in seconds: run alone
@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_database_cut_under_load_answers_503_and_loses_no_acknowledged_event(
    db, make_key, add_route, database_url_for_test, tmp_path
):
    # A delivery whose recording failed in the cut is retried on the route's schedule.
    add_route(
        "steady",
        [{"connector": "text", "config": {"field": "text"}}],
        mode="async",
        retry_schedule=[1, 1, 1, 1, 1],
    )
    key = make_key()
    url = make_url(database_url_for_test)
    # Short leases: an event whose outcome could not be written during the cut is claimed
    # again within the test, by the embedded workers or the separate one.
    # JSON logs: every line either process writes during the faults must be one object.
    env = {
        "HUB_LEASE_SECONDS": "3",
        "HUB_DB_RETRY_AFTER": "7",
        "HUB_DB_CONNECT_TIMEOUT": "2",
        "HUB_LOG_FORMAT": "json",
    }
    with TcpProxy(url.host, url.port) as proxy:
        via_proxy = url.set(port=proxy.port).render_as_string(hide_password=False)
        separate = worker(via_proxy, tmp_path / "worker.log", concurrency=2, **env)
        try:
            with (
                gunicorn(via_proxy, tmp_path / "web.log", **env) as (_, base),
                Senders(f"{base}/hooks/steady", key) as senders,
            ):
                wait_until(lambda: senders.acknowledged_since(0) >= 20, 10, what="warm-up")

                # (a) The server drops every connection the hub holds, in use or idle.
                killed_at = time.monotonic()
                assert terminate_backends(database_url_for_test) > 0
                wait_until(
                    lambda: senders.acknowledged_since(killed_at) >= 20, 10, what="recovery (a)"
                )

                # (b) The database is unreachable for a few seconds.
                proxy.cut()
                wait_until(lambda: senders.refused() >= 10, 10, what="503s during the cut")
                ready = requests.get(base + "/ready", timeout=10)
                assert ready.status_code == 503 and ready.headers["Retry-After"] == "7"
                time.sleep(1.5)
                proxy.restore()
                restored_at = time.monotonic()
                wait_until(
                    lambda: senders.acknowledged_since(restored_at) >= 20,
                    15,
                    what="ingest to accept again after the cut",
                )
                assert requests.get(base + "/ready", timeout=5).status_code == 200

            answers = list(senders.answers)
            acknowledged = {a.event_id for a in answers if a.status == 202}

            # Every event the hub acknowledged is stored and delivered once the database is back.
            # This test's own pooled connections were terminated too: start afresh.
            db.engine.dispose()

            def all_delivered():
                with db.session() as session:
                    rows = dict(
                        session.execute(
                            select(Event.id, Event.status).where(Event.id.in_(acknowledged))
                        ).all()
                    )
                return set(rows) == acknowledged and set(rows.values()) == {"delivered"}

            wait_until(all_delivered, 20, interval=0.5, what="every acknowledged event delivered")
        finally:
            stop(separate)

    others = [a for a in answers if a.status != 202]
    assert {a.status for a in others} == {503}, {a.status for a in others}
    assert all(a.retry_after == "7" and a.code == "database_unavailable" for a in others)
    for name in ("web.log", "worker.log"):
        log = (tmp_path / name).read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "SELECT" not in log and "INSERT" not in log and "UPDATE" not in log
        not_json = [line for line in log.splitlines() if not is_json_object(line)]
        assert not_json == [], f"{name}: {not_json[:5]}"


def is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
