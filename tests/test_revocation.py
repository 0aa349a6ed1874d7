"""Revocation is immediate everywhere: once the revocation of a key has answered, the key's
next request is 401 in every process, whichever one it reaches.

Real processes, as docs/operations.md deploys the hub: gunicorn with 2 worker processes and a
`flask --app hub worker`; the key is revoked through each face in turn (the admin API,
`keys revoke`, the dashboard). Before each revocation the key is used in BOTH gunicorn
processes (each connection's server-side socket is traced to the process that accepted
it, through /proc), so each process has seen it warm; after it, each process is asked
again, including to mint a new admin key with it. A key that expires meanwhile is
refused by both from the instant its expires_at passes.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import requests
from sqlalchemy import func, select

from hub.services.keys import create_key
from hub.store.db import Database
from hub.store.models import ApiKey, utcnow
from tests.procs import BIN, ROOT, gunicorn, hub_env, stop, wait_until, web_processes, worker

# Each round revokes through one face: the admin API, the CLI (a process of its own), the
# dashboard's Revoke button.
FACES = ("api", "cli", "dashboard")
TOKEN_RE = re.compile(r'name="csrf-token" content="([^"]+)"')
WARM_REQUESTS = 4  # per process, before each revocation
EXPIRES_IN = timedelta(seconds=4)  # enough to warm the key in both processes first


def worker_pids(master: int, expected: int = 2, wait: float = 15.0) -> set[int]:
    """gunicorn's worker processes: the children of its master, once ``expected`` of them
    have been forked (the master is listening before it has forked them all)."""
    deadline = time.monotonic() + wait
    while len(pids := web_processes(master)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server's end of the connection from ``client_port``."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return fields[9]
    return None


def owner(pids: set[int], inode: str) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def connection_to_each(
    port: int, pids: set[int], opened: list[http.client.HTTPConnection]
) -> dict[int, http.client.HTTPConnection]:
    """One open connection accepted by each gunicorn worker (new connections are made
    until every worker holds one; the others are closed). Each is also added to
    ``opened``, for the test to close whatever happens."""
    held: dict[int, http.client.HTTPConnection] = {}
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        opened.append(conn)
        conn.connect()
        client_port = conn.sock.getsockname()[1]

        def accepted_by(client_port=client_port):
            inode = socket_inode(port, client_port)
            return owner(pids, inode) if inode and inode != "0" else None

        pid = wait_until(accepted_by, 5, 0.005, "a gunicorn worker to accept the connection")
        if pid in held:
            conn.close()
        else:
            held[pid] = conn
        if len(held) == len(pids):
            return held
    raise AssertionError(f"no connection reached every worker: {sorted(held)} of {sorted(pids)}")


def answer(conn: http.client.HTTPConnection, method: str, path: str, key: str, body=None):
    """(status, JSON body) of one request on ``conn``."""
    headers = {"X-API-Key": key, "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


def call(conn: http.client.HTTPConnection, method: str, path: str, key: str, body=None) -> int:
    return answer(conn, method, path, key, body)[0]


def revoke_with_cli(database_url: str, prefix: str) -> None:
    done = subprocess.run(
        [str(BIN / "flask"), "--app", "hub", "keys", "revoke", prefix],
        cwd=ROOT,
        env=hub_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"revoked {prefix}" in done.stdout


def revoke_with_dashboard(base: str, admin_key: str, prefix: str) -> None:
    """Sign in to the dashboard with ``admin_key`` and press Revoke on the key ``prefix``."""
    with requests.Session() as browser:
        page = browser.get(f"{base}/dashboard/sign-in", timeout=10).text
        form = {"key": admin_key, "csrf_token": TOKEN_RE.search(page).group(1)}
        signed_in = browser.post(f"{base}/dashboard/sign-in", data=form, timeout=10)
        assert signed_in.status_code == 200 and signed_in.url.endswith("/dashboard/")
        token = TOKEN_RE.search(signed_in.text).group(1)
        revoked = browser.post(
            f"{base}/dashboard/keys/{prefix}/revoke", data={"csrf_token": token}, timeout=10
        )
        assert revoked.status_code == 200 and f"Key {prefix}" in revoked.text


def test_a_revoked_or_expired_admin_key_is_refused_at_once_by_every_process(
    database_url_for_test, tmp_path
):
    db = Database(database_url_for_test)
    with db.session() as session:  # the admin who revokes, through the API
        _, root = create_key(session, "root", admin=True)
    with gunicorn(database_url_for_test, tmp_path / "web.log", workers=2) as (web, base):
        delivery = worker(database_url_for_test, tmp_path / "worker.log")
        opened: list[http.client.HTTPConnection] = []
        try:
            port = int(base.rsplit(":", 1)[1])
            pids = worker_pids(web.pid)
            assert len(pids) == 2
            with db.session() as session:  # used in both processes now, expired by the end
                row, expiring = create_key(session, "expiring", expires_in=EXPIRES_IN, admin=True)
                expires_at = row.expires_at
            for conn in connection_to_each(port, pids, opened).values():
                for _ in range(WARM_REQUESTS):
                    assert call(conn, "GET", "/admin/api/keys", expiring) == 200
                conn.close()
            for round_, face in enumerate(FACES):
                with db.session() as session:
                    row, victim = create_key(session, f"victim-{round_}", admin=True)
                    prefix = row.prefix
                held = connection_to_each(port, pids, opened)
                for conn in held.values():  # each process has verified the key, recently
                    for _ in range(WARM_REQUESTS):
                        assert call(conn, "GET", "/admin/api/keys", victim) == 200
                if face == "api":
                    revoker = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    opened.append(revoker)
                    assert call(revoker, "DELETE", f"/admin/api/keys/{prefix}", root) == 200
                elif face == "cli":
                    revoke_with_cli(database_url_for_test, prefix)
                else:
                    revoke_with_dashboard(base, root, prefix)
                revoked_at = time.monotonic()
                # The first requests after the answer, in each process: on the kept-alive
                # connections after the API's quick answer, else on new ones to each process
                # (a kept-alive connection is closed after 2 s idle).
                after = held if face == "api" else connection_to_each(port, pids, opened)
                for pid, conn in after.items():
                    mint = {"name": "minted", "admin": True}
                    assert call(conn, "POST", "/admin/api/keys", victim, mint) == 401, pid
                    assert call(conn, "GET", "/admin/api/keys", victim) == 401, pid
                for conn in {*held.values(), *after.values()}:
                    conn.close()
                assert time.monotonic() - revoked_at < 8  # inside the old 10 s cache
            # The expiring key, once its expires_at has passed: refused in each process.
            time.sleep(max(0.0, (expires_at - utcnow()).total_seconds() + 0.05))
            for pid, conn in connection_to_each(port, pids, opened).items():
                mint = {"name": "minted", "admin": True}
                assert call(conn, "POST", "/admin/api/keys", expiring, mint) == 401, pid
                status, body = answer(conn, "GET", "/admin/api/keys", expiring)
                assert (status, body["error"]) == (401, "API key has expired"), pid
                conn.close()
            with db.session() as session:
                minted = session.scalar(
                    select(func.count()).select_from(ApiKey).where(ApiKey.name == "minted")
                )
            assert minted == 0
            assert delivery.poll() is None  # the worker process ran beside them throughout
        finally:
            for conn in opened:
                conn.close()
            stop(delivery)
            db.dispose()
