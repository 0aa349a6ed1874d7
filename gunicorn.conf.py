"""gunicorn settings for the hub; HUB_HOST, HUB_PORT and HUB_WEB_WORKERS override them."""

import os

bind = f"{os.environ.get('HUB_HOST', '127.0.0.1')}:{os.environ.get('HUB_PORT', '8000')}"
workers = int(os.environ.get("HUB_WEB_WORKERS", "2"))
threads = int(os.environ.get("HUB_WEB_THREADS", "4"))
worker_class = "gthread"
timeout = 60
graceful_timeout = 30
keepalive = 5
# The access log names the path without its query string: `?api_key=` never reaches a log.
accesslog = "-"
access_log_format = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(B)s %(M)sms'
errorlog = "-"
loglevel = "info"


def on_starting(server):
    """Build the app once in the master: a configuration error (production without
    HUB_SECRET_KEY) stops gunicorn with its message instead of failing every worker."""
    from hub import create_app

    create_app()


def post_worker_init(worker):
    """Each web process delivers async events on a thread of its own unless
    HUB_EMBEDDED_WORKER=false (then run `flask --app hub worker` processes beside it)."""
    from hub.worker import start_embedded

    start_embedded(worker.wsgi)


def worker_exit(server, worker):
    embedded = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("hub.worker")
    if embedded is not None:
        embedded.stop(grace=float(worker.wsgi.config["WORKER_GRACE"]))
