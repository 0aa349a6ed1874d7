"""Webhooks answered on the gunicorn worker's own event loop, without a request thread.

Why: under gunicorn a webhook cost about twice its in-process CPU. A gthread worker hands
each request from its loop to a pool thread and back; the hub's request thread then waited
for the writer process's commit, and with 8 threads waiting in a process every answer meant
a handover of the GIL and a switch of threads: 12.7 context switches a webhook, and a tenth
of the web process's CPU in the kernel's ``finish_task_switch`` (``perf``). A longer wait
for bigger commits cost the web side what it saved the writer (bench/RESULTS.md, round 6).

How: ``LoopWorker`` is the hub's gthread worker (``JsonRefusalWorker``) whose loop reads a
connection itself when it becomes readable (a new one too: nginx opens one a request). A
request that is one whole ``POST /hooks/<route>`` (a Content-Length body of what fits in
one read, nothing after it, no Transfer-Encoding, Expect or Upgrade; a body sent after its
head is waited for on the loop, for a second at most), to a route this process has cached
whose accepted webhooks write nothing but their new rows (``intake.writes_only_new_rows``),
is answered on the loop: a greenlet runs gunicorn's parser and ``handle_request`` on those
bytes, the same WSGI app, lane and checks. Where the request thread waited for the writer's
answer (``WriterClient``), the greenlet queues its rows and gives the loop back; after each
turn the loop sends what was queued on the process's one connection to the writer in one
write (the writer reads it as one batch), and as the answers come, in the order the
messages went, each greenlet goes on and writes its 202. Everything else (a request whose
rest is slower than that, larger, or with more after it, the admin API, the dashboard, a
sync route, a route with a rate limit, deduplication, ordering or a handshake, TLS, HTTP/2)
goes to the pool's threads as before, with what the loop read given back to gunicorn's
parser.

What holds: an answer leaves only after the writer's commit; a lost answer or one slower
than HUB_WRITER_TIMEOUT has each waiting webhook committed by its web process unless the
writer did (``WriterClient``), and the connection to the writer is made anew; the loop
never waits on a sender (it reads only what is there, answers only a connection whose
earlier answers were all sent, and a request's own read or write that would block is
bounded to a second, then its connection closed); a webhook that writes more than its
rows after all (a refusal, a key with its own rate limit) does so on the loop, waiting for
the database meanwhile.
HUB_WEB_LOOP=false turns it off; it is off too without the writer process or the lane
(HUB_OTEL=true).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import re
import selectors
import socket
import struct
import termios
import time
from functools import partial

import greenlet
from gunicorn.http import errors as http_errors
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import DEFAULT_WORKER_DATA_TIMEOUT, TConn

from hub.services import intake, writer
from hub.web.gunicorn_worker import JsonRefusalWorker
from hub.web.lane import HooksLane

# What one read of a readable connection takes; a request longer than that goes to a thread.
READ = 64 * 1024
# A request answered on the loop is read from memory and its answer is small, so neither
# waits on the sender; if one would, a second bounds it and the connection is closed.
IO_SECONDS = 1.0
_WEBHOOK = b"POST /hooks/"
_ROUTE_NAME = re.compile(rb"[A-Za-z0-9._~-]{1,64}")
_NOT_ON_THE_LOOP = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))
_UNSENT = struct.Struct("i")


class _More:
    """``webhook_in``'s answer for the start of what may be such a request."""

    def __repr__(self) -> str:
        return "MORE"


MORE = _More()


def webhook_in(data: bytes) -> tuple[str, set[str]] | _More | None:
    """The route name and the header names (lowercase) of the request ``data`` holds when it
    is exactly one whole ``POST /hooks/<name>`` with a Content-Length body and nothing the
    loop leaves to gunicorn's threads; MORE when ``data`` may be the start of one (a client
    often sends the head and the body apart); else None. gunicorn's parser still reads it
    (its limits and refusals apply): this only decides where."""
    if not data.startswith(_WEBHOOK):
        return MORE if _WEBHOOK.startswith(data) else None
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return MORE
    lines = data[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        return None
    name = parts[1][len(_WEBHOOK) - len(b"POST ") :].partition(b"?")[0]
    if not _ROUTE_NAME.fullmatch(name):
        return None  # percent-encoded, a sub-path or too long: Flask's routing decides
    length = None
    names: set[str] = set()
    for line in lines[1:]:
        field, colon, value = line.partition(b":")
        if not colon or not field or field != field.strip() or b"\n" in line:
            return None  # folded, malformed or bare-LF lines: gunicorn's thread refuses them
        field = field.lower()
        if field in _NOT_ON_THE_LOOP:
            return None
        if field == b"content-length":
            value = value.strip()
            if length is not None or not value.isdigit():
                return None
            length = int(value)
        names.add(field.decode("latin-1"))
    if length is None or len(data) > end + 4 + length:
        return None
    if len(data) < end + 4 + length:
        return MORE
    return name.decode("ascii"), names


def unsent(sock: socket.socket) -> int:
    """Bytes the kernel still holds to send on ``sock`` (1 where it can't say)."""
    try:
        return _UNSENT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except OSError:
        return 1


class _Webhook(greenlet.greenlet):
    """One webhook answered on the loop: it runs until it waits for the writer."""

    deadline = 0.0


class _Finished:
    """What gthread's ``finish_request`` reads of a request's future."""

    def __init__(self, keep: bool):
        self.keep = keep

    def result(self) -> bool:
        return self.keep

    def cancelled(self) -> bool:
        return False


class LoopWorker(JsonRefusalWorker):
    """The hub's gthread worker, answering the webhooks it can on its loop (module doc)."""

    def run(self) -> None:
        app = self.wsgi
        self.on_loop = (
            not self.cfg.is_ssl
            and writer.socket_path() is not None
            and isinstance(getattr(app, "wsgi_app", None), HooksLane)
        )
        self.main = greenlet.getcurrent()
        self.routes = app.extensions["hub.routes"] if self.on_loop else None
        self.waiting: collections.deque[_Webhook] = collections.deque()
        # Connections whose request came in part, by when the rest must come.
        self.collecting: dict[TConn, float] = {}
        self.link: socket.socket | None = None  # to the writer
        self.outbox: list[bytes] = []  # messages to it, sent after this turn's events
        self.answers = bytearray()
        self.retry_at = 0.0
        if self.on_loop:
            writer.serve_from(self)
        try:
            super().run()
        finally:
            writer.serve_from(None)

    # --- connections ---

    def accept(self, listener: socket.socket) -> None:
        if not self.on_loop:
            return super().accept(listener)
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return None
        self.nr_conns += 1
        conn = TConn(self.cfg, client, address, listener.getsockname())
        if negotiation.prior_knowledge_allowed(self.cfg, address) or negotiation.upgrade_allowed(
            self.cfg, address
        ):
            self.enqueue_req(conn)  # HTTP/2 may be spoken: gunicorn's threads
            return None
        conn.hub_loop = True
        # gunicorn's thread waits 5 s for a first byte, then its poller the keep-alive time.
        conn.timeout = time.monotonic() + DEFAULT_WORKER_DATA_TIMEOUT + self.cfg.keepalive
        self.pending_conns.append(conn)
        self.poller.register(
            client, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn)
        )
        return None

    def on_pending_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        if not getattr(conn, "hub_loop", False):
            return super().on_pending_socket_readable(conn, client)
        self.poller.unregister(client)
        self.pending_conns.remove(conn)
        conn.data_ready = True
        conn.init()  # the HTTP/1 parser: no TLS, no HTTP/2 on this connection
        return self.serve(conn)

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        if not getattr(conn, "hub_loop", False):
            return super().on_client_socket_readable(conn, client)
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        return self.serve(conn)

    def serve(self, conn: TConn) -> None:
        """Read what ``conn`` sent; answer it here, wait for the rest of it here, or hand it
        to a pool thread."""
        sock = conn.sock
        sock.setblocking(False)
        try:
            data = sock.recv(READ)
        except (BlockingIOError, InterruptedError):
            data = None
        except OSError:
            data = b""
        if data == b"":  # the client closed it
            self.collecting.pop(conn, None)
            self.nr_conns -= 1
            conn.close()
            return
        data = getattr(conn, "hub_read", b"") + (data or b"")
        found = webhook_in(data) if data else MORE
        if found is MORE and len(data) < READ:
            # The rest (a body sent after its head) is waited for here, within IO_SECONDS.
            conn.hub_read = data
            self.collecting.setdefault(conn, time.monotonic() + IO_SECONDS)
            self.poller.register(sock, selectors.EVENT_READ, partial(self.on_more, conn))
            return
        self.collecting.pop(conn, None)
        conn.hub_read = b""
        if data:
            conn.parser.unreader.unread(data)
        if isinstance(found, tuple) and self.answers_here(found, sock):
            _Webhook(self.answer).switch(conn)
        else:
            self.enqueue_req(conn)

    def on_more(self, conn: TConn, client: socket.socket) -> None:
        self.poller.unregister(client)
        self.serve(conn)

    def answers_here(self, found: tuple[str, set[str]], sock: socket.socket) -> bool:
        if unsent(sock):
            return False
        name, header_names = found
        hit = self.routes.get(name)
        return (
            hit is not None
            and hit[0] is not None
            and intake.writes_only_new_rows(hit[0], header_names)
        )

    def hand_over_the_slow(self) -> None:
        """Requests whose rest did not come within IO_SECONDS go to a thread with what the
        loop read of them: gunicorn's thread waits for a slow sender as it always did."""
        now = time.monotonic()
        for conn in [conn for conn, deadline in self.collecting.items() if deadline <= now]:
            self.poller.unregister(conn.sock)
            del self.collecting[conn]
            data, conn.hub_read = conn.hub_read, b""
            conn.parser.unreader.unread(data)
            self.enqueue_req(conn)

    def answer(self, conn: TConn) -> None:
        """gthread's ``handle`` for a request already read: its refusals, its closing."""
        req = None
        keep = False
        try:
            conn.sock.settimeout(IO_SECONDS)
            req = next(conn.parser)
            keep = self._keepalive_after(conn, self.handle_request(req, conn))
        except (http_errors.NoMoreData, StopIteration, OSError) as exc:
            self.log.debug("Closing connection (%s).", type(exc).__name__)
        except Exception as exc:
            self.handle_error(req, conn.sock, conn.client, exc)
        finally:
            self.finish_request(conn, _Finished(keep))

    # --- the writer (writer.Loop) ---

    def serving(self) -> bool:
        return isinstance(greenlet.getcurrent(), _Webhook)

    def exchange(self, path: str, frame: bytes, timeout: float) -> bytes | None:
        if self.link is None and self.connect(path) is None:
            return None
        # Sent with the others of this turn of the loop (``send_to_the_writer``): one write,
        # and the writer reads them as one batch.
        self.outbox.append(frame)
        me = greenlet.getcurrent()
        me.deadline = time.monotonic() + timeout
        self.waiting.append(me)
        return self.main.switch()

    def send_to_the_writer(self) -> None:
        frames, self.outbox = self.outbox, []
        try:
            self.link.sendall(b"".join(frames))
        except OSError as exc:
            self.drop(exc)

    def connect(self, path: str) -> socket.socket | None:
        if time.monotonic() < self.retry_at:
            return None
        link = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        link.settimeout(IO_SECONDS)
        try:
            link.connect(path)
        except OSError:
            link.close()
            self.retry_at = time.monotonic() + 1.0  # as a request thread waits
            return None
        self.link = link
        self.poller.register(link, selectors.EVENT_READ, self.read_answers)
        return link

    def read_answers(self, link: socket.socket) -> None:
        try:
            chunk = link.recv(READ)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError as exc:
            self.drop(exc)
            return
        if not chunk:
            self.drop(EOFError("the writer process closed the connection"))
            return
        self.answers += chunk
        size = writer.LENGTH.size
        while len(self.answers) >= size:
            (length,) = writer.LENGTH.unpack_from(self.answers)
            if len(self.answers) < size + length:
                break
            answer = bytes(self.answers[size : size + length])
            del self.answers[: size + length]
            if not self.waiting:
                self.drop(EOFError("the writer answered a message not sent"))
                return
            self.waiting.popleft().switch(answer)

    def drop(self, why: BaseException) -> None:
        """Close the connection to the writer: every webhook waiting on it lost its answer.
        Called on the loop (the main greenlet) only."""
        self.fail(self.close_link(), why)

    def close_link(self) -> list[_Webhook]:
        """Close the connection to the writer: the webhooks that were waiting on it."""
        if self.link is not None:
            self.poller.unregister(self.link)
            self.link.close()
            self.link = None
        self.answers.clear()
        self.outbox = []
        waiting, self.waiting = list(self.waiting), collections.deque()
        return waiting

    @staticmethod
    def fail(waiting: list[_Webhook], why: BaseException) -> None:
        for webhook in waiting:
            webhook.throw(type(why), why)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.waiting:
            timeout = min(timeout, self.waiting[0].deadline - time.monotonic())
        if self.collecting:
            timeout = min(timeout, min(self.collecting.values()) - time.monotonic())
        timeout = max(0.0, timeout)
        super().wait_for_and_dispatch_events(timeout)
        if self.outbox:
            self.send_to_the_writer()
        if self.waiting and self.waiting[0].deadline <= time.monotonic():
            self.drop(TimeoutError("timed out"))
        if self.collecting:
            self.hand_over_the_slow()
