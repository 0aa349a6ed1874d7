"""Prometheus metrics: what the hub counts, and the text GET /metrics answers (system.py),
the sum over every process of one deployment.

Counters and histograms are kept per process. Under gunicorn (several web processes) and
beside ``flask --app hub worker`` processes they live in prometheus_client's multiprocess
mode: each process writes its values to memory-mapped files named by its host and pid in
one shared directory, and whichever process answers a scrape adds every file up, those of
processes that have exited included (their counts are not lost). The directory is HUB_METRICS_DIR;
unset, gunicorn and the worker command use ``<instance>/metrics`` (so ``make run`` and a
worker started from the same checkout share it), and anything else (``flask run``, tests)
counts in memory, in its own process only. The gunicorn master empties the directory of
this host's processes no longer running when it starts; a process that ends takes its live
gauge (hub_processes) with it.

Queue depth and the age of the oldest due event are read from the database when scraped
(two or three indexed, bounded queries, remembered for QUEUE_CACHE_SECONDS), by the reading
function ``init_app`` is given: this module knows no table.

Label values never come from the network unchecked: a route label is the name of a route
that exists, or ``(unknown)``; every label value is cut to LABEL_MAX characters.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from flask import Flask, current_app
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from hub.ops import logs

log = logging.getLogger("hub.metrics")

UNKNOWN = "(unknown)"
LABEL_MAX = 64
# The queue queries count at most this many rows: a backlog larger than this reads as this.
QUEUE_COUNT_CAP = 100_000
# Seconds the queue gauges are remembered: a storm of scrapes costs one query per process.
QUEUE_CACHE_SECONDS = 2.0
# A connector call: from a local transform (milliseconds) to a slow model (a minute).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The files prometheus_client writes per process: <kind>_<pid>.db
# prometheus_client names a process's files <kind>_<identifier>.db; the hub's identifier is
# <host>-<pid>, so processes of several hosts or containers may share one directory (a
# volume) without two of them ever writing the same file.
HOST = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"
FILE_RE = re.compile(r"_([A-Za-z0-9.-]+)-(\d+)\.db$")
LIVE_GAUGE_PREFIX = "gauge_live"


def process_identifier(pid: int | None = None) -> str:
    """``<host>-<pid>``: this process's, or that of the process ``pid``. prometheus_client
    asks for this process's at every count (to notice a fork), so it is kept, and made
    again in a forked child."""
    return _own[0] if pid is None else f"{HOST}-{pid}"


def _identify() -> None:
    _own[0] = f"{HOST}-{os.getpid()}"


_own = [""]
_identify()
os.register_at_fork(after_in_child=_identify)


class Metrics:
    """The hub's counters, created once per process (see ``use``)."""

    def __init__(self) -> None:
        # registry=None: never in prometheus_client's global registry; a scrape builds its own.
        self.requests = Counter(
            "hub_http_requests",
            "Requests to /hooks/<route> and /api/..., by route and the HTTP status answered.",
            ["route", "status"],
            registry=None,
        )
        self.events = Counter(
            "hub_events",
            "Events that reached an end state, by route and status (rejected, duplicate, "
            "filtered, delivered, failed, dead).",
            ["route", "status"],
            registry=None,
        )
        self.refusals = Counter(
            "hub_refusals",
            "Requests turned away, by reason (unauthorized, unknown_route, too_large, ...).",
            ["reason"],
            registry=None,
        )
        self.attempts = Counter(
            "hub_attempts",
            "Connector calls, by connector and outcome (ok, retryable, permanent).",
            ["connector", "outcome"],
            registry=None,
        )
        self.attempt_seconds = Histogram(
            "hub_attempt_duration_seconds",
            "Duration of connector calls, by connector.",
            ["connector"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.breaker_openings = Counter(
            "hub_breaker_openings",
            "Times a destination's circuit breaker opened (by itself or by an admin), by "
            "route and destination.",
            ["route", "destination"],
            registry=None,
        )
        self.writer_fallbacks = Counter(
            "hub_writer_fallbacks",
            "New events a web process committed itself instead of through the writer "
            "process, by reason (unreachable: not running or restarting; lost: it ended "
            "before answering; failed: its write failed and was tried again here).",
            ["reason"],
            registry=None,
        )
        self.processes = Gauge(
            "hub_processes",
            "Hub processes running, by kind (web, worker, writer).",
            ["kind"],
            multiprocess_mode="livesum",
            registry=None,
        )

        # The children of attempts and attempt_seconds, by connector and outcome: taking
        # them by their labels again was a quarter of what counting a call cost.
        self.attempt_children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def all(self) -> list[Any]:
        return [
            self.requests,
            self.events,
            self.refusals,
            self.attempts,
            self.attempt_seconds,
            self.breaker_openings,
            self.writer_fallbacks,
            self.processes,
        ]


_lock = threading.Lock()
_metrics: Metrics | None = None
_directory: str | None = None


def use(directory: str | None) -> Metrics:
    """Decide where this process keeps its counts (a directory shared with the deployment's
    other processes, or None: memory) and create the counters; the first decision holds."""
    global _metrics, _directory
    directory = os.path.abspath(directory) if directory else None
    with _lock:
        if _metrics is not None:
            if directory and directory != _directory:
                log.warning("metrics already kept in %s; %s ignored", _directory, directory)
            return _metrics
        if directory:
            make_directory(directory)
            # prometheus_client names its files after this variable, and a child process
            # (a gunicorn worker forked from the master) inherits it.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
            values.ValueClass = values.MultiProcessValue(process_identifier)
        else:
            values.ValueClass = values.MutexValue
        _directory = directory
        _metrics = Metrics()
        return _metrics


def make_directory(directory: str) -> None:
    """The metrics directory, made if missing; a clear start-up error if it can't be used."""
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise ValueError(
            f"HUB_METRICS_DIR: expected a directory this process can write, shared by the "
            f"deployment's processes: {directory} ({exc.strerror or type(exc).__name__})"
        ) from None


def metrics() -> Metrics:
    """The counters; a process that never chose a directory counts in memory."""
    return _metrics if _metrics is not None else use(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def directory_for(app: Flask) -> str:
    """HUB_METRICS_DIR, or the default a server or worker process uses: <instance>/metrics."""
    return str(app.config.get("METRICS_DIR") or os.path.join(app.instance_path, "metrics"))


def label(value: object) -> str:
    return str(value)[:LABEL_MAX]


# --- what the hub counts (one call at each place where it happens) ---


def route_label() -> str:
    """The route of the request being answered, if it exists: intake binds it as
    ``known_route`` (hub.ops.logs) once found."""
    return label(logs.values().get("known_route") or UNKNOWN)


def event_ended(route: str | None, status: str, count: int = 1) -> None:
    """An event reached the end state ``status`` (the caller says only those). ``route`` is
    trusted: the name on an accepted event (a rejected one is counted by ``refused``)."""
    if count:
        metrics().events.labels(label(route or UNKNOWN), status).inc(count)


def breaker_opened(route: str, destination: str) -> None:
    """A destination's circuit opened."""
    metrics().breaker_openings.labels(label(route), label(destination)).inc()


def refused(reason: str, recorded_as: str | None) -> None:
    """A request turned away for ``reason``; ``recorded_as``: the status its event row was
    written with, or None when no row was written."""
    m = metrics()
    m.refusals.labels(label(reason)).inc()
    if recorded_as is not None:
        m.events.labels(route_label(), recorded_as).inc()


def attempt_done(connector: str, outcome: str, seconds: float) -> None:
    m = metrics()
    children = m.attempt_children.get((connector, outcome))
    if children is None:
        children = (
            m.attempts.labels(label(connector), label(outcome)),
            m.attempt_seconds.labels(label(connector)),
        )
        m.attempt_children[(connector, outcome)] = children
    children[0].inc()
    children[1].observe(max(seconds, 0.0))


def writer_fallback(reason: str) -> None:
    """A new event was committed by its web process, not the writer process, for ``reason``."""
    metrics().writer_fallbacks.labels(reason).inc()


def process_started(kind: str) -> None:
    """This process is a running web server, worker or writer (hub_processes)."""
    metrics().processes.labels(kind).set(1)


def process_died(pid: int) -> None:
    """A process of this deployment ended: its live gauges go (its counts stay)."""
    if _directory:
        mark_process_dead(process_identifier(pid), _directory)


def request_answered(status: int) -> None:
    """A /hooks or /api request was answered ``status`` (the web face calls it after each)."""
    metrics().requests.labels(route_label(), str(status)).inc()


# --- the directory, at a server's start ---


def prepare_directory(app: Flask) -> str:
    """For the gunicorn master, before it forks: the directory made, the files of this host's
    processes no longer running removed (a previous run's), and its path handed to the
    workers."""
    directory = os.path.abspath(directory_for(app))
    make_directory(directory)
    remove_ended(directory)
    os.environ["HUB_METRICS_DIR"] = directory
    use(directory)
    return directory


def ended_here(name: str) -> bool:
    """Whether the file ``name`` belongs to a process of this host that is no longer running
    (another host's processes can't be checked from here: their files stay)."""
    match = FILE_RE.search(name)
    return bool(match) and match.group(1) == HOST and not pid_running(int(match.group(2)))


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


def remove_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # another process removed it first
        os.remove(path)


def remove_ended(directory: str, live_gauges_only: bool = False) -> None:
    """Remove the files of this host's processes that are no longer running: all of them
    when a server starts, or only their live gauges (hub_processes) at each scrape, which
    is what a process that died without a goodbye (SIGKILL) would have removed itself;
    the counts of processes that ended are kept while the server runs."""
    for name in os.listdir(directory):
        if (not live_gauges_only or name.startswith(LIVE_GAUGE_PREFIX)) and ended_here(name):
            remove_quietly(os.path.join(directory, name))


class ProcessFiles(MultiProcessCollector):
    """Every process's files, added up, skipping a file caught in the instant between its
    creation and its first write (empty: nothing counted in it yet). prometheus_client
    reads such a file as corrupt and fails the whole scrape; a process starting while
    another answers a scrape makes one."""

    def collect(self):
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(FileNotFoundError):  # a live gauge of a process that ended
                if os.path.getsize(path) > 0:  # grows to its full size before its first value
                    files.append(path)
        return self.merge(files, accumulate=True)


# --- the queue, read from the database at scrape time ---


# (due, waiting, oldest due next_attempt_at): events due now and events waiting, each
# counted up to QUEUE_COUNT_CAP, and when the event due longest became due (None: none is).
QueueReading = tuple[int, int, datetime | None, int]


class QueueCollector(Collector):
    """hub_queue_* gauges from ``query`` (the database), remembered for ``ttl`` seconds."""

    def __init__(self, query: Callable[[], QueueReading], ttl: float = QUEUE_CACHE_SECONDS):
        self._query = query
        self.ttl = ttl
        self._lock = threading.Lock()
        self._read_at = -1e9
        self._read: QueueReading | None = None

    def read(self) -> QueueReading | None:
        """(due, waiting, oldest due next_attempt_at) or None when the database failed."""
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                try:
                    self._read = self._query()
                except Exception as exc:  # the scrape still answers, without these
                    log.warning("queue metrics: database unavailable (%s)", type(exc).__name__)
                    self._read = None
                self._read_at = time.monotonic()
            return self._read

    def collect(self):
        read = self.read()
        ok = GaugeMetricFamily(
            "hub_queue_query_ok", "1 when the queue gauges below could be read from the database."
        )
        ok.add_metric([], 1 if read is not None else 0)
        yield ok
        if read is None:
            return
        due, waiting, oldest, held = read
        yield GaugeMetricFamily(
            "hub_queue_due_events",
            f"Events due for delivery now (pending or retrying, their time come; at most "
            f"{QUEUE_COUNT_CAP}).",
            value=due,
        )
        yield GaugeMetricFamily(
            "hub_queue_waiting_events",
            f"Events waiting for delivery, due now or scheduled later (at most {QUEUE_COUNT_CAP}).",
            value=waiting,
        )
        yield GaugeMetricFamily(
            "hub_queue_held_deliveries",
            f"Deliveries held for a paused destination (at most {QUEUE_COUNT_CAP}).",
            value=held,
        )
        age = 0.0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
        yield GaugeMetricFamily(
            "hub_queue_oldest_due_age_seconds",
            "Seconds the longest-waiting due event has been due (0 when none is).",
            value=age,
        )


# The destinations whose state /metrics shows (those not active) are read up to this many.
DESTINATION_STATE_CAP = 1_000


class DestinationCollector(Collector):
    """hub_destination_state from ``query`` (the database: (route, destination, state) of
    the destinations not active), remembered for ``ttl`` seconds."""

    def __init__(
        self, query: Callable[[], list[tuple[str, str, str]]], ttl: float = QUEUE_CACHE_SECONDS
    ):
        self._query = query
        self.ttl = ttl
        self._lock = threading.Lock()
        self._read_at = -1e9
        self._read: list[tuple[str, str, str]] | None = None

    def read(self) -> list[tuple[str, str, str]] | None:
        with self._lock:
            if time.monotonic() - self._read_at >= self.ttl:
                try:
                    self._read = self._query()
                except Exception as exc:  # the scrape still answers, without these
                    log.warning(
                        "destination metrics: database unavailable (%s)", type(exc).__name__
                    )
                    self._read = None
                self._read_at = time.monotonic()
            return self._read

    def collect(self):
        read = self.read()
        if read is None:
            return
        gauge = GaugeMetricFamily(
            "hub_destination_state",
            "1 for each destination that is not active, by route, destination and state "
            "(paused, open, half_open); active ones are left out (at most "
            f"{DESTINATION_STATE_CAP}).",
            labels=["route", "destination", "state"],
        )
        for route, destination, state in read:
            gauge.add_metric([label(route), label(destination), label(state)], 1)
        yield gauge


# --- the scrape ---


def exposition() -> bytes:
    """Every metric in the Prometheus text format: this deployment's counters (summed over
    its processes' files, or this process's own) and the queue gauges."""
    registry = CollectorRegistry(auto_describe=False)
    if _directory:
        remove_ended(_directory, live_gauges_only=True)
        ProcessFiles(registry, path=_directory)
    else:
        for metric in metrics().all():
            registry.register(metric)
    registry.register(current_app.extensions["hub.metrics.queue"])
    destinations = current_app.extensions.get("hub.metrics.destinations")
    if destinations is not None:
        registry.register(destinations)
    return generate_latest(registry)


def init_app(
    app: Flask,
    read_queue: Callable[[int], QueueReading],
    read_destinations: Callable[[int], list[tuple[str, str, str]]] | None = None,
) -> None:
    """The counters' home (HUB_METRICS_DIR when set), the request counter, the queue
    collector reading the queue with ``read_queue(QUEUE_COUNT_CAP)``; system.py serves
    GET /metrics."""
    # HUB_METRICS_TOKEN, checked by the settings model (at least 16 characters).
    app.extensions["hub.metrics.token"] = app.config.get("METRICS_TOKEN") or None
    configured = app.config.get("METRICS_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        use(str(configured))
    app.extensions["hub.metrics.queue"] = QueueCollector(lambda: read_queue(QUEUE_COUNT_CAP))
    if read_destinations is not None:
        app.extensions["hub.metrics.destinations"] = DestinationCollector(
            lambda: read_destinations(DESTINATION_STATE_CAP)
        )
