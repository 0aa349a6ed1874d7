"""The receiver of the benchmarks' http drains: Debian's nginx on 127.0.0.1, answering
every request ``200 {"ok": true}`` from its config, with connections kept open.

The drain measures what the hub spends delivering through its ``http`` connector. A
receiver in production runs on machines of its own; here it shares the two cores with the
hub's workers and PostgreSQL, and what it spends is taken from them. The test servers'
Python receiver (``hub.testing_servers.Receiver``) spent about 0.28 ms of CPU a request
beside an http drain (25 % of a core at 900 deliveries a second), nginx's ``return``
0.036 ms (0.23 s of CPU for 6,400 deliveries). Every delivery is still checked exactly
once, from the attempt rows the hub wrote.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.procs import NGINX, closed_port, nginx_main_conf


def missing() -> str | None:
    """What the receiver needs and this machine lacks, as a sentence; None when ready."""
    if NGINX.exists() or shutil.which("nginx"):
        return None
    return "nginx is missing (the http drains' receiver): install Debian's nginx-light"


@contextmanager
def nginx_receiver() -> Iterator[str]:
    """nginx answering 200 on a port of 127.0.0.1; yields its base URL, once it answers."""
    folder = Path(tempfile.mkdtemp(prefix="hub-bench-receiver-"))
    binary = str(NGINX) if NGINX.exists() else shutil.which("nginx") or "nginx"
    for _ in range(5):  # another process may take the port between the look and the bind
        port = closed_port()
        site = folder / "receiver.conf"
        site.write_text(
            "server {\n"
            f"    listen 127.0.0.1:{port};\n"
            "    keepalive_requests 10000000;\n"
            "    client_body_buffer_size 1m;\n"
            "    location / {\n"
            "        default_type application/json;\n"
            "        return 200 '{\"ok\": true}';\n"
            "    }\n"
            "}\n"
        )
        main = nginx_main_conf(folder, site)
        command = [binary, "-c", str(main), "-p", str(folder), "-e", str(folder / "error.log")]
        proc = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        else:
            if proc.poll() is None:  # running, and not answering within 10 s
                proc.terminate()
                proc.wait(10)
            continue
        break
    else:
        raise SystemExit(f"nginx did not start: {(folder / 'error.log').read_text()[-500:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)
