"""The writer process: one per gunicorn master, it commits the new events of all its web
processes, and their sync runs' endings.

Why a process of its own: a request thread that writes a batch in its web process waits
for the GIL after each call into the database driver, holding the SQLite write lock or a
PostgreSQL transaction meanwhile. bench/commit_beside_threads.py measured one group-commit
write at 1.0 ms alone, 40 ms beside one busy thread and 224 ms beside four; under gunicorn a
third of a web process's CPU went to the kernel switching threads that waited for the GIL.
The writer has one thread, so nothing takes the GIL from it between driver calls, and a
request thread waiting for its answer waits on a socket, holding no GIL.

How: each request thread of a web process keeps one connection to the writer's Unix socket
and sends it an accepted event's rows (what ``insert_rows`` of the in-process group
committer takes). The writer reads every message that came while it wrote its last batch,
writes them as one batch with the same group committer (hub.store.groupcommit: one
transaction, the keys' guard, a failed batch written again piece by piece) and answers each
once committed. The sender's 2xx still leaves only after its event's commit.

When the writer can't be reached (not started yet, starting again after a crash, or
HUB_WRITER_PROCESS=false, or tracing on: the in-process committer's batches are spans), the
web process commits through its own group committer, as it did before the writer. A
message whose answer never came (the writer died while writing it, or took longer than
HUB_WRITER_TIMEOUT) is written by the web process if its event is not there yet
(``GroupCommitter.insert_new``): the event is stored once either way. A write the writer
reports failed is tried again in the web process, whose own exception then decides the
answer (503 for a database that is down, as before).

The socket lies in a directory of the master's making that only the hub's user can open
(mode 0700): what comes in is unpickled, so only the hub's own processes may write to it.

A sync run's ending (its attempts, its delivery's and event's end state) goes the same
way (``write_ending``), for a route with one destination: after a lost answer the web
process writes it only while the event is still ``processing``, so it is written once.

Messages: a 4-byte big-endian length, then the body. To the writer, a pickle of
``(rows, key id or None, updates)`` with rows as ``[(table name, row), ...]`` and updates as
``[(table name, row id, {column: value}), ...]``, applied after the batch's rows; from it, ``ok``,
``refused`` (the key was revoked since it was read), ``unavailable`` (the database can't be
used now: the sender is answered 503 at once, as a web process's own commit would) or the
name of the exception its write failed with.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, Table, exc

from hub.ops import metrics
from hub.services import keys
from hub.store.db import Database, is_unavailable
from hub.store.groupcommit import (
    MAX_BATCH,
    Condition,
    GroupCommitter,
    Guard,
    Update,
    apply_updates,
)
from hub.store.models import Base

log = logging.getLogger("hub.writer")

LENGTH = struct.Struct(">I")
# The largest message the writer reads; a larger one (an event of a route whose body limit
# was raised past it) is committed by its web process instead.
MAX_MESSAGE = 64 * 1024 * 1024
_READ = 1 << 16
# The shortest time between two NOTIFYs of the writer (as a web process's Notifier).
ANNOUNCE_INTERVAL = 0.005
_LONGEST_SOCKET_PATH = 107  # sockaddr_un's sun_path, less its final NUL

# Set in gunicorn's master when it starts the writer (``Supervisor.start``), before it forks
# the web processes, which find it here: None, no writer.
_socket_path: str | None = None


def socket_path() -> str | None:
    """The writer's socket for this process's app, or None when there is no writer."""
    return _socket_path


# --- the web processes' side ---


class WriterClient:
    """``insert_rows`` through the writer process, and through ``local`` (the process's own
    group committer) whenever the writer can't take it. Each request thread has its own
    connection to the writer, made at its first event and again after a failure."""

    def __init__(self, path: str, local: GroupCommitter, timeout: float):
        self.path = path
        self.local = local
        self.timeout = timeout
        self._mine = threading.local()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every thread's, for ``close``
        # After a failed connect, threads go straight to ``local`` until then.
        self._retry_at = 0.0
        local.db.on_dispose(self.close)

    def insert_rows(
        self, rows: Iterable[tuple[Table, dict[str, Any]]], guard: tuple[Guard, Any] | None = None
    ) -> bool:
        """True when the writer committed them: it tells the workers of new events itself
        (PostgreSQL's NOTIFY, ``Writer.announce``); False when this process did."""
        rows = list(rows)
        if guard is not None and guard[0] is not keys.commit_guard:
            self.local.insert_rows(rows, guard)  # a guard the writer does not know
            return False
        answer = self._exchange(rows, guard[1] if guard else None, [])
        if answer is _UNREACHABLE:
            self.local.insert_rows(rows, guard)
        elif answer is _LOST:  # it may have committed them: written unless there
            self.local.insert_new(rows, guard)
        elif answer is _FAILED:
            self.local.insert_rows(rows, guard)
        else:
            return True
        return False

    def write_ending(
        self,
        rows: list[tuple[Table, dict[str, Any]]],
        updates: list[Update],
        only_if: Condition,
        here: GroupCommitter,
    ) -> None:
        """``GroupCommitter.write_ending`` through the writer, or with ``here`` (the web
        process's committer of row-locking writes) when the writer can't take it; after a
        lost answer, only if ``only_if`` still holds (the writer may have committed it)."""
        answer = self._exchange(rows, None, updates)
        if answer is _UNREACHABLE or answer is _FAILED:
            here.write_ending(rows, updates)
        elif answer is _LOST:
            here.write_ending(rows, updates, only_if)

    def _exchange(
        self, rows: list[tuple[Table, dict[str, Any]]], key_id: Any, updates: list[Update]
    ) -> object:
        """Hand ``rows`` (guarded by ``key_id``) and ``updates`` to the writer: None once
        committed, else what the caller is to do here instead (_UNREACHABLE, _LOST,
        _FAILED, each counted); raises KeyRefused or, for a database that can't be used,
        DisconnectionError."""
        body = pickle.dumps(
            (
                [(table.name, row) for table, row in rows],
                key_id,
                [(table.name, row_id, values) for table, row_id, values in updates],
            ),
            protocol=pickle.HIGHEST_PROTOCOL,
        )
        if len(body) > MAX_MESSAGE:
            return _UNREACHABLE  # too large for the writer to read: not counted
        frame = LENGTH.pack(len(body)) + body
        loop = _loop
        try:
            if loop is not None and loop.serving():
                answer = loop.exchange(self.path, frame, self.timeout)
            else:
                answer = self._exchange_here(frame)
        except (OSError, EOFError) as lost:
            log.warning("writer process gave no answer (%s): committed here", _why(lost))
            metrics.writer_fallback("lost")
            return _LOST
        if answer is None:
            metrics.writer_fallback("unreachable")
            return _UNREACHABLE
        if answer == b"ok":
            return None
        if answer == b"refused":
            raise keys.KeyRefused("revoked")
        if answer == b"unavailable":  # trying here too would only wait for it twice: 503
            raise exc.DisconnectionError("the writer process could not use the database")
        # Its write failed and was rolled back: again here, where the exception is the real one.
        metrics.writer_fallback("failed")
        return _FAILED

    def _exchange_here(self, frame: bytes) -> bytes | None:
        """``frame`` sent on this thread's connection and the writer's answer read from it:
        None when the writer can't be reached; OSError or EOFError when the answer was lost
        (the connection is forgotten)."""
        sock = self._send(frame)
        if sock is None:
            return None
        try:
            return _read_message(sock)
        except (OSError, EOFError):
            self._forget(sock)
            raise

    def _send(self, message: bytes) -> socket.socket | None:
        """Send ``message`` on this thread's connection, made anew once if the one kept
        was closed by a writer that ended: the connection it went out on, or None when the
        writer can't be reached (nothing of it was read)."""
        for _ in range(2):
            sock = self._connection()
            if sock is None:
                return None
            try:
                sock.sendall(message)
                return sock
            except OSError:
                self._forget(sock)
        return None

    def _connection(self) -> socket.socket | None:
        sock = getattr(self._mine, "sock", None)
        if sock is not None:
            return sock
        if time.monotonic() < self._retry_at:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            self._retry_at = time.monotonic() + 1.0
            return None
        self._mine.sock = sock
        with self._lock:
            self._open.add(sock)
        return sock

    def _forget(self, sock: socket.socket) -> None:
        self._mine.sock = None
        with self._lock:
            self._open.discard(sock)
        sock.close()

    def close(self) -> None:
        """Close every thread's connection (when the app's database is disposed)."""
        with self._lock:
            socks, self._open = self._open, set()
        for sock in socks:
            sock.close()


class Loop(Protocol):
    """A web process's own event loop that answers some webhooks without a request thread
    (hub.web.loop): what ``WriterClient`` asks of it."""

    def serving(self) -> bool:
        """Whether the code running now is a request the loop answers."""

    def exchange(self, path: str, frame: bytes, timeout: float) -> bytes | None:
        """``frame`` sent to the writer at ``path`` and its answer, the loop serving other
        requests meanwhile: None when the writer can't be reached (nothing was sent);
        OSError or EOFError when the answer was lost or took over ``timeout`` seconds."""


# The loop of this web process, once its gunicorn worker runs one (``serve_from``).
_loop: Loop | None = None


def serve_from(loop: Loop | None) -> None:
    global _loop
    _loop = loop


# What a web process does when the writer did not commit its message (WriterClient._exchange).
_UNREACHABLE, _LOST, _FAILED = object(), object(), object()


def _read_message(sock: socket.socket) -> bytes:
    (length,) = LENGTH.unpack(_read_exactly(sock, LENGTH.size))
    return _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the writer process closed the connection")
        data += chunk
    return data


def _why(exc: BaseException) -> str:
    return "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__


# --- the writer process ---


@dataclass(eq=False)
class _Peer:
    sock: socket.socket
    received: bytearray = field(default_factory=bytearray)


class Writer:
    """The writer's loop: accept the web processes' connections, read what they sent,
    write it as one batch (``max_batch`` events at most per transaction), answer each."""

    def __init__(self, db: Database, path: str, max_batch: int = MAX_BATCH):
        self.committer = GroupCommitter(db, max_batch)
        self.max_batch = max_batch
        self.tables: dict[str, Table] = dict(Base.metadata.tables)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):  # left by a writer that was killed
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen(256)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.stopping = False
        # On PostgreSQL the writer tells the workers of the events it committed (a web
        # process whose event the writer committed sends no NOTIFY): at most one NOTIFY
        # every ANNOUNCE_INTERVAL, the first due then (``announce_at``), on a connection
        # of its own.
        self.db = db
        self.announces = db.dialect == "postgresql"
        self.announce_at: float | None = None
        self.announced_at = 0.0
        self.notifying: Connection | None = None

    def serve(self, parent: int | None = None) -> None:
        """Until ``stop``, or until ``parent`` (the master's pid) is no longer this
        process's parent: a master killed outright leaves no one to stop the writer."""
        while not self.stopping:
            timeout = 1.0
            if self.announce_at is not None:
                timeout = max(0.0, min(timeout, self.announce_at - time.monotonic()))
            ready = self.selector.select(timeout=timeout)
            if parent is not None and os.getppid() != parent:
                log.warning("writer process: gunicorn's master is gone; stopping")
                break
            received: list[tuple[_Peer, Any]] = []
            for key, _ in ready:
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.data, received)
            for start in range(0, len(received), self.max_batch):
                self._write(received[start : start + self.max_batch])
            if self.announce_at is not None and time.monotonic() >= self.announce_at:
                self.announce()
        if self.announce_at is not None:
            self.announce()
        self.close()

    def announce(self) -> None:
        """NOTIFY the workers: events it committed are due. A failure is logged; they find
        them at their next poll."""
        self.announce_at = None
        self.announced_at = time.monotonic()
        try:
            self.notifying = self.db.notify_workers(self.notifying)
        except Exception as exc:  # the database went away: workers poll meanwhile
            log.warning("writer process: NOTIFY failed (%s)", type(exc).__name__)
            self.notifying = None

    def stop(self) -> None:
        """Stop after the batch being written, if any, is answered."""
        self.stopping = True

    def close(self) -> None:
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()
        if self.notifying is not None:
            with contextlib.suppress(Exception):
                self.notifying.close()
        self.committer.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, _Peer(sock))

    def _read(self, peer: _Peer, received: list[tuple[_Peer, Any]]) -> None:
        """Whole messages ``peer`` sent, appended to ``received``; a peer that closed its end
        is let go (what it sent whole is still written: its thread may be gone, not its
        event's sender)."""
        closed = False
        while True:
            try:
                chunk = peer.sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                closed = True
                break
            peer.received += chunk
            if len(chunk) < _READ:
                break
        data = peer.received
        while len(data) >= LENGTH.size:
            (length,) = LENGTH.unpack_from(data)
            if length > MAX_MESSAGE:
                log.error("writer process: a message of %d bytes refused", length)
                closed = True
                break
            if len(data) < LENGTH.size + length:
                break
            try:
                received.append((peer, pickle.loads(data[LENGTH.size : LENGTH.size + length])))
            except Exception as exc:
                log.error("writer process: a message not read (%s)", type(exc).__name__)
                closed = True
                break
            del data[: LENGTH.size + length]
        if closed:
            self._let_go(peer)

    def _write(self, received: list[tuple[_Peer, Any]]) -> None:
        pieces = []
        for _, message in received:
            try:
                rows, key_id, updates = message
                guard = (keys.commit_guard, key_id) if key_id is not None else None
                apply = None
                if updates:
                    these = [
                        (self.tables[name], row_id, values) for name, row_id, values in updates
                    ]
                    apply = functools.partial(apply_updates, updates=these)
                pieces.append(([(self.tables[name], row) for name, row in rows], guard, apply))
            except (KeyError, TypeError, ValueError):
                pieces.append(None)
        readable = [piece for piece in pieces if piece is not None]
        outcomes = iter(self.committer.write_pieces(readable) if readable else [])
        for (peer, _), piece in zip(received, pieces, strict=True):
            outcome = next(outcomes) if piece is not None else ValueError()
            if outcome is None:
                answer = b"ok"
                if self.announces and self.announce_at is None and piece[0]:
                    self.announce_at = max(time.monotonic(), self.announced_at + ANNOUNCE_INTERVAL)
            elif isinstance(outcome, keys.KeyRefused):
                answer = b"refused"
            elif is_unavailable(outcome):
                answer = b"unavailable"
            else:
                answer = type(outcome).__name__.encode()
            self._answer(peer, answer)

    def _answer(self, peer: _Peer, answer: bytes) -> None:
        if peer.sock.fileno() < 0:
            return  # let go while its message was written
        message = LENGTH.pack(len(answer)) + answer
        try:
            sent = peer.sock.send(message)
        except OSError:
            sent = -1
        if sent != len(message):  # gone, or not reading its answers
            self._let_go(peer)

    def _let_go(self, peer: _Peer) -> None:
        if peer.sock.fileno() >= 0:
            self.selector.unregister(peer.sock)
            peer.sock.close()


# --- gunicorn's master: starting the writer and starting it again ---


class Supervisor:
    """Runs the writer process for gunicorn's master (hub/gunicorn_conf.py): starts it, and
    starts another whenever it ends (after 0.1 s, doubling to 5 s while each lasts under
    10 s), until ``stop``. The web processes forked after ``start`` find its socket."""

    def __init__(self, database_url: str, logger: Any = log):
        self.directory = tempfile.mkdtemp(prefix="hub-writer-")  # mode 0700
        self.path = os.path.join(self.directory, "writer.sock")
        if len(os.fsencode(self.path)) > _LONGEST_SOCKET_PATH:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise ValueError(f"its socket's path would be too long for Linux: {self.path}")
        # The database the master's app resolved (the embedded default's file included).
        self.env = {**os.environ, "HUB_DATABASE_URL": database_url}
        self.log = logger
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        global _socket_path
        self._spawn()
        _socket_path = self.path
        threading.Thread(target=self._watch, name="hub-writer-watch", daemon=True).start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub.services.writer", self.path, str(os.getpid())],
                env=self.env,
                stdin=subprocess.DEVNULL,
            )

    def _watch(self) -> None:
        delay = 0.1
        while True:
            began = time.monotonic()
            proc = self.proc
            # gunicorn's master reaps every child it sees end; when it reaps the writer
            # first, wait() says 0.
            code = proc.wait()
            if self._stopping.is_set():
                return
            # 0 also when gunicorn's master reaped it first, its status unknown here.
            status = f" (exit status {code})" if code else ""
            self.log.warning("writer process %s ended%s; starting another", proc.pid, status)
            if time.monotonic() - began > 10:
                delay = 0.1
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, 5.0)
            self._spawn()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the writer (it answers the batch it is writing first), once the web
        processes are gone."""
        global _socket_path
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):  # the SIGTERM that follows is the master's
                open(stop_file(self.path), "x").close()
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)
        _socket_path = None


def stop_file(path: str) -> str:
    """The file beside the socket ``path`` by which the master says its SIGTERM is its own."""
    return os.path.join(os.path.dirname(path), "stop")


def main(argv: list[str] | None = None) -> int:
    """``python -m hub.services.writer SOCKET MASTER_PID``, as the Supervisor starts it."""
    from hub.config import database_url, load_settings
    from hub.ops.logs import choose_format, route_process_logs

    path, parent = (argv if argv is not None else sys.argv[1:])[:2]
    settings = load_settings()
    route_process_logs(choose_format(settings.log_format, settings.env))
    metrics.process_started("writer")  # in the master's metrics directory, inherited
    # Ctrl-C reaches every process of the terminal's group: gunicorn's master stops the
    # writer itself, after its web processes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    db = Database(
        database_url(settings.database_url),
        settings.db_connect_timeout,
        pooler=settings.database_pooler,
    )
    writer = Writer(db, path)

    def on_sigterm(*_: Any) -> None:
        # A SIGTERM to the whole process group (systemd's default, `kill -- -PGID`) reaches
        # the writer with the master, whose web processes may still be answering: it stops
        # when the master asks, after them (``Supervisor.stop``), or when the master is gone.
        if os.path.exists(stop_file(path)):
            writer.stop()
        else:
            log.info("writer process: SIGTERM left to gunicorn's master, which stops it last")

    signal.signal(signal.SIGTERM, on_sigterm)
    log.info("writer process %s started", os.getpid())
    try:
        writer.serve(int(parent))
    finally:
        done = writer.committer
        log.info(
            "writer process %s stopping: %d events written in %d transactions",
            os.getpid(),
            done.pieces,
            done.batches,
        )
        db.dispose()
        with contextlib.suppress(OSError):  # a writer started after this one makes its own
            os.unlink(path)
        if os.getppid() != int(parent):  # no master left to remove the socket's directory
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
