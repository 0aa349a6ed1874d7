"""The settings model (hub.config): strict parsing, one clear line per bad value at start-up
(from `flask --app hub` and from gunicorn, with no traceback), .env, warnings about unknown
HUB_* variables, and the table of docs/configuration.md, which is generated from the model."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from hub import create_app, http
from hub.config import (
    NOT_SETTINGS,
    RETIRED,
    TABLE_END,
    TABLE_START,
    Settings,
    SettingsError,
    load_settings,
    markdown_table,
    read_env_file,
    unknown_variables,
    variable,
)
from hub.services.delivery import start_embedded
from tests.procs import BIN, ROOT, clean_env, gunicorn, hub_env

FLAG = "expected true or false (also 1/0, yes/no, on/off)"


def app_with(database_url: str, **config):
    return create_app({"TESTING": True, "DATABASE_URL": database_url, "SECRET_KEY": "k", **config})


# --- flags ---

SPELLINGS = [
    *[(s, True) for s in ("true", "TRUE", "True", "1", "yes", "YES", "on", "On", " on ")],
    *[(s, False) for s in ("false", "FALSE", "False", "0", "no", "No", "off", "OFF")],
]


@pytest.mark.parametrize(("spelling", "value"), SPELLINGS)
def test_every_spelling_of_a_flag(monkeypatch, spelling, value):
    monkeypatch.setenv("HUB_EMBEDDED_WORKER", spelling)
    monkeypatch.setenv("HUB_ALLOW_PRIVATE_TARGETS", spelling)
    settings = load_settings()
    assert settings.embedded_worker is value
    assert settings.allow_private_targets is value
    assert http.allow_private_targets() is value  # the guard reads the same setting


@pytest.mark.parametrize("spelling", ["False", "off", "NO", "0"])
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_a_worker_turned_off_in_any_spelling_stays_off(
    database_url_for_test, monkeypatch, spelling
):
    monkeypatch.setenv("HUB_EMBEDDED_WORKER", spelling)
    app = app_with(database_url_for_test)
    try:
        assert app.config["EMBEDDED_WORKER"] is False
        assert start_embedded(app) is None
    finally:
        app.extensions["hub.db"].dispose()


@pytest.mark.parametrize("spelling", ["t", "n", "enabled", "", "2", "none", "truee"])
def test_anything_else_is_not_a_flag(monkeypatch, spelling):
    monkeypatch.setenv("HUB_EMBEDDED_WORKER", spelling)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.problems == [f"HUB_EMBEDDED_WORKER: {FLAG}, got {spelling!r}"]


# --- one bad value of each kind ---

BAD = [
    ("HUB_EMBEDDED_WORKER", "maybe", FLAG),
    ("HUB_SYNC_TIMEOUT", "abc", "expected a number of seconds, more than 0"),
    ("HUB_TEMPLATE_TIMEOUT", "0", "expected a number of seconds, more than 0"),
    ("HUB_LEASE_SECONDS", "inf", "expected a number of seconds, more than 0"),
    ("HUB_ROUTE_CACHE_SECONDS", "-1", "expected a number of seconds, 0 or more"),
    ("HUB_MAX_BODY_BYTES", "1.5", "expected a whole number, 0 or more"),
    ("HUB_STORED_HEADERS", "-5", "expected a whole number, 0 or more"),
    ("HUB_TRUSTED_PROXIES", "two", "expected a whole number, 0 or more"),
    ("HUB_STEP_TRIES", "0", "expected a whole number, 1 or more"),
    ("HUB_MAX_JSON_DEPTH", "501", "expected a whole number from 1 to 500"),
    ("HUB_PORT", "99999", "expected a port number, 0 to 65535"),
    ("HUB_ENV", "prod", "expected development or production"),
    ("HUB_DATABASE_POOLER", "pgbouncer", "expected none or transaction"),
    (
        "HUB_REFUSAL_LIMIT",
        "lots",
        "expected a rate such as 30/minute (1 or more per second, minute or hour), or empty or 0",
    ),
    (
        "HUB_REFUSAL_LIMIT",
        "0/minute",
        "expected a rate such as 30/minute (1 or more per second, minute or hour), or empty or 0",
    ),
]
# Values that may carry a password are named, never shown.
BAD_SECRET = [
    ("HUB_DATABASE_URL", "pg://user:hunter2@db:5432:9/x", "expected a SQLite or PostgreSQL URL"),
    ("HUB_REDIS_URL", "user:hunter2@cache:6379", "expected a Redis URL"),
    ("HUB_DATABASE_LISTEN_URL", "sqlite:////tmp/hunter2.db", "expected a PostgreSQL URL"),
]


@pytest.mark.parametrize(("name", "value", "expects"), BAD)
def test_a_bad_value_names_the_variable_what_it_expects_and_what_it_got(
    monkeypatch, name, value, expects
):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.problems == [f"{name}: {expects}, got {value!r}"]


@pytest.mark.parametrize(("name", "value", "expects"), BAD_SECRET)
def test_a_bad_url_is_named_without_its_password(monkeypatch, name, value, expects):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    [line] = info.value.problems
    assert line.startswith(f"{name}: {expects}") and "hunter2" not in line


@pytest.mark.parametrize(
    ("config", "line"),
    [
        ({"SYNC_TIMEOUT": "abc"}, "HUB_SYNC_TIMEOUT: expected a number of seconds"),
        ({"EMBEDDED_WORKER": "maybe"}, f"HUB_EMBEDDED_WORKER: {FLAG}"),
        ({"STORED_HEADERS": True}, "HUB_STORED_HEADERS: expected a whole number, 0 or more"),
        ({"TRUSTED_PROXIES": -1}, "HUB_TRUSTED_PROXIES: expected a whole number, 0 or more"),
    ],
)
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_create_app_overrides_are_checked_the_same_way(database_url_for_test, config, line):
    with pytest.raises(SettingsError, match=f"^{re.escape(line)}"):
        app_with(database_url_for_test, **config)


def test_overrides_take_python_values_and_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("HUB_STEP_TRIES", "7")
    settings = load_settings({"STEP_TRIES": 2, "ROUTE_CACHE_SECONDS": 0, "REFUSAL_LIMIT": 0})
    assert (settings.step_tries, settings.route_cache_seconds) == (2, 0.0)
    assert settings.refusal_limit == ""  # 0 turns the limit off
    assert load_settings({"REFUSAL_LIMIT": "100/min"}).refusal_limit == "100/minute"
    assert load_settings({"EMBEDDED_WORKER": False}).embedded_worker is False


# --- in real processes: flask and gunicorn ---

# One bad value of each kind at once: each gets its own line, in the model's order.
ALL_BAD = {name: value for name, value, _ in BAD[:13]}
ALL_BAD_LINES = [f"{name}: {expects}, got {value!r}" for name, value, expects in BAD[:13]]


def problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("HUB_")]


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_flask_stops_with_one_line_per_bad_value_and_no_traceback(database_url_for_test):
    done = run_flask(hub_env(database_url_for_test, **ALL_BAD))
    assert done.returncode != 0
    assert sorted(problem_lines(done.stderr)) == sorted(ALL_BAD_LINES)
    assert done.stderr.strip().splitlines() == problem_lines(done.stderr)  # nothing else
    assert "Traceback" not in done.stdout + done.stderr


def run_flask(env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`flask --app hub routes list`: any command builds the app first."""
    return subprocess.run(
        [str(BIN / "flask"), "--app", "hub", "routes", "list"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_gunicorn(env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "hub:create_app()"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_gunicorn_stops_with_one_line_per_bad_value_and_no_traceback(database_url_for_test):
    done = run_gunicorn(hub_env(database_url_for_test, **ALL_BAD))
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert sorted(problem_lines(output)) == sorted(ALL_BAD_LINES)
    assert "Traceback" not in output
    assert "Listening at" not in output  # it stopped before binding


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_gunicorn_stops_cleanly_when_the_app_refuses_to_start(database_url_for_test):
    """on_starting builds the app: production without a secret key stops the master."""
    env = hub_env(database_url_for_test, HUB_PORT="0", HUB_ENV="production", HUB_SECRET_KEY="")
    done = run_gunicorn(env)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "HUB_SECRET_KEY is not set" in output
    assert "Traceback" not in output


# --- .env ---


def test_env_file_precedence_environment_over_file_over_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hub.env"
    path.write_text("HUB_STEP_TRIES=5\nHUB_SYNC_TIMEOUT=7\nOPENAI_API_KEY=sk-from-file\n")
    environ = {"HUB_ENV_FILE": str(path), "HUB_STEP_TRIES": "2"}
    assert read_env_file(environ) == path
    assert environ["HUB_STEP_TRIES"] == "2"  # the environment wins
    assert environ["HUB_SYNC_TIMEOUT"] == "7"  # the file fills what the environment lacks
    assert environ["OPENAI_API_KEY"] == "sk-from-file"  # connectors see it too
    assert read_env_file({"HUB_ENV_FILE": ""}) is None  # empty: no file
    assert read_env_file({}) is None  # no .env in the current directory: nothing to read
    with pytest.raises(SettingsError) as info:  # a file named on purpose must be there
        read_env_file({"HUB_ENV_FILE": str(tmp_path / "missing.env")})
    assert info.value.problems == [
        f"HUB_ENV_FILE: expected a file that exists, got {str(tmp_path / 'missing.env')!r}"
    ]


def env_without_env_file(**extra: str) -> dict[str, str]:
    """A child's environment that reads the default .env (the tests turn it off elsewhere)."""
    env = clean_env(**extra)
    del env["HUB_ENV_FILE"]
    return env


def test_a_dotenv_file_in_the_current_directory_is_read(tmp_path):
    (tmp_path / ".env").write_text(
        "# development settings\nHUB_STEP_TRIES=5\nHUB_SYNC_TIMEOUT=7\nHUB_EMBEDDED_WORKER=off\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "hub.config"],
        cwd=tmp_path,
        env=env_without_env_file(HUB_STEP_TRIES="2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    shown = dict(line.split("=", 1) for line in done.stdout.splitlines() if line[0] != "#")
    assert shown["HUB_STEP_TRIES"] == "2"  # the environment wins over the file
    assert shown["HUB_SYNC_TIMEOUT"] == "7.0"  # the file over the default (25)
    assert shown["HUB_EMBEDDED_WORKER"] == "false"
    assert shown["HUB_WEB_WORKERS"] == "2"  # the default where neither says


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_a_bad_value_in_dotenv_stops_flask_and_gunicorn(tmp_path, database_url_for_test):
    (tmp_path / ".env").write_text("HUB_SYNC_TIMEOUT=soon\n")
    env = env_without_env_file(
        HUB_DATABASE_URL=database_url_for_test, HUB_SECRET_KEY="k", HUB_PORT="0"
    )
    line = "HUB_SYNC_TIMEOUT: expected a number of seconds, more than 0, got 'soon'"
    flask = run_flask(env, cwd=tmp_path)
    served = run_gunicorn(env, cwd=tmp_path)
    for done in (flask, served):
        assert done.returncode != 0
        assert problem_lines(done.stdout + done.stderr) == [line]
        assert "Traceback" not in done.stdout + done.stderr


# --- unknown variables ---


def test_an_unknown_hub_variable_is_named_with_the_nearest_setting():
    environ = {
        "HUB_SYNC_TIMOUT": "5",
        "HUB_EMBEDED_WORKER": "false",
        "HUB_NOTHING_LIKE_IT": "1",
        "HUB_KEY_CACHE_SECONDS": "10",  # retired: a revocation is seen at once
        "HUB_STEP_TRIES": "1",
        "HUB_TEST_DATABASE_URL": "postgresql://",  # the test suite's own
        "HUB_BENCH_DATABASE_URL": "postgresql://",  # the benchmarks' own
        "PATH": "/bin",
    }
    assert unknown_variables(environ) == [
        "HUB_EMBEDED_WORKER is not a setting of the hub and is ignored; "
        "did you mean HUB_EMBEDDED_WORKER?",
        "HUB_KEY_CACHE_SECONDS is no longer a setting and is ignored: a revoked key is refused "
        "at once in every process (an admin's request reads its key, a webhook's commit checks "
        "it), so no key is kept for a time",
        "HUB_NOTHING_LIKE_IT is not a setting of the hub and is ignored",
        "HUB_SYNC_TIMOUT is not a setting of the hub and is ignored; "
        "did you mean HUB_SYNC_TIMEOUT?",
    ]


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_flask_and_gunicorn_warn_about_a_typo_once(database_url_for_test, tmp_path):
    warning = (
        "HUB_SYNC_TIMOUT is not a setting of the hub and is ignored; did you mean HUB_SYNC_TIMEOUT?"
    )
    done = run_flask(hub_env(database_url_for_test, HUB_SYNC_TIMOUT="5"))
    assert done.returncode == 0, done.stderr
    assert done.stderr.count(warning) == 1
    log = tmp_path / "web.log"
    with gunicorn(database_url_for_test, log, workers=2, HUB_SYNC_TIMOUT="5"):
        pass
    # Once for the server, not once per worker.
    assert log.read_text().count(warning) == 1


# --- the docs' table ---


def test_the_configuration_page_table_is_the_models_own():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    assert TABLE_START in readme and TABLE_END in readme
    table = readme.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == markdown_table(), "run `python -m hub.config --readme docs/configuration.md`"
    for field, info in Settings.model_fields.items():
        assert info.description, f"{variable(field)} has no description"
        assert f"| `{variable(field)}` |" in table


def test_every_hub_variable_the_code_names_is_a_setting():
    """A HUB_* name in the hub's code that the model lacks is a setting read (or documented)
    outside the model: add it to hub.config.Settings."""
    known = {variable(f) for f in Settings.model_fields}
    named: set[str] = set()
    files = [*(ROOT / "hub").rglob("*.py"), *(ROOT / "connectors").rglob("*.py")]
    for path in [*files, ROOT / "gunicorn.conf.py"]:
        named |= set(re.findall(r"\bHUB_[A-Z][A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    strays = {n for n in named - known - set(RETIRED) if not n.startswith(NOT_SETTINGS)}
    assert not strays


@pytest.mark.parametrize(
    ("pooler", "listen_url", "listens_on"),
    [
        ("none", None, "postgresql://hub:***@db:5432/hub"),
        ("transaction", None, None),  # PgBouncer would drop the notifications: workers poll
        ("transaction", "postgres://hub:pw@pg:5432/hub", "postgresql://hub:***@pg:5432/hub"),
    ],
)
def test_a_worker_listens_on_the_server_itself_never_through_a_transaction_pooler(
    pooler, listen_url, listens_on
):
    """Workers through PgBouncer in transaction mode LISTEN on HUB_DATABASE_LISTEN_URL, or
    not at all (tests/test_pgbouncer.py runs them through it)."""
    from sqlalchemy import make_url

    from hub.store.db import Database

    db = Database(
        "postgresql+psycopg://hub:pw@db:5432/hub", pooler=pooler, listen_url=listen_url
    )  # no connection is made
    shown = db.listen_url and make_url(db.listen_url).render_as_string(hide_password=True)
    db.dispose()
    assert shown == listens_on
