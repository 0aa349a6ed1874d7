"""The writer process (hub/services/writer.py): gunicorn's master runs one, the web processes
hand it their new events, and an event is stored once whatever happens to the writer.

In one process, a real Writer serving a real Unix socket on a thread:
- an accepted webhook's event and deliveries are committed by the writer, not the web side;
- a key revoked before the writer's commit refuses the event, and nothing is written;
- no writer: the web side commits the event itself (``unreachable``);
- the writer ends after committing, before answering: the event is stored once (``lost``);
- the writer ends before committing: the web side commits it (``lost``);
- a writer that does not answer within HUB_WRITER_TIMEOUT: committed by the web side;
- a sync run's ending (its attempts, its delivery's and event's end) is the writer's commit
  too, and one whose answer was lost is written once, by one side or the other;
- the writer's write fails: tried again on the web side, whose exception is the answer;
- the writer can't reach the database: 503 at once, without a second wait on the web side.

Under real gunicorn: the writer is the master's child and every webhook goes through it
(one stopped makes a webhook wait for HUB_WRITER_TIMEOUT); SIGKILLed under load, it is
started again (one counted in hub_processes) and every 202 is one stored event; it stops
with the master, and by itself when the master is killed; HUB_WRITER_PROCESS=false runs none;
without room for its socket, gunicorn runs without it; on PostgreSQL the writer sends the
NOTIFY that wakes the workers of other processes for the webhooks it committed.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError

from hub.ops import metrics
from hub.services import keys
from hub.services.writer import Writer, WriterClient
from hub.store.db import Database, is_unavailable
from hub.store.groupcommit import GroupCommitter, row_of
from hub.store.models import ApiKey, Attempt, Delivery, Event, utcnow
from tests.conftest import PG_URL
from tests.procs import children, closed_port, gunicorn, is_writer, wait_until
from tests.test_delivery import heard, listener  # noqa: F401 - the fixture

SHORT_PATH = Path("/tmp")  # a Unix socket's path is at most 107 bytes: tmp_path may be longer


def fallbacks(reason: str) -> float:
    """This process's count of events committed on the web side for ``reason``."""
    samples = metrics.metrics().writer_fallbacks.collect()[0].samples
    return sum(
        s.value for s in samples if s.labels["reason"] == reason and s.name.endswith("_total")
    )


@pytest.fixture
def socket_path():
    folder = Path(os.path.realpath(SHORT_PATH)) / f"hub-writer-test-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(mode=0o700)
    yield str(folder / "w.sock")
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()


class Served:
    """A Writer of ``kind`` on a thread, on its own engine of the test's database."""

    def __init__(self, url: str, path: str, kind: type[Writer] = Writer):
        self.db = Database(url)
        self.writer = kind(self.db, path)
        self.thread = threading.Thread(target=self.writer.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.writer.stop()
        self.thread.join(5)
        self.db.dispose()


@pytest.fixture
def serve_writer(database_url_for_test, socket_path):
    started: list[Served] = []

    def start(kind: type[Writer] = Writer) -> Writer:
        started.append(Served(database_url_for_test, socket_path, kind))
        return started[-1].writer

    yield start
    for served in started:
        served.close()


@pytest.fixture
def through_writer(app, socket_path):
    """The app's new events go to the writer at ``socket_path`` (as a web process's under
    gunicorn), its own committer kept for when the writer can't take them."""
    local = app.extensions["hub.inserts"]
    app.extensions["hub.inserts"] = WriterClient(socket_path, local, timeout=5.0)
    return local


def new_rows(route: str = "direct") -> tuple[str, list]:
    """An accepted event's rows and one delivery's, as ingest hands them over."""
    now = utcnow()
    event = Event(
        id=f"evt_w{time.time_ns()}",
        route=route,
        method="POST",
        path=f"/hooks/{route}",
        received_at=now,
        headers={"content-type": "application/json"},
        content_type="application/json",
        body=b'{"n": 1}',
        body_size=8,
        status="pending",
        response_status=202,
        next_attempt_at=now,
    )
    delivery = Delivery(
        id=f"dlv_w{time.time_ns()}",
        event_id=event.id,
        route=route,
        destination="main",
        lane=f"{route}/main",
        status="pending",
        attempts=0,
        retries=0,
        next_attempt_at=now,
        created_at=now,
    )
    return event.id, [(Event.__table__, row_of(event)), (Delivery.__table__, row_of(delivery))]


def stored(db, event_id: str) -> tuple[int, int]:
    """(events, deliveries) stored under ``event_id``."""
    with db.session() as session:
        events = session.scalar(select(func.count()).where(Event.id == event_id))
        deliveries = session.scalar(select(func.count()).where(Delivery.event_id == event_id))
    return events, deliveries


def test_an_accepted_webhook_is_committed_by_the_writer(
    client, db, key, add_route, serve_writer, through_writer
):
    writer = serve_writer()
    add_route("orders", [{"connector": "text"}], mode="async")
    answer = client.post("/hooks/orders", json={"text": "hi"}, headers={"X-API-Key": key})
    assert answer.status_code == 202, answer.json
    assert stored(db, answer.json["id"]) == (1, 1)
    assert writer.committer.pieces == 1  # the writer's commit, not the web side's
    assert through_writer.pieces == 0


def test_a_key_revoked_before_the_commit_refuses_the_event(
    app, db, make_key, serve_writer, socket_path
):
    serve_writer()
    make_key(name="doomed")
    with db.session() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.name == "doomed"))
        session.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
    local = GroupCommitter(db)
    client = WriterClient(socket_path, local, timeout=5.0)
    event_id, rows = new_rows()
    with pytest.raises(keys.KeyRefused) as refused:
        client.insert_rows(rows, guard=(keys.commit_guard, key_id))
    assert refused.value.code == "revoked"
    assert stored(db, event_id) == (0, 0)
    assert local.pieces == 0


def test_with_no_writer_the_web_side_commits_the_event(app, db, socket_path):
    local = GroupCommitter(db)
    client = WriterClient(socket_path, local, timeout=5.0)  # nothing listens there
    before = fallbacks("unreachable")
    event_id, rows = new_rows()
    client.insert_rows(rows)
    assert stored(db, event_id) == (1, 1)
    assert local.pieces == 1
    assert fallbacks("unreachable") == before + 1


class EndsAfterCommitting(Writer):
    """Commits, then closes the connection instead of answering (killed right after)."""

    def _answer(self, peer, answer):
        self._let_go(peer)


class EndsBeforeCommitting(Writer):
    """Reads the message, then closes the connection without writing it."""

    def _write(self, received):
        for peer, _ in received:
            self._let_go(peer)


@pytest.mark.parametrize("kind", [EndsAfterCommitting, EndsBeforeCommitting])
def test_a_writer_that_ends_before_answering_leaves_the_event_stored_once(
    app, db, serve_writer, socket_path, kind
):
    serve_writer(kind)
    local = GroupCommitter(db)
    client = WriterClient(socket_path, local, timeout=5.0)
    before = fallbacks("lost")
    event_id, rows = new_rows()
    client.insert_rows(rows)
    assert stored(db, event_id) == (1, 1)
    assert fallbacks("lost") == before + 1


def attempts_of(db, event_id: str) -> list[tuple[str, str]]:
    with db.session() as session:
        rows = session.execute(
            select(Attempt.connector, Attempt.outcome).where(Attempt.event_id == event_id)
        )
        return [tuple(row) for row in rows]


def test_a_sync_run_is_ended_by_the_writer(
    app, client, db, key, add_route, serve_writer, through_writer
):
    writer = serve_writer()
    add_route("now", [{"connector": "text", "config": {"field": "text"}}], mode="sync")
    answer = client.post("/hooks/now", json={"text": "Hi"}, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.json
    with db.session() as session:
        (event,) = session.scalars(select(Event).where(Event.route == "now"))
        (run,) = session.scalars(select(Delivery).where(Delivery.event_id == event.id))
        assert (event.status, event.response_status, run.status) == ("delivered", 200, "delivered")
    assert attempts_of(db, event.id) == [("text", "ok")]
    # The event and then its ending, both the writer's commits; none on the web side.
    assert writer.committer.pieces == 2
    assert through_writer.pieces == 0 and app.extensions["hub.commits"].pieces == 0


@pytest.mark.parametrize("kind", [EndsAfterCommitting, EndsBeforeCommitting])
def test_a_sync_run_whose_ending_lost_its_answer_is_ended_once(
    app, client, db, key, add_route, serve_writer, through_writer, kind
):
    serve_writer(kind)
    add_route("now", [{"connector": "text", "config": {"field": "text"}}], mode="sync")
    before = fallbacks("lost")
    answer = client.post("/hooks/now", json={"text": "Hi"}, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.json
    with db.session() as session:
        (event_id,) = session.scalars(select(Event.id).where(Event.route == "now"))
        assert session.get(Event, event_id).status == "delivered"
    # Written by the writer or by the web side, never by both: one attempt row.
    assert attempts_of(db, event_id) == [("text", "ok")]
    assert fallbacks("lost") == before + 2  # the event's insert, then the ending


def test_a_writer_that_does_not_answer_in_time_leaves_the_event_to_the_web_side(
    app, db, socket_path
):
    import socket

    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # accepts, never reads
    silent.bind(socket_path)
    silent.listen(8)
    try:
        client = WriterClient(socket_path, GroupCommitter(db), timeout=0.5)
        event_id, rows = new_rows()
        began = time.monotonic()
        client.insert_rows(rows)
        waited = time.monotonic() - began
    finally:
        silent.close()
    assert stored(db, event_id) == (1, 1)
    assert 0.5 <= waited < 5


def test_a_write_the_writer_fails_is_tried_again_on_the_web_side(
    app, db, serve_writer, socket_path
):
    serve_writer()
    client = WriterClient(socket_path, GroupCommitter(db), timeout=5.0)
    event_id, rows = new_rows()
    client.insert_rows(rows)
    before = fallbacks("failed")
    _, again = new_rows()
    again[0][1]["id"] = event_id  # an event id already taken: the writer's insert fails
    with pytest.raises(IntegrityError):  # the web side's own attempt, its real exception
        client.insert_rows(again[:1])
    assert fallbacks("failed") == before + 1
    assert stored(db, event_id) == (1, 1)


def test_a_database_the_writer_cannot_reach_is_a_503_without_a_second_wait(app, db, socket_path):
    unreachable = make_url(PG_URL or "postgresql://postgres@127.0.0.1/hub").set(port=closed_port())
    served = Served(unreachable.render_as_string(hide_password=False), socket_path)
    local = GroupCommitter(db)
    try:
        client = WriterClient(socket_path, local, timeout=5.0)
        _, rows = new_rows()
        with pytest.raises(DisconnectionError) as raised:
            client.insert_rows(rows)
    finally:
        served.close()
    assert is_unavailable(raised.value)  # what the web face answers 503 for
    assert local.pieces == 0  # the web side did not wait for the database a second time


# --- under gunicorn ---


def writer_pid(master: int) -> int | None:
    """The writer process among the master's children, if one runs."""
    return next((pid for pid in children(master) if is_writer(pid)), None)


def socket_of(writer: int) -> Path:
    """The socket the writer process ``writer`` was started on (its command line's)."""
    return Path(Path(f"/proc/{writer}/cmdline").read_bytes().split(b"\0")[3].decode())


def listening(master: int) -> int:
    """The writer process's pid, once it listens on its socket."""
    writer = wait_until(lambda: writer_pid(master), 10, what="the writer process")
    wait_until(lambda: socket_of(writer).exists(), 10, what="the writer to listen")
    return writer


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "Z"  # ended, not yet reaped


@pytest.mark.slow
def test_the_writer_takes_every_webhook_and_is_started_again_when_killed(
    db, make_key, add_route, database_url_for_test, tmp_path
):
    add_route("load", [{"connector": "text"}], mode="async")
    key = make_key()
    admin = make_key(admin=True)
    log = tmp_path / "web.log"
    acknowledged: list[str] = []
    other: Counter = Counter()
    lock = threading.Lock()
    stop_sending = threading.Event()

    def send(base: str) -> None:
        with requests.Session() as http:
            while not stop_sending.is_set():
                try:
                    r = http.post(
                        f"{base}/hooks/load",
                        json={"t": time.time()},
                        headers={"X-API-Key": key},
                        timeout=30,
                    )
                except requests.RequestException as exc:
                    with lock:
                        other[type(exc).__name__] += 1
                    continue
                with lock:
                    if r.status_code == 202:
                        acknowledged.append(r.json()["id"])
                    else:
                        other[r.status_code] += 1

    env = {"HUB_EMBEDDED_WORKER": "false", "HUB_WRITER_TIMEOUT": "1"}
    with gunicorn(database_url_for_test, log, **env) as (proc, base):
        first = listening(proc.pid)
        # A stopped writer holds a webhook for HUB_WRITER_TIMEOUT: it went to the writer.
        os.kill(first, signal.SIGSTOP)
        began = time.monotonic()
        held = requests.post(f"{base}/hooks/load", json={"n": 1}, headers={"X-API-Key": key})
        waited = time.monotonic() - began
        os.kill(first, signal.SIGCONT)
        assert held.status_code == 202 and waited >= 1.0, (held.status_code, waited)
        acknowledged.append(held.json()["id"])

        senders = [threading.Thread(target=send, args=(base,)) for _ in range(6)]
        for t in senders:
            t.start()
        wait_until(lambda: len(acknowledged) >= 100, 60, what="100 acknowledged webhooks")
        os.kill(first, signal.SIGKILL)
        second = wait_until(
            lambda: (pid := writer_pid(proc.pid)) not in (None, first) and pid,
            10,
            what="another writer process",
        )
        count = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= count + 100, 60, what="100 more webhooks")
        # One writer counted once the new one has started (a scrape drops the killed one's).
        started = f"writer process {second} started".encode()
        wait_until(lambda: started in log.read_bytes(), 15, what="the new writer to start")
        scraped = requests.get(f"{base}/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert 'hub_processes{kind="writer"} 1.0' in scraped.text
        stop_sending.set()
        for t in senders:
            t.join(10)
    assert second != first
    assert not other, other  # no sender was refused while the writer was replaced
    with db.session() as session:
        ids = set(session.scalars(select(Event.id).where(Event.route == "load")))
        per_event = Counter(session.scalars(select(Delivery.event_id)))
    assert set(acknowledged) <= ids
    # Written whole by whichever side wrote it: each stored event has its one delivery.
    assert all(per_event[event_id] == 1 for event_id in ids)
    assert f"writer process {first} ended".encode() in log.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_the_writer_ends_with_its_master(db, database_url_for_test, tmp_path):
    with gunicorn(database_url_for_test, tmp_path / "web.log") as (proc, _):
        writer = listening(proc.pid)
        folder = socket_of(writer).parent
        assert folder.stat().st_mode & 0o777 == 0o700
        # A SIGTERM to the whole group (systemd's) reaches it first: it waits for the master.
        os.kill(writer, signal.SIGTERM)
        time.sleep(1.5)
        assert writer_pid(proc.pid) == writer and not gone(writer)
        proc.terminate()
        proc.wait(30)
        wait_until(lambda: gone(writer), 10, what="the writer to stop with its master")
        assert not folder.exists()

    with gunicorn(database_url_for_test, tmp_path / "killed.log") as (proc, _):
        writer = wait_until(lambda: writer_pid(proc.pid), 10, what="the writer process")
        folder = socket_of(writer).parent
        os.kill(proc.pid, signal.SIGKILL)  # the master alone: its web processes and writer live
        proc.wait(10)
        wait_until(lambda: gone(writer), 10, what="the writer to stop by itself")
        assert not folder.exists()  # it removed the directory the master can't


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_the_writer_tells_the_workers_of_the_webhooks_it_committed(
    database_url_for_test, add_route, make_key, request, tmp_path
):
    """A web process whose event the writer committed sends no NOTIFY: the writer does,
    and a worker of another process, listening, hears it."""
    other_worker = request.getfixturevalue("listener")
    add_route("later", [{"connector": "text"}], mode="async")
    key = make_key()
    env = {"HUB_EMBEDDED_WORKER": "false"}
    with gunicorn(database_url_for_test, tmp_path / "web.log", 1, **env) as (proc, base):
        listening(proc.pid)
        with requests.Session() as http:

            def new_event():
                answer = http.post(f"{base}/hooks/later", json={}, headers={"X-API-Key": key})
                assert answer.status_code == 202

            new_event()  # the route is cached, and the writer has the web process's messages
            assert heard(other_worker, new_event)
    assert b"committed here" not in (tmp_path / "web.log").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_without_room_for_its_socket_gunicorn_runs_without_a_writer(
    db, make_key, add_route, database_url_for_test, tmp_path
):
    add_route("orders", [{"connector": "text"}], mode="async")
    key = make_key()
    deep = tmp_path / ("d" * 100)  # a socket's path there is longer than Linux allows
    deep.mkdir()
    log = tmp_path / "web.log"
    with gunicorn(database_url_for_test, log, TMPDIR=str(deep)) as (proc, base):
        answer = requests.post(f"{base}/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
        assert writer_pid(proc.pid) is None
    assert answer.status_code == 202
    assert stored(db, answer.json()["id"]) == (1, 1)
    assert b"writer process not started (its socket's path would be too long" in log.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_no_writer_process_when_it_is_turned_off(db, database_url_for_test, tmp_path):
    with gunicorn(database_url_for_test, tmp_path / "web.log", HUB_WRITER_PROCESS="false") as (
        proc,
        _,
    ):
        time.sleep(0.5)
        assert writer_pid(proc.pid) is None
