"""Limits that hold while a step runs: a template's time and size, the sync deadline
during a step (504 ``timeout``), and the size and whole-call deadline of an answer a
connector reads. The hostile shapes are the ones a sender really tried; every test that
could hang without its limit runs under a bound of its own and fails instead."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

import hub.deadline as deadline_module
import hub.http as http
from hub.connectors import Connector, PermanentError, RetryableError, StepContext
from hub.deadline import DeadlineExceeded, call_before, interrupting
from hub.services.delivery import Worker
from hub.services.templating import TemplateLimits, TemplateProblem, evaluate_filter, render_config
from tests.rows import attempts, events, summary
from tests.servers import Reply
from tests.test_http import make_ctx as step_context

MB = 1024 * 1024
LONG_LISTS = {"a": list(range(40_000)), "b": list(range(40_000, 80_000))}


def finishes_within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``, run where a missing limit fails the test after ``seconds`` instead of
    hanging it (the runaway thread is left to end on its own)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds}s: the limit did not hold"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- templates ------------------------------------------------------------------------------

SMALL = TemplateLimits(timeout=0.5, max_output=100_000)
PAYLOAD = {**LONG_LISTS, "s": "x" * 1000, "n": 5000, "big": 5_000_000}


@pytest.mark.parametrize(
    "source, limit",
    [
        # 40,000 x 40,000 iterations with nothing to output: 46 s before there was a limit.
        (
            "{% for x in payload.a %}{% for y in payload.b %}{% endfor %}{% endfor %}",
            "HUB_TEMPLATE_TIMEOUT",
        ),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "HUB_TEMPLATE_TIMEOUT",
        ),
        # Each of these would build megabytes and output a few characters.
        ("{{ (payload.s * payload.n)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ (payload.a * payload.n)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ (2 ** payload.big) % 7 }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ ('%2000000d' % 1)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ ('%*d' % (payload.big, 1))|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ '%2000000s'|format('x')|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ '{:>{w}}'.format(1, w=payload.big)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ 'x'|center(payload.big)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        (
            "{{ (payload.s ~ '\n' ~ payload.s)|indent(payload.big)|length }}",
            "HUB_TEMPLATE_MAX_OUTPUT",
        ),
        ("{{ payload.s.ljust(payload.big)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ payload.s|replace('x', payload.s)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ payload.a|join(payload.s)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ [1]|batch(payload.big, 0)|first|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        ("{{ (1).to_bytes(payload.big, 'big')|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
        # Output itself, counted as it is generated.
        ("{% for x in payload.a %}{{ payload.s }}{% endfor %}", "HUB_TEMPLATE_MAX_OUTPUT"),
    ],
)
def test_hostile_templates_stop_at_a_limit_that_names_the_field(source, limit):
    started = time.monotonic()
    with pytest.raises(TemplateProblem) as info:
        finishes_within(5, lambda: render_config({"body": source}, {"payload": PAYLOAD}, SMALL))
    assert info.value.code == "template_limit"
    assert str(info.value).startswith("body: ")
    assert limit in str(info.value)
    assert time.monotonic() - started < SMALL.timeout + 2  # a wide margin


def test_templates_within_the_limits_render_as_before():
    config = {
        "body": "{% for x in payload.a[:1000] %}{{ x % 10 }}{% endfor %}",
        "title": "{{ payload.s|length * 2 }} {{ '%5s'|format('ab') }} {{ 'ab'|center(6) }}|",
    }
    rendered = render_config(config, {"payload": PAYLOAD}, SMALL)
    assert rendered["body"] == "0123456789" * 100
    assert rendered["title"] == "2000    ab   ab  |"


def test_the_output_limit_holds_for_the_whole_config_and_names_the_field_that_crossed_it():
    config = {"first": "{{ payload.s * 60 }}", "second": "{{ payload.s * 60 }}"}
    with pytest.raises(TemplateProblem) as info:
        render_config(config, {"payload": PAYLOAD}, SMALL)
    assert str(info.value).startswith("second: template output is larger than")


@pytest.mark.parametrize(
    "expression, limit",
    [
        ("payload.a|select('in', payload.b)|list|length > 0", "HUB_TEMPLATE_TIMEOUT"),
        ("(payload.s * payload.n)|length > 0", "HUB_TEMPLATE_MAX_OUTPUT"),
    ],
)
def test_hostile_filters_stop_at_a_limit(expression, limit):
    with pytest.raises(TemplateProblem) as info:
        finishes_within(5, lambda: evaluate_filter(expression, {"payload": PAYLOAD}, SMALL))
    assert info.value.code == "template_limit"
    assert str(info.value).startswith("filter: ")
    assert limit in str(info.value)


# --- the watchdog ---------------------------------------------------------------------------


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_an_interrupt_never_lands_after_its_block_has_left():
    """Deadlines set around the moment each block ends: the interrupt surfaces from the
    ``with`` statement or not at all, never in the code that follows."""
    fired = escaped = 0
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)  # let the watchdog thread in often: a sharper race
    try:
        for i in range(150):
            try:
                with interrupting(time.monotonic() + (i % 20) * 0.0001):
                    spin(0.001)
            except DeadlineExceeded:
                fired += 1
            try:
                spin(0.005)
            except DeadlineExceeded:
                escaped += 1
    finally:
        sys.setswitchinterval(switch)
    assert escaped == 0
    assert fired > 0


def test_deadlines_armed_one_after_another_wake_the_watchdog_once(monkeypatch):
    """A quick delivery arms a deadline for its templates, its call and its step, each
    a little later than the last one's: the watchdog thread is woken only for one due
    before it would wake anyway, not at each (a wake costs the delivery's thread the
    interpreter)."""
    watchdog = deadline_module._watchdog
    woken = []
    notify = watchdog._cond.notify
    monkeypatch.setattr(watchdog._cond, "notify", lambda *a: woken.append(1) or notify(*a))
    with interrupting(time.monotonic() + 30):  # a call in flight, say
        for _ in range(50):
            with interrupting(time.monotonic() + 2):
                pass
            time.sleep(0.002)  # the watchdog thread gets its turn
    assert len(woken) <= 2, len(woken)
    # And it still fires on time.
    with pytest.raises(DeadlineExceeded):
        finishes_within(5, lambda: call_before(time.monotonic() + 0.3, spin, 5))


def test_call_before_stops_waiting_for_a_sleeping_call():
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        finishes_within(5, lambda: call_before(time.monotonic() + 0.3, time.sleep, 5))
    assert time.monotonic() - started < 1.5


def test_call_before_interrupts_a_loop_not_merely_abandons_it():
    ticks = [0]

    def loop() -> None:
        end = time.monotonic() + 10
        while time.monotonic() < end:
            ticks[0] += 1

    with pytest.raises(DeadlineExceeded):
        finishes_within(5, lambda: call_before(time.monotonic() + 0.3, loop))
    time.sleep(0.3)
    stopped_at = ticks[0]
    time.sleep(0.3)
    assert ticks[0] == stopped_at > 0  # the loop no longer runs


def test_call_before_interrupts_only_in_the_code_it_was_told():
    """Elsewhere (a library, which may hold a lock) the helper is left alone: the caller
    still stops waiting at the deadline, and the helper finishes its work."""
    finished = threading.Event()

    def loop() -> None:
        spin(1.0)
        finished.set()

    with pytest.raises(DeadlineExceeded):
        call_before(time.monotonic() + 0.2, loop, interrupt_in="/somewhere/else.py")
    assert finished.wait(3)


def test_call_before_returns_what_the_call_returns_or_raises():
    assert call_before(time.monotonic() + 5, lambda x: x * 2, 21) == 42
    with pytest.raises(ZeroDivisionError):
        call_before(time.monotonic() + 5, lambda: 1 / 0)


# --- answers a connector reads --------------------------------------------------------------


def make_ctx(limit: int = MB, deadline: float | None = None) -> StepContext:
    return step_context(deadline, max_response_bytes=limit)


def streamed(megabytes: int, *, declare_length: bool) -> Iterator[bytes]:
    """An answer of ``megabytes`` MB, made as it is sent (never held whole)."""
    head = b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
    if declare_length:
        head += b"Content-Length: %d\r\n" % (megabytes * MB)
    yield head + b"\r\n"
    block = b"x" * (64 * 1024)
    for _ in range(megabytes * 16):
        yield block


def dripped(head: bytes, piece: bytes, count: int = 100) -> Iterator[bytes]:
    yield head
    for _ in range(count):
        yield piece


# What a client took but had not read yet sits in socket buffers (the server's is small).
BUFFER_SLACK = 8 * MB


@pytest.fixture
def allow_private(monkeypatch):
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")


@pytest.mark.parametrize("declare_length", [False, True])
def test_a_huge_answer_is_cut_at_the_limit_and_the_rest_never_read(
    receiver, allow_private, declare_length
):
    receiver.script(Reply(raw=streamed(128, declare_length=declare_length)))
    ctx = make_ctx(limit=MB)
    with pytest.raises(PermanentError) as info:
        finishes_within(10, lambda: http.request(ctx, "GET", receiver.url))
    assert info.value.code == "response_too_large"
    assert "HUB_MAX_RESPONSE_BYTES (1048576 bytes)" in info.value.message
    [sent] = receiver.wait_sent()
    assert sent <= MB + http.READ_CHUNK + BUFFER_SLACK  # of 128 MB on offer
    assert ctx.exchange.status == 200


def test_a_huge_error_answer_is_cut_but_keeps_its_status_class(receiver, allow_private):
    def failing() -> Iterator[bytes]:
        answer = streamed(128, declare_length=False)
        yield next(answer).replace(b"200 OK", b"503 Service Unavailable")
        yield from answer

    receiver.script(Reply(raw=failing()))
    with pytest.raises(RetryableError) as info:
        finishes_within(10, lambda: http.request(make_ctx(limit=MB), "GET", receiver.url))
    assert info.value.status == 503
    [sent] = receiver.wait_sent()
    assert sent <= MB + http.READ_CHUNK + BUFFER_SLACK


def test_an_answer_within_the_limit_is_read_whole(receiver, allow_private):
    receiver.script(Reply(raw=streamed(1, declare_length=False)))
    response = http.request(make_ctx(limit=MB), "GET", receiver.url)
    assert response.content == b"x" * MB


def test_a_dripping_answer_ends_at_the_calls_deadline(receiver, allow_private):
    receiver.script(Reply(raw=dripped(b"HTTP/1.0 200 OK\r\n\r\n", b"x"), interval=0.2))
    started = time.monotonic()
    with pytest.raises(RetryableError) as info:
        finishes_within(10, lambda: http.request(make_ctx(), "GET", receiver.url, timeout=1.0))
    took = time.monotonic() - started
    assert info.value.code == "upstream_timeout"
    assert 0.9 <= took < 2.0  # at the deadline, not 20 s later when the drip ends


def test_dripping_headers_end_at_the_steps_deadline_as_the_hubs_timeout(receiver, allow_private):
    receiver.script(Reply(raw=dripped(b"HTTP/1.0 200 OK\r\n", b"X-Drip: 1\r\n"), interval=0.2))
    started = time.monotonic()
    ctx = make_ctx(deadline=time.monotonic() + 0.7)
    with pytest.raises(RetryableError) as info:
        finishes_within(10, lambda: http.request(ctx, "GET", receiver.url, timeout=30))
    assert info.value.code == "timeout"
    assert time.monotonic() - started < 1.7


# --- through the hub, on each database -------------------------------------------------------


class Wait(BaseModel):
    seconds: float = 5.0


class Sleepy(Connector):
    name = "sleepy"
    description = "Sleeps in Python, as a connector stuck in a blocking call would."
    Config = Wait

    def run(self, payload: Any, ctx: StepContext) -> Any:
        time.sleep(self.config.seconds)
        return {"slept": True}


class Spinner(Connector):
    name = "spinner"
    description = "Loops in Python, swallowing what it can."
    Config = Wait

    def run(self, payload: Any, ctx: StepContext) -> Any:
        end = time.monotonic() + self.config.seconds
        while time.monotonic() < end:
            # A careless connector: the deadline is not an Exception, so it gets through.
            with contextlib.suppress(Exception):
                spin(0.01)
        return {"spun": True}


class Computing(Spinner):
    """A spinner that says it only computes: run in the delivery thread itself."""

    name = "computing"
    computes_only = True
    threads: ClassVar[list[str]] = []

    def run(self, payload: Any, ctx: StepContext) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().run(payload, ctx)


@pytest.fixture
def slow_connectors(app):
    registry = app.extensions["hub.connectors"]
    for connector in (Sleepy, Spinner, Computing):
        registry.register(connector)
    app.config["STEP_TRIES"] = 1
    Computing.threads.clear()
    yield
    for connector in (Sleepy, Spinner, Computing):
        registry.unregister(connector.name)


def post(client, key, payload=None, route="flow"):
    return client.post(f"/hooks/{route}", json=payload or {}, headers={"X-API-Key": key})


def timed_post(client, key, payload=None, route="flow"):
    started = time.monotonic()
    response = finishes_within(15, lambda: post(client, key, payload, route))
    return response, time.monotonic() - started


@pytest.mark.parametrize("connector", ["sleepy", "spinner", "computing"])
def test_a_sync_step_past_the_deadline_is_stopped_and_answers_504(
    client, key, add_route, app, db, slow_connectors, connector
):
    app.config["SYNC_TIMEOUT"] = 0.5
    add_route("flow", [{"connector": connector}])
    response, took = timed_post(client, key)
    assert response.status_code == 504, response.json
    assert response.json["code"] == "timeout"
    assert took < 0.5 + 2.0  # promptly: not the 5 s the step wanted
    [event] = events(db)
    assert event.status == "failed"
    assert "deadline" in event.last_error
    assert summary(db) == [(0, connector, 1, "retryable", None)]


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, {"ok": True}, delay=3),
        Reply(raw=dripped(b"HTTP/1.0 200 OK\r\n\r\n", b"x"), interval=0.2),
    ],
    ids=["slow", "dripping"],
)
def test_a_slow_receiver_past_the_sync_deadline_answers_504_not_502(
    client, key, add_route, app, db, receiver, reply
):
    app.config["SYNC_TIMEOUT"] = 0.5
    add_route("flow", [{"connector": "http", "config": {"url": receiver.url, "timeout": 10}}])
    receiver.script(reply)
    response, took = timed_post(client, key)
    assert (response.status_code, response.json["code"]) == (504, "timeout")
    assert took < 0.5 + 2.0
    [event] = events(db)
    assert event.status == "failed"
    assert "deadline" in event.last_error


def test_a_receiver_slower_than_its_own_timeout_stays_an_upstream_timeout(
    client, key, add_route, app, db, receiver, make_key
):
    """Within the hub's deadline, the receiver's own shorter timeout is the upstream's
    fault: retryable, and on an async route retried later."""
    app.config["STEP_TRIES"] = 1
    add_route(
        "later",
        [{"connector": "http", "config": {"url": receiver.url, "timeout": 0.2}}],
        mode="async",
    )
    receiver.script(Reply(200, {"ok": True}, delay=2))
    assert post(client, key, route="later").status_code == 202
    assert Worker(app, name="test-worker").run_once() == 1
    [event] = events(db)
    assert event.status == "retrying"
    assert "timed out after 0.20s" in event.last_error


@pytest.mark.parametrize("connector", ["spinner", "computing"])
def test_an_async_step_past_the_workers_deadline_is_stopped_and_retried(
    client, key, add_route, app, db, slow_connectors, connector
):
    app.config["LEASE_SECONDS"] = 1.0  # the worker stops a step 0.2 s before the lease ends
    add_route("later", [{"connector": connector}], mode="async")
    assert post(client, key, route="later").status_code == 202
    worker = Worker(app, name="test-worker")
    started = time.monotonic()
    assert finishes_within(15, worker.run_once) == 1
    assert time.monotonic() - started < 1.0 + 2.0
    [event] = events(db)
    assert event.status == "retrying"
    assert "deadline" in event.last_error
    assert summary(db) == [(0, connector, 1, "retryable", None)]


def test_a_connector_that_only_computes_runs_in_the_delivery_thread_itself(
    client, key, add_route, app, db, slow_connectors
):
    """No hand-off to a helper thread for it (the text connector's case)."""
    add_route("later", [{"connector": "computing", "config": {"seconds": 0}}], mode="async")
    assert post(client, key, route="later").status_code == 202
    caller = threading.current_thread().name
    assert Worker(app, name="test-worker").run_once() == 1
    assert [event.status for event in events(db)] == ["delivered"]
    assert Computing.threads == [caller]


HOSTILE_BODY = "{% for x in payload.a %}{% for y in payload.b %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    "body, limit",
    [
        (HOSTILE_BODY, "HUB_TEMPLATE_TIMEOUT"),
        ("{{ (payload.s * payload.n)|length }}", "HUB_TEMPLATE_MAX_OUTPUT"),
    ],
)
def test_a_template_past_its_limit_fails_the_sync_step_with_422(
    client, key, add_route, app, db, receiver, body, limit
):
    app.config["TEMPLATE_TIMEOUT"] = 0.3
    add_route("flow", [{"connector": "http", "config": {"url": receiver.url, "body": body}}])
    payload = {**LONG_LISTS, "s": "x" * 1000, "n": 10_000_000}
    response, took = timed_post(client, key, payload)
    assert response.status_code == 422, response.json
    assert response.json["code"] == "template_limit"
    assert response.json["error"].startswith("body: ")
    assert limit in response.json["error"]
    assert took < 0.3 + 3.0
    assert receiver.requests == []
    [event] = events(db)
    assert (event.status, event.last_error) == ("failed", response.json["error"])
    assert summary(db) == [(0, "http", 1, "permanent", None)]


def test_a_template_still_rendering_at_the_sync_deadline_answers_504(
    client, key, add_route, app, db, receiver
):
    app.config["SYNC_TIMEOUT"] = 0.3  # nearer than the template's own limit
    app.config["TEMPLATE_TIMEOUT"] = 10
    add_route(
        "flow", [{"connector": "http", "config": {"url": receiver.url, "body": HOSTILE_BODY}}]
    )
    response, took = timed_post(client, key, LONG_LISTS)
    assert (response.status_code, response.json["code"]) == (504, "timeout")
    assert response.json["error"] == "body: template was still rendering at the step's deadline"
    assert took < 0.3 + 2.0
    [event] = events(db)
    assert event.status == "failed"
    assert receiver.requests == []


def test_a_filter_past_its_limit_fails_the_event_with_its_reason(
    client, key, add_route, app, db, receiver
):
    add_route(
        "flow",
        [{"connector": "http", "config": {"url": receiver.url}}],
        filter="(payload.s * payload.n)|length > 0",
    )
    response = post(client, key, {"s": "x" * 1000, "n": 10_000_000})
    assert (response.status_code, response.json["code"]) == (422, "template_limit")
    [event] = events(db)
    assert event.status == "failed"
    assert event.last_error.startswith("filter: the * operator would build")
    assert receiver.requests == []


def test_an_async_template_past_its_limit_fails_at_once_never_retried(
    client, key, add_route, app, db, receiver
):
    app.config["TEMPLATE_TIMEOUT"] = 0.3
    add_route(
        "later",
        [{"connector": "http", "config": {"url": receiver.url, "body": HOSTILE_BODY}}],
        mode="async",
    )
    assert post(client, key, LONG_LISTS, route="later").status_code == 202
    assert finishes_within(15, Worker(app, name="test-worker").run_once) == 1
    [event] = events(db)
    assert event.status == "failed"
    assert "HUB_TEMPLATE_TIMEOUT (0.3 s)" in event.last_error
    assert receiver.requests == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_huge_answer_fails_the_step_permanently(client, key, add_route, app, db, receiver, mode):
    app.config["MAX_RESPONSE_BYTES"] = MB
    add_route("flow", [{"connector": "http", "config": {"url": receiver.url}}], mode=mode)
    receiver.script(Reply(raw=streamed(128, declare_length=False)))
    response = finishes_within(10, lambda: post(client, key))
    if mode == "sync":
        assert (response.status_code, response.json["code"]) == (502, "response_too_large")
    else:
        assert response.status_code == 202
        assert finishes_within(10, Worker(app, name="test-worker").run_once) == 1
    [event] = events(db)
    assert event.status == "failed"  # permanent: the same answer would come again
    assert "HUB_MAX_RESPONSE_BYTES" in event.last_error
    [attempt] = attempts(db)
    assert (attempt.outcome, attempt.http_status) == ("permanent", 200)
    [sent] = receiver.wait_sent()
    assert sent <= MB + http.READ_CHUNK + BUFFER_SLACK
