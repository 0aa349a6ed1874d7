"""hub.http against real servers on 127.0.0.1 (hub.testing_servers); nothing leaves the machine."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests
import tenacity

import hub.http as http
from hub.connectors import PermanentError, RetryableError, StepContext
from tests.procs import ROOT, clean_env
from tests.servers import FakeOpenAI, Receiver, Recorded, Reply


def make_ctx(deadline: float | None = None, **more) -> StepContext:
    """A step's context as a connector sees it, outside any pipeline."""
    return StepContext(
        event_id="evt_1",
        route="test",
        step_index=0,
        payload={},
        outputs=[],
        logger=logging.getLogger("test"),
        deadline=deadline,
        **more,
    )


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture
def fake_openai():
    with FakeOpenAI(api_key="sk-good") as f:
        yield f


@pytest.fixture
def allow_private(monkeypatch):
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")


@pytest.fixture
def forbid_private(monkeypatch):
    monkeypatch.delenv("HUB_ALLOW_PRIVATE_TARGETS", raising=False)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# classify(), through real responses
# --------------------------------------------------------------------------------------

CLASSIFICATION = [
    # status, headers, expected error, retry_after
    (200, {}, None, None),
    (201, {}, None, None),
    (204, {}, None, None),
    (301, {"Location": "/elsewhere"}, PermanentError, None),
    (400, {}, PermanentError, None),
    (401, {}, PermanentError, None),
    (404, {}, PermanentError, None),
    (408, {}, RetryableError, None),
    (409, {}, RetryableError, None),
    (410, {}, PermanentError, None),
    (422, {"Retry-After": "5"}, PermanentError, None),
    (429, {}, RetryableError, None),
    (429, {"Retry-After": "7"}, RetryableError, 7.0),
    (429, {"Retry-After": "7", "retry-after-ms": "1500"}, RetryableError, 1.5),
    (500, {}, RetryableError, None),
    (502, {}, RetryableError, None),
    (503, {"Retry-After": "3600"}, RetryableError, 60.0),
    (504, {}, RetryableError, None),
    (400, {"x-should-retry": "true", "Retry-After": "2"}, RetryableError, 2.0),
    (503, {"x-should-retry": "false"}, PermanentError, None),
    (200, {"x-should-retry": "true"}, None, None),
]


@pytest.mark.parametrize(("status", "headers", "error", "retry_after"), CLASSIFICATION)
def test_classification(receiver, allow_private, status, headers, error, retry_after):
    body = b"" if status == 204 else b"upstream says no"
    receiver.script(Reply(status, body, headers))
    ctx = make_ctx()
    if error is None:
        response = http.request(ctx, "POST", receiver.url + "/hook", json={"a": 1})
        assert response.status_code == status
    else:
        with pytest.raises(error) as info:
            http.request(ctx, "POST", receiver.url + "/hook", json={"a": 1})
        exc = info.value
        assert type(exc) is error
        assert exc.status == status
        assert exc.code == "upstream_error"
        assert f"answered {status}" in exc.message
        if error is RetryableError:
            assert exc.retry_after == retry_after
    assert ctx.exchange.status == status
    assert len(receiver.requests) == 1  # one call, no hidden retries or redirects


def test_error_message_is_short_and_has_no_request_headers(receiver, allow_private):
    receiver.script(Reply(500, "x" * 5000 + " end"))
    with pytest.raises(RetryableError) as info:
        http.request(
            make_ctx(),
            "POST",
            receiver.url + "/hook?token=query-secret",
            headers={"Authorization": "Bearer sk-very-secret"},
            json={},
        )
    message = str(info.value)
    assert "xxxx" in message  # some of the body is there to help the operator
    assert len(message) < 300
    assert "end" not in message
    assert "sk-very-secret" not in message
    assert "query-secret" not in message


def test_classify_accepts_a_hand_built_response():
    response = requests.Response()
    response.status_code = 429
    response.reason = "Too Many Requests"
    response.headers["Retry-After"] = "4"
    response._content = b'{"error": "slow down"}'
    response.url = "https://api.example.com/v1/x?key=secret"
    with pytest.raises(RetryableError) as info:
        http.classify(response)
    assert info.value.retry_after == 4.0
    assert "api.example.com" in info.value.message
    assert "secret" not in info.value.message


# --------------------------------------------------------------------------------------
# parse_retry_after
# --------------------------------------------------------------------------------------


def _http_date(delta_seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=delta_seconds), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500.5"}, 1.5005),
        ({"Retry-After": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "0"}, 0.0),
        ({"retry-after-ms": "2000", "Retry-After": "9"}, 2.0),
        ({"retry-after-ms": "junk", "Retry-After": "9"}, 9.0),
        ({"retry-after-ms": "-5", "Retry-After": "9"}, 9.0),
        ({"Retry-After": "3600"}, 60.0),
        ({"retry-after-ms": "999999"}, 60.0),
        ({"Retry-After": "-1"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "1e999"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "Wed, 99 Foo 2015 07:28:00 GMT"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert http.parse_retry_after(headers) == expected


def test_parse_retry_after_http_dates():
    future = http.parse_retry_after({"Retry-After": _http_date(30)})
    assert future is not None and 27 <= future <= 30
    assert http.parse_retry_after({"Retry-After": _http_date(-30)}) is None
    assert http.parse_retry_after({"Retry-After": _http_date(3600)}) == 60.0
    assert http.parse_retry_after({"Retry-After": _http_date(3600)}, cap=10) == 10.0


def test_parse_retry_after_cap_and_case_insensitive_dict():
    headers = requests.structures.CaseInsensitiveDict({"RETRY-AFTER": "45"})
    assert http.parse_retry_after(headers) == 45.0
    assert http.parse_retry_after(headers, cap=5) == 5.0


# --------------------------------------------------------------------------------------
# wait strategy
# --------------------------------------------------------------------------------------


def _state(attempt: int, exc: BaseException) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    future = tenacity.Future(attempt)
    future.set_exception(exc)
    state.outcome = future
    return state


@pytest.mark.parametrize(
    ("attempt", "base"), [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (20, 8.0)]
)
def test_backoff_grows_with_jitter_and_is_capped(attempt, base):
    wait = http.wait_retry_after_or_backoff()
    waits = [wait(_state(attempt, RetryableError("boom"))) for _ in range(300)]
    assert all(0.75 * base <= w <= base for w in waits)
    assert len(set(waits)) > 1  # jitter
    assert max(waits) - min(waits) > 0.1 * base  # spread over the jitter range


def test_backoff_honours_custom_initial_and_maximum():
    wait = http.wait_retry_after_or_backoff(initial=1.0, maximum=3.0)
    assert 0.75 <= wait(_state(1, RetryableError("x"))) <= 1.0
    assert 2.25 <= wait(_state(5, RetryableError("x"))) <= 3.0


@pytest.mark.parametrize(
    ("retry_after", "cap", "expected"),
    [(2.5, 60.0, 2.5), (0.0, 60.0, 0.0), (500.0, 60.0, 60.0), (30.0, 5.0, 5.0)],
)
def test_retry_after_wins_over_backoff(retry_after, cap, expected):
    wait = http.wait_retry_after_or_backoff(cap=cap)
    assert wait(_state(5, RetryableError("slow down", retry_after=retry_after))) == expected


# --------------------------------------------------------------------------------------
# retry_policy
# --------------------------------------------------------------------------------------


def test_retry_policy_retries_until_success(receiver, allow_private):
    receiver.script(Reply(503), Reply(503), Reply(200, {"done": True}))
    sleeps: list[float] = []
    policy = http.retry_policy(sleep=sleeps.append)
    response = policy(http.request, make_ctx(), "POST", receiver.url + "/hook", json={"n": 1})
    assert response.json() == {"done": True}
    assert len(receiver.requests) == 3
    assert len(sleeps) == 2
    assert 0.375 <= sleeps[0] <= 0.5
    assert 0.75 <= sleeps[1] <= 1.0


def test_retry_policy_does_not_retry_permanent_errors(receiver, allow_private):
    receiver.script(Reply(400))
    sleeps: list[float] = []
    with pytest.raises(PermanentError) as info:
        http.retry_policy(sleep=sleeps.append)(http.request, make_ctx(), "POST", receiver.url)
    assert info.value.status == 400
    assert len(receiver.requests) == 1
    assert sleeps == []


def test_retry_policy_gives_up_after_tries_and_reraises_the_error(receiver, allow_private):
    receiver.script(*[Reply(502)] * 5)
    sleeps: list[float] = []
    with pytest.raises(RetryableError) as info:  # not tenacity.RetryError
        http.retry_policy(4, sleep=sleeps.append)(http.request, make_ctx(), "GET", receiver.url)
    assert info.value.status == 502
    assert len(receiver.requests) == 4
    assert len(sleeps) == 3


def test_retry_policy_sleeps_what_the_server_asked(receiver, allow_private):
    receiver.script(Reply(429, b"busy", {"Retry-After": "2"}), Reply(200))
    sleeps: list[float] = []
    http.retry_policy(sleep=sleeps.append)(http.request, make_ctx(), "GET", receiver.url)
    assert sleeps == [2.0]


def test_retry_policy_stops_before_a_wait_past_the_deadline(receiver, allow_private):
    receiver.script(Reply(503, b"later", {"Retry-After": "30"}), Reply(200))
    sleeps: list[float] = []
    policy = http.retry_policy(5, deadline=time.monotonic() + 5, sleep=sleeps.append)
    with pytest.raises(RetryableError):
        policy(http.request, make_ctx(), "GET", receiver.url)
    assert len(receiver.requests) == 1
    assert sleeps == []


def test_retry_policy_with_a_far_deadline_still_retries(receiver, allow_private):
    receiver.script(Reply(503, b"later", {"Retry-After": "1"}), Reply(200))
    sleeps: list[float] = []
    policy = http.retry_policy(deadline=time.monotonic() + 60, sleep=sleeps.append)
    assert policy(http.request, make_ctx(), "GET", receiver.url).status_code == 200
    assert sleeps == [1.0]


def test_retry_policy_logs_without_urls_or_bodies(receiver, allow_private, caplog):
    receiver.script(Reply(503, b"secret body text"), Reply(200))
    caplog.set_level(logging.WARNING, logger="hub.http")
    policy = http.retry_policy(sleep=lambda s: None, connector="webhook")
    policy(http.request, make_ctx(), "POST", receiver.url + "/hook?token=abc123", json={})
    records = [r for r in caplog.records if r.name == "hub.http"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    text = records[0].getMessage()
    assert "webhook" in text and "attempt 1/3" in text
    assert "status=503" in text and "code=upstream_error" in text
    assert "abc123" not in text and "127.0.0.1" not in text and "secret body" not in text


def test_retry_policy_works_as_an_iterator(receiver, allow_private):
    receiver.script(Reply(500), Reply(201))
    for attempt in http.retry_policy(sleep=lambda s: None):
        with attempt:
            response = http.request(make_ctx(), "GET", receiver.url)
    assert response.status_code == 201


# --------------------------------------------------------------------------------------
# request()
# --------------------------------------------------------------------------------------


def test_connection_refused_is_retryable_unreachable(allow_private):
    ctx = make_ctx()
    url = f"http://127.0.0.1:{closed_port()}/hook"
    with pytest.raises(RetryableError) as info:
        http.request(ctx, "POST", url, json={"a": 1})
    assert info.value.code == "upstream_unreachable"
    assert ctx.exchange.request["url"] == url
    assert ctx.exchange.status is None


def test_slow_answer_times_out_as_retryable(receiver, allow_private):
    receiver.script(Reply(200, delay=30))
    started = time.monotonic()
    with pytest.raises(RetryableError) as info:
        http.request(make_ctx(), "GET", receiver.url, timeout=0.2)
    assert info.value.code == "upstream_timeout"
    assert time.monotonic() - started < 10  # long before the answer, even on a busy machine


def test_step_deadline_shortens_the_timeout(receiver, allow_private):
    """Cut short by the hub's own deadline, the call says so: ``timeout``, not the
    upstream's ``upstream_timeout`` (a sync route answers the first with 504)."""
    receiver.script(Reply(200, delay=30))
    started = time.monotonic()
    with pytest.raises(RetryableError) as info:
        http.request(make_ctx(deadline=time.monotonic() + 0.3), "GET", receiver.url)
    assert info.value.code == "timeout"
    assert "deadline" in info.value.message
    assert time.monotonic() - started < 10  # the default timeout would have waited 30 s


def test_request_records_the_exchange_with_secrets_redacted(receiver, allow_private):
    receiver.script(Reply(200, {"answer": 42}))
    ctx = make_ctx()
    headers = {
        "Authorization": "Bearer sk-live-secret",
        "X-API-Key": "key-1",
        "Cookie": "session=abc",
        "Webhook-Signature": "v1,c2ln",
        "X-Auth-Token": "tok",
        "X-Client-Secret": "shh",
        "Api-Key": "k2",
        "X-Trace": "keep-me",
    }
    http.request(
        ctx, "POST", receiver.url + "/hook?api_key=qs-secret&page=2", json={"a": 1}, headers=headers
    )

    sent = ctx.exchange.request
    assert sent["method"] == "POST"
    assert "qs-secret" not in sent["url"] and "page=2" in sent["url"]
    sent_headers = dict(ctx.exchange.request_headers)
    for name in headers:
        expected = "keep-me" if name == "X-Trace" else http.REDACTED
        assert sent_headers[name] == expected, name
    assert json.loads(sent["body"]) == {"a": 1}
    assert json.loads(ctx.exchange.response) == {"answer": 42}
    assert ctx.exchange.status == 200

    # Redaction is for the log only: the far side got the real credentials.
    got = receiver.wait_for(1)[0]
    assert got.headers["authorization"] == "Bearer sk-live-secret"
    assert got.headers["user-agent"] == "webhook-hub/0.1"
    assert got.headers["content-type"] == "application/json"
    assert got.json() == {"a": 1}
    assert got.path == "/hook?api_key=qs-secret&page=2"


def test_recorded_response_is_truncated(receiver, allow_private):
    receiver.script(Reply(200, b"y" * 20_000))
    ctx = make_ctx()
    http.request(ctx, "GET", receiver.url)
    assert ctx.exchange.response.startswith("y" * 4096)
    assert len(ctx.exchange.response) < 4096 + 50


def test_redirects_are_not_followed(receiver, allow_private):
    receiver.script(Reply(302, b"", {"Location": receiver.url + "/elsewhere"}))
    with pytest.raises(PermanentError) as info:
        http.request(make_ctx(), "GET", receiver.url + "/start")
    assert info.value.status == 302
    assert [r.path for r in receiver.requests] == ["/start"]


def test_request_without_a_context(receiver, allow_private):
    assert http.request(None, "GET", receiver.url).json() == {"ok": True}


@pytest.fixture
def environment_read_afresh(monkeypatch):
    """hub.http reads the environment once a host: a test that changes it starts clean."""
    http._environments.clear()
    yield monkeypatch
    http._environments.clear()


def test_a_proxy_of_the_environment_carries_the_call_and_no_proxy_is_honoured(
    receiver, allow_private, environment_read_afresh
):
    """HTTP_PROXY sends a call through the proxy (the receiver here, which then sees the
    absolute URL); a host named in NO_PROXY is called directly."""
    environment_read_afresh.setenv("HTTP_PROXY", receiver.url)
    environment_read_afresh.setenv("NO_PROXY", "localhost")
    http.request(make_ctx(), "POST", "http://destination.invalid/in", json={"a": 1})
    direct = receiver.url.replace("127.0.0.1", "localhost") + "/direct"
    http.request(make_ctx(), "POST", direct, json={"a": 2})
    assert [r.path for r in receiver.requests] == ["http://destination.invalid/in", "/direct"]


def test_a_netrc_is_never_read(receiver, allow_private, environment_read_afresh, tmp_path):
    """A ~/.netrc of the hub's user names the destination's host: the destination still
    gets only what the step sends, no Authorization of the netrc's."""
    (tmp_path / ".netrc").write_text("machine 127.0.0.1 login hub password netrc-secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    environment_read_afresh.setenv("HOME", str(tmp_path))
    environment_read_afresh.setenv("NETRC", str(tmp_path / ".netrc"))
    http.request(make_ctx(), "POST", receiver.url + "/in", json={"a": 1})
    assert "authorization" not in receiver.requests[0].headers


def test_session_is_shared_and_created_once_across_threads(monkeypatch):
    monkeypatch.setattr(http, "_session", None)
    barrier = threading.Barrier(8)
    seen = []

    def grab():
        barrier.wait()
        seen.append(http.session())

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = seen[0]
    try:
        assert all(s is created for s in seen)
        assert created.headers["User-Agent"] == "webhook-hub/0.1"
        adapter = created.get_adapter("https://example.com/")
        assert isinstance(adapter, http.GuardedAdapter)
        assert adapter._pool_maxsize >= 16
    finally:
        created.close()


@pytest.mark.parametrize("keep_alive", [True, False])
def test_calls_to_a_receiver_that_keeps_connections_reuse_one(allow_private, keep_alive):
    """The connector's calls share pooled connections: to a receiver that keeps them open,
    three calls in a row take one; to one that closes each, three."""
    with Receiver(keep_alive=keep_alive) as r:
        for n in range(3):
            response = http.request(make_ctx(), "POST", f"{r.url}/in", json={"n": n})
            assert response.status_code == 200
            assert response.json() == {"ok": True}
        bodies = [recorded.json() for recorded in r.requests]
        peers = {recorded.peer for recorded in r.requests}
    assert bodies == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert len(peers) == (1 if keep_alive else 3)


def test_a_stopped_receiver_closes_the_connections_it_kept():
    """A kept connection must not outlive its test server: a client's pool would send a
    later request to a stopped server's thread, lost to the test that started it."""
    r = Receiver(keep_alive=True).start()
    try:
        sock = socket.create_connection(("127.0.0.1", r.port), timeout=5)
        sock.sendall(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        answer = b""
        while not answer.endswith(b'{"ok": true}'):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        r.stop()
    try:
        assert sock.recv(4096) == b""  # closed by the server, not left waiting
    finally:
        sock.close()


# --------------------------------------------------------------------------------------
# check_target and the connected-peer guard
# --------------------------------------------------------------------------------------

REFUSED = [
    "http://127.0.0.1/",
    "http://127.1.2.3:8080/x",
    "http://localhost:8080/hook",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://100.64.0.1/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::127.0.0.1]/",
    "http://[fd00:ec2::254]/",
    "http://[fe80::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://2130706433/",  # 127.0.0.1 as a decimal number
    "https://[64:ff9b::a00:1]/",  # NAT64 form of 10.0.0.1
    "http://[2002:a00:1::1]/",  # 6to4 form of 10.0.0.1
]


@pytest.mark.parametrize("url", REFUSED)
def test_check_target_refuses_private_and_local_addresses(url, forbid_private):
    with pytest.raises(PermanentError) as info:
        http.check_target(url)
    assert info.value.code == "forbidden_target"
    assert info.value.message == "refusing to connect to a private or local address"


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34/",
        "https://93.184.216.34:8443/path?q=1",
        "http://[2606:2800:220:1:248:1893:25c8:1946]/",
        "http://8.8.8.8",
        "http://[::ffff:93.184.216.34]/",  # IPv4-mapped public address
        "http://[64:ff9b::5db8:d822]/",  # NAT64 form of a public address
    ],
)
def test_check_target_allows_public_addresses(url, forbid_private):
    http.check_target(url)  # resolves a literal only; no connection is made


@pytest.mark.parametrize(
    "url",
    ["ftp://93.184.216.34/", "file:///etc/passwd", "http:///path", "not a url", "", "http://[::1/"],
)
def test_check_target_refuses_other_schemes_and_missing_hosts(url, allow_private):
    with pytest.raises(PermanentError):
        http.check_target(url)


def test_check_target_refuses_when_any_resolved_address_is_private(monkeypatch, forbid_private):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.1.2.3", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(PermanentError) as info:
        http.check_target("https://mixed.example/")
    assert info.value.code == "forbidden_target"


def test_check_target_resolution_failure_is_retryable(monkeypatch, forbid_private):
    def failing_getaddrinfo(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", failing_getaddrinfo)
    with pytest.raises(RetryableError) as info:
        http.check_target("https://nowhere.example/")
    assert info.value.code == "upstream_unreachable"


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("", False)],
)
def test_allow_private_targets_is_read_at_call_time(monkeypatch, value, allowed):
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", value)
    assert http.allow_private_targets() is allowed
    if allowed:
        http.check_target("http://127.0.0.1:9/")
    else:
        with pytest.raises(PermanentError):
            http.check_target("http://127.0.0.1:9/")


def test_peer_guard_refuses_a_real_private_connection(receiver, monkeypatch, forbid_private):
    monkeypatch.setattr(http, "check_target", lambda url: None)  # only the socket guard left
    ctx = make_ctx()
    with pytest.raises(PermanentError) as info:
        http.request(ctx, "POST", receiver.url + "/hook", json={"a": 1})
    assert info.value.code == "forbidden_target"
    time.sleep(0.1)
    assert receiver.requests == []  # nothing was sent over the socket


def test_peer_guard_defeats_dns_rebinding(receiver, monkeypatch, forbid_private):
    real_getaddrinfo = socket.getaddrinfo
    answers = []

    def rebinding_getaddrinfo(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real_getaddrinfo(host, port, *args, **kwargs)
        address = "93.184.216.34" if not answers else "127.0.0.1"  # public first, then not
        answers.append(address)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding_getaddrinfo)
    with pytest.raises(PermanentError) as info:
        http.request(make_ctx(), "GET", f"http://rebind.test:{receiver.port}/")
    assert info.value.code == "forbidden_target"
    assert answers == ["93.184.216.34", "127.0.0.1"]  # the check passed, the socket did not
    time.sleep(0.1)
    assert receiver.requests == []


def test_peer_guard_covers_https_too(receiver, monkeypatch, forbid_private):
    monkeypatch.setattr(http, "check_target", lambda url: None)
    with pytest.raises(PermanentError) as info:  # refused before any TLS handshake
        http.request(make_ctx(), "GET", f"https://127.0.0.1:{receiver.port}/")
    assert info.value.code == "forbidden_target"


def test_guarded_adapter_directly(receiver, monkeypatch):
    with requests.Session() as s:
        s.mount("http://", http.GuardedAdapter())
        monkeypatch.delenv("HUB_ALLOW_PRIVATE_TARGETS", raising=False)
        with pytest.raises(PermanentError):
            s.get(receiver.url, timeout=5)
        monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "1")
        with s.get(receiver.url, timeout=5) as response:
            assert response.json() == {"ok": True}
    assert len(receiver.requests) == 1


# --------------------------------------------------------------------------------------
# The test servers themselves
# --------------------------------------------------------------------------------------


def test_receiver_answers_scripted_replies_in_order_then_default(receiver):
    receiver.script(
        Reply(201, b"first"),
        Reply(500, {"error": "second"}, {"X-Extra": "yes"}),
    )
    with requests.Session() as s:
        first = s.post(receiver.url + "/a", data=b"one", headers={"X-Test": "1"}, timeout=5)
        second = s.put(receiver.url + "/b", json={"n": 2}, timeout=5)
        third = s.get(receiver.url + "/c", timeout=5)
    assert (first.status_code, first.content) == (201, b"first")
    assert (second.status_code, second.json()) == (500, {"error": "second"})
    assert second.headers["X-Extra"] == "yes"
    assert (third.status_code, third.json()) == (200, {"ok": True})

    recorded = receiver.wait_for(3)
    assert [(r.method, r.path) for r in recorded] == [("POST", "/a"), ("PUT", "/b"), ("GET", "/c")]
    assert recorded[0].body == b"one"
    assert recorded[0].headers["x-test"] == "1"
    assert recorded[1].json() == {"n": 2}
    assert all(r.received_at <= time.time() for r in recorded)
    with pytest.raises(AssertionError):
        receiver.wait_for(4, timeout=0.1)


def test_receiver_stops_cleanly():
    r = Receiver().start()
    url = r.url
    r.stop()
    r.stop()  # idempotent
    with pytest.raises(requests.ConnectionError), requests.Session() as s:
        s.get(url, timeout=1)


def _sign(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _signed_post(receiver: Receiver, body: bytes, timestamp: int | None = None, extra=""):
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = (extra + " " if extra else "") + _sign(SECRET, "msg_1", ts, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": ts, "webhook-signature": signature}
    before = len(receiver.requests)
    with requests.Session() as s:
        s.post(receiver.url, data=body, headers=headers, timeout=5).close()
    return receiver.wait_for(before + 1)[before]


def test_standard_webhooks_checker_accepts_good_and_rejects_tampered(receiver):
    recorded = _signed_post(receiver, b'{"type":"ping"}')
    assert Receiver.verify_standard_webhooks(SECRET, recorded)
    assert receiver.verify_standard_webhooks(SECRET, recorded)

    tampered_body = dataclasses.replace(recorded, body=b'{"type":"pong"}')
    assert not Receiver.verify_standard_webhooks(SECRET, tampered_body)
    other_id = dict(recorded.headers, **{"webhook-id": "msg_2"})
    assert not Receiver.verify_standard_webhooks(
        SECRET, dataclasses.replace(recorded, headers=other_id)
    )
    other_secret = "whsec_" + base64.b64encode(b"x" * 32).decode()
    assert not Receiver.verify_standard_webhooks(other_secret, recorded)
    unsigned = dict(recorded.headers)
    del unsigned["webhook-signature"]
    assert not Receiver.verify_standard_webhooks(
        SECRET, dataclasses.replace(recorded, headers=unsigned)
    )


def test_standard_webhooks_checker_timestamp_and_signature_lists(receiver):
    stale = _signed_post(receiver, b"{}", timestamp=int(time.time()) - 1000)
    assert not Receiver.verify_standard_webhooks(SECRET, stale)
    assert Receiver.verify_standard_webhooks(SECRET, stale, tolerance=2000)
    rotated = _signed_post(receiver, b"{}", extra="v1,bm90IGl0")
    assert Receiver.verify_standard_webhooks(SECRET, rotated)


def _chat(fake: FakeOpenAI, body, key="sk-good"):
    with requests.Session() as s:
        return s.post(
            fake.base_url + "/chat/completions",
            data=body if isinstance(body, bytes) else json.dumps(body),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=5,
        )


CHAT = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ],
    "temperature": 0.2,
    "max_tokens": 50,
}


def test_fake_openai_answers_a_realistic_completion(fake_openai):
    response = _chat(fake_openai, CHAT)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "gpt-4o-mini"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": "echo: hello there"}
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert fake_openai.wait_for(1)[0].json() == CHAT


def test_fake_openai_scripted_answers_in_order(fake_openai):
    fake_openai.script(
        FakeOpenAI.rate_limited(retry_after=2, retry_after_ms=1500),
        FakeOpenAI.server_error(),
        FakeOpenAI.unauthorized(),
        FakeOpenAI.malformed(),
        FakeOpenAI.missing_choices(),
    )
    answers = [_chat(fake_openai, CHAT) for _ in range(6)]
    assert [a.status_code for a in answers] == [429, 500, 401, 200, 200, 200]
    assert answers[0].headers["Retry-After"] == "2"
    assert answers[0].headers["retry-after-ms"] == "1500"
    assert set(answers[0].json()["error"]) >= {"message", "type", "code"}
    assert answers[0].json()["error"]["code"] == "rate_limit_exceeded"
    assert answers[3].content == b"{not json"
    assert "choices" not in answers[4].json()
    assert answers[5].json()["choices"][0]["message"]["content"] == "echo: hello there"
    assert len(fake_openai.requests) == 6


def test_fake_openai_rate_limit_is_classified_with_its_retry_after(fake_openai, allow_private):
    fake_openai.script(FakeOpenAI.rate_limited(retry_after=2, retry_after_ms=1500))
    with pytest.raises(RetryableError) as info:
        http.request(
            make_ctx(),
            "POST",
            fake_openai.base_url + "/chat/completions",
            json=CHAT,
            headers={"Authorization": "Bearer sk-good"},
        )
    assert (info.value.status, info.value.retry_after) == (429, 1.5)


def test_fake_openai_slow_answer(fake_openai):
    fake_openai.script(FakeOpenAI.slow(0.3))
    started = time.monotonic()
    response = _chat(fake_openai, CHAT)
    assert time.monotonic() - started >= 0.3
    assert response.json()["choices"][0]["message"]["content"] == "echo: hello there"


def test_fake_openai_rejects_a_wrong_key(fake_openai):
    response = _chat(fake_openai, CHAT, key="sk-wrong")
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 4}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
    ],
)
def test_fake_openai_rejects_bad_request_shapes(fake_openai, change, param):
    body = {k: v for k, v in {**CHAT, **change}.items() if v is not None}
    response = _chat(fake_openai, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_fake_openai_rejects_a_body_that_is_not_json(fake_openai):
    response = _chat(fake_openai, b"{nope")
    assert response.status_code == 400
    assert "parse the JSON" in response.json()["error"]["message"]


def test_receiver_cli_runs_as_a_process(tmp_path):
    port_file, log_file = tmp_path / "port", tmp_path / "requests.jsonl"
    cmd = [sys.executable, "-m", "hub.testing_servers", "receiver", "--port", "0"]
    cmd += ["--port-file", str(port_file), "--log", str(log_file)]
    cmd += ["--fail-first", "1", "--fail-status", "503"]
    env = clean_env(PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not port_file.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "receiver did not start"
            time.sleep(0.02)
        url = f"http://127.0.0.1:{int(port_file.read_text())}/hook"
        with requests.Session() as s:
            statuses = [s.post(url, data=f"body {i}", timeout=5).status_code for i in range(2)]
        assert statuses == [503, 200]
        lines = [json.loads(line) for line in log_file.read_text().splitlines()]
        assert [(x["method"], x["path"], x["body"]) for x in lines] == [
            ("POST", "/hook", "body 0"),
            ("POST", "/hook", "body 1"),
        ]
        assert all(isinstance(x["time"], float) and "host" in x["headers"] for x in lines)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr.decode()
    assert stderr == b""


def test_recorded_is_a_plain_value():
    r = Recorded("POST", "/x", {"a": "b"}, b'{"k": 1}', 1.0)
    assert r.json() == {"k": 1} and r.text == '{"k": 1}'
