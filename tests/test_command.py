"""The `hub` command (hub.__main__.main): the same commands as `flask --app hub`, plus `hub serve`
and `hub config`; and where the hub keeps its data (hub.config.data_dir). The wheel test
(tests/test_package.py) runs the installed command end to end."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from hub import create_app
from hub.__main__ import main
from hub.config import data_dir, project_root, user_data_dir
from tests.procs import BIN, ROOT, clean_env, hub_env


def hub(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    """The `hub` script this checkout's venv has (pyproject's [project.scripts])."""
    return subprocess.run(
        [str(BIN / "hub"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_hub_help_lists_every_command_of_flask_app_hub_plus_serve_config_and_listen(tmp_path):
    app = create_app({"DATABASE_URL": f"sqlite:///{tmp_path / 'hub.db'}", "SECRET_KEY": "k"})
    flask_commands = set(app.cli.list_commands(None))
    listed = CliRunner().invoke(main, ["--help"])
    assert listed.exit_code == 0, listed.output
    names = {line.split()[0] for line in listed.output.split("Commands:")[1].splitlines() if line}
    assert names == flask_commands | {"serve", "config", "listen"}
    assert {"keys", "routes", "events", "db", "worker", "init", "connectors"} <= names
    # One definition serves both entries: the very same command objects.
    for name in flask_commands:
        assert main.commands[name] is app.cli.commands[name], name


def test_hub_keys_create_makes_a_key_the_admin_api_accepts(database_url_for_test, client, tmp_path):
    env = hub_env(database_url_for_test)
    done = hub(["keys", "create", "ops", "--admin"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    key = done.stdout.splitlines()[0]
    answer = client.get("/admin/api/keys", headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.text
    assert "ops" in [k["name"] for k in answer.json["keys"]]


def test_hub_serve_refuses_a_port_out_of_range_before_starting_gunicorn(tmp_path):
    done = hub(["serve", "--port", "70000"], hub_env(""), tmp_path)
    assert done.returncode == 2
    assert "70000 is not in the range" in done.stderr
    assert "Traceback" not in done.stderr


def test_hub_serve_says_a_bad_setting_in_one_line_and_starts_nothing(tmp_path):
    done = hub(["serve"], hub_env("", HUB_WEB_WORKERS="many"), tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "HUB_WEB_WORKERS: expected a whole number, 1 or more, got 'many'"
    )


def test_hub_config_says_where_the_data_is_and_never_a_secret(tmp_path):
    env = hub_env(
        "postgresql://hub:db-password@127.0.0.1:5432/hub",
        HUB_SECRET_KEY="the-secret-key-value",
        HUB_DATA_DIR="data",  # relative: to the directory the command runs in
    )
    done = hub(["config"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    data = tmp_path / "data"
    assert lines[:4] == [
        f"# data directory: {data}",
        "# database: postgresql+psycopg://hub:***@127.0.0.1:5432/hub",
        "# secret key: HUB_SECRET_KEY",
        f"# metrics directory: {data / 'metrics'}",
    ]
    assert "HUB_DATA_DIR=data" in lines
    assert "the-secret-key-value" not in done.stdout
    assert "db-password" not in done.stdout


def test_hub_config_names_the_sqlite_file_and_the_key_file_in_the_data_directory(tmp_path):
    env = hub_env("", HUB_SECRET_KEY="", HUB_DATA_DIR=str(tmp_path / "data"))
    done = hub(["config"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    data = tmp_path / "data"
    assert done.stdout.splitlines()[1:3] == [
        f"# database: sqlite:///{data / 'hub.db'}",
        f"# secret key: {data / 'secret_key'}",
    ]


def test_the_data_directory_holds_the_database_and_the_secret_key(tmp_path):
    """With HUB_DATA_DIR set and nothing else, `hub db upgrade` and the first start put the
    SQLite database and the development secret key there, not in instance/."""
    data = tmp_path / "data"
    env = clean_env(HUB_DATA_DIR=str(data))
    done = hub(["db", "upgrade"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in data.iterdir()) == ["hub.db", "hub.db-writer.lock", "secret_key"]


def test_the_data_directory_defaults_to_the_checkouts_instance_folder():
    """`make run` and every user of a checkout keep the database and key they have."""
    assert (ROOT / "pyproject.toml").is_file() and project_root() == ROOT
    assert data_dir("") == ROOT / "instance"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"XDG_DATA_HOME": "/srv/xdg"}, Path("/srv/xdg/webhook-hub")),
        ({}, Path.home() / ".local/share/webhook-hub"),
        ({"XDG_DATA_HOME": ""}, Path.home() / ".local/share/webhook-hub"),
        # The XDG rule: a relative XDG_DATA_HOME is ignored.
        ({"XDG_DATA_HOME": "xdg"}, Path.home() / ".local/share/webhook-hub"),
    ],
)
def test_an_installed_hub_keeps_its_data_in_the_users_data_directory(environ, expected):
    assert user_data_dir(environ) == expected


@pytest.mark.parametrize("command", [["config"], ["db", "upgrade"]])
def test_a_data_directory_that_cannot_be_made_is_one_clear_line(tmp_path, command):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    env = clean_env(HUB_DATA_DIR=str(in_the_way / "data"))
    done = hub(command, env, tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"HUB_DATA_DIR: the data directory {in_the_way / 'data'} can't be made (Not a "
        "directory); set HUB_DATA_DIR to a directory the hub may write in"
    )
