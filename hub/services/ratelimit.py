"""Rate limits per route and per key, counted in a store every worker shares.

A limit is ``N/second``, ``N/minute`` or ``N/hour`` (its grammar is ``hub.rates``, which the
settings read too), counted in fixed windows aligned to the clock. The count lives in the
database (``rate_counters``, one upserted row per bucket and window) or, when HUB_REDIS_URL
is set, in Redis (INCR + EXPIRE): never in process memory, so two gunicorn workers, or two
machines, share one budget.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from flask import Flask
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hub.rates import Rate, parse
from hub.store.models import RateCounter

log = logging.getLogger("hub.ratelimit")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    count: int
    limit: int
    retry_after: int  # whole seconds until the window frees, at least 1


def window(rate: Rate, now: float) -> tuple[int, int]:
    """(start of the current window, seconds until it ends, at least 1)."""
    start = int(now // rate.period) * rate.period
    return start, max(1, math.ceil(start + rate.period - now))


class DatabaseLimiter:
    """Counts in ``rate_counters``; the increment is one INSERT ... ON CONFLICT statement.

    ``clock`` (seconds since the epoch) places each hit in its window; a test sets its own
    so that no test waits for a window to begin.
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock

    def hit(self, session: Session, bucket: str, rate: Rate, now: float | None = None) -> Decision:
        now = self.clock() if now is None else now
        start, retry_after = window(rate, now)
        dialect = session.get_bind().dialect.name
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        expires = datetime.fromtimestamp(start + rate.period, UTC)
        stmt = (
            insert(RateCounter)
            .values(bucket=bucket[:200], window_start=start, count=1, expires_at=expires)
            .on_conflict_do_update(
                index_elements=["bucket", "window_start"],
                set_={"count": RateCounter.count + 1},
            )
            .returning(RateCounter.count)
        )
        count = session.execute(stmt).scalar_one()
        if count == 1:  # a new window: the bucket's old ones are done with
            session.execute(
                delete(RateCounter).where(
                    RateCounter.bucket == bucket[:200], RateCounter.window_start < start
                )
            )
        return Decision(count <= rate.limit, count, rate.limit, retry_after)

    def peek(self, session: Session, bucket: str, rate: Rate, now: float | None = None) -> Decision:
        """The current window's count, without counting: one read, for a cheap refusal."""
        now = self.clock() if now is None else now
        start, retry_after = window(rate, now)
        count = session.scalar(
            select(RateCounter.count).where(
                RateCounter.bucket == bucket[:200], RateCounter.window_start == start
            )
        )
        return Decision((count or 0) < rate.limit, count or 0, rate.limit, retry_after)

    def purge(self, session: Session, before: datetime | None = None) -> int:
        """Drop windows that ended before ``before`` (default: an hour ago)."""
        cutoff = before or datetime.now(UTC) - timedelta(hours=1)
        return session.execute(delete(RateCounter).where(RateCounter.expires_at < cutoff)).rowcount


class RedisLimiter:
    """Counts in Redis under ``prefix + bucket + ":" + window start``, expiring with the window.

    If Redis cannot be reached the request is let through and a warning logged: losing the
    limiter for a moment must not lose webhooks.
    """

    def __init__(self, client, prefix: str = "hub:rl:", clock: Callable[[], float] = time.time):
        self.client = client
        self.prefix = prefix
        self.clock = clock  # as DatabaseLimiter's

    def hit(self, session: Session, bucket: str, rate: Rate, now: float | None = None) -> Decision:
        import redis

        now = self.clock() if now is None else now
        start, retry_after = window(rate, now)
        name = f"{self.prefix}{bucket}:{start}"
        try:
            with self.client.pipeline(transaction=True) as pipe:
                pipe.incr(name)
                pipe.expire(name, rate.period + 1)
                count = int(pipe.execute()[0])
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable (%s); request allowed", type(exc).__name__)
            return Decision(True, 0, rate.limit, retry_after)
        return Decision(count <= rate.limit, count, rate.limit, retry_after)

    def peek(self, session: Session, bucket: str, rate: Rate, now: float | None = None) -> Decision:
        """The current window's count, without counting (allowed if Redis is unreachable)."""
        import redis

        now = self.clock() if now is None else now
        start, retry_after = window(rate, now)
        try:
            count = int(self.client.get(f"{self.prefix}{bucket}:{start}") or 0)
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable (%s); request allowed", type(exc).__name__)
            return Decision(True, 0, rate.limit, retry_after)
        return Decision(count < rate.limit, count, rate.limit, retry_after)


def check(
    limiter: DatabaseLimiter | RedisLimiter, session: Session, limits: list[tuple[str, Rate]]
) -> Decision | None:
    """Count one request against each (bucket, rate); the first refusal, or None.

    On the database the counts are committed at once, so a counter row is never held
    locked while the request goes on to run its pipeline.
    """
    refused = None
    for bucket, rate in limits:
        decision = limiter.hit(session, bucket, rate)
        if not decision.allowed:
            refused = decision
            break
    if isinstance(limiter, DatabaseLimiter) and limits:
        session.commit()
    return refused


def optional_rate(text: object, setting: str) -> Rate | None:
    """A setting's rate, or None where empty or 0 turns the limit off; ValueError naming it."""
    if text in (None, "", 0, "0", False):
        return None
    try:
        return parse(str(text))
    except ValueError as exc:
        raise ValueError(f"HUB_{setting}: {exc}") from None


def init_app(app: Flask) -> None:
    # Refusals per remote address (hub.services.intake) are counted by the same limiter.
    url = app.config.get("REDIS_URL")
    if url:
        import redis

        client = redis.Redis.from_url(str(url), socket_timeout=1.0, socket_connect_timeout=1.0)
        prefix = str(app.config.get("RATE_LIMIT_PREFIX") or "hub:rl:")
        app.extensions["hub.ratelimit"] = RedisLimiter(client, prefix)
    else:
        app.extensions["hub.ratelimit"] = DatabaseLimiter()
