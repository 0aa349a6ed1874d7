"""gunicorn settings for the hub; HUB_HOST, HUB_PORT and HUB_WEB_WORKERS override them.

In production gunicorn sits behind nginx (deploy/nginx.conf), which reads each request
whole before passing it on: a gthread worker gives a connection a thread from its first
byte, so 8 clients sending a byte a second would otherwise hold all 2 x 4 threads.
"""

import os

from gunicorn.glogging import Logger

from hub.logs import EscapingFormatter

bind = f"{os.environ.get('HUB_HOST', '127.0.0.1')}:{os.environ.get('HUB_PORT', '8000')}"
workers = int(os.environ.get("HUB_WEB_WORKERS", "2"))
threads = int(os.environ.get("HUB_WEB_THREADS", "4"))
worker_class = "gthread"
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
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
loglevel = "info"


class EscapingLogger(Logger):
    """gunicorn's logger with the hub's formatter: a CR/LF or NUL in a URL or header is
    written escaped, so a request can't forge a line of the access or error log."""

    def setup(self, cfg):
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False) and handler.formatter is not None:
                    plain = handler.formatter
                    handler.setFormatter(EscapingFormatter(plain._fmt, plain.datefmt))


logger_class = EscapingLogger


def on_starting(server):
    """Build the app once in the master: a configuration error (production without
    HUB_SECRET_KEY) stops gunicorn with its message instead of failing every worker. Then
    the metrics directory (HUB_METRICS_DIR, or instance/metrics): made, emptied of the files
    of this host's processes no longer running, and named to the workers forked from here."""
    from hub import create_app, metrics

    metrics.prepare_directory(create_app())


def post_worker_init(worker):
    """Each web process delivers async events on a thread of its own unless
    HUB_EMBEDDED_WORKER=false (then run `flask --app hub worker` processes beside it)."""
    from hub import metrics
    from hub.worker import start_embedded

    metrics.process_started("web")
    start_embedded(worker.wsgi)


def child_exit(server, worker):
    """A web process ended (or was killed): its live gauges go; its counts stay summed."""
    from hub import metrics

    metrics.process_died(worker.pid)


def worker_exit(server, worker):
    embedded = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("hub.worker")
    if embedded is not None:
        embedded.stop(grace=float(worker.wsgi.config["WORKER_GRACE"]))
