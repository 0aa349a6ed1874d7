"""Log lines: one record is one line, whatever a sender puts in a URL or a header.

Two formats, chosen by HUB_LOG_FORMAT (default: ``json`` when HUB_ENV=production, ``text``
otherwise). ``json`` writes one JSON object per line (time, level, logger, message, and the
request id, route, event id and key prefix where they are known); JSON's own escaping, here
ASCII only, means no value can end the line early. ``text`` is for a developer's terminal:
``EscapingFormatter`` writes every control character escaped (``x\\r\\nfake``), so a CR/LF
that a URL brings (``/hooks/x%0D%0Afake``) can't start a forged line either. The hub's handler
and gunicorn's (see hub/gunicorn_conf.py) format the same way.

What a line knows about is bound in a context variable, never read from Flask: the web face
binds each request's id when the request starts and resets it at its end (hub/web/context.py),
intake binds the event row it is writing (``event``: its route, id and key prefix are read
from the row as they become known), and a worker binds the event it delivers. ``bind`` sets
values until ``unbind``, ``bound(...)`` for a block, ``values()`` reads them. Every request
gets an id: the sender's ``X-Request-ID`` when it is a sane token (``request_id_from``), a new
one otherwise; it is answered in ``X-Request-ID`` and kept on the event.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from hub.ops import redact

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("json", "text")
# What a line may say about the work it belongs to, in this order.
CONTEXT_FIELDS = ("request_id", "route", "event_id", "key_prefix")
# A request id a sender may choose: a short token that can't carry anything but itself.
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,200}")
REQUEST_ID_HEADER = "X-Request-ID"

_bound: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "hub_log_context", default=None
)


def escape_controls(text: str) -> str:
    r"""``text`` with every control character written as an escape (``\r``, ``\x00``)."""
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def choose_format(configured: Any, env: Any) -> str:
    """``json`` or ``text``: HUB_LOG_FORMAT when set, else json in production, text otherwise."""
    if configured in (None, ""):
        return "json" if str(env or "").strip().lower() == "production" else "text"
    value = str(configured).strip().lower()
    if value not in FORMATS:
        raise ValueError(f"HUB_LOG_FORMAT: expected json or text: {configured!r}")
    return value


# --- what a line knows about ---


def bind(**fields: Any) -> contextvars.Token:
    """Lines logged from now on (in this thread, and in threads that copy its context) carry
    ``fields`` too, until ``unbind`` with the token returned. ``event`` may be an Event row:
    a line then names its route, id and key prefix as loaded at the time of the line."""
    return _bound.set({**(_bound.get() or {}), **fields})


def unbind(token: contextvars.Token) -> None:
    """Back to what was bound before the ``bind`` that gave ``token`` (and every later one)."""
    _bound.reset(token)


@contextlib.contextmanager
def bound(**fields: Any) -> Iterator[None]:
    """Lines logged inside the block carry ``fields``; what is bound inside it ends with it."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def values() -> dict[str, Any]:
    """What is bound now (a copy)."""
    return dict(_bound.get() or {})


def context_fields() -> dict[str, Any]:
    """The request id, route, event id and key prefix this thread is working for, where known."""
    found = values()
    event = found.get("event")
    if event is not None:
        # Only what is loaded: a log line must never make the ORM go to the database.
        loaded = vars(event)
        found.setdefault("route", loaded.get("route"))
        found.setdefault("event_id", loaded.get("id"))
        found.setdefault("key_prefix", loaded.get("key_prefix"))
    return {name: found[name] for name in CONTEXT_FIELDS if found.get(name) is not None}


# --- formatters ---


class EscapingFormatter(logging.Formatter):
    """A Formatter whose line can't be split or forged by the values it carries.

    What the line is about (request id, event id ...) follows the message in brackets. A
    traceback the hub chose to log keeps its lines, each indented under its record, so no
    line of it can pass for a record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        fields = {**context_fields(), **getattr(record, "hub_fields", {})}
        if fields:
            line += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return escape_controls(line)

    def format(self, record: logging.LogRecord) -> str:
        return redact.keys_in_text(super().format(record))  # no hub key in any line

    def formatException(self, ei) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    | " + escape_controls(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, what the line
    is about, and ``exc_type`` for a record that carries an exception (its type only: a
    message or traceback can hold a secret or SQL). ASCII only, DEL escaped too."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(context_fields())
        data.update(getattr(record, "hub_fields", {}))
        if record.exc_info and record.exc_info[0] is not None:
            data["exc_type"] = record.exc_info[0].__name__
        line = json.dumps(data, default=str).replace("\x7f", "\\u007f")
        return redact.keys_in_text(line)  # no hub key in any line


def formatter(kind: str, fmt: str = LOG_FORMAT, datefmt: str | None = None) -> logging.Formatter:
    """The formatter of ``kind`` (``json`` or ``text``; ``fmt`` is the text layout)."""
    return JsonFormatter() if kind == "json" else EscapingFormatter(fmt, datefmt)


# --- request ids ---


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """The sender's request id when it is a sane token (and not a hub key), a new one
    otherwise."""
    if value and REQUEST_ID_RE.fullmatch(value) and not redact.KEY_SHAPE.search(value):
        return value
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the request being answered, as bound; None outside a request."""
    return values().get("request_id")


def route_process_logs(kind: str) -> None:
    """Every line this process writes through Python goes out in ``kind``, once per process.

    One handler on the root logger: the hub's lines (INFO and up) and every library's
    warnings and errors (psycopg's "error ignored terminating ...", three lines of libpq's
    message in one record, was written raw to stderr by logging's last-resort handler
    during a database cut). Python warnings, an exception no thread caught and an
    exception Python could only ignore (``__del__``) become records too, with their type
    only, as the JSON formatter keeps every record. gunicorn's own loggers keep their
    handlers (hub/gunicorn_conf.py formats them the same way). What C code writes to file
    descriptor 2 itself is not seen here: psycopg takes libpq's notices, so none is known.
    """
    root = logging.getLogger()
    if any(getattr(handler, "hub_process_handler", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(kind))
    handler.hub_process_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    logging.getLogger("hub").setLevel(logging.INFO)
    logging.captureWarnings(True)
    threading.excepthook = _log_uncaught_in_thread
    sys.unraisablehook = _log_unraisable


_crash_log = logging.getLogger("hub.crash")


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    _crash_log.error(
        "thread %s ended on %s", name, args.exc_type.__name__, exc_info=_exc_info(args)
    )


def _log_unraisable(args: Any) -> None:
    _crash_log.warning("exception ignored (%s)", args.exc_type.__name__, exc_info=_exc_info(args))


def _exc_info(args: Any) -> tuple:
    return (args.exc_type, args.exc_value, args.exc_traceback)


def init_app(app: Flask) -> None:
    """Log lines go to stderr in the chosen format (see ``route_process_logs``; tests keep
    pytest's capture). The web face gives every request its id (hub/web/context.py)."""
    kind = choose_format(app.config.get("LOG_FORMAT"), app.config.get("ENV"))
    app.config["LOG_FORMAT"] = kind
    if not app.testing:
        route_process_logs(kind)
