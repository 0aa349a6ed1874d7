"""Rate limits per route and per key: 429 with Retry-After, logged as rate_limited, and
shared by every process (two app instances, real gunicorn workers, real Redis).

In-process tests stop the limiter's clock ten minutes into an hour, so no count is ever cut
by a window's end and no test waits for one. The Redis tests run when HUB_TEST_REDIS_URL
names a server (``.ci/run`` sets it); with it set, an unreachable server fails them.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
import requests
from sqlalchemy import func, select

from hub import create_app, rates
from hub.rates import Rate
from hub.services import ratelimit
from hub.services.ratelimit import DatabaseLimiter
from hub.store.models import Event, RateCounter
from tests.procs import gunicorn, wait_until

REDIS_URL = os.environ.get("HUB_TEST_REDIS_URL")
needs_redis = pytest.mark.skipif(
    not REDIS_URL, reason="set HUB_TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/0) to run it"
)
BODY = {"input": "count me"}
STEPS = [{"connector": "text"}]
# Where the stopped clocks stand: ten minutes into an hour, at the start of a minute.
TEN_PAST = 1_800_000_000 // 3600 * 3600 + 600.0


class Clock:
    """A clock the test moves by hand; every app given to it counts in its windows."""

    def __init__(self, *apps, now: float = TEN_PAST):
        self.now = now
        for app in apps:
            app.extensions["hub.ratelimit"].clock = self

    def __call__(self) -> float:
        return self.now


def statuses(client, n: int, route: str = "r", key: str | None = None) -> list[int]:
    headers = {"X-API-Key": key} if key else {}
    return [
        client.post(f"/hooks/{route}", json=BODY, headers=headers).status_code for _ in range(n)
    ]


@pytest.mark.parametrize(
    "text, rate",
    [
        ("100/minute", Rate(100, 60)),
        ("5/second", Rate(5, 1)),
        ("1000/hour", Rate(1000, 3600)),
        (" 7 / min ", Rate(7, 60)),
        ("3/h", Rate(3, 3600)),
        ("2/s", Rate(2, 1)),
    ],
)
def test_parse_rates(text, rate):
    assert rates.parse(text) == rate
    assert rates.normalise(text) == str(rate)


@pytest.mark.parametrize("text", ["", "100", "100/day", "-1/minute", "0/minute", "x/minute"])
def test_parse_refuses_what_is_not_a_rate(text):
    with pytest.raises(ValueError, match="not a rate"):
        rates.parse(text)


def test_window_and_retry_after():
    assert ratelimit.window(Rate(10, 60), 120.0) == (120, 60)
    assert ratelimit.window(Rate(10, 60), 179.2) == (120, 1)
    assert ratelimit.window(Rate(10, 3600), 3600 * 5 + 10.5) == (18000, 3590)


def test_route_limit_answers_429_with_retry_after_and_logs_it(app, client, db, add_route, key):
    add_route("r", STEPS, rate_limit="3/hour")
    Clock(app)
    assert statuses(client, 3, key=key) == [200, 200, 200]
    refused = client.post("/hooks/r", json=BODY, headers={"X-API-Key": key})
    assert refused.status_code == 429
    assert refused.json["code"] == "rate_limited"
    assert refused.headers["Retry-After"] == "3000"  # the 50 minutes left of the hour
    with db.session() as session:
        event = session.scalars(select(Event).order_by(Event.received_at.desc())).first()
        assert (event.status, event.reason, event.response_status) == (
            "rejected",
            "rate_limited",
            429,
        )
        assert event.key_prefix == key.split("_")[1]
        assert session.scalar(select(func.count()).select_from(Event)) == 4


def test_a_new_window_frees_the_budget(app, client, add_route, key):
    add_route("r", STEPS, rate_limit="2/minute")
    clock = Clock(app)
    assert statuses(client, 3, key=key) == [200, 200, 429]
    clock.now += 59.5  # the same minute
    refused = client.post("/hooks/r", json=BODY, headers={"X-API-Key": key})
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
    clock.now += 0.5
    assert statuses(client, 3, key=key) == [200, 200, 429]


def test_unauthenticated_requests_do_not_spend_the_route_budget(app, client, add_route, key):
    add_route("r", STEPS, rate_limit="2/hour")
    Clock(app)
    assert statuses(client, 5) == [401] * 5
    assert statuses(client, 3, key=key) == [200, 200, 429]


def test_key_limit_is_per_key(app, client, add_route, make_key):
    add_route("r", STEPS)
    limited = make_key(name="noisy", rate_limit="2/hour")
    other = make_key(name="quiet")
    Clock(app)
    assert statuses(client, 3, key=limited) == [200, 200, 429]
    assert statuses(client, 3, key=other) == [200, 200, 200]
    add_route("r2", STEPS)
    assert statuses(client, 1, route="r2", key=limited) == [429]  # the key's, on any route


def test_signature_routes_are_limited_too(app, client, add_route):
    from hub import signatures

    add_route(
        "r", STEPS, rate_limit="2/hour", verify={"scheme": "github", "secrets": ["gh-secret"]}
    )
    Clock(app)
    body = b'{"input": "signed"}'
    headers = {"Content-Type": "application/json"}
    headers.update(signatures.sign("github", body=body, secret="gh-secret"))
    codes = [client.post("/hooks/r", data=body, headers=headers).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_database_counter_rolls_its_windows(db):
    limiter, rate = DatabaseLimiter(), Rate(2, 60)
    with db.session() as session:
        hits = [limiter.hit(session, "route:x", rate, now=600.0 + i) for i in range(3)]
        assert [h.allowed for h in hits] == [True, True, False]
        assert [h.count for h in hits] == [1, 2, 3]
        assert hits[2].retry_after == 58
        nxt = limiter.hit(session, "route:x", rate, now=661.0)
        assert (nxt.allowed, nxt.count) == (True, 1)
        rows = session.execute(select(RateCounter.window_start, RateCounter.count)).all()
        assert rows == [(660, 1)]  # the finished window was dropped
        assert limiter.purge(session, before=datetime.fromtimestamp(721, UTC)) == 1
        assert limiter.purge(session, before=datetime.now(UTC) - timedelta(hours=1)) == 0


def test_two_app_instances_share_one_budget(app, client, add_route, database_url_for_test, key):
    """Two apps, two engines, one database: what two gunicorn workers are."""
    add_route("r", STEPS, rate_limit="4/hour")
    other = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url_for_test,
            "SECRET_KEY": app.config["SECRET_KEY"],
        }
    )
    try:
        other_client = other.test_client()
        Clock(app, other)
        seen = []
        for _ in range(3):
            seen += statuses(client, 1, key=key) + statuses(other_client, 1, key=key)
        assert seen == [200, 200, 200, 200, 429, 429]
    finally:
        other.extensions["hub.db"].dispose()


@pytest.mark.serial  # requests at once under real gunicorn: run alone
def test_gunicorn_workers_share_one_budget(database_url_for_test, add_route, make_key, tmp_path):
    """gunicorn counts on the real clock: a burst that an hour's end cut in two is sent
    again on a second route (an hour ends at most once in a few seconds)."""
    for route in ("r", "again"):
        add_route(route, STEPS, rate_limit="10/hour")
    key = make_key()
    log = tmp_path / "gunicorn.log"
    # Sync workers take one request at a time, so concurrent requests reach both; the access
    # log names each answer's worker pid, to see that both did answer.
    fmt = {"GUNICORN_CMD_ARGS": "--access-logformat 'pid=%(p)s %(U)s %(s)s' -k sync"}
    with gunicorn(database_url_for_test, log, workers=2, **fmt) as (_, base):

        def answered_by(path: str) -> set[str]:
            return set(re.findall(rf"pid=<(\d+)> {path} \d+", log.read_text()))

        def both_workers_up() -> bool:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: requests.get(base + "/health", timeout=5), range(16)))
            return len(answered_by("/health")) == 2

        wait_until(both_workers_up, 30, what="both gunicorn workers to answer")

        def burst(route: str) -> list[requests.Response]:
            def one(_):
                return requests.post(
                    f"{base}/hooks/{route}", json=BODY, headers={"X-API-Key": key}, timeout=20
                )

            with ThreadPoolExecutor(8) as pool:
                return list(pool.map(one, range(40)))

        for route in ("r", "again"):
            hour = time.time() // 3600
            answers = burst(route)
            if time.time() // 3600 == hour:
                break
    codes = sorted(a.status_code for a in answers)
    odd = [a.text for a in answers if a.status_code not in (200, 429)]
    assert codes == [200] * 10 + [429] * 30, odd
    assert all(a.headers["Retry-After"].isdigit() for a in answers if a.status_code == 429)
    assert len(answered_by(f"/hooks/{route}")) == 2, log.read_text()[-2000:]


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the real Redis, removed afterwards. The ping fails the test
    when HUB_TEST_REDIS_URL names a server that does not answer."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    client.ping()
    prefix = f"hub-test:{uuid.uuid4().hex}:"
    yield prefix
    for name in client.scan_iter(match=prefix + "*"):
        client.delete(name)
    client.close()


def redis_app(database_url: str, prefix: str, secret_key: str, redis_url: str):
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": secret_key,
            "REDIS_URL": redis_url,
            "RATE_LIMIT_PREFIX": prefix,
        }
    )


@needs_redis
def test_redis_counts_for_every_instance(app, db, add_route, database_url_for_test, redis_prefix):
    add_route("r", STEPS, rate_limit="3/hour")
    from hub.services.keys import create_key

    with db.session() as session:
        _, key = create_key(session, "k", None, None, "5/hour")
    first = redis_app(database_url_for_test, redis_prefix, app.config["SECRET_KEY"], REDIS_URL)
    second = redis_app(database_url_for_test, redis_prefix, app.config["SECRET_KEY"], REDIS_URL)
    try:
        assert isinstance(first.extensions["hub.ratelimit"], ratelimit.RedisLimiter)
        Clock(first, second)
        a, b = first.test_client(), second.test_client()
        seen = statuses(a, 2, key=key) + statuses(b, 2, key=key)
        assert seen == [200, 200, 200, 429]
        refused = b.post("/hooks/r", json=BODY, headers={"X-API-Key": key})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        client = redis.Redis.from_url(REDIS_URL)
        names = sorted(n.decode() for n in client.scan_iter(match=redis_prefix + "*"))
        assert [n.split(":")[2] for n in names] == ["key", "route"]
        assert int(client.get(names[1])) == 5
        assert 0 < client.ttl(names[1]) <= 3601
        client.close()
        with db.session() as session:  # nothing counted in the database
            assert session.scalar(select(func.count()).select_from(RateCounter)) == 0
    finally:
        first.extensions["hub.db"].dispose()
        second.extensions["hub.db"].dispose()


def test_unreachable_redis_lets_requests_through_and_says_so(
    app, add_route, database_url_for_test, key, caplog
):
    """Needs no Redis server: nothing listens on port 1."""
    add_route("r", STEPS, rate_limit="1/hour")
    down = redis_app(
        database_url_for_test, "hub-test:", app.config["SECRET_KEY"], "redis://127.0.0.1:1/0"
    )
    try:
        with caplog.at_level("WARNING", logger="hub.ratelimit"):
            assert statuses(down.test_client(), 2, key=key) == [200, 200]
        assert "rate limiter unavailable" in caplog.text
    finally:
        down.extensions["hub.db"].dispose()
