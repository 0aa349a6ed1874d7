"""Every HUB_* setting, in one typed model: its type, its bounds, its default and what it does.

``load_settings()`` reads them from the environment and from a ``.env`` file in the current
directory (the environment wins over the file, the file over the defaults), parses each one
strictly and stops the start with one line per bad value. ``create_app`` copies the result
into ``app.config`` under the names without the prefix (``app.config["SYNC_TIMEOUT"]``), which
is what the rest of the hub reads. ``python -m hub.config --markdown`` prints the configuration
table of docs/configuration.md from the same model, so the table is the model's own description;
without options (and as ``hub config``) it prints where the data directory, the database, the
secret key and the metrics are, then every effective setting, secrets masked.

A new setting is one field of ``Settings``: its type (one of the aliases below, or a plain
``str``), ``Field(default, description=...)``, and the table regenerated with
``python -m hub.config --readme docs/configuration.md``.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from hub.rates import normalise

PREFIX = "HUB_"
# Variables of the test suite and the benchmarks, read by them and never by the hub; and
# those of `hub listen`, a client of a running hub (its URL and the key it presents).
NOT_SETTINGS = ("HUB_TEST_", "HUB_BENCH_", "HUB_URL", "HUB_API_KEY")
ENV_FILE_VARIABLE = "HUB_ENV_FILE"

log = logging.getLogger("hub.config")


class SettingsError(SystemExit):
    """Stops the process with one line per bad setting: a configuration error, not a crash."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Expects:
    """What a type accepts, in words: the part of an error line after ``expected``."""

    def __init__(self, text: str):
        self.text = text


class Secret:
    """Marks a setting whose value may hold a password: an error never shows it."""


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_flag(value: object) -> bool:
    """true/false, 1/0, yes/no, on/off in any case (or a Python bool); ValueError otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("not a boolean")


def _number(value: object) -> object:
    # pydantic would take True for 1: a flag where a number belongs is a mistake.
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


def _unset_when_empty(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


def _rate(value: object) -> str:
    """A rate in its canonical spelling, or "" for off (empty, 0 or None)."""
    if value in (None, "", 0, "0"):
        return ""
    if not isinstance(value, str):
        raise ValueError("not a rate")
    return normalise(value.strip())


# The databases the hub runs on, with the drivers it ships (None: the URL names none).
DATABASE_DRIVERS = {"sqlite": (None, "pysqlite"), "postgresql": (None, "psycopg")}


def _database_url(value: str | None) -> str | None:
    if value is not None:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL") from None
        backend = "postgresql" if url.drivername == "postgres" else url.get_backend_name()
        driver = None if "+" not in url.drivername else url.get_driver_name()
        if driver not in DATABASE_DRIVERS.get(backend, ()):
            # Said before any connection: otherwise a missing driver module is the error.
            raise ValueError(f"{url.drivername}:// is not supported")
    return value


def _listen_url(value: str | None) -> str | None:
    if value is not None:
        from sqlalchemy.engine import make_url

        if not make_url(value).drivername.startswith(("postgresql", "postgres")):
            raise ValueError("not a PostgreSQL URL: LISTEN is PostgreSQL's")
    return value


def _redis_url(value: str | None) -> str | None:
    if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("not a Redis URL")
    return value


Flag = Annotated[
    bool, BeforeValidator(parse_flag), Expects("true or false (also 1/0, yes/no, on/off)")
]
Count = Annotated[int, BeforeValidator(_number), Field(ge=0), Expects("a whole number, 0 or more")]
Positive = Annotated[
    int, BeforeValidator(_number), Field(ge=1), Expects("a whole number, 1 or more")
]
Seconds = Annotated[
    float,
    BeforeValidator(_number),
    Field(gt=0, allow_inf_nan=False),
    Expects("a number of seconds, more than 0"),
]
SecondsOrZero = Annotated[
    float,
    BeforeValidator(_number),
    Field(ge=0, allow_inf_nan=False),
    Expects("a number of seconds, 0 or more"),
]
Share = Annotated[
    float,
    BeforeValidator(_number),
    Field(gt=0, le=1, allow_inf_nan=False),
    Expects("a number more than 0 and at most 1"),
]
RateOrOff = Annotated[
    str,
    BeforeValidator(_rate),
    Expects("a rate such as 30/minute (1 or more per second, minute or hour), or empty or 0"),
]
DatabaseUrl = Annotated[
    str | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(_database_url),
    Secret(),
    Expects(
        "a SQLite or PostgreSQL URL (the two databases the hub supports): "
        "sqlite:////absolute/path/hub.db, or postgresql://user:password@host:5432/db "
        "(postgres:// and postgresql+psycopg:// also)"
    ),
]
ListenUrl = Annotated[
    str | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(_database_url),
    AfterValidator(_listen_url),
    Secret(),
    Expects("a PostgreSQL URL such as postgresql://user:password@host:5432/db"),
]
# How HUB_DATABASE_URL reaches PostgreSQL: straight (or through a pooler in session mode),
# or through a pooler in transaction mode (PgBouncer's pool_mode = transaction).
Pooler = Annotated[
    Literal["none", "transaction"],
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
    Expects("none or transaction"),
]
RedisUrl = Annotated[
    str | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(_redis_url),
    Secret(),
    Expects("a Redis URL such as redis://host:6379/0"),
]
SecretText = Annotated[str | None, BeforeValidator(_unset_when_empty), Secret(), Expects("a text")]
Environment = Annotated[
    Literal["development", "production"],
    BeforeValidator(lambda v: v.strip().lower() if isinstance(v, str) else v),
    Expects("development or production"),
]
Port = Annotated[
    int, BeforeValidator(_number), Field(ge=0, le=65535), Expects("a port number, 0 to 65535")
]
JsonDepth = Annotated[
    int, BeforeValidator(_number), Field(ge=1, le=500), Expects("a whole number from 1 to 500")
]
Text = Annotated[str, Expects("a text")]
OptionalText = Annotated[str | None, BeforeValidator(_unset_when_empty), Expects("a text")]
PositiveOrUnset = Annotated[
    Positive | None, BeforeValidator(_unset_when_empty), Expects("a whole number, 1 or more")
]
LogFormat = Annotated[
    Literal["json", "text"] | None,
    BeforeValidator(lambda v: (v.strip().lower() or None) if isinstance(v, str) else v),
    Expects("json or text"),
]
Host = Annotated[str, Field(min_length=1), Expects("a host name or address")]
SessionSeconds = Annotated[
    int, BeforeValidator(_number), Field(ge=60), Expects("a whole number of seconds, 60 or more")
]


def _metrics_token(value: str | None) -> str | None:
    if value is not None and len(value) < 16:
        raise ValueError("shorter than 16 characters")
    return value


MetricsToken = Annotated[
    str | None,
    BeforeValidator(_unset_when_empty),
    AfterValidator(_metrics_token),
    Secret(),
    Expects("a random text of at least 16 characters"),
]
Directory = Annotated[str | None, BeforeValidator(_unset_when_empty), Expects("a directory")]
# The longest retention, the hub's default's or a route's (hub.services.retention): 100 years,
# the longest time the hub counts in (keys' lifetimes, dedup windows).
MAX_RETENTION_DAYS = 36_500
RetentionDays = Annotated[
    int,
    BeforeValidator(_number),
    Field(ge=0, le=MAX_RETENTION_DAYS),
    Expects(f"a whole number of days, 0 (keep every one) to {MAX_RETENTION_DAYS}"),
]
PurgeBatch = Annotated[
    int, BeforeValidator(_number), Field(ge=1, le=10_000), Expects("a whole number, 1 to 10000")
]


class Settings(BaseSettings):
    """The hub's settings. Each field is the variable HUB_<NAME>; its description is its
    documentation (the configuration table of docs/configuration.md is generated from it)."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, case_sensitive=False, extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        # Overrides (create_app's config), then the environment, which read_env_file has
        # already filled from .env (so that code reading os.environ sees the file too).
        return init_settings, env_settings

    # --- where it runs ---
    env: Environment = Field(
        "development",
        description="`production` refuses to start without `HUB_SECRET_KEY`; `development` "
        "makes a key once in the data directory (`HUB_DATA_DIR`)",
    )
    data_dir: Directory = Field(
        None,
        description="directory of what the hub keeps on this machine: the embedded SQLite "
        "database (`hub.db`), the development secret key (`secret_key`) and the metrics "
        "directory (`metrics`); `hub config` prints where each one is",
        json_schema_extra={
            "shown": "`instance/` in a source checkout; for an installed hub "
            "`$XDG_DATA_HOME/webhook-hub` (`~/.local/share/webhook-hub`)"
        },
    )
    env_file: Text = Field(
        ".env",
        description="file of `NAME=value` lines read at start, relative to the current "
        "directory, when it exists; a variable set in the environment wins over the file. "
        "Empty reads no file",
    )
    log_format: LogFormat = Field(
        None,
        description="log lines, the hub's and gunicorn's: `json` (one object per line, with "
        "the request id, route, event id and key prefix where known) or `text` (for a "
        "terminal)",
        json_schema_extra={"shown": "`json` when `HUB_ENV=production`, else `text`"},
    )
    database_url: DatabaseUrl = Field(
        None,
        description="SQLAlchemy URL of the database; `postgresql://user@host/db` uses psycopg 3",
        json_schema_extra={"shown": "SQLite `hub.db` in `HUB_DATA_DIR`"},
    )
    secret_key: SecretText = Field(
        None,
        description="encrypts route secrets; required when `HUB_ENV=production`",
        json_schema_extra={"shown": "made in `HUB_DATA_DIR` in development"},
    )
    host: Host = Field("127.0.0.1", description="address gunicorn (`make run`) listens on")
    port: Port = Field(8000, description="port gunicorn (`make run`) listens on")
    web_workers: Positive = Field(2, description="gunicorn processes")
    web_threads: Positive = Field(
        8,
        description="threads of each gunicorn process: more of them share each commit of "
        "webhooks (8 took 10-20 % off a webhook's CPU against 4, with 16 clients)",
    )
    web_loop: Flag = Field(
        True,
        description="answer a webhook that writes only its new rows on its gunicorn "
        "process's event loop, without a request thread, while the writer process commits "
        "it ([Performance](performance.md)); `false`: every request on a thread",
    )
    embedded_worker: Flag = Field(
        True,
        description="deliver async events on 2 threads inside each web process; `false` when "
        "`flask --app hub worker` processes run beside gunicorn",
    )
    writer_process: Flag = Field(
        True,
        description="commit the new events of every gunicorn process in one writer process "
        "that gunicorn's master starts, and starts again if it ends; a web process commits "
        "its own while the writer can't be reached. `false`: each web process commits its "
        "own ([Performance](performance.md))",
    )
    writer_timeout: Seconds = Field(
        30.0,
        description="seconds a web process waits for the writer process to commit an event "
        "before committing it itself (unless the writer did)",
    )
    connectors: Text = Field(
        "",
        description="comma list of the connectors to load (built-in or installed); empty "
        "loads every one",
        json_schema_extra={"shown": "all"},
    )
    allow_private_targets: Flag = Field(
        False, description="let connectors call loopback and private addresses"
    )

    # --- the front door ---
    max_body_bytes: Count = Field(
        1024 * 1024,
        description="largest body accepted on `/hooks` and `/api`; a larger one is answered "
        "413 unread (keep nginx's `client_max_body_size` equal)",
    )
    max_json_depth: JsonDepth = Field(
        100,
        description="deepest nesting of objects and arrays in a body (400 `too_deep`) or a "
        "step's output (the step fails); 1 to 500",
    )
    trusted_proxies: Count = Field(
        0,
        description="reverse proxies in front that append to `X-Forwarded-For`; the client "
        "address is the Nth entry from the right. 0: the socket peer, and the header is never "
        "believed. Set it behind nginx, or every request shares the proxy's address",
    )
    refusal_limit: RateOrOff = Field(
        "30/minute",
        description="refused requests one address may make per window before its further "
        "requests are answered 429 unread and unlogged (a valid key still passes); empty or "
        "`0` turns the limit off",
    )
    refused_body_bytes: Count = Field(
        256,
        description="bytes of a refused request's body kept on its event (its size is always kept)",
    )
    max_challenge_bytes: Positive = Field(
        512,
        description="longest challenge a provider's handshake may ask the hub to echo (Dropbox's "
        "and Meta's GET, Twitch's): a longer one is answered 400 `challenge_too_long`",
    )
    jwks_cache_seconds: Seconds = Field(
        3600.0,
        description="how long a key set fetched from a route's `jwks_url` is used before it is "
        "fetched again (sooner when a signature no cached key verifies, at most every 30 s)",
    )
    jwks_max_bytes: Positive = Field(
        65536,
        description="largest key set read from a route's `jwks_url`; a larger one is not used "
        "and its requests are answered 503 `keys_unavailable`",
    )
    refused_headers: Count = Field(20, description="headers kept on a refused request's event")
    refused_header_bytes: Count = Field(
        2048, description="bytes of header names and values kept on a refused request's event"
    )
    stored_headers: Count = Field(100, description="headers kept on an accepted event")
    stored_header_bytes: Count = Field(
        32768, description="bytes of header names and values kept on an accepted event"
    )
    route_schema_max_bytes: Positive = Field(
        65536,
        description="largest JSON Schema a route may hold (`schema`, as compact JSON): a "
        "larger one is refused when the route is saved",
    )
    route_cache_seconds: SecondsOrZero = Field(
        5.0,
        description="how long ingest and workers remember a route: a change made in another "
        "process takes effect within this time, one made through this process at once",
    )
    redis_url: RedisUrl = Field(
        None,
        description="count rate limits in this Redis instead of the database",
    )
    rate_limit_prefix: Text = Field("hub:rl:", description="prefix of the rate-limit keys in Redis")

    # --- metrics (hub/ops/metrics.py, docs/operations.md "Metrics") ---
    metrics_dir: Directory = Field(
        None,
        description="directory where every process of one deployment (gunicorn's workers, "
        "`flask --app hub worker` processes) keeps its counts for `/metrics` to add up; they "
        "must all share it",
        json_schema_extra={
            "shown": "`metrics` in `HUB_DATA_DIR` under gunicorn and the worker command; "
            "in memory otherwise"
        },
    )
    metrics_token: MetricsToken = Field(
        None,
        description="bearer token Prometheus presents to `GET /metrics`; unset, only an admin "
        "API key reads the metrics",
    )

    # --- traces (hub/ops/tracing.py, docs/tracing.md) ---
    otel: Flag = Field(
        False,
        description="OpenTelemetry traces of each webhook, from its request to each "
        "destination's call, exported as the standard `OTEL_*` variables say (needs "
        "`pip install 'webhook-hub[otel]'`); off, no OpenTelemetry module is loaded",
    )

    # --- running steps ---
    sync_timeout: Seconds = Field(
        25.0,
        description="seconds a sync route may spend running its steps before it answers 504; "
        "a step still running then is stopped",
    )
    sync_runs_per_route: PositiveOrUnset = Field(
        None,
        description="requests of one sync route that run their steps at once in each web "
        "process; one more waits `HUB_SYNC_BUSY_WAIT`, then is answered `503 sync_busy` with "
        "`Retry-After` (and recorded), so a slow receiver can't take every thread from the "
        "other routes",
        json_schema_extra={"shown": "half of `HUB_WEB_THREADS`, at least 1"},
    )
    sync_busy_wait: SecondsOrZero = Field(
        0.1,
        description="seconds a request to a sync route already running "
        "`HUB_SYNC_RUNS_PER_ROUTE` requests waits for one of them to end before it is answered "
        "`503 sync_busy`: a burst to a fast route queues, one to a slow route is turned away",
    )
    sync_lease_margin: SecondsOrZero = Field(
        30.0,
        description="seconds past `HUB_SYNC_TIMEOUT` after which a sync event whose process "
        "died is marked `failed` by a worker",
    )
    listen_wait: SecondsOrZero = Field(
        20.0,
        description="most seconds one `hub listen` poll waits for an event before it is "
        "answered with none; below nginx's `proxy_read_timeout` (35 s in deploy/nginx.conf)",
    )
    listen_streams_per_key: Positive = Field(
        2,
        description="`hub listen` polls one key may hold open at once in each web process; "
        "one more is answered `429 too_many_listeners` (all keys together hold at most half "
        "of `HUB_WEB_THREADS`)",
    )
    listen_settle: SecondsOrZero = Field(
        1.0,
        description="seconds an accepted event waits before `hub listen` hands it out, so "
        "that a listener's cursor never passes an event a concurrent request has yet to commit",
    )
    step_tries: Positive = Field(
        3, description="quick tries of a step inside one attempt, for transient errors"
    )
    template_timeout: Seconds = Field(
        2.0,
        description="seconds one step's templates (or a route filter) may take to render; past "
        "it the step fails, permanent (`422 template_limit` on a sync route)",
    )
    template_max_output: Count = Field(
        1024 * 1024,
        description="characters a step's rendered templates, and any value built on the way, "
        "may reach",
    )
    max_response_bytes: Count = Field(
        10 * 1024 * 1024,
        description="bytes of a receiver's answer a connector reads; past it the call fails, "
        "permanent (`response_too_large`), and the rest is never read",
    )
    attempt_copy_bytes: Count = Field(
        4096,
        description="bytes of a request or response kept (redacted) in an attempt row; HTTP "
        "calls are cut at 4 KiB before that",
    )
    attempt_headers: Count = Field(
        50,
        description="headers of a request or response kept (redacted) in an attempt row; "
        "the rest are counted, not kept",
    )
    attempt_header_bytes: Count = Field(
        8192,
        description="bytes of header names and values kept for a request or response in an "
        "attempt row; a value past it is cut short with a mark",
    )

    # --- workers ---
    lease_seconds: Seconds = Field(
        300.0,
        description="seconds a worker owns a claimed event; past it another worker may claim "
        "it again",
    )
    worker_max_idle: Seconds = Field(
        2.0,
        description="longest pause of an idle worker between looks for due events (it backs "
        "off to this)",
    )
    worker_route_share: Share = Field(
        0.75,
        description="the largest share of a worker process's delivery threads (`--concurrency`) "
        "one destination of a route may hold at once, at least one thread, until its "
        "deliveries prove quick (under 0.5 s): the others stay free for other destinations, so "
        "a slow receiver cannot take them all (the name is older than destinations; a route of "
        "one destination holds what it held)",
    )
    worker_grace: SecondsOrZero = Field(
        25.0,
        description="seconds a stopping worker waits for its in-flight deliveries before "
        "handing them back",
    )

    # --- retention (hub/services/retention.py, docs/retention.md) ---
    retention_days: RetentionDays = Field(
        0,
        description="days a finished event is kept, with its deliveries and attempts, on "
        "routes whose `retention_days` is not set; the workers purge older ones. 0 keeps "
        "them until `hub events purge` deletes them, as before routes had a retention",
    )
    retention_interval: Seconds = Field(
        300.0,
        description="seconds between two purge passes; worker processes take turns (one "
        "pass at a time across every process), and a pass deletes all that is due",
    )
    retention_batch: PurgeBatch = Field(
        500,
        description="events deleted (with their deliveries and attempts) in one purge "
        "transaction: the longest any row lock of the purge is held is one batch's",
    )
    retention_pause: SecondsOrZero = Field(
        0.01,
        description="seconds a purge pass rests between two batches, leaving the database "
        "to ingest and delivery",
    )

    # --- alerts ---
    alert_interval: Seconds = Field(
        5.0,
        description="seconds between two evaluations of the alert rules; worker processes "
        "take turns (one evaluation per interval across every process), and each message "
        "is sent from a thread of its own",
    )
    alert_max_channels: Positive = Field(
        50,
        description="alert channels an admin may define (each is listed whole, and every "
        "alert goes to each)",
    )
    alert_max_rules: Positive = Field(
        100,
        description="alert rules an admin may define (each is listed whole, and evaluated "
        "every HUB_ALERT_INTERVAL)",
    )
    alert_send_timeout: Seconds = Field(
        10.0,
        description="seconds one try of sending an alert may take (a webhook, Slack or SMTP "
        "call); three tries at most",
    )
    public_url: OptionalText = Field(
        None,
        description="the address the hub is reached at, such as `https://hooks.example.com`: "
        "alerts then link to the dashboard's page of their route, and providers that sign the "
        "URL (Twilio) are checked against it plus the request's path, unless the route's "
        "`url` option says otherwise. Unset, alerts name the route only",
    )

    # --- the database ---
    db_connect_timeout: Seconds = Field(
        5.0,
        description="seconds to wait for a PostgreSQL connection before the request answers 503",
    )
    database_pooler: Pooler = Field(
        "none",
        description="`transaction` when `HUB_DATABASE_URL` goes through a pooler in transaction "
        "mode (PgBouncer's `pool_mode = transaction`): the hub then prepares no statement on "
        "the server (one prepared on one server connection is unknown to the next), and "
        "workers LISTEN on `HUB_DATABASE_LISTEN_URL`, or without it look for events every "
        "`HUB_WORKER_MAX_IDLE`. `none`: PostgreSQL itself, or a pooler in session mode "
        "([Scaling](scaling.md))",
    )
    database_listen_url: ListenUrl = Field(
        None,
        description="PostgreSQL URL of each worker process's one LISTEN connection (a new event "
        "wakes an idle worker at once): the server itself, when `HUB_DATABASE_URL` goes "
        "through a transaction pooler, which drops notifications",
        json_schema_extra={
            "shown": "`HUB_DATABASE_URL`; none when `HUB_DATABASE_POOLER=transaction`"
        },
    )
    db_retry_after: Count = Field(
        5, description="`Retry-After` seconds on the 503 answered while the database is unavailable"
    )

    # --- the admin API ---
    # 2,000 bodies of 1.5 KB: 36-46 ms p50 a call on PostgreSQL and SQLite; 10,000 took
    # 131-175 ms (bench/admin_scale.py), over the listing's 60 ms target.
    admin_search_window: Positive = Field(
        2_000,
        description="events the admin listing looks at per call when no one index answers "
        "it (a body search `q`, or two or more of route, status, reason, key, request_id); "
        "past them it hands a cursor",
    )
    admin_replay_max: Positive = Field(
        10_000,
        description="matching events one bulk replay call looks at; `next_cursor` continues",
    )
    admin_stats_max_rows: Positive = Field(
        100_000, description="newest events of the window the admin statistics are computed over"
    )

    # --- the dashboard ---
    dashboard: Flag = Field(
        True,
        description="serve the [dashboard](admin.md#dashboard); `false` leaves it out (its "
        "paths and `/` answer 404)",
    )
    dashboard_prefix: Text = Field(
        "/dashboard",
        description="path the dashboard is served under (such as `/admin/ui`); `/` redirects there",
    )
    dashboard_session_seconds: SessionSeconds = Field(
        8 * 3600,
        description="how long a dashboard sign-in lasts (at least 60); signing out or revoking "
        "the key ends it sooner",
    )
    dashboard_overview_max_rows: Positive = Field(
        20_000,
        description="newest events of the last hour the overview counts and charts (a busier "
        "hour says so)",
    )

    # --- the audit log ---
    audit_retention_days: RetentionDays = Field(
        365,
        description="days an entry of the [audit log](audit.md) is kept: the workers delete "
        "older ones (one look an hour per worker process); `0` keeps every entry. Nothing "
        "else deletes an entry",
    )

    def as_config(self) -> dict[str, Any]:
        """The values under the names ``app.config`` uses (``SYNC_TIMEOUT``)."""
        return {name.upper(): value for name, value in self.model_dump().items()}


def variable(field: str) -> str:
    return PREFIX + field.upper()


def is_setting(name: str) -> bool:
    """Whether ``name`` (an ``app.config`` key such as ``SYNC_TIMEOUT``) is one of the settings."""
    return name.lower() in Settings.model_fields


def _marker(field: str, kind: type) -> Any:
    return next((m for m in Settings.model_fields[field].metadata if isinstance(m, kind)), None)


def _problem(error: Mapping[str, Any]) -> str:
    field = str(error["loc"][0]) if error.get("loc") else ""
    if field not in Settings.model_fields:
        return f"settings: {error['msg']}"
    expects = _marker(field, Expects)
    line = f"{variable(field)}: expected {expects.text if expects else error['msg']}"
    if _marker(field, Secret):
        return line + " (the value is not shown)"
    return f"{line}, got {error.get('input')!r}"


def read_env_file(environ: MutableMapping[str, str] | None = None) -> Path | None:
    """Put the ``.env`` file's variables into the environment where it has none of that name,
    so that everything that reads the environment (the settings, a connector's API key, a
    route's ``secrets_env``) sees the same values, under gunicorn as under ``flask``."""
    environ = os.environ if environ is None else environ
    name = environ.get(ENV_FILE_VARIABLE, Settings.model_fields["env_file"].default)
    path = Path(name) if name else None
    if path is None or not path.is_file():
        if path is not None and ENV_FILE_VARIABLE in environ:  # named, so meant to be there
            raise SettingsError([f"{ENV_FILE_VARIABLE}: expected a file that exists, got {name!r}"])
        return None
    from dotenv import dotenv_values

    for key, value in dotenv_values(path).items():
        if value is not None:
            environ.setdefault(key, value)
    return path


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    """The settings from the environment (and ``.env``), with ``overrides`` (Python values
    under their ``app.config`` names, as tests pass them) on top; SettingsError when any is bad.
    """
    read_env_file()
    given = {k.lower(): v for k, v in (overrides or {}).items() if is_setting(k)}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = list(dict.fromkeys(_problem(e) for e in exc.errors()))
        raise SettingsError(problems) from None


# Settings the hub once had, with why each went: a deployment that still sets one is told.
RETIRED = {
    "HUB_KEY_CACHE_SECONDS": "a revoked key is refused at once in every process (an admin's "
    "request reads its key, a webhook's commit checks it), so no key is kept for a time",
}


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A sentence for each HUB_* variable that is no setting (a typo), naming the nearest."""
    environ = os.environ if environ is None else environ
    known = [variable(f) for f in Settings.model_fields]
    found = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper.startswith(NOT_SETTINGS) or upper in known:
            continue
        if upper in RETIRED:
            found.append(f"{name} is no longer a setting and is ignored: {RETIRED[upper]}")
            continue
        nearest = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {nearest[0]}?" if nearest else ""
        found.append(f"{name} is not a setting of the hub and is ignored{hint}")
    return found


_warned: set[str] = set()


def warn_unknown_variables() -> None:
    """Log each unknown HUB_* variable once per process (gunicorn's workers inherit the
    master's memory, so a server says it once, not once per worker)."""
    for message in unknown_variables():
        if message not in _warned:
            _warned.add(message)
            log.warning("%s", message)


def flag_from_environment(field: str) -> bool:
    """A boolean setting read from the environment now (for code that runs without an app,
    such as a connector's own test); a value that does not parse counts as the default."""
    try:
        return parse_flag(os.environ[variable(field)])
    except (KeyError, ValueError):
        return bool(Settings.model_fields[field].default)


# --- the docs' table --------------------------------------------------------------------------

TABLE_START = "<!-- settings table: generated by `python -m hub.config --markdown` -->"
TABLE_END = "<!-- end of settings table -->"


def _shown_default(field: str) -> str:
    info = Settings.model_fields[field]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "shown" in extra:
        return str(extra["shown"])
    value = info.default
    if value is None:
        return "unset"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def markdown_table() -> str:
    rows = ["| Variable | Default | Effect |", "|---|---|---|"]
    for field, info in Settings.model_fields.items():
        text = (info.description or "").replace("|", "\\|")
        rows.append(f"| `{variable(field)}` | {_shown_default(field)} | {text} |")
    return "\n".join(rows)


def replace_table(readme: str) -> str:
    """``readme`` with the text between the table's markers replaced by the current table."""
    head, rest = readme.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}"


# --- where the database is ------------------------------------------------------------------


def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


# The folder a hub installed from a wheel keeps its data in, under the user's data directory:
# outside the virtualenv, so rebuilding the venv (or upgrading the hub) keeps them.
DATA_DIR_NAME = "webhook-hub"


def is_source_checkout() -> bool:
    """True when the hub runs from a checkout (an editable install or PYTHONPATH): its
    pyproject.toml is beside the package. A wheel's site-packages has none."""
    return (project_root() / "pyproject.toml").is_file()


def user_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_DATA_HOME/webhook-hub, or ~/.local/share/webhook-hub when XDG_DATA_HOME is unset
    or not absolute (the XDG rule); %LOCALAPPDATA%\\webhook-hub on Windows."""
    environ = os.environ if environ is None else environ
    if sys.platform == "win32" and environ.get("LOCALAPPDATA"):
        return Path(environ["LOCALAPPDATA"]) / DATA_DIR_NAME
    xdg = environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / DATA_DIR_NAME


def data_dir(configured: str | None = None) -> Path:
    """The one place that decides the data directory (Flask's instance folder): HUB_DATA_DIR
    (``configured``; None reads the settings, "" is unset), relative to the current
    directory, else the checkout's instance/ folder (where `make run` has always kept its
    database and key), else the user's data directory. Made if missing."""
    if configured is None:
        configured = load_settings().data_dir
    if configured:
        folder = Path(configured).expanduser().absolute()
    elif is_source_checkout():
        folder = project_root() / "instance"
    else:
        folder = user_data_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise SettingsError(
            [
                f"HUB_DATA_DIR: the data directory {folder} can't be made ({exc.strerror}); "
                "set HUB_DATA_DIR to a directory the hub may write in"
            ]
        ) from None
    return folder


def database_url(configured: str | None = None, instance_path: str | Path | None = None) -> str:
    """The one place that decides which database the hub talks to."""
    url = configured or load_settings().database_url
    if not url:
        folder = Path(instance_path) if instance_path else data_dir()
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'hub.db'}"
    # Plain postgres URLs mean the psycopg 3 driver the hub ships with.
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hub.config",
        description="Check the hub's settings and print them (secrets masked), or the "
        "table of them in docs/configuration.md.",
    )
    parser.add_argument("--markdown", action="store_true", help="print the settings table")
    parser.add_argument(
        "--readme", metavar="FILE", help="rewrite the table inside FILE (docs/configuration.md)"
    )
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table())
        return 0
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_table(path.read_text()))
        return 0
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 1
    for message in unknown_variables():
        print(f"warning: {message}", file=sys.stderr)
    # Comment lines first, so that the whole output still reads as a .env file.
    for what, where in places(settings):
        print(f"# {what}: {where}")
    for field, value in settings.model_dump().items():
        print(f"{variable(field)}={_masked(field, value)}")
    return 0


def places(settings: Settings) -> list[tuple[str, str]]:
    """Where this hub keeps its data, as ``hub config`` prints it: the data directory, the
    database (its URL without a password), the secret key (a file, or the setting: never its
    value) and the metrics directory."""
    folder = data_dir(settings.data_dir or "")
    if settings.secret_key:
        key = "HUB_SECRET_KEY"
    elif settings.env == "production":
        key = "none: HUB_ENV=production needs HUB_SECRET_KEY"
    else:
        key = str(folder / "secret_key")
    return [
        ("data directory", str(folder)),
        ("database", _without_password(database_url(settings.database_url, folder))),
        ("secret key", key),
        ("metrics directory", settings.metrics_dir or str(folder / "metrics")),
    ]


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _masked(field: str, value: object) -> str:
    """A value as ``python -m hub.config`` prints it: a URL without its password, a secret
    as ``(set)``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if not _marker(field, Secret):
        return str(value)
    parts = urlsplit(str(value))
    if not parts.scheme or not parts.netloc:
        return "(set)"
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts)


if __name__ == "__main__":
    sys.exit(main())
