"""gunicorn settings for the hub; HUB_HOST, HUB_PORT, HUB_WEB_WORKERS and HUB_WEB_THREADS
(hub.config, like every setting) override them.

It ships inside the package: `hub serve` passes it to gunicorn as ``python:hub.gunicorn_conf``,
and the checkout's gunicorn.conf.py (Makefile, Dockerfile, tests) imports everything from it.

In production gunicorn sits behind nginx (deploy/nginx.conf), which reads each request
whole before passing it on: a gthread worker gives a connection a thread from its first
byte, so 16 clients sending a byte a second would otherwise hold all 2 x 8 threads.
"""

import errno
import os
import socket
import sys

from gunicorn.glogging import Logger

from hub.config import load_settings
from hub.ops.logs import choose_format, formatter

# Every setting is checked here, before gunicorn starts anything: a bad value stops it with
# one line per problem (SettingsError is a SystemExit, which gunicorn lets through).
_hub = load_settings()
bind = f"{_hub.host}:{_hub.port}"
workers = _hub.web_workers
threads = _hub.web_threads
# gunicorn's gthread worker whose own refusals (400, 414, 431 ...) are the hub's JSON
# (hub/web/gunicorn_worker.py), answering the webhooks it can on its loop (hub/web/loop.py).
worker_class = (
    "hub.web.loop.LoopWorker" if _hub.web_loop else "hub.web.gunicorn_worker.JsonRefusalWorker"
)
timeout = 60
graceful_timeout = 30
# An idle kept-alive connection waits in the worker's poller, not on a thread; short all
# the same, since a client that starts its next request slowly does take one.
keepalive = 2
# What a webhook needs, and no more: a short request line (a route and ?api_key=), a few
# dozen headers of at most 8 KiB each; past them gunicorn answers 414 / 431 / 400.
limit_request_line = 4094
limit_request_fields = 64
limit_request_field_size = 8190
# The access log names the path without its query string: `?api_key=` never reaches a log.
# This layout is the text format's; the JSON one has the same facts as fields.
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms %({x-request-id}o)s'
errorlog = "-"
loglevel = "info"


class EscapingLogger(Logger):
    """gunicorn's logger in the hub's format (HUB_LOG_FORMAT, as the hub decides it).

    ``json``: each access or error line is one JSON object; an access line carries the
    method, the path without its query (``?api_key=`` never reaches a log), the status, the
    bytes sent, the duration in ms and the request id the hub answered. ``text``: gunicorn's
    own lines, with a CR/LF or NUL from a URL or header written escaped. Either way a request
    can't forge a line of the access or error log.
    """

    def setup(self, cfg):
        super().setup(cfg)
        self.hub_format = choose_format(_hub.log_format, _hub.env)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False) and handler.formatter is not None:
                    plain = handler.formatter
                    handler.setFormatter(formatter(self.hub_format, plain._fmt, plain.datefmt))

    def access(self, resp, req, environ, request_time):
        if self.hub_format != "json":
            return super().access(resp, req, environ, request_time)
        if not self.access_log_enabled:
            return None
        try:
            message, fields = self._access_line(resp, environ, request_time)
            self.access_log.info("%s", message, extra={"hub_fields": fields})
        except Exception as exc:  # a line that can't be built is no reason to fail a request
            self.error("access log line not written (%s)", type(exc).__name__)
        return None

    @staticmethod
    def _access_line(resp, environ, request_time):
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        headers = resp.headers.items() if hasattr(resp.headers, "items") else resp.headers
        request_id = next((v for k, v in headers if k.lower() == "x-request-id"), None)
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
        fields = {
            "method": method,
            "path": path,
            "status": int(status) if str(status).isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 1),
            "remote_addr": environ.get("REMOTE_ADDR"),
        }
        if request_id:
            fields["request_id"] = request_id
        return f"{method} {path} {status}", fields


logger_class = EscapingLogger


def on_starting(server):
    """Check that the address is free, and build the app once in the master: a
    configuration error (production without HUB_SECRET_KEY) stops gunicorn with its
    message instead of failing every worker. Then the metrics directory (HUB_METRICS_DIR,
    or instance/metrics): made, emptied of the files of this host's processes no longer
    running, and named to the workers forked from here. A database nobody migrated is
    said at once too (requests that need it answer 503 until then). Last, the writer
    process (``start_the_writer``)."""
    from hub import create_app
    from hub.ops import metrics

    refuse_an_address_in_use(server)
    # Traces are each worker's own (HUB_OTEL): made here, the instrumentation would hold
    # this app's engine, not the worker's, and the exporter's thread would be the master's.
    app = create_app({"OTEL": False})
    metrics.prepare_directory(app)
    say_when_the_schema_is_behind(server, app)
    start_the_writer(server, app)


# The writer process of this master (hub/services/writer.py), when it runs one.
_writer = None


def start_the_writer(server, app):
    """The writer process that commits the web processes' new events, started before they
    are forked so that they find its socket. None with HUB_WRITER_PROCESS=false, nor with
    HUB_OTEL=true (a commit is a span of its request's trace only in the web process)."""
    global _writer
    if not _hub.writer_process or _hub.otel:
        return
    from hub.services.writer import Supervisor

    try:
        _writer = Supervisor(app.config["DATABASE_URL"], server.log)
        _writer.start()
    except (OSError, ValueError) as exc:  # no room for its socket: a read-only or long TMPDIR
        _writer = None
        server.log.warning(
            "writer process not started (%s): each web process commits its own events", exc
        )


def on_exit(server):
    """The writer stops last: it answers what the web processes sent before they ended."""
    if _writer is not None:
        _writer.stop()


def say_when_the_schema_is_behind(server, app):
    from hub.store.db import SCHEMA_OUTDATED, current_revision, head_revision

    db = app.extensions["hub.db"]
    try:
        behind = current_revision(db) != head_revision(db)
    except Exception as exc:  # unreachable: requests say so with 503 database_unavailable
        server.log.warning("database not checked at start (%s)", type(exc).__name__)
        return
    if behind:
        server.log.error("%s; until then requests that need it are answered 503", SCHEMA_OUTDATED)


def refuse_an_address_in_use(server):
    """A second hub on the same port stops at once with what to change. gunicorn itself
    would try five times a second apart and then say only "Can't connect"."""
    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS") or server.cfg.reuse_port:
        return  # sockets handed over (a re-exec, systemd), or shared on purpose
    for address in server.cfg.address:
        if not isinstance(address, tuple):
            continue  # a unix socket: gunicorn reports its own problems
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    continue
                host, port = address[:2]
                server.log.error(
                    "%s:%s is already in use (is the hub already running?): stop what listens "
                    "there, or set HUB_PORT to another port (HUB_HOST for the address; "
                    "gunicorn's --bind overrides both)",
                    host,
                    port,
                )
                sys.exit(1)


def post_worker_init(worker):
    """Each web process delivers async events on a thread of its own unless
    HUB_EMBEDDED_WORKER=false (then run `flask --app hub worker` processes beside it)."""
    from hub.ops import metrics
    from hub.services.delivery import start_embedded

    metrics.process_started("web")
    start_embedded(worker.wsgi)


def child_exit(server, worker):
    """A web process ended (or was killed): its live gauges go; its counts stay summed."""
    from hub.ops import metrics

    metrics.process_died(worker.pid)


def worker_exit(server, worker):
    embedded = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("hub.worker")
    if embedded is not None:
        embedded.stop(grace=float(worker.wsgi.config["WORKER_GRACE"]))
