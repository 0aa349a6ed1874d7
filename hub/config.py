"""Defaults for every setting; each can be overridden by an HUB_* environment variable.

``app.config.from_prefixed_env("HUB")`` reads HUB_DATABASE_URL into DATABASE_URL and so on,
parsing values as JSON where they parse (HUB_MAX_BODY_BYTES=2048 is an int).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS: dict[str, object] = {
    # SQLAlchemy URL; None means the embedded SQLite file instance/hub.db.
    "DATABASE_URL": None,
    # Seconds to wait for a PostgreSQL connection before the request answers 503.
    "DB_CONNECT_TIMEOUT": 5,
    # Retry-After (seconds) on the 503 answered while the database is unreachable.
    "DB_RETRY_AFTER": 5,
    # Largest request body accepted on /hooks and /api; larger ones get 413 unread.
    "MAX_BODY_BYTES": 1024 * 1024,
    # Seconds a sync route may spend running its steps before it answers 504; a step still
    # running then (a slow receiver, a connector looping or sleeping) is stopped.
    "SYNC_TIMEOUT": 25.0,
    # Seconds past HUB_SYNC_TIMEOUT after which a sync event whose request never finished (its
    # process died) is marked failed by a worker's reaper.
    "SYNC_LEASE_MARGIN": 30.0,
    # Deepest nesting of objects and arrays accepted in a body or a step's output (at most 500).
    "MAX_JSON_DEPTH": 100,
    # Seconds one step's config templates (or a route filter) may take to render; past it
    # the step fails, permanent (a sync route answers 422 template_limit).
    "TEMPLATE_TIMEOUT": 2.0,
    # Characters a step's rendered templates (and any value built on the way) may reach.
    "TEMPLATE_MAX_OUTPUT": 1024 * 1024,
    # Bytes of a receiver's answer a connector reads; past it the call fails, permanent
    # (response_too_large), and the rest is never read.
    "MAX_RESPONSE_BYTES": 10 * 1024 * 1024,
    # Seconds a verified API key is remembered before the database is asked again.
    "KEY_CACHE_SECONDS": 10.0,
    # Seconds a route read by ingest or a worker is remembered: a change made in another
    # process takes effect within this time (at once in the process that made it).
    "ROUTE_CACHE_SECONDS": 5.0,
    # Comma list of connector names to load; empty loads every installed connector.
    "CONNECTORS": "",
    # Tries of one step inside one delivery attempt (tenacity), for transient errors.
    "STEP_TRIES": 3,
    # "production" refuses to start without HUB_SECRET_KEY; "development" makes one.
    "ENV": "development",
    # Log lines: "json" (one JSON object per line) or "text" (for a terminal); None means
    # json when HUB_ENV=production and text otherwise. gunicorn's lines follow it too.
    "LOG_FORMAT": None,
    # Redis for the shared rate-limit counters (redis://host:6379/0); None counts in the database.
    "REDIS_URL": None,
    # Prefix of the hub's rate-limit keys in Redis.
    "RATE_LIMIT_PREFIX": "hub:rl:",
    # Bytes of a request or response copied into an attempt row.
    "ATTEMPT_COPY_BYTES": 4096,
    # Seconds a worker owns a claimed event; past it, another worker may claim it again.
    "LEASE_SECONDS": 300.0,
    # Longest pause of an idle worker between looks for due events (it backs off to this).
    "WORKER_MAX_IDLE": 2.0,
    # Seconds a stopping worker waits for its in-flight deliveries before handing them back.
    "WORKER_GRACE": 25.0,
    # Run a delivery thread inside each web process (the embedded default of `make run`).
    "EMBEDDED_WORKER": True,
    # Rows the admin API's body search (?q=) looks at per page; past them it hands a cursor.
    "ADMIN_SEARCH_WINDOW": 10_000,
    # Matching events one bulk replay call looks at; next_cursor continues past them.
    "ADMIN_REPLAY_MAX": 10_000,
    # Newest events of the window the admin statistics are computed over.
    "ADMIN_STATS_MAX_ROWS": 100_000,
    # Refused requests one remote address may make per window ("30/minute") before its
    # further requests are answered 429 unread and unlogged; a valid API key still passes.
    # Empty or 0 turns the limit off.
    "REFUSAL_LIMIT": "30/minute",
    # Proxies in front of the hub that append to X-Forwarded-For; the client address is the
    # Nth entry from the right. 0: the socket peer, and X-Forwarded-For is never believed.
    "TRUSTED_PROXIES": 0,
    # Bytes of a refused request's body kept on its event (its size is always kept).
    "REFUSED_BODY_BYTES": 256,
    # Headers, and bytes of header names and values, kept on a refused request's event.
    "REFUSED_HEADERS": 20,
    "REFUSED_HEADER_BYTES": 2048,
    # Headers, and bytes of header names and values, kept on an accepted event.
    "STORED_HEADERS": 100,
    "STORED_HEADER_BYTES": 32768,
    # Metrics (hub/metrics.py; for the settings model to take over). The directory where
    # every process of one deployment (gunicorn's workers, `flask --app hub worker`
    # processes on the same host) keeps its counts for GET /metrics to add up; None: the
    # gunicorn server and the worker command use <instance>/metrics, anything else counts in
    # memory.
    "METRICS_DIR": None,
    # Bearer token Prometheus presents to GET /metrics (at least 16 characters); None: only
    # an admin API key may read the metrics.
    "METRICS_TOKEN": None,
}

ENV_PREFIX = "HUB"


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_instance_path() -> Path:
    return project_root() / "instance"


def database_url(configured: str | None = None, instance_path: str | Path | None = None) -> str:
    """The one place that decides which database the hub talks to."""
    url = configured or os.environ.get("HUB_DATABASE_URL")
    if not url:
        folder = Path(instance_path) if instance_path else default_instance_path()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'hub.db'}"
    # Plain postgres URLs mean the psycopg 3 driver the hub ships with.
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url
