"""What ingest keeps in memory to stay fast, and how soon a change reaches it.

Routes are remembered per process for a few seconds (HUB_ROUTE_CACHE_SECONDS): a change
made through this process's admin API takes effect at once, a change made elsewhere
(another gunicorn worker, the CLI) within those seconds. Keys are never remembered (a
revocation takes effect at once everywhere: tests/test_revocation.py). And a commit is
durable, not only written: SQLite runs with ``synchronous=FULL``.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text

from hub import create_app

TEXT = [{"connector": "text", "config": {"field": "text"}}]


def cached_app(database_url: str, seconds: float):
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url,
            "SECRET_KEY": "test-secret-key-for-the-hub",
            "ROUTE_CACHE_SECONDS": seconds,
        }
    )


def post(client, key: str, route: str = "shout"):
    return client.post(f"/hooks/{route}", json={"text": "hi"}, headers={"X-API-Key": key})


def test_a_route_changed_elsewhere_takes_effect_within_the_cache_seconds(
    database_url_for_test, add_route, key
):
    add_route("shout", TEXT)
    web = cached_app(database_url_for_test, 0.5)
    try:
        client = web.test_client()
        assert post(client, key).status_code == 200  # the route is now remembered
        add_route("shout", TEXT, enabled=False)  # another process disables it
        assert post(client, key).status_code == 200  # still the remembered route
        time.sleep(0.6)
        assert post(client, key).status_code == 404  # the change has arrived
    finally:
        web.extensions["hub.db"].dispose()


def test_a_route_unknown_a_moment_ago_arrives_within_the_cache_seconds(
    database_url_for_test, add_route, key
):
    web = cached_app(database_url_for_test, 0.5)
    try:
        client = web.test_client()
        assert post(client, key, "late").status_code == 404
        add_route("late", TEXT)
        time.sleep(0.6)
        assert post(client, key, "late").status_code == 200
    finally:
        web.extensions["hub.db"].dispose()


def test_changes_through_this_processs_admin_api_take_effect_at_once(
    database_url_for_test, add_route, make_key, key
):
    add_route("shout", TEXT)
    web = cached_app(database_url_for_test, 3600)
    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    try:
        client = web.test_client()
        assert post(client, key).status_code == 200
        patched = client.patch("/admin/api/routes/shout", json={"enabled": False}, headers=admin)
        assert patched.status_code == 200
        assert post(client, key).status_code == 404
        enabled = client.patch("/admin/api/routes/shout", json={"enabled": True}, headers=admin)
        assert enabled.status_code == 200
        assert post(client, key).status_code == 200
        prefix = key.split("_")[1]
        assert client.delete(f"/admin/api/keys/{prefix}", headers=admin).status_code == 200
        assert post(client, key).status_code == 401
    finally:
        web.extensions["hub.db"].dispose()


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_sqlite_commits_are_flushed_to_disk(db):
    with db.engine.connect() as conn:
        # 2 is FULL: every commit waits for fsync, so a 202 survives power loss.
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"


def test_a_request_session_is_kept_for_the_next_request_only_if_it_did_nothing(app):
    """An untouched session is used again by the thread's next request; one that began a
    transaction or holds an object is closed, and the next request gets a fresh one."""
    from hub.store.db import get_session
    from hub.store.models import ApiKey

    with app.app_context():
        untouched = get_session()
    with app.app_context():
        assert get_session() is untouched

    with app.app_context():
        reading = get_session()
        reading.execute(text("SELECT 1"))  # a transaction begun, never ended by the request
        assert reading.in_transaction()
    with app.app_context():
        after = get_session()
        assert after is not reading
        assert not after.in_transaction()
    assert not reading.in_transaction()  # closed: its transaction rolled back

    with app.app_context():
        holding = get_session()
        holding.add(ApiKey(name="never committed", prefix="zz", digest="x" * 64))
    with app.app_context():
        fresh = get_session()
        assert fresh is not holding
        assert not fresh.new
