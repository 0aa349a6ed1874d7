"""Webhooks answered on the gunicorn worker's loop (hub/web/loop.py).

- which requests the loop takes: one whole ``POST /hooks/<name>`` with a Content-Length
  body and nothing after it; anything in pieces, chunked, pipelined, folded or ambiguous
  goes to gunicorn's threads;
- which routes: an async one whose accepted webhooks write only their new rows (no rate
  limit, deduplication, ordering or handshake);
- what a sender sees does not change: under real gunicorn with one web process of one
  thread, concurrent senders on kept or new connections share the writer's commits (with
  HUB_WEB_LOOP=false, one thread commits one webhook at a time); a request in pieces,
  two pipelined, a malformed one and a refused key are answered as the threads answer them;
  a sync route to a slow receiver runs on the thread while the loop answers other webhooks;
  webhooks waiting on a stopped writer are all answered after HUB_WRITER_TIMEOUT, each
  committed once by its process, and the next ones reach the writer anew.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import func, select

from hub.services import intake
from hub.services import routes as route_store
from hub.store.db import Database
from hub.store.models import Event
from hub.testing_servers import Receiver
from hub.web.loop import MORE, unsent, webhook_in
from tests.procs import gunicorn
from tests.test_writer import listening

BODY = b'{"a": 1}'
TEXT = [{"connector": "text"}]


def request(
    head: str = "POST /hooks/orders HTTP/1.1",
    body: bytes = BODY,
    *extra: str,
    key: str = "k",
    length: bool = True,
) -> bytes:
    lines = [head, "Host: hub", "Content-Type: application/json", f"X-API-Key: {key}", *extra]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# --- which requests ---


def test_one_whole_webhook_is_the_loops_with_its_route_and_header_names():
    assert webhook_in(request()) == (
        "orders",
        {"host", "content-type", "x-api-key", "content-length"},
    )
    assert webhook_in(request("POST /hooks/orders?api_key=k HTTP/1.0"))[0] == "orders"


@pytest.mark.parametrize(
    "data",
    [
        request() + request(),  # pipelined: the second is read by a thread
        request("GET /hooks/orders HTTP/1.1"),
        request("POST /api/process HTTP/1.1"),
        request("POST /hooks/a%2Fb HTTP/1.1"),  # percent-encoded: Flask decodes it
        request("POST /hooks/a/b HTTP/1.1"),
        request("POST /hooks/orders HTTP/2.0"),
        request(length=False),
        request("POST /hooks/orders HTTP/1.1", BODY, "Transfer-Encoding: chunked"),
        request("POST /hooks/orders HTTP/1.1", BODY, "Content-Length: 8"),  # two lengths
        request("POST /hooks/orders HTTP/1.1", BODY, "Expect: 100-continue"),
        request("POST /hooks/orders HTTP/1.1", BODY, "Upgrade: h2c"),
        request("POST /hooks/orders HTTP/1.1", BODY, "X-A: 1", " folded"),
        request("POST /hooks/orders HTTP/1.1", BODY, "X-A : 1"),
        request("POST /hooks/orders HTTP/1.1", BODY, "X-A: 1\nX-B: 2"),  # a bare LF
        request("POST /hooks/orders HTTP/1.1", BODY, "Content-Length: -1", length=False),
    ],
)
def test_anything_else_goes_to_a_thread(data):
    assert webhook_in(data) is None


@pytest.mark.parametrize("cut", [1, 5, 12, 30, -len(BODY), -1])
def test_the_start_of_a_webhook_is_waited_for(cut):
    assert webhook_in(request()[:cut]) is MORE


def test_answers_a_client_has_not_read_count_as_unsent():
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()),  # a client that never reads
    ):
        hub_side, _ = server.accept()
        with hub_side:
            assert unsent(hub_side) == 0
            hub_side.setblocking(False)
            with pytest.raises(BlockingIOError):
                while True:
                    hub_side.send(b"x" * 65536)
            assert unsent(hub_side) > 0


# --- which routes ---


@pytest.mark.parametrize(
    ("fields", "headers", "loop"),
    [
        ({}, set(), True),
        ({}, {"idempotency-key"}, False),  # deduplicated: committed in the web process
        ({}, {"x-github-delivery"}, False),
        ({"dedup_window": 0}, {"idempotency-key"}, True),
        ({"dedup_path": "$.id"}, set(), False),
        ({"rate_limit": "100/second"}, set(), False),
        ({"mode": "sync"}, set(), False),
        ({"enabled": False}, set(), False),
        ({"destinations": [{"name": "a", "steps": TEXT, "ordering_key": "{{ payload.k }}"}]},)
        + (set(), False),
        ({"verify": {"scheme": "slack", "secrets": ["s" * 32]}}, set(), False),  # a handshake
    ],
)
def test_the_loop_takes_routes_whose_webhooks_write_only_their_rows(
    db, add_route, fields, headers, loop
):
    steps = None if "destinations" in fields else TEXT
    add_route("r", steps, **{"mode": "async", **fields})
    with db.session() as session:
        route = route_store.get(session, "r")
        assert intake.writes_only_new_rows(route, {"host", *headers}) is loop


# --- under gunicorn ---


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    """One HTTP answer read from ``sock``: its status and JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096) or b"!"
        assert not data.endswith(b"!"), data
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(4096)
    assert len(body) == length, "more than one answer came"
    return int(head.split(b" ", 2)[1]), json.loads(body)


def writer_batches(log: bytes) -> tuple[int, int]:
    """(events, transactions) the writer process said it wrote when it stopped."""
    found = re.search(rb"(\d+) events written in (\d+) transactions", log)
    assert found, log[-2000:]
    return int(found.group(1)), int(found.group(2))


@pytest.mark.parametrize(
    ("on_loop", "kept"),
    [(True, True), (False, True), (True, False)],
    ids=["loop", "threads", "loop-new-connections"],
)
def test_concurrent_senders_share_commits_with_one_thread(
    database_url_for_test, add_route, make_key, tmp_path, on_loop, kept
):
    """Kept connections (a sender's own client), or a new connection a request (what
    nginx in front of gunicorn opens)."""
    add_route("load", [{"connector": "text"}], mode="async")
    key = make_key()
    log = tmp_path / "web.log"
    env = {
        "HUB_WEB_THREADS": "1",
        "HUB_EMBEDDED_WORKER": "false",
        "HUB_WEB_LOOP": str(on_loop).lower(),
    }
    senders, each = 12, 15

    def send(base: str) -> list[int]:
        with requests.Session() as http:
            post = http.post if kept else requests.post
            return [
                post(
                    f"{base}/hooks/load", json={"n": n}, headers={"X-API-Key": key}, timeout=30
                ).status_code
                for n in range(each)
            ]

    with gunicorn(database_url_for_test, log, 1, **env) as (proc, base):
        listening(proc.pid)  # every webhook goes to the writer
        with ThreadPoolExecutor(senders) as pool:
            statuses = [s for sent in pool.map(send, [base] * senders) for s in sent]
    assert statuses == [202] * senders * each
    events, transactions = writer_batches(log.read_bytes())
    assert events == senders * each
    if on_loop:  # one thread, yet webhooks waited for the writer together
        assert transactions < events, (events, transactions)
    else:  # one thread, one webhook at a time
        assert transactions == events


def test_what_a_sender_sees_on_a_kept_connection_does_not_change(
    database_url_for_test, add_route, make_key, tmp_path
):
    add_route("orders", [{"connector": "text"}], mode="async")
    key = make_key()
    log = tmp_path / "web.log"
    env = {"HUB_WEB_THREADS": "2", "HUB_EMBEDDED_WORKER": "false"}
    with gunicorn(database_url_for_test, log, 1, **env) as (_, base):
        first = requests.post(f"{base}/hooks/orders", json={}, headers={"X-API-Key": key})
        assert first.status_code == 202  # the route is cached from here on
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as kept:
            whole = request(key=key)
            kept.sendall(whole)
            status, body = read_answer(kept)
            assert status == 202, body
            head, _, rest = whole.partition(b"\r\n\r\n")
            kept.sendall(head + b"\r\n\r\n")  # in pieces: the rest 0.3 s later
            time.sleep(0.3)
            kept.sendall(rest)
            assert read_answer(kept)[0] == 202
            kept.sendall(whole + whole)  # two at once
            assert [read_answer(kept)[0], read_answer(kept)[0]] == [202, 202]
            kept.sendall(request(key="wrong"))
            status, body = read_answer(kept)
            assert (status, body["code"]) == (401, "unauthorized")
            kept.sendall(whole)  # still open after a refusal
            assert read_answer(kept)[0] == 202
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fresh:
            fresh.sendall(request(key=key))
            assert read_answer(fresh)[0] == 202  # a new connection's first request
            two_lengths = request("POST /hooks/orders HTTP/1.1", BODY, "Content-Length: 9", key=key)
            fresh.sendall(two_lengths)
            status, body = read_answer(fresh)
            assert status == 400 and body["code"] == "bad_request", body
    db = Database(database_url_for_test)
    with db.session() as session:
        by_status = select(Event.status, func.count()).where(Event.route == "orders")
        counts = dict(session.execute(by_status.group_by(Event.status)).all())
    db.dispose()
    assert counts == {"pending": 7, "rejected": 1}, counts


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_a_slow_sync_route_runs_on_the_thread_while_the_loop_answers_webhooks(
    database_url_for_test, add_route, make_key, tmp_path
):
    with Receiver(delay=3) as slow:
        add_route("slow", [{"connector": "http", "config": {"url": slow.url + "/in"}}])
        add_route("quick", [{"connector": "text"}], mode="async")
        key = make_key()
        log = tmp_path / "web.log"
        env = {"HUB_WEB_THREADS": "1", "HUB_EMBEDDED_WORKER": "false"}
        with gunicorn(database_url_for_test, log, 1, **env) as (_, base):
            hooks = f"{base}/hooks/"
            with requests.Session() as http:
                assert http.post(hooks + "quick", json={}, headers={"X-API-Key": key}).ok
                sync: list[requests.Response] = []
                running = threading.Thread(
                    target=lambda: sync.append(
                        requests.post(hooks + "slow", json={}, headers={"X-API-Key": key})
                    )
                )
                running.start()
                time.sleep(0.5)  # the sync request holds the process's one thread
                took = []
                for n in range(20):
                    began = time.monotonic()
                    answer = http.post(hooks + "quick", json={"n": n}, headers={"X-API-Key": key})
                    took.append(time.monotonic() - began)
                    assert answer.status_code == 202
                assert running.is_alive(), "the sync run ended before the webhooks were sent"
                running.join(10)
    assert sync[0].status_code == 200
    assert max(took) < 1.0, took


def test_webhooks_waiting_on_a_stopped_writer_are_committed_by_their_process_once(
    database_url_for_test, add_route, make_key, tmp_path
):
    add_route("held", [{"connector": "text"}], mode="async")
    key = make_key()
    env = {"HUB_WEB_THREADS": "1", "HUB_EMBEDDED_WORKER": "false", "HUB_WRITER_TIMEOUT": "1"}
    with gunicorn(database_url_for_test, tmp_path / "web.log", 1, **env) as (proc, base):
        writer = listening(proc.pid)
        hooks = f"{base}/hooks/held"

        def send(n: int) -> tuple[int, str]:
            with requests.Session() as http:
                answer = http.post(hooks, json={"n": n}, headers={"X-API-Key": key}, timeout=30)
                return answer.status_code, answer.json().get("id")

        assert send(-1)[0] == 202  # the route is cached: the rest are the loop's
        os.kill(writer, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(send, range(8)))
            waited = time.monotonic() - began
        finally:
            os.kill(writer, signal.SIGCONT)
        # Answered after HUB_WRITER_TIMEOUT, on the one thread's loop, all at once.
        assert [status for status, _ in answers] == [202] * 8
        assert 1.0 <= waited < 5.0, waited
        later = [send(n)[0] for n in range(8, 12)]  # a new connection to the writer
    assert later == [202] * 4
    db = Database(database_url_for_test)
    with db.session() as session:
        stored = Counter(session.scalars(select(Event.id).where(Event.route == "held")))
    db.dispose()
    assert {event_id for _, event_id in answers} <= set(stored)
    assert sum(stored.values()) == 13 and set(stored.values()) == {1}
