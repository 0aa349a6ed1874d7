"""Real processes for end-to-end tests: gunicorn serving the hub, `flask --app hub worker`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# gunicorn's line once its socket is bound: the port it got when asked for port 0.
LISTENING_RE = re.compile(rb"Listening at: http://127\.0\.0\.1:(\d+)")


def closed_port() -> int:
    """A port nothing listens on right now, for a server that must be down or for nginx
    (which cannot bind port 0 and say which port it got). Another process may take it
    before it is used: a caller that binds it retries on "Address already in use"."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any HUB_* variable, plus ``extra``: a child process sees the
    settings its test gives it, never the developer's shell (HUB_STEP_TRIES=1 ...) nor a
    .env file in the checkout (read by the hub, and by `flask` itself)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(HUB_ENV_FILE="", FLASK_SKIP_DOTENV="1")
    env.update(extra)
    return env


def hub_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a hub process on ``database_url``; ``extra`` overrides."""
    defaults = {
        "HUB_DATABASE_URL": database_url,
        "HUB_SECRET_KEY": "test-secret-key-for-the-hub",
        "HUB_ALLOW_PRIVATE_TARGETS": "true",
        "PYTHONUNBUFFERED": "1",
    }
    return clean_env(**{**defaults, **extra})


def wait_until(check, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


@contextmanager
def gunicorn(
    database_url: str,
    log_path: Path,
    workers: int = 2,
    *,
    conf: Path = ROOT / "gunicorn.conf.py",
    app: str = "hub:create_app()",
    bin_dir: Path = BIN,
    cwd: Path = ROOT,
    command: list | None = None,
    own_metrics: bool = True,
    **env: str,
) -> Iterator[tuple[subprocess.Popen, str]]:
    """The hub under real gunicorn on 127.0.0.1; yields (process, base URL).

    ``bin_dir`` is the virtualenv whose gunicorn runs (this one by default), ``cwd`` where;
    ``command`` starts it another way (`hub serve ...`), with the same log and settings.
    ``own_metrics=False`` leaves the metrics directory to the hub's default.

    gunicorn binds port 0 and the test reads the port it got from its log, so two runs
    never race for a port. It runs without a control socket (one fixed path per user,
    which parallel runs would share), with a metrics directory of its own, and in a
    session of its own, so a test can SIGKILL the whole server (master and workers) with
    ``os.killpg``.
    """
    # Its own metrics directory, kept across restarts on one log: the default
    # (<instance>/metrics) is the checkout's, shared by every server the suite runs at once,
    # whose live gauges (hub_processes) would add up with this one's.
    if own_metrics:
        env.setdefault("HUB_METRICS_DIR", str(log_path.with_name(log_path.name + ".metrics")))
    log = open(log_path, "ab")  # noqa: SIM115 - closed below
    start = log.tell()  # a test may start gunicorn twice on one log: read this run's lines
    if command is None:
        command = [bin_dir / "gunicorn", "-c", conf, "--no-control-socket", app]
    proc = subprocess.Popen(
        [str(part) for part in command],
        cwd=cwd,
        env=hub_env(database_url, **{"HUB_PORT": "0", "HUB_WEB_WORKERS": str(workers), **env}),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def this_run() -> bytes:
        with open(log_path, "rb") as f:
            f.seek(start)
            return f.read()

    def still_running() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"gunicorn exited: {this_run()[-2000:].decode(errors='replace')}")

    def listening() -> str | None:
        still_running()
        match = LISTENING_RE.search(this_run())
        return f"http://127.0.0.1:{int(match.group(1))}" if match else None

    def healthy(base: str) -> bool:
        still_running()
        try:
            return requests.get(base + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        base = wait_until(listening, 30, what="gunicorn to bind its port")
        wait_until(lambda: healthy(base), 30, what="gunicorn to answer /health")
        yield proc, base
    finally:
        stop(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # any worker left behind
        log.close()


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid``: gunicorn's web processes and its writer."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry))
    return found


def is_writer(pid: int) -> bool:
    """Whether ``pid`` is a writer process (hub/services/writer.py)."""
    try:
        return b"hub.services.writer" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def web_processes(master: int) -> set[int]:
    """gunicorn's web processes: its master's children but the writer."""
    return {pid for pid in children(master) if not is_writer(pid)}


def worker(database_url: str, log_path: Path, concurrency: int = 1, **env: str):
    """A `flask --app hub worker` process (stop it with ``stop``)."""
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "flask"), "--app", "hub", "worker", "--concurrency", str(concurrency)],
            cwd=ROOT,
            env=hub_env(database_url, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


NGINX = Path("/usr/sbin/nginx")


def nginx_main_conf(folder: Path, site: Path) -> Path:
    """A minimal nginx.conf of a test's own under ``folder`` that reads ``site`` inside its
    http {} block, as Debian's /etc/nginx/nginx.conf and the nginx image's read conf.d/."""
    main = folder / "nginx.conf"
    temp_paths = "".join(
        f"    {kind}_temp_path {folder}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main.write_text(
        # As root nginx would run its workers as nobody, who can't read pytest's tmp_path.
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"worker_processes 1;\npid {folder}/nginx.pid;\n"
        + "events { worker_connections 2048; }\n"
        + "http {\n"
        + temp_paths
        + "    access_log off;\n"
        + f"    include {site};\n"
        + "}\n"
    )
    return main


@contextmanager
def nginx(config: Path, prefix: Path, base: str, ca: Path) -> Iterator[subprocess.Popen]:
    """Debian's nginx in the foreground with ``config`` (a whole nginx.conf) under ``prefix``;
    yields once ``base + "/health"`` answers through it over TLS (``ca`` signed its cert)."""
    log = open(prefix / "nginx.out", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(NGINX),
            "-c",
            str(config),
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-g",
            "daemon off;",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )

    def answering():
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {(prefix / 'error.log').read_text()[-2000:]}")
        try:
            return requests.get(base + "/health", timeout=2, verify=ca).ok
        except requests.RequestException:
            return False

    try:
        wait_until(answering, 15, what="nginx to answer /health")
        yield proc
    finally:
        stop(proc)
        log.close()
