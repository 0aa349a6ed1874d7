"""Real HTTP servers on 127.0.0.1 for tests: a recording webhook receiver and a fake
OpenAI-compatible chat completions API. Each runs a ThreadingHTTPServer on an ephemeral
port in a daemon thread; use ``start()``/``stop()`` or ``with``.

They ship with the hub so that a connector's own package can test against them: the pytest
plugin ``hub.pytest_plugin`` gives them as the ``receiver`` and ``fake_openai`` fixtures, and
the hub's own tests use the same ones. This module imports nothing but the standard library
(nothing from the hub either: it checks the hub from outside).

Run a receiver as its own process (for crash tests)::

    python -m hub.testing_servers receiver --port 0 --port-file F --log FILE \
        [--delay SECONDS] [--fail-first N --fail-status 503]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FakeOpenAI", "Recorded", "Receiver", "Reply", "main"]


@dataclass
class Reply:
    """A scripted answer. ``body`` may be bytes, str, or a dict/list sent as JSON; ``None``
    means "answer normally" (useful with ``delay`` for a slow but otherwise normal reply).

    ``raw``, when set, is the whole answer instead (status line and headers included),
    written piece by piece as the iterable yields it, ``interval`` seconds apart: a
    generator streams any size without holding it, a slow one drips. The bytes the client
    took before it closed the connection are appended to the server's ``sent``."""

    status: int = 200
    body: bytes | str | dict | list | None = b"ok"
    # A dict, or (name, value) pairs to send one header several times (Set-Cookie).
    headers: dict[str, str] | list[tuple[str, str]] = field(default_factory=dict)
    delay: float = 0.0
    raw: Iterable[bytes] | None = None
    interval: float = 0.0


def _header_pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A reply's headers as (name, value) pairs, from a dict or from pairs."""
    if isinstance(headers, Mapping):
        return list(headers.items())
    return [(str(name), str(value)) for name, value in headers]


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received_at: float  # time.time()
    # The client's (host, port): requests that share it came on one connection.
    peer: tuple[str, int] | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    owner: _Server

    def handle_error(self, request, client_address):
        # A client that gave up (timeout test) is expected; anything else is a real bug.
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers in pools
    server_version = "TestServer/1.0"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls between header and body

    def log_message(self, format, *args):  # noqa: A002 - silence stderr access log
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.owner._cond:
            self.server.owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.owner._cond:
                self.server.owner._connections.discard(self.connection)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        recorded = Recorded(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self._read_body(),
            received_at=time.time(),
            peer=tuple(self.client_address[:2]),
        )
        owner = self.server.owner
        reply = owner._record_and_pick(recorded)
        if reply.delay > 0 and owner._stopping.wait(reply.delay):
            self.close_connection = True
            return  # shutting down: drop the connection
        if reply.raw is not None:
            self.close_connection = True  # a raw answer ends where its connection does
            owner._sent(self._stream(reply))
            return
        if reply.body is None:
            reply = owner.answer(recorded, reply)
        self._send(reply)

    def _stream(self, reply: Reply) -> int:
        """Write ``reply.raw`` until it ends or the client goes away; the bytes written."""
        # A small send buffer: what the client did not read stays here, not in the kernel.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sent = 0
        try:
            for piece in reply.raw:
                if reply.interval and self.server.owner._stopping.wait(reply.interval):
                    break
                self.wfile.write(piece)
                sent += len(piece)
        except OSError:  # the client closed the connection: how much it took is the point
            pass
        return sent

    def _send(self, reply: Reply) -> None:
        body = reply.body
        headers = _header_pairs(reply.headers)
        content_type = None
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            content_type = "application/json"
        elif isinstance(body, str):
            body = body.encode()
            content_type = "text/plain; charset=utf-8"
        elif body is None:
            body = b""
        else:
            content_type = "text/plain"
        if content_type and not any(name.lower() == "content-type" for name, _ in headers):
            headers.append(("Content-Type", content_type))
        self.send_response(reply.status)
        for name, value in headers:
            self.send_header(name, str(value))
        self.send_header("Content-Length", str(len(body)))
        if self.protocol_version == "HTTP/1.0":
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


class _KeepAliveHandler(_Handler):
    """HTTP/1.1: a connection takes request after request, as most receivers allow."""

    protocol_version = "HTTP/1.1"


class _Server:
    """Shared machinery: lifecycle, recording, scripted replies."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, keep_alive: bool = False):
        self._host = host
        self._port = port
        # False: one request per connection (HTTP/1.0), so nothing lingers in a client's
        # pool between tests; True: connections kept open between requests (HTTP/1.1), as
        # most receivers keep them.
        self._handler = _KeepAliveHandler if keep_alive else _Handler
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._requests: list[Recorded] = []
        self._script: collections.deque[Reply] = collections.deque()
        self._stopping = threading.Event()
        self._sent_bytes: list[int] = []
        # The connections open now, closed when the server stops: a client's pool must
        # never send a later request to a stopped server's thread.
        self._connections: set[socket.socket] = set()
        self.on_request: Callable[[Recorded], None] | None = None

    # lifecycle -------------------------------------------------------------------------
    def start(self):
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _HTTPServer((self._host, self._port), self._handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.01},
            name=f"{type(self).__name__}:{httpd.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()  # wake delayed replies
        httpd.shutdown()
        httpd.server_close()
        with self._cond:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # recording and scripting -----------------------------------------------------------
    @property
    def requests(self) -> list[Recorded]:
        with self._cond:
            return list(self._requests)

    def _sent(self, count: int) -> None:
        with self._cond:
            self._sent_bytes.append(count)
            self._cond.notify_all()

    def wait_sent(self, n: int = 1, timeout: float = 5.0) -> list[int]:
        """Bytes written for each finished ``raw`` reply, once ``n`` of them have ended."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._sent_bytes) >= n, timeout):
                raise AssertionError(f"expected {n} streamed reply(s) to end within {timeout}s")
            return list(self._sent_bytes)

    def clear(self) -> None:
        with self._cond:
            self._requests.clear()
            self._script.clear()

    def script(self, *replies: Reply):
        """Queue answers, used in order for the next requests; then the default answer."""
        with self._cond:
            self._script.extend(replies)
        return self

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least ``n`` requests have arrived; return them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise AssertionError(
                    f"expected {n} request(s) within {timeout}s, got {len(self._requests)}"
                )
            return list(self._requests)

    def _record_and_pick(self, recorded: Recorded) -> Reply:
        with self._cond:
            self._requests.append(recorded)
            reply = self._script.popleft() if self._script else self.default_reply()
            self._cond.notify_all()
        if self.on_request is not None:
            self.on_request(recorded)
        return reply

    def default_reply(self) -> Reply:
        return Reply(body=None)

    def answer(self, recorded: Recorded, reply: Reply) -> Reply:
        """The normal answer to ``recorded`` (status/headers/delay of ``reply`` kept)."""
        raise NotImplementedError


class Receiver(_Server):
    """A webhook receiver that records every request and answers 200 ``{"ok": true}``
    unless scripted otherwise."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        delay: float = 0.0,
        keep_alive: bool = False,
    ):
        super().__init__(host=host, port=port, keep_alive=keep_alive)
        self.delay = delay

    def default_reply(self) -> Reply:
        return Reply(body=None, delay=self.delay)

    def answer(self, recorded: Recorded, reply: Reply) -> Reply:
        return Reply(reply.status, {"ok": True}, reply.headers)

    @staticmethod
    def verify_standard_webhooks(secret: str, recorded: Recorded, tolerance: int = 300) -> bool:
        """Check a request's Standard Webhooks signature (an independent implementation).

        Signed content is ``"{webhook-id}.{webhook-timestamp}.{body}"``; the signature
        header is a space-separated list of ``v1,<base64 HMAC-SHA256>``; the key is the
        base64-decoded part of a ``whsec_`` secret.
        """
        headers = {k.lower(): v for k, v in recorded.headers.items()}
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signatures = headers.get("webhook-signature")
        if not (msg_id and timestamp and signatures):
            return False
        try:
            sent_at = int(timestamp)
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (ValueError, binascii.Error):
            return False
        if abs(time.time() - sent_at) > tolerance:
            return False
        signed = f"{msg_id}.{timestamp}.".encode() + recorded.body
        expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
        for item in signatures.split():
            version, _, value = item.partition(",")
            if version == "v1" and hmac.compare_digest(value.encode(), expected):
                return True
        return False


# --------------------------------------------------------------------------------------
# Fake OpenAI
# --------------------------------------------------------------------------------------


def _openai_error(message: str, type_: str, code: str | None, param: str | None = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class FakeOpenAI(_Server):
    """An OpenAI-compatible ``POST /v1/chat/completions`` that checks the API key and the
    request shape, and by default answers ``"echo: <last user message>"``."""

    ROLES = ("system", "user", "assistant")

    def __init__(
        self, api_key: str = "sk-test", *, model: str | None = None, host: str = "127.0.0.1"
    ):
        super().__init__(host=host)
        self.api_key = api_key
        self.model = model  # force the answered model name; default: echo the request's
        self.reply_content: Callable[[list[dict]], str] = self._echo

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @staticmethod
    def _echo(messages: list[dict]) -> str:
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return f"echo: {last}"

    # helpers for scripting ---------------------------------------------------------------
    @staticmethod
    def rate_limited(retry_after: float | str = 1, retry_after_ms: float | None = None) -> Reply:
        headers = {"Retry-After": str(retry_after)}
        if retry_after_ms is not None:
            headers["retry-after-ms"] = str(retry_after_ms)
        return Reply(
            429,
            _openai_error(
                "Rate limit reached for requests. Please try again later.",
                "requests",
                "rate_limit_exceeded",
            ),
            headers,
        )

    @staticmethod
    def server_error(status: int = 500) -> Reply:
        return Reply(
            status,
            _openai_error(
                "The server had an error while processing your request.", "server_error", None
            ),
        )

    @staticmethod
    def unauthorized() -> Reply:
        return Reply(
            401,
            _openai_error(
                "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
            ),
        )

    @staticmethod
    def slow(delay: float) -> Reply:
        """A normal completion, after ``delay`` seconds."""
        return Reply(body=None, delay=delay)

    @staticmethod
    def malformed() -> Reply:
        return Reply(200, b"{not json", {"Content-Type": "application/json"})

    @staticmethod
    def missing_choices() -> Reply:
        return Reply(
            200,
            {
                "id": "chatcmpl-nochoices",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": "gpt-4o-mini",
                "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
            },
        )

    @staticmethod
    def completion(content: str, model: str = "gpt-4o-mini") -> Reply:
        """A fixed, well-formed completion answering ``content``."""
        return Reply(200, FakeOpenAI._completion_body(model, content, 1))

    # answering ---------------------------------------------------------------------------
    @staticmethod
    def _completion_body(model: str, content: str, prompt_tokens: int) -> dict:
        completion_tokens = _tokens(content)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def answer(self, recorded: Recorded, reply: Reply) -> Reply:
        if recorded.method != "POST" or recorded.path.split("?")[0] != "/v1/chat/completions":
            return Reply(
                404,
                _openai_error(
                    f"Invalid URL ({recorded.method} {recorded.path})",
                    "invalid_request_error",
                    None,
                ),
            )
        auth = recorded.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            return Reply(
                401,
                _openai_error(
                    "You didn't provide an API key. You need to provide your API key in an "
                    "Authorization header using Bearer auth.",
                    "invalid_request_error",
                    None,
                ),
            )
        if not hmac.compare_digest(auth[7:].strip(), self.api_key):
            return self.unauthorized()
        try:
            body = json.loads(recorded.body)
        except ValueError:
            return Reply(
                400,
                _openai_error(
                    "We could not parse the JSON body of your request.",
                    "invalid_request_error",
                    None,
                ),
            )
        problem = self._check_shape(body)
        if problem is not None:
            message, param = problem
            return Reply(400, _openai_error(message, "invalid_request_error", None, param))
        messages = body["messages"]
        prompt_tokens = sum(_tokens(m["content"]) for m in messages)
        content = self.reply_content(messages)
        model = self.model or body["model"]
        return Reply(
            reply.status,
            self._completion_body(model, content, prompt_tokens),
            [("x-request-id", f"req_{uuid.uuid4().hex[:16]}"), *_header_pairs(reply.headers)],
        )

    def _check_shape(self, body: Any) -> tuple[str, str | None] | None:
        if not isinstance(body, dict):
            return "The request body must be a JSON object.", None
        if not isinstance(body.get("model"), str) or not body["model"]:
            return "you must provide a model parameter", "model"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "'messages' must be a non-empty array", "messages"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in self.ROLES:
                return f"Invalid value for 'messages[{i}].role'", f"messages[{i}].role"
            if not isinstance(m.get("content"), str):
                return f"Invalid type for 'messages[{i}].content'", f"messages[{i}].content"
        temperature = body.get("temperature")
        if temperature is not None and (
            isinstance(temperature, bool) or not isinstance(temperature, int | float)
        ):
            return "Invalid type for 'temperature': expected a number", "temperature"
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
        ):
            return "Invalid type for 'max_tokens': expected a positive integer", "max_tokens"
        return None


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(str(port))
    os.replace(tmp, path)  # readers never see a half-written file


def _run_receiver(args: argparse.Namespace) -> int:
    receiver = Receiver(port=args.port, delay=args.delay)
    if args.fail_first:
        receiver.script(
            *[
                Reply(args.fail_status, {"ok": False}, delay=args.delay)
                for _ in range(args.fail_first)
            ]
        )
    log_lock = threading.Lock()
    log_file = open(args.log, "a", encoding="utf-8")  # noqa: SIM115 - closed below

    def write_line(rec: Recorded) -> None:
        line = json.dumps(
            {
                "method": rec.method,
                "path": rec.path,
                "headers": rec.headers,
                "body": rec.body.decode("utf-8", "replace"),
                "time": rec.received_at,
            }
        )
        with log_lock:
            if not log_file.closed:  # a late request while shutting down is dropped
                log_file.write(line + "\n")
                log_file.flush()

    receiver.on_request = write_line
    done = threading.Event()

    def on_signal(signum, frame):
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        receiver.start()
        if args.port_file:
            _write_port_file(args.port_file, receiver.port)
        while not done.wait(0.2):
            pass
    finally:
        receiver.stop()
        with log_lock:
            log_file.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.testing_servers")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("receiver", help="run a recording webhook receiver")
    rec.add_argument("--port", type=int, default=0)
    rec.add_argument("--port-file", help="write the listening port here when ready")
    rec.add_argument("--log", required=True, help="append one JSON line per request")
    rec.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    rec.add_argument("--fail-first", type=int, default=0, help="answer the first N with an error")
    rec.add_argument("--fail-status", type=int, default=503)
    args = parser.parse_args(argv)
    return _run_receiver(args)


if __name__ == "__main__":
    sys.exit(main())
