"""Fixtures: the hub on a real SQLite file and, when HUB_TEST_DATABASE_URL is set, on the
real PostgreSQL server too. Every test that takes ``app`` runs once per database.

With HUB_TEST_DATABASE_URL set, an unreachable server fails the PostgreSQL tests: they never
skip, so a CI run can't pass by quietly testing less.
"""

from __future__ import annotations

import hmac
import os
import shutil
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text

from hub import create_app
from hub.services.keys import create_key
from hub.services.routes import save_routes
from hub.store.db import Database, upgrade
from tests.schema_check import scratch_postgres

PG_URL = os.environ.get("HUB_TEST_DATABASE_URL")
BACKENDS = ["sqlite"] + (["postgresql"] if PG_URL else [])
TABLES = (
    "attempts",
    "deliveries",
    "events",
    "destinations",
    "destination_changes",
    "routes",
    "api_keys",
    "rate_counters",
    "dashboard_sessions",
    "alert_sends",
    "alerts",
    "alert_rules",
    "alert_channels",
    "alert_state",
    "audit_log",
    "dedup_keys",
    "retention_state",
)

# ``receiver`` and ``fake_openai``: the fixtures a connector's own package gets from the hub's
# pytest plugin (entry point pytest11); named here as well, for runs with plugin autoloading
# off. A plugin already loaded through its entry point is not loaded twice.
pytest_plugins = ["hub.pytest_plugin"]


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory) -> str:
    """A migrated SQLite file, copied for each test (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("template") / "hub.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db)
    db.dispose()
    return str(path)


@pytest.fixture(autouse=True)
def no_hub_settings_from_the_shell(monkeypatch):
    """HUB_* variables in the developer's shell (HUB_STEP_TRIES=1 ...) or a .env file in the
    checkout must not change what the tests see; HUB_TEST_* name the test servers and stay."""
    for name in list(os.environ):
        if name.startswith("HUB_") and not name.startswith("HUB_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HUB_ENV_FILE", "")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database of this test session's own.

    Its name is the configured one plus a random suffix, so two runs on one server (two
    developers, a developer and CI) never drop each other's database.
    """
    with scratch_postgres(PG_URL) as url:
        db = Database(url)
        upgrade(db)
        db.dispose()
        yield url


@pytest.fixture(params=BACKENDS)
def database_url_for_test(request, tmp_path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "hub.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_database")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def app(database_url_for_test, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")
    app = create_app(
        {
            "TESTING": True,
            "DATABASE_URL": database_url_for_test,
            "SECRET_KEY": "test-secret-key-for-the-hub",
            "ROUTE_CACHE_SECONDS": 0,
        }
    )
    yield app
    app.extensions["hub.db"].dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def db(app) -> Database:
    return app.extensions["hub.db"]


@pytest.fixture
def make_key(db):
    """``make_key(scopes=None, name="test", expires_in=None, rate_limit=None, admin=False)``
    -> the key."""

    def make(scopes=None, name="test", expires_in=None, rate_limit=None, admin=False) -> str:
        with db.session() as session:
            _, key = create_key(session, name, scopes, expires_in, rate_limit, admin=admin)
        return key

    return make


@pytest.fixture
def key(make_key) -> str:
    return make_key()


@pytest.fixture
def add_route(app, db):
    """``add_route(name, steps=[...], **fields)``: saved through the same checks as the CLI."""

    def add(name: str, steps=None, **fields):
        data = {"name": name, "steps": steps or [], **fields}
        with db.session() as session:
            save_routes(
                session, [data], app.extensions["hub.connectors"], app.extensions["hub.secrets"]
            )

    return add


@pytest.fixture
def compared(monkeypatch) -> list[tuple]:
    """Every ``hmac.compare_digest`` call as (a, b, result), the real comparison still made:
    proof that a secret-dependent comparison took the constant-time path."""
    calls: list[tuple] = []
    real = hmac.compare_digest

    def recording(a, b):
        result = real(a, b)
        calls.append((a, b, result))
        return result

    monkeypatch.setattr(hmac, "compare_digest", recording)
    return calls


@pytest.fixture
def seed_routes(app, add_route, fake_openai):
    """The seed's two routes: /api/process (text) and /api/chat (the fake OpenAI server)."""
    add_route("process", [{"connector": "text"}])
    add_route(
        "chat",
        [
            {
                "connector": "openai",
                "config": {
                    "base_url": fake_openai.base_url,
                    "user_message": "{{ payload.message }}",
                },
            }
        ],
    )
