"""Rate limits per route and per key: 429 with Retry-After, logged as rate_limited, and
shared by every process (two app instances, real gunicorn workers, real Redis)."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
import redis
import requests
from sqlalchemy import func, select

from hub import create_app, ratelimit
from hub.models import Event, RateCounter
from hub.ratelimit import DatabaseLimiter, Rate
from tests.procs import gunicorn, wait_until

REDIS_URL = "redis://127.0.0.1:6379/0"
BODY = {"input": "count me"}
STEPS = [{"connector": "text"}]


def fresh_window(period: int, need: float = 8.0) -> None:
    """Wait for a new window if this one ends within ``need`` seconds (keeps counts whole)."""
    left = period - time.time() % period
    if left < need:
        time.sleep(left + 0.05)


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
    assert ratelimit.parse(text) == rate
    assert ratelimit.normalise(text) == str(rate)


@pytest.mark.parametrize("text", ["", "100", "100/day", "-1/minute", "0/minute", "x/minute"])
def test_parse_refuses_what_is_not_a_rate(text):
    with pytest.raises(ValueError, match="not a rate"):
        ratelimit.parse(text)


def test_window_and_retry_after():
    assert ratelimit.window(Rate(10, 60), 120.0) == (120, 60)
    assert ratelimit.window(Rate(10, 60), 179.2) == (120, 1)
    assert ratelimit.window(Rate(10, 3600), 3600 * 5 + 10.5) == (18000, 3590)


def test_route_limit_answers_429_with_retry_after_and_logs_it(client, db, add_route, key):
    add_route("r", STEPS, rate_limit="3/hour")
    fresh_window(3600)
    assert statuses(client, 3, key=key) == [200, 200, 200]
    refused = client.post("/hooks/r", json=BODY, headers={"X-API-Key": key})
    assert refused.status_code == 429
    assert refused.json["code"] == "rate_limited"
    retry_after = int(refused.headers["Retry-After"])
    expected = 3600 - time.time() % 3600
    assert 1 <= retry_after <= 3600 and abs(retry_after - expected) <= 2
    with db.session() as session:
        event = session.scalars(select(Event).order_by(Event.received_at.desc())).first()
        assert (event.status, event.reason, event.response_status) == (
            "rejected",
            "rate_limited",
            429,
        )
        assert event.key_prefix == key.split("_")[1]
        assert session.scalar(select(func.count()).select_from(Event)) == 4


def test_unauthenticated_requests_do_not_spend_the_route_budget(client, add_route, key):
    add_route("r", STEPS, rate_limit="2/hour")
    fresh_window(3600)
    assert statuses(client, 5) == [401] * 5
    assert statuses(client, 3, key=key) == [200, 200, 429]


def test_key_limit_is_per_key(client, add_route, make_key):
    add_route("r", STEPS)
    limited = make_key(name="noisy", rate_limit="2/hour")
    other = make_key(name="quiet")
    fresh_window(3600)
    assert statuses(client, 3, key=limited) == [200, 200, 429]
    assert statuses(client, 3, key=other) == [200, 200, 200]
    add_route("r2", STEPS)
    assert statuses(client, 1, route="r2", key=limited) == [429]  # the key's, on any route


def test_signature_routes_are_limited_too(client, add_route):
    from hub import signatures

    add_route(
        "r", STEPS, rate_limit="2/hour", verify={"scheme": "github", "secrets": ["gh-secret"]}
    )
    fresh_window(3600)
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
            "KEY_CACHE_SECONDS": 0,
        }
    )
    try:
        other_client = other.test_client()
        fresh_window(3600)
        seen = []
        for _ in range(3):
            seen += statuses(client, 1, key=key) + statuses(other_client, 1, key=key)
        assert seen == [200, 200, 200, 200, 429, 429]
    finally:
        other.extensions["hub.db"].dispose()


def test_gunicorn_workers_share_one_budget(database_url_for_test, add_route, make_key, tmp_path):
    add_route("r", STEPS, rate_limit="10/hour")
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
        fresh_window(3600, need=30)

        def one(_):
            return requests.post(
                f"{base}/hooks/r", json=BODY, headers={"X-API-Key": key}, timeout=20
            )

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(40)))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200] * 10 + [429] * 30
    assert all(a.headers["Retry-After"].isdigit() for a in answers if a.status_code == 429)
    assert len(answered_by("/hooks/r")) == 2, log.read_text()[-2000:]


@pytest.fixture
def redis_prefix():
    """A unique key prefix on the real Redis, removed afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"hub-test:{uuid.uuid4().hex}:"
    yield prefix
    for name in client.scan_iter(match=prefix + "*"):
        client.delete(name)
    client.close()


def redis_app(database_url: str, prefix: str, secret_key: str, redis_url: str = REDIS_URL):
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": secret_key,
            "KEY_CACHE_SECONDS": 0,
            "REDIS_URL": redis_url,
            "RATE_LIMIT_PREFIX": prefix,
        }
    )


def test_redis_counts_for_every_instance(app, db, add_route, database_url_for_test, redis_prefix):
    add_route("r", STEPS, rate_limit="3/hour")
    from hub.keys import create_key

    with db.session() as session:
        _, key = create_key(session, "k", None, None, "5/hour")
    first = redis_app(database_url_for_test, redis_prefix, app.config["SECRET_KEY"])
    second = redis_app(database_url_for_test, redis_prefix, app.config["SECRET_KEY"])
    try:
        assert isinstance(first.extensions["hub.ratelimit"], ratelimit.RedisLimiter)
        fresh_window(3600)
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
    app, add_route, database_url_for_test, redis_prefix, key, caplog
):
    add_route("r", STEPS, rate_limit="1/hour")
    down = redis_app(
        database_url_for_test, redis_prefix, app.config["SECRET_KEY"], "redis://127.0.0.1:1/0"
    )
    try:
        with caplog.at_level("WARNING", logger="hub.ratelimit"):
            assert statuses(down.test_client(), 2, key=key) == [200, 200]
        assert "rate limiter unavailable" in caplog.text
    finally:
        down.extensions["hub.db"].dispose()
