"""The hub as a user installs it: a wheel built from this checkout, installed with the
dependencies it declares into a fresh virtualenv, and run from a directory that is not the
checkout (no alembic.ini, no migrations/ folder, no connectors/ beside it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests

from tests.procs import BIN, ROOT, gunicorn, hub_env, wait_until

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# pip may fetch the build backend and the dependencies from the package index (its cache
# and the machine's pip configuration keep that short); none of it may hang the suite.
PIP_TIMEOUT = 240


def requirement_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_requirements_txt_lists_the_declared_dependencies_then_the_tools():
    """`make test` installs requirements.txt; `pip install` reads pyproject. They must agree:
    the runtime part of one is the other's dependencies, the rest the test and dev extras."""
    text = (ROOT / "requirements.txt").read_text()
    runtime, marker, tools = text.partition("# Tests and tooling")
    assert marker, "requirements.txt lost its '# Tests and tooling' line"
    project = PYPROJECT["project"]
    assert requirement_lines(runtime) == project["dependencies"]
    extras = project["optional-dependencies"]
    tools_extras = extras["test"] + extras["docs"] + extras["dev"] + extras["otel"]
    declared_tools = [r for r in tools_extras if not r.startswith("webhook-hub")]
    assert sorted(requirement_lines(tools)) == sorted(declared_tools)
    assert "webhook-hub[test]" in extras["dev"] and "webhook-hub[docs]" in extras["dev"]
    assert "webhook-hub[otel]" in extras["test"]  # the suite runs the tracing tests


def run(args: list, cwd: Path, env: dict | None = None, timeout: float = 60) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtualenv with the wheel of this checkout and its declared dependencies."""
    work = tmp_path_factory.mktemp("package")
    # Build from a copy of what the wheel is made of, so the checkout gets no build/ folder.
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    # The three folders pyproject.toml maps into the one package hub.
    for folder in ("hub", "connectors", "migrations"):
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    wheels = work / "wheels"
    pip = [BIN / "python", "-m", "pip"]
    # The build backend (setuptools) is in the test extra: no isolated environment to make.
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", wheels, source]
    run(build, work, timeout=PIP_TIMEOUT)
    (wheel,) = wheels.glob("webhook_hub-*.whl")
    env = work / "venv"
    # The standard library's venv, without a pip of its own: this test's pip installs into it.
    run([BIN / "python", "-m", "venv", "--without-pip", env], work)
    run(
        [*pip, "--python", env / "bin" / "python", "install", "--quiet", wheel],
        work,
        timeout=PIP_TIMEOUT,
    )
    return env


def outside_env(venv: Path, database_url: str, **extra: str) -> dict[str, str]:
    """A hub process's environment that can only find the installed hub."""
    env = hub_env(database_url, **extra)
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_the_wheel_installs_only_the_hub_package(venv, tmp_path):
    script = (
        "import importlib.metadata as m, importlib.util as u, json, hub;"
        "files = m.distribution('webhook-hub').files;"
        "print(json.dumps({'hub': hub.__file__,"
        " 'tops': sorted({f.parts[0] for f in files if f.parts[0] != '..'}),"
        " 'scripts': [f.name for f in files if f.parts[0] == '..'],"
        " 'mako': [str(f) for f in files if f.name == 'script.py.mako'],"
        " 'files': sorted(f.as_posix() for f in files if f.suffix == '.py'),"
        " 'builtin': u.find_spec('hub.builtin.text').origin,"
        " 'migrations': u.find_spec('hub.migrations').origin,"
        " 'found': [n for n in ('connectors', 'tests', 'migrations') if u.find_spec(n)]}))"
    )
    seen = json.loads(run([venv / "bin" / "python", "-c", script], tmp_path, outside_env(venv, "")))
    assert Path(seen["hub"]).is_relative_to(venv)
    assert seen["tops"] == ["hub", next(t for t in seen["tops"] if t.endswith(".dist-info"))]
    assert seen["mako"] == ["hub/migrations/script.py.mako"]
    # The repository's connectors/ and migrations/ land inside hub, under their import names.
    builtins = {f.rpartition("/")[2] for f in seen["files"] if f.startswith("hub/builtin/")}
    assert builtins == {p.name for p in (ROOT / "connectors").glob("*.py")}
    assert "hub/migrations/env.py" in seen["files"]
    versions = [f for f in seen["files"] if f.startswith("hub/migrations/versions/")]
    assert len(versions) == len(list((ROOT / "migrations" / "versions").glob("*.py"))) > 0
    assert Path(seen["builtin"]).is_relative_to(Path(seen["hub"]).parent)
    assert Path(seen["migrations"]).is_relative_to(Path(seen["hub"]).parent)
    assert not [f for f in seen["files"] if f.startswith(("connectors/", "migrations/"))]
    assert seen["scripts"] == ["hub"]  # the `hub` command, in the venv's bin/
    assert seen["found"] == []


def test_the_editable_install_maps_connectors_and_migrations_into_hub(tmp_path):
    """`make` installs the checkout with `pip install -e .`: from any directory, hub.builtin and
    hub.migrations are the checkout's top-level connectors/ and migrations/ folders."""
    script = (
        "import importlib.util as u, json;"
        "print(json.dumps([u.find_spec(n).origin for n in"
        " ('hub', 'hub.builtin', 'hub.builtin.text', 'hub.migrations')]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    origins = json.loads(run([sys.executable, "-c", script], tmp_path, env))
    assert origins == [
        str(ROOT / "hub" / "__init__.py"),
        str(ROOT / "connectors" / "__init__.py"),
        str(ROOT / "connectors" / "text.py"),
        str(ROOT / "migrations" / "__init__.py"),
    ]


@pytest.mark.slow
def test_an_installed_hub_keeps_its_data_outside_the_venv_and_serves_with_the_hub_command(
    venv, tmp_path, receiver
):
    """`pip install webhook-hub`, then the `hub` command alone, from a directory holding no
    file of the checkout, on the embedded SQLite default: the database and the secret key go
    to the user's data directory (outside the venv, so rebuilding it keeps them), `hub
    config` says where, and `hub serve` runs gunicorn with the configuration in the wheel."""
    elsewhere = tmp_path / "elsewhere"  # neither the checkout nor a copy of any of it
    elsewhere.mkdir()
    data = tmp_path / "xdg" / "webhook-hub"
    # No HUB_DATABASE_URL, no HUB_SECRET_KEY: the defaults a new user starts with.
    env = outside_env(
        venv, "", HUB_SECRET_KEY="", XDG_DATA_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path)
    )
    hub = venv / "bin" / "hub"

    assert "newest schema" in run([hub, "db", "upgrade"], elsewhere, env)
    key = run([hub, "keys", "create", "sender"], elsewhere, env).splitlines()[0]
    admin = run([hub, "keys", "create", "ops", "--admin"], elsewhere, env).splitlines()[0]
    step = "http:" + json.dumps({"url": receiver.url + "/in"})
    # The same commands under `flask --app hub`, on the same data.
    flask = [venv / "bin" / "flask", "--app", "hub"]
    run([*flask, "routes", "add", "orders", "--mode", "async", "--step", step], elsewhere, env)
    assert list(elsewhere.iterdir()) == []  # nothing written into the working directory
    assert sorted(p.name for p in data.iterdir()) == ["hub.db", "hub.db-writer.lock", "secret_key"]

    shown = run([hub, "config"], elsewhere, env)
    assert f"# data directory: {data}\n" in shown
    assert f"# database: sqlite:///{data / 'hub.db'}\n" in shown
    assert f"# secret key: {data / 'secret_key'}\n" in shown
    assert (data / "secret_key").read_text().strip() not in shown

    # gunicorn from the fresh virtualenv through `hub serve`, its embedded worker delivering;
    # --port wins over HUB_PORT (here a port already taken, which gunicorn would refuse).
    serve = [hub, "serve", "--port", "0", "--no-control-socket"]
    taken = str(urlsplit(receiver.url).port)
    with gunicorn(
        "",
        tmp_path / "gunicorn.log",
        workers=1,
        cwd=elsewhere,
        command=serve,
        own_metrics=False,  # the default: in the data directory
        **{k: env[k] for k in ("HUB_SECRET_KEY", "XDG_DATA_HOME", "HOME", "PATH")},
        HUB_PORT=taken,
        PYTHONPATH="",
    ) as (_, base):
        answer = requests.post(
            base + "/hooks/orders", json={"order": 42}, headers={"X-API-Key": key}, timeout=10
        )
        assert answer.status_code == 202, answer.text
        (delivered,) = receiver.wait_for(1, timeout=20)
        assert delivered.json() == {"order": 42}

        def status() -> dict | None:
            url = answer.json()["status_url"]
            event = requests.get(url, headers={"X-API-Key": admin}, timeout=5)
            return event.json()["status"] == "delivered" and event.json()

        event = wait_until(status, 20, what="the event to be marked delivered")
        assert [(a["connector"], a["outcome"], a["http_status"]) for a in event["attempt_log"]] == [
            ("http", "ok", 200)
        ]
    assert (data / "metrics").is_dir()
    assert list(elsewhere.iterdir()) == []


def test_the_image_sets_the_data_directory_its_user_owns():
    """In the image the hub's user has no home to write in: HUB_DATA_DIR names the folder the
    Dockerfile gives it (and compose mounts the metrics volume in)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    (folder,) = re.findall(r"HUB_DATA_DIR=(\S+)", dockerfile)
    assert f"chown hub:hub {folder} " in dockerfile
