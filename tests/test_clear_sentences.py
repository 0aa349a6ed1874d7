"""A newcomer's mistakes get a sentence that says what is wrong and what to do, on every
face: the JSON answers, the dashboard's page, the CLI's one line on stderr and its exit
status. Never an exception's name alone, a traceback or Python's own wording."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import requests
from sqlalchemy import create_engine, text

from hub import create_app
from hub.config import SettingsError, load_settings
from tests.conftest import BACKENDS, PG_URL
from tests.procs import BIN, ROOT, gunicorn, hub_env
from tests.schema_check import scratch_postgres
from tests.test_dashboard import sign_in

UPGRADE = "run `flask --app hub db upgrade`"
KEY = "hk_0123abcd_" + "k" * 43  # well-formed: only the database can tell


@pytest.fixture(params=BACKENDS)
def empty_database(request, tmp_path) -> Iterator[str]:
    """A database nobody has migrated: what a new install has before `db upgrade`."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.db'}"
        return
    with scratch_postgres(PG_URL, "_empty") as url:
        yield url


def hub_on(url: str):
    return create_app(
        {"TESTING": True, "DATABASE_URL": url, "SECRET_KEY": "x", "DB_RETRY_AFTER": 7}
    )


@pytest.fixture
def unmigrated_hub(empty_database):
    app = hub_on(empty_database)
    yield app
    app.extensions["hub.db"].dispose()


def test_an_unmigrated_database_answers_503_naming_the_upgrade_command_on_every_face(
    unmigrated_hub,
):
    app = unmigrated_hub
    client = app.test_client()
    key = {"X-API-Key": KEY}
    answers = {
        "hook": client.post("/hooks/orders", json={"id": 1}, headers=key),
        "seed api": client.post("/api/process", json={"input": "x"}),
        "admin keys": client.get("/admin/api/keys", headers=key),
        "admin events": client.get("/admin/api/events", headers=key),
        "event status": client.get("/events/evt_1", headers=key),
        "metrics": client.get("/metrics", headers=key),
        "ready": client.get("/ready"),
    }
    for face, answer in answers.items():
        assert answer.status_code == 503, (face, answer.get_data(as_text=True))
        assert answer.json["code"] == "schema_outdated", face
        assert UPGRADE in answer.json["error"], face
        assert answer.headers["Retry-After"] == "7", face

    page = sign_in(client, KEY)
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert UPGRADE in page.get_data(as_text=True)

    runner = app.test_cli_runner()
    for args in (
        ["keys", "list"],
        ["keys", "create", "first"],
        ["routes", "list"],
        ["routes", "add", "orders", "--step", "text"],
        ["events", "list"],
        ["worker", "--once"],
    ):
        result = runner.invoke(args=args)
        assert result.exit_code == 1, (args, result.output)
        assert UPGRADE in result.stderr and "OperationalError" not in result.stderr, args
        assert "ProgrammingError" not in result.stderr, args

    # Once migrated, the same hub works: the 503 followed the database's state.
    assert runner.invoke(args=["db", "upgrade"]).exit_code == 0
    answer = client.post("/hooks/orders", json={"id": 1}, headers=key)
    assert answer.status_code == 404 and answer.json["code"] == "unknown_route"


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_a_table_missing_from_a_migrated_database_is_a_500_not_advice_to_upgrade(
    database_url_for_test,
):
    """Upgrading would not bring back a table dropped by hand: that is a fault to look into,
    and the hub says nothing it can't stand behind."""
    engine = create_engine(database_url_for_test)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE dashboard_sessions"))
        conn.execute(text("DROP TABLE api_keys"))
    engine.dispose()
    answer = (
        hub_on(database_url_for_test)
        .test_client()
        .post("/hooks/orders", json={"id": 1}, headers={"X-API-Key": KEY})
    )
    assert answer.status_code == 500 and answer.json["code"] == "internal_error"
    assert "upgrade" not in answer.get_data(as_text=True)


def test_a_bad_retry_schedule_names_the_option_and_the_bad_value(runner, db):
    result = runner.invoke(
        args=["routes", "add", "orders", "--step", "text", "--retry-schedule", "5,abc"]
    )
    assert result.exit_code == 2, result.output
    assert "'--retry-schedule'" in result.stderr and "'abc'" in result.stderr
    assert "30,120,600" in result.stderr and "invalid literal" not in result.stderr
    assert runner.invoke(args=["routes", "show", "orders"]).exit_code == 1  # nothing saved
    kept = runner.invoke(
        args=["routes", "add", "orders", "--step", "text", "--retry-schedule", "5, 60"]
    )
    assert kept.exit_code == 0, kept.output
    shown = json.loads(runner.invoke(args=["routes", "show", "orders"]).stdout)
    assert shown["retry_schedule"] == [5, 60]


@pytest.mark.parametrize(
    "url",
    [
        "mysql://hub:hunter2@localhost/hub",
        "mssql+pyodbc://hub:hunter2@dsn",
        "postgresql+psycopg2://hub:hunter2@localhost/hub",
        "not a url at all",
    ],
)
def test_an_unsupported_database_url_names_the_databases_and_url_forms(url):
    with pytest.raises(SettingsError) as stopped:
        load_settings({"DATABASE_URL": url})
    (line,) = stopped.value.problems
    assert line.startswith("HUB_DATABASE_URL: ")
    assert "SQLite or PostgreSQL" in line and "sqlite:///" in line and "postgresql://" in line
    assert "hunter2" not in line


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///hub.db",
        "postgres://hub@db/hub",
        "postgresql://hub@db/hub",
        "postgresql+psycopg://hub@db/hub",
    ],
)
def test_the_supported_database_url_forms_are_taken(url):
    assert load_settings({"DATABASE_URL": url}).database_url == url


def test_the_cli_on_a_mysql_url_says_what_it_supports_without_a_traceback(tmp_path):
    done = subprocess.run(
        [str(BIN / "flask"), "--app", "hub", "keys", "list"],
        cwd=tmp_path,
        env=hub_env("mysql://hub:hunter2@localhost/hub"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "SQLite or PostgreSQL" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    assert "hunter2" not in done.stderr


@pytest.mark.slow
def test_a_second_hub_on_a_taken_port_stops_at_once_naming_hub_port(tmp_path, sqlite_template):
    """gunicorn alone retried for 5 s and then said "Can't connect"."""
    database = tmp_path / "hub.db"
    shutil.copy(sqlite_template, database)
    with socket.create_server(("127.0.0.1", 0)) as first:  # the hub already running
        port = first.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "--no-control-socket"]
            + ["hub:create_app()"],
            cwd=ROOT,
            env=hub_env(f"sqlite:///{database}", HUB_PORT=str(port)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert f"127.0.0.1:{port} is already in use" in done.stderr, done.stderr
    assert "HUB_PORT" in done.stderr
    assert "Retrying" not in done.stderr and "Can't connect" not in done.stderr
    assert took < 30, took


@pytest.mark.parametrize(
    ("option", "field", "value"),
    [
        ("--dedup-window", "dedup_window", "99999999999999999999"),
        ("--retry-schedule", "retry_schedule", "5,99999999999999999999"),
    ],
)
def test_a_time_too_long_to_count_is_refused_with_a_sentence_by_cli_and_api(
    runner, client, make_key, option, field, value
):
    result = runner.invoke(
        args=["routes", "add", "orders", "--mode", "async", "--step", "text", option, value]
    )
    assert result.exit_code == 1, result.output
    assert "at most 100 years" in result.stderr and "OverflowError" not in result.stderr
    numbers = [int(v) for v in value.split(",")]
    body = {
        "name": "orders",
        "mode": "async",
        "steps": [{"connector": "text"}],
        field: numbers if field == "retry_schedule" else numbers[0],
    }
    answer = client.post(
        "/admin/api/routes", json=body, headers={"X-API-Key": make_key(admin=True)}
    )
    assert 400 <= answer.status_code < 500, answer.get_data(as_text=True)
    assert "at most 100 years" in answer.get_data(as_text=True)


@pytest.mark.slow
def test_gunicorn_on_an_unmigrated_database_says_so_at_start_and_answers_503(tmp_path):
    log = tmp_path / "web.log"
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    with gunicorn(url, log, workers=1, HUB_EMBEDDED_WORKER="false") as (_, base):
        answer = requests.post(f"{base}/hooks/orders", json={}, headers={"X-API-Key": KEY})
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert answer.json() == {
            "error": "The database schema is not up to date: run `flask --app hub db upgrade`",
            "code": "schema_outdated",
        }
    assert f"{UPGRADE}; until then requests that need it are answered 503" in log.read_text()
