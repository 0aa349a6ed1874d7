"""The webhook lane: ``POST /hooks/<route>`` and ``POST /api/process`` answered without
Flask's request machinery.

A webhook is the request the hub answers most, and the one whose cost decides how many a
machine takes. Flask's request context, URL matching, session, before- and after-request
hooks and response object were a quarter of an accepted webhook's CPU
(``python -m bench.ingest_cpu``). The lane sits in front of the Flask app as WSGI
middleware: a POST whose path is ``/hooks/<route>`` runs the same view code
(``hub.web.hooks.handle``: the same checks, limits, rows and answers) inside the app's
context only, and is answered with what the Flask face would send: the same status, JSON
body (compact, one line), ``X-Request-ID``, the same error answers (``hub.web.errors``) and
metrics. A POST to the seed's ``/api/process`` (a sync run: Flask's dispatch was a fifth of
its web side's CPU) goes the same way through ``hub.web.seed.process``. Every other
request, and every webhook path Flask would route otherwise (a trailing slash, an empty
name), goes to Flask as before.

The lane is not installed with HUB_OTEL=true: the Flask instrumentation's server span must
see every request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, g
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from hub.ops import logs, metrics
from hub.services import intake
from hub.web import errors, hooks, seed

PREFIX = "/hooks/"
SEED_PROCESS = "/api/process"
JSON = ("Content-Type", "application/json")


class HooksLane:
    """WSGI middleware: ``POST /hooks/<route>`` by ``hub.web.hooks.handle``; the rest to
    ``inner`` (the Flask app's own ``wsgi_app``)."""

    def __init__(self, app: Flask, inner: Callable[..., Iterable[bytes]]):
        self.app = app
        self.inner = inner
        # What Flask's JSON provider writes for a view's dict (compact unless debugging),
        # with an encoder made once, not one a response.
        provider = app.json
        self.encode = None
        if not app.debug and type(provider).dumps is DefaultJSONProvider.dumps:
            self.encode = json.JSONEncoder(
                separators=(",", ":"),
                ensure_ascii=provider.ensure_ascii,
                sort_keys=provider.sort_keys,
                default=provider.default,
            ).encode

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "POST":
            return self.inner(environ, start_response)
        if path == SEED_PROCESS:
            route_name, view = "process", seed.process
        elif path.startswith(PREFIX) and len(path) > len(PREFIX) and "/" not in path[len(PREFIX) :]:
            # Werkzeug's decoding of a path (WSGI gives it as latin-1 of its bytes).
            route_name = path[len(PREFIX) :].encode("latin-1").decode(errors="replace")
            view = hooks.handle
        else:
            return self.inner(environ, start_response)
        app = self.app
        with app.app_context():
            req = app.request_class(environ)
            rid = logs.request_id_from(req.headers.get(logs.REQUEST_ID_HEADER))
            g.hub_log_token = logs.bind(request_id=rid)  # unbound as the context ends
            try:
                try:
                    answer = view(hooks.incoming(route_name, req, rid), req)
                except Exception as exc:  # as the Flask face's error handlers answer it
                    answer = self.error_answer(exc)
                finally:
                    hooks.give_back_sync_slot(None)
                status, headers, body = self.render(answer)
            except Exception as exc:  # the answer itself failed: a 500 like Flask's
                status, headers, body = self.render(errors.unhandled(exc))
            headers.append((logs.REQUEST_ID_HEADER, rid))
            metrics.request_answered(status)
        start_response(STATUS_LINES.get(status) or _status_line(status), headers)
        return [body]

    @staticmethod
    def error_answer(exc: Exception) -> Any:
        """What the Flask face's error handlers answer for ``exc`` (hub.web.hooks' own, the
        seed's the same, then hub.web.errors')."""
        if isinstance(exc, intake.SyncBusy):
            return hooks.sync_busy_response(exc)
        if isinstance(exc, intake.RefusedAtCommit):
            return hooks.refused_at_commit_response(exc)
        if isinstance(exc, HTTPException):
            return errors.http_error(exc)
        return errors.unhandled(exc)

    def render(self, answer: Any) -> tuple[int, list[tuple[str, str]], bytes]:
        """A view's return value (``body``, ``(body, status)`` or ``(body, status,
        headers)``, the body a dict or a Response) as status, header list and bytes."""
        headers: Any = None
        if isinstance(answer, tuple):
            if len(answer) == 3:
                answer, status, headers = answer
            else:
                answer, status = answer
        else:
            status = None
        if isinstance(answer, dict) and self.encode is not None:
            text = self.encode(answer)
            body = f"{text}\n".encode()
            out = [JSON, ("Content-Length", str(len(body)))]
            if headers:
                out.extend((name, str(value)) for name, value in dict(headers).items())
            return status or 200, out, body
        response: Response = self.app.make_response(
            (answer, status, headers) if headers else (answer, status) if status else answer
        )
        body = b"".join(response.iter_encoded())
        out = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
        out.append(("Content-Length", str(len(body))))
        return response.status_code, out, body


def _status_line(status: int) -> str:
    """What Werkzeug's response says on its status line: ``202 ACCEPTED``."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'unknown').upper()}"


STATUS_LINES = {status: _status_line(status) for status in HTTP_STATUS_CODES}
