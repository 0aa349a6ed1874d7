"""The front door: 200 clients sending headers or bodies a byte a second, with no key, don't
slow valid senders on the production setup, nginx (deploy/nginx.conf, the shipped file)
in front of gunicorn (gunicorn.conf.py, 2 workers x 4 threads). Straight at gunicorn the
same kind of load stalls every sender: that is why nginx is there."""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPSConnection
from pathlib import Path

import pytest
import requests

from hub.web.loop import IO_SECONDS
from tests.procs import NGINX, ROOT, closed_port, gunicorn, nginx, nginx_main_conf

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed: apt-get install nginx"),
]

SHIPPED = ROOT / "deploy" / "nginx.conf"


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: the test's own CA and server at once."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def render(folder: Path, listen_port: int, gunicorn_port: int, cert: Path, key: Path) -> Path:
    """The shipped file with only this test's ports and paths swapped in, inside a minimal
    nginx.conf of the test's own (Debian's /etc/nginx/nginx.conf is the production one)."""
    site = SHIPPED.read_text()
    swaps = {
        "listen 443 ssl;": f"listen 127.0.0.1:{listen_port} ssl;",
        "server 127.0.0.1:8000;": f"server 127.0.0.1:{gunicorn_port};",
        "/etc/ssl/hub/fullchain.pem": str(cert),
        "/etc/ssl/hub/privkey.pem": str(key),
        "/var/log/nginx/": f"{folder}/",
    }
    for old, new in swaps.items():
        assert old in site, f"deploy/nginx.conf no longer has {old!r}: update this test"
        site = site.replace(old, new)
    (folder / "hub.conf").write_text(site)
    return nginx_main_conf(folder, folder / "hub.conf")


class SlowClients:
    """Connections from addresses of their own (127.0.x.y: many senders, as an attacker
    with many machines has) that send one byte a second and never finish."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None):
        self.port, self.tls = port, tls
        self.pending: dict[socket.socket, bytes] = {}
        self.dropped = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._drip, daemon=True)

    def open(self, source: str, request: bytes, sent_at_once: int) -> None:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_hostname="127.0.0.1")
        sock.sendall(request[:sent_at_once])
        self.pending[sock] = request[sent_at_once:]

    def __enter__(self) -> SlowClients:
        return self

    def start(self) -> None:
        self.thread.start()

    def _drip(self) -> None:
        while not self.stopping.wait(1.0):
            for sock, rest in list(self.pending.items()):
                if not rest:
                    continue
                try:
                    sock.send(rest[:1])
                    self.pending[sock] = rest[1:]
                except OSError:
                    self.pending.pop(sock)
                    self.dropped += 1
                    sock.close()

    def connected(self) -> int:
        """How many are still open, as the server sees it (it has not closed them)."""
        alive = 0
        for sock in list(self.pending):
            sock.setblocking(False)
            try:
                alive += sock.recv(1) != b""
            except (BlockingIOError, ssl.SSLWantReadError):
                alive += 1
            except OSError:
                pass
            sock.setblocking(True)
        return alive

    def __exit__(self, *_exc) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(5)
        for sock in self.pending:
            with contextlib.suppress(OSError):
                sock.close()


def slow_header(route: str) -> bytes:
    return (
        f"POST /hooks/{route} HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        "Content-Length: 2\r\nUser-Agent: drip\r\nX-Filler: " + "x" * 60 + "\r\n\r\n{}"
    ).encode()


def slow_body(route: str) -> bytes:
    body = b'{"drip": "' + b"x" * 500 + b'"}'
    head = (
        f"POST /hooks/{route} HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def valid_senders(url: str, key: str, verify: Path | bool, threads=4, each=10, timeout=5.0):
    """Post ``threads x each`` valid webhooks; the (status or exception name, seconds) of each.
    A thread stops at its first failure (a stalled server need not be waited on ten times)."""
    results: list[tuple[object, float]] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        with requests.Session() as http:
            for n in range(each):
                started = time.monotonic()
                try:
                    r = http.post(
                        url,
                        json={"text": f"sender {index} webhook {n}"},
                        headers={"X-API-Key": key},
                        timeout=timeout,
                        verify=verify,
                    )
                    outcome: object = (r.status_code, r.json().get("result"))
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                with lock:
                    results.append((outcome, time.monotonic() - started))
                if isinstance(outcome, str):
                    return  # stalled: one is enough to tell

    workers = [threading.Thread(target=send, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout * each + 10)
    return results


@dataclass
class FrontDoor:
    front: str  # https through nginx
    direct: str  # gunicorn itself
    listen: int
    gunicorn_port: int
    cert: Path
    tls: ssl.SSLContext
    key: str


@pytest.fixture
def front_door(database_url_for_test, make_key, add_route, tmp_path) -> Iterator[FrontDoor]:
    """Real gunicorn (gunicorn.conf.py) behind real nginx running deploy/nginx.conf."""
    add_route("steady", [{"connector": "text", "config": {"field": "text"}}])
    add_route("later", [{"connector": "text", "config": {"field": "text"}}], mode="async")
    key = make_key()
    cert, private = certificate(tmp_path)
    with gunicorn(database_url_for_test, tmp_path / "web.log", HUB_EMBEDDED_WORKER="false") as (
        _,
        direct,
    ):
        gunicorn_port = int(direct.rsplit(":", 1)[1])
        for attempt in range(3):  # another run may take the port between pick and bind
            listen = closed_port()
            config = render(tmp_path, listen, gunicorn_port, cert, private)
            front = f"https://127.0.0.1:{listen}"
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(nginx(config, tmp_path, front, cert))
                break
            except AssertionError as exc:
                if "Address already in use" not in str(exc) or attempt == 2:
                    raise
        with stack:
            tls = ssl.create_default_context(cafile=str(cert))
            yield FrontDoor(front, direct, listen, gunicorn_port, cert, tls, key)


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_slow_clients_without_a_key_do_not_slow_valid_senders_behind_nginx(front_door):
    door = front_door
    with SlowClients(door.listen, door.tls) as slow:
        for i in range(100):
            slow.open(f"127.0.1.{i + 1}", slow_header("steady"), 1)
            body = slow_body("steady")
            slow.open(f"127.0.2.{i + 1}", body, body.index(b"\r\n\r\n") + 5)
        slow.start()
        results = valid_senders(f"{door.front}/hooks/steady", door.key, door.cert)
        still_connected = slow.connected()
    assert [outcome for outcome, _ in results if outcome[0] != 200] == []
    assert all(outcome[1]["processed"].startswith("SENDER") for outcome, _ in results)
    slowest = max(seconds for _, seconds in results)
    assert slowest < 2.0, f"a valid sender waited {slowest:.1f}s"
    assert still_connected >= 190, f"only {still_connected} of 200 slow clients connected"

    # The same kind of load straight at gunicorn: slow connections hold its 8 threads, once
    # its loop has handed them over (a request not whole within IO_SECONDS goes to a thread).
    with SlowClients(door.gunicorn_port) as slow:
        for i in range(64):
            slow.open(f"127.0.3.{i + 1}", slow_header("steady"), 1)
            time.sleep(0.01)
        slow.start()
        time.sleep(IO_SECONDS + 0.5)
        stalled = valid_senders(f"{door.direct}/hooks/steady", door.key, False, 4, 1, timeout=3)
    assert [outcome for outcome, _ in stalled] == ["ReadTimeout"] * 4


def answered(sock: socket.socket) -> bytes:
    """What the server has sent on ``sock`` so far, without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(4096)
    except (BlockingIOError, ssl.SSLWantReadError):
        return b""


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_nginx_limits_each_address_and_answers_as_the_hub(front_door, make_key):
    door = front_door
    # /metrics is not served through the front door, even to an admin key; gunicorn itself
    # (where Prometheus scrapes from the inside) serves it.
    admin = {"X-API-Key": make_key(admin=True)}
    for path in ("/metrics", "//metrics", "/%6detrics", "/metrics?x=1"):
        outside = requests.get(door.front + path, headers=admin, timeout=10, verify=door.cert)
        assert outside.status_code == 403 and outside.json()["code"] == "forbidden", path
    inside = requests.get(door.direct + "/metrics", headers=admin, timeout=10)
    assert inside.status_code == 200 and "hub_queue_due_events" in inside.text

    # 32 open requests per address: the 33rd and later are refused at once.
    with SlowClients(door.listen, door.tls) as slow:
        body = slow_body("steady")
        for _ in range(40):
            slow.open("127.0.4.1", body, body.index(b"\r\n\r\n") + 5)
        time.sleep(1.0)
        answers = [answered(sock) for sock in slow.pending]
    refused = [a for a in answers if a.startswith(b"HTTP/1.1 429")]
    assert len(refused) == 8, answers
    assert all(b'"code": "rate_limited"' in a and b"Retry-After: 1" in a for a in refused)

    # 50 requests a second with bursts of 100, per address.
    statuses = []
    http = HTTPSConnection(
        "127.0.0.1", door.listen, context=door.tls, source_address=("127.0.5.1", 0)
    )
    try:
        for _ in range(300):
            http.request("GET", "/health")
            answer = http.getresponse()
            answer.read()
            statuses.append((answer.status, answer.headers.get("Retry-After")))
    finally:
        http.close()
    assert statuses[:100] == [(200, None)] * 100
    assert statuses.count((429, "1")) >= 50, statuses
    assert {status for status, _ in statuses} == {200, 429}

    # The body limit (HUB_MAX_BODY_BYTES) is nginx's too.
    big = requests.post(
        f"{door.front}/hooks/steady",
        data=b"x" * (1024 * 1024 + 1),
        headers={"X-API-Key": door.key, "Content-Type": "application/json"},
        timeout=10,
        verify=door.cert,
    )
    assert big.status_code == 413 and big.json()["code"] == "too_large"

    # The links the hub hands out name the front door, not gunicorn.
    accepted = requests.post(
        f"{door.front}/hooks/later",
        json={"text": "x"},
        headers={"X-API-Key": door.key},
        timeout=10,
        verify=door.cert,
    )
    assert accepted.status_code == 202
    assert accepted.json()["status_url"].startswith(f"{door.front}/events/evt_")


def raw_exchange(port: int, request: bytes, tls: ssl.SSLContext | None = None) -> bytes:
    """Send ``request`` as is on a new connection and read the answer until the server closes
    it (or 5 s pass): what a client sees, byte for byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
    answer = b""
    with sock:
        sock.sendall(request)
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def json_refusal(answer: bytes) -> tuple[int, dict]:
    """(status, body) of an answer that must be the hub's JSON refusal, whole."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    content_type = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert content_type == "application/json", answer
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    document = json.loads(body[:length])
    assert set(document) == {"error", "code"} and document["error"] and document["code"], answer
    return status, document


HOST = b"Host: 127.0.0.1\r\nConnection: close\r\n"
# Malformed requests, each with the status it must get from gunicorn itself and through nginx.
MALFORMED = {
    "a garbage request line": (b"GARBAGE / HTTP/1.1 x\r\n" + HOST + b"\r\n", 400, 400),
    "a request line over the limits": (
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
        414,
        414,
    ),
    "a header field over the limits": (
        b"GET /health HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n",
        431,
        400,
    ),
    "too many header fields": (
        b"GET /health HTTP/1.1\r\n"
        + HOST
        + b"".join(b"X-F%d: " % i + b"v" * 700 + b"\r\n" for i in range(70))
        + b"\r\n",
        431,
        400,
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /hooks/steady HTTP/1.1\r\n"
        + HOST
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        400,
    ),
    "two different Content-Lengths": (
        b"POST /hooks/steady HTTP/1.1\r\n" + HOST + b"Content-Length: 2\r\nContent-Length: 3\r\n"
        b"\r\n{}x",
        400,
        400,
    ),
    "a folded header": (b"GET /health HTTP/1.1\r\n" + HOST + b"X-A: b\r\n  c\r\n\r\n", 400, 400),
    "a bad chunk size": (
        b"POST /hooks/steady HTTP/1.1\r\n" + HOST + b"X-API-Key: KEY\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
        b"zz\r\n{}\r\n0\r\n\r\n",
        400,
        400,
    ),
}


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_malformed_requests_are_refused_in_the_hubs_json_by_gunicorn_and_by_nginx(front_door):
    door = front_door
    seen = {}
    for name, (request, direct_status, front_status) in MALFORMED.items():
        request = request.replace(b"KEY", door.key.encode())
        for face, port, tls, expected in (
            ("gunicorn", door.gunicorn_port, None, direct_status),
            ("nginx", door.listen, door.tls, front_status),
        ):
            status, body = json_refusal(raw_exchange(port, request, tls))
            assert status == expected, (face, name, status, body)
            seen[face, name] = body["code"]
    assert seen["gunicorn", "a request line over the limits"] == "uri_too_long"
    assert seen["gunicorn", "too many header fields"] == "headers_too_large"
    # Plain HTTP on nginx's TLS port: its 497, answered as a 400 in JSON too.
    plain = raw_exchange(door.listen, b"GET /health HTTP/1.1\r\n" + HOST + b"\r\n")
    status, body = json_refusal(plain)
    assert status == 400 and body["code"] == "bad_request"
    # The refusals' own paths are nginx's, not the sender's to ask for.
    asked = raw_exchange(
        door.listen, b"GET /.hub-refusal/400 HTTP/1.1\r\n" + HOST + b"\r\n", door.tls
    )
    assert json_refusal(asked) == (404, {"error": "Endpoint not found", "code": "not_found"})
