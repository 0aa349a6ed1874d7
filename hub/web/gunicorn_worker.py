"""gunicorn's gthread worker, with its own refusals in the hub's JSON.

gunicorn answers a request it can't parse (a bad request line, a request line over
``limit_request_line``, too many or too large header fields, conflicting Content-Length and
Transfer-Encoding, obsolete header folding, a bad chunk size) before the hub sees it, with
an HTML page. ``JsonRefusalWorker`` keeps gunicorn's decision (which status, what it logs,
the access line) and replaces only the page: ``{"error": "sentence", "code": "..."}`` with
``Content-Type: application/json``, the same status, and the connection closed, as gunicorn
does. hub/gunicorn_conf.py names it as the worker class.

The sentence is the hub's, chosen by the exception's class: it never quotes the request
(a malformed line can carry ``?api_key=``). Cost: one list of bytes per refusal.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from hub.web.errors import CODES, MESSAGES

# The most specific class first: what a sender reads about its own malformed request.
SENTENCES: tuple[tuple[type[Exception] | tuple[type[Exception], ...], str], ...] = (
    (http_errors.LimitRequestLine, "Request line too long"),
    (http_errors.LimitRequestHeaders, "Too many header fields, or a header field too large"),
    (http_errors.ObsoleteFolding, "Header folding (a line starting with a space) is not allowed"),
    (
        http_errors.UnsupportedTransferCoding,
        "Unsupported Transfer-Encoding; send chunked or a Content-Length",
    ),
    (
        (
            http_errors.InvalidChunkSize,
            http_errors.ChunkMissingTerminator,
            http_errors.InvalidChunkExtension,
        ),
        "Malformed chunked body",
    ),
    (
        http_errors.InvalidHeader,
        "Malformed or conflicting header (Content-Length, Transfer-Encoding or another)",
    ),
    (http_errors.InvalidHeaderName, "Malformed header name"),
    (http_errors.InvalidHTTPVersion, "Unsupported HTTP version"),
    (http_errors.InvalidRequestMethod, "Malformed request method"),
    (http_errors.InvalidRequestLine, "Malformed request line"),
    (http_errors.ExpectationFailed, "Unsupported Expect header"),
)


def refusal(status: int, exc: BaseException) -> bytes:
    """The whole HTTP answer for a request gunicorn refused with ``status`` because of ``exc``:
    the sentence of the exception's class, or the hub's own for the status (a 500 says no
    more than that)."""
    sentence = next((text for kind, text in SENTENCES if isinstance(exc, kind)), None)
    if sentence is None or status == 500:
        sentence = MESSAGES.get(status, "Bad request" if status < 500 else "Server error")
    code = CODES.get(status, "bad_request" if status < 500 else "internal_error")
    body = (json.dumps({"error": sentence, "code": code}) + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _Captured:
    """Stands for the client's socket while gunicorn writes its HTML page: keeps the bytes."""

    def __init__(self, sock: Any):
        self.sock = sock
        self.written = bytearray()

    def gettimeout(self) -> float:
        return 0.0  # gunicorn then writes without switching the socket's blocking mode

    def sendall(self, data: bytes) -> None:
        self.written += data

    def __getattr__(self, name: str) -> Any:  # anything else gunicorn asks of the socket
        return getattr(self.sock, name)


class JsonRefusalWorker(ThreadWorker):
    """The gthread worker (2 x 4 threads as docs/operations.md deploys it), refusing in JSON."""

    def handle_error(self, req, client, addr, exc):  # gunicorn's signature
        captured = _Captured(client)
        super().handle_error(req, captured, addr, exc)
        status = _status_of(bytes(captured.written))
        if status is None:  # gunicorn wrote nothing we can read: say nothing either
            return
        try:
            util.write_nonblock(client, refusal(status, exc))
        except OSError:
            self.log.debug("Failed to send error message.")


def _status_of(answer: bytes) -> int | None:
    """The status of the answer gunicorn wrote (``HTTP/1.1 431 ...``)."""
    parts = answer.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1])
