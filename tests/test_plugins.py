"""A developer adds a connector: entry points, HUB_CONNECTORS, `connectors list` and `new`,
the contract checks in hub.testing, and the example of docs/writing-a-connector.md run through
a real route."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import types
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import BaseModel

from hub import create_app
from hub.cli import scaffold
from hub.connectors import (
    BUILTIN_CONNECTORS,
    ENTRY_POINT_GROUP,
    Connector,
    PermanentError,
    RetryableError,
    StepContext,
    load_connectors,
)
from hub.services.routes import RouteInvalid, save_routes
from hub.testing import check_class, check_connector
from tests.procs import ROOT, clean_env
from tests.rows import summary

WRITING = (ROOT / "docs" / "writing-a-connector.md").read_text()
ROUTES = (ROOT / "docs" / "routes.md").read_text()
# The fences of docs/writing-a-connector.md that the tests run (their titles show in the site).
EXAMPLE = 'python title="hub_slack.py"'
EXAMPLE_TEST = 'python title="tests/test_slack.py"'
ENTRY_POINT_SNIPPET = 'toml title="pyproject.toml"'

# The built-ins by name, wherever their modules live.
BUILTINS = load_connectors(list(BUILTIN_CONNECTORS))
TextConnector = BUILTINS.get("text")
OpenAIChatConnector = BUILTINS.get("openai")
HttpForwardConnector = BUILTINS.get("http")

PLUGIN_MODULE = """
from typing import Any

from pydantic import BaseModel, Field

from hub.connectors import Connector, StepContext


class ReverseConfig(BaseModel):
    field: str = Field("text", description="Payload field to reverse.")


class ReverseConnector(Connector):
    name = "{name}"
    description = "Reverses one text field."
    Config = ReverseConfig

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        return {{"reversed": payload[self.config.field][::-1]}}
"""


class Plugins:
    """Installs throwaway distributions the way pip leaves them: a module beside a
    ``*.dist-info`` directory whose ``entry_points.txt`` names it; importlib.metadata finds
    them on sys.path exactly as it finds any installed package."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root = root
        self.modules: list[str] = []
        monkeypatch.syspath_prepend(str(root))

    def install(self, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for module, source in modules.items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        # pip's spelling of the directory (hub_reverse-0.1.dist-info): importlib.metadata
        # takes the name from it, up to the first "-", and keeps one distribution per name.
        info = self.root / f"{re.sub(r'[-_.]+', '_', dist).lower()}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")

    def cleanup(self) -> None:
        for module in self.modules:
            sys.modules.pop(module, None)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    installed = Plugins(site, monkeypatch)
    try:
        yield installed
    finally:
        installed.cleanup()


def names(registry) -> set[str]:
    return {cls.name for cls in registry}


@pytest.fixture(params=["alone", "beside another connector package"])
def installed(request, plugins) -> set[str]:
    """What a registry holds without HUB_CONNECTORS before the test installs its own plugins:
    the built-ins, and whatever connector packages happen to be installed beside the hub. Each
    test taking it runs twice, the second time with one more such package, so that its
    assertions are proven not to depend on what else is installed."""
    if request.param != "alone":
        plugins.install(
            "hub-connector-unrelated",
            {"unrelated": "unrelated_plugin:ReverseConnector"},
            {"unrelated_plugin": PLUGIN_MODULE.format(name="unrelated")},
        )
    baseline = names(load_connectors())
    assert set(BUILTIN_CONNECTORS) <= baseline
    assert ("unrelated" in baseline) == (request.param != "alone")
    return baseline


# --- discovery ---


def test_an_entry_point_connector_is_loaded_beside_the_builtins(plugins, installed):
    plugins.install(
        "hub-reverse",
        {"reverse": "reverse_plugin:ReverseConnector"},
        {"reverse_plugin": PLUGIN_MODULE.format(name="reverse")},
    )
    registry = load_connectors()
    assert names(registry) == installed | {"reverse"}
    assert registry.get("reverse").__module__ == "reverse_plugin"
    assert set(BUILTIN_CONNECTORS) == {"text", "openai", "http"}


def test_an_entry_point_may_name_a_module_of_connectors(plugins):
    plugins.install(
        "hub-two",
        {"two": "two_plugin"},
        {
            "two_plugin": PLUGIN_MODULE.format(name="rev_a").replace("ReverseConnector", "A")
            + PLUGIN_MODULE.format(name="rev_b").replace("ReverseConnector", "B")
        },
    )
    assert {"rev_a", "rev_b"} <= names(load_connectors())


def test_hub_connectors_limits_what_loads(plugins, caplog):
    plugins.install(
        "hub-reverse",
        {"reverse": "reverse_plugin:ReverseConnector"},
        {"reverse_plugin": PLUGIN_MODULE.format(name="reverse")},
    )
    assert names(load_connectors(["text", "reverse"])) == {"text", "reverse"}
    assert names(load_connectors(["http"])) == {"http"}
    with caplog.at_level(logging.WARNING, logger="hub.connectors"):
        assert names(load_connectors(["text", "nonesuch"])) == {"text"}
    assert "HUB_CONNECTORS names 'nonesuch', but no such connector is installed" in caplog.text


def test_a_plugin_that_fails_to_import_is_logged_and_skipped(plugins, installed, caplog):
    plugins.install(
        "hub-broken",
        {"broken": "broken_plugin:Nope", "notaclass": "reverse_plugin:ReverseConfig"},
        {
            "broken_plugin": "raise RuntimeError('missing dependency frobnicate')\n",
            "reverse_plugin": PLUGIN_MODULE.format(name="reverse"),
        },
    )
    with caplog.at_level(logging.ERROR, logger="hub.connectors"):
        registry = load_connectors()
    assert names(registry) == installed  # the hub starts without them
    assert (
        "connector broken (broken_plugin:Nope) failed to load: missing dependency frobnicate"
        in caplog.text
    )
    assert "connector notaclass (reverse_plugin:ReverseConfig) failed to load" in caplog.text
    assert "Traceback" not in caplog.text


@pytest.fixture
def plugin_app(plugins, database_url_for_test, monkeypatch):
    """A hub started with HUB_CONNECTORS naming a built-in and an installed plugin."""
    plugins.install(
        "hub-reverse",
        {"reverse": "reverse_plugin:ReverseConnector"},
        {"reverse_plugin": PLUGIN_MODULE.format(name="reverse")},
    )
    monkeypatch.setenv("HUB_CONNECTORS", "text,reverse")
    app = create_app(
        {"TESTING": True, "DATABASE_URL": database_url_for_test, "SECRET_KEY": "k" * 32}
    )
    yield app
    app.extensions["hub.db"].dispose()


def test_a_loaded_plugin_serves_routes_and_is_listed(plugin_app):
    registry = plugin_app.extensions["hub.connectors"]
    assert names(registry) == {"text", "reverse"}
    listing = plugin_app.test_cli_runner().invoke(args=["connectors", "list"]).output
    assert "reverse: Reverses one text field." in listing
    assert 'field: string = "text"  Payload field to reverse.' in listing
    assert "openai" not in listing
    db = plugin_app.extensions["hub.db"]
    from hub.services.keys import create_key

    with db.session() as session:
        save_routes(session, [{"name": "rev", "steps": [{"connector": "reverse"}]}], registry)
        _, key = create_key(session, "t", None)
        with pytest.raises(
            RouteInvalid, match="unknown connector 'openai' \\(known: reverse, text\\)"
        ):
            save_routes(session, [{"name": "ai", "steps": [{"connector": "openai"}]}], registry)
    response = plugin_app.test_client().post(
        "/hooks/rev", json={"text": "hub"}, headers={"X-API-Key": key}
    )
    assert response.json["result"] == {"reversed": "buh"}
    assert summary(db) == [(0, "reverse", 1, "ok", None)]


# --- connectors list ---


def test_connectors_list_shows_every_builtin_with_its_fields(runner):
    output = runner.invoke(args=["connectors", "list"]).output
    for cls in (TextConnector, OpenAIChatConnector, HttpForwardConnector):
        assert f"{cls.name}: {cls.description}" in output
        for field in cls.Config.model_fields:
            assert f"    {field}: " in output
    assert "    url: string (required)" in output
    assert '    base_url: string = "https://api.openai.com/v1"' in output


# --- connectors new ---


def outside_env(**extra: str) -> dict[str, str]:
    """The environment of a process that knows nothing of this checkout: no HUB_* settings,
    no PYTHONPATH, no virtualenv of ours."""
    env = {k: v for k, v in clean_env().items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=cwd,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def hub_venv(path: Path) -> Path:
    """A fresh virtualenv with nothing installed in it that sees the hub's environment (the
    hub, editable from this checkout, its dependencies, pip, setuptools and pytest) the way
    ``--system-site-packages`` sees a system-wide install: through a .pth file. Returns its
    python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
        env=outside_env(),
    ).stdout.strip()
    hub_site = sysconfig.get_path("purelib")  # this test run's environment
    Path(purelib, "hub_environment.pth").write_text(f"import site; site.addsitedir({hub_site!r})\n")
    return python


@pytest.mark.slow
def test_new_package_passes_its_own_test_and_loads_once_installed_outside_the_checkout(
    tmp_path,
):
    """What a connector author does: `connectors new --dir`, `pip install -e`, `pytest` in
    their package, far from the hub's checkout (nothing of its tests/ on the path), then the
    hub lists the connector, and the hub's own tests still pass beside it."""
    python = hub_venv(tmp_path / "venv")

    def run(*args, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        env = outside_env(
            HUB_DATABASE_URL=f"sqlite:///{tmp_path / 'hub.db'}", HUB_SECRET_KEY="k" * 32
        )
        done = subprocess.run(
            [python, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    target = tmp_path / "hub-greet"
    created = run("flask", "--app", "hub", "connectors", "new", "greet", "--dir", str(target))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*.*")) == [
        "greet.py",
        "pyproject.toml",
        "tests/test_greet.py",
    ]
    assert f"pip install -e {target}" in created.stdout
    # The documented example and its test beside the generated ones: that test takes the
    # `receiver` fixture, which only the installed hub's pytest plugin can give here.
    (target / "hub_slack.py").write_text(doc_block(EXAMPLE))
    (target / "tests" / "test_slack.py").write_text(doc_block(EXAMPLE_TEST))

    run(
        "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-build-isolation", "-e", target
    )
    tested = run("pytest", "-q", "-p", "no:cacheprovider", cwd=target)
    assert "4 passed" in tested.stdout

    listing = run("flask", "--app", "hub", "connectors", "list").stdout
    assert "greet: Returns one payload field with a prefix." in listing
    assert all(f"\n{name}: " in f"\n{listing}" for name in BUILTIN_CONNECTORS)

    # The hub's tests that look at every loaded connector, with greet installed for real.
    counting = [
        "test_an_entry_point_connector_is_loaded_beside_the_builtins",
        "test_a_plugin_that_fails_to_import_is_logged_and_skipped",
    ]
    ids = [f"tests/test_plugins.py::{name}" for name in counting]
    hub_tests = run("pytest", "-q", "-p", "no:cacheprovider", *ids, cwd=ROOT)
    assert "4 passed" in hub_tests.stdout


# Scaffolding and installing a connector touches no database (SQLite only).
@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_new_in_the_hub_checkout_writes_a_builtin_whose_test_passes(runner, tmp_path, monkeypatch):
    """In a checkout the built-ins live in connectors/ (installed as hub.builtin): the new
    connector lands there, and its test passes once the checkout is installed as `make` does."""
    package = scaffold.builtin_package()
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    for folder in ("hub", "connectors", "migrations"):
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(ROOT / folder, checkout / folder, ignore=ignore)
    (checkout / "tests").mkdir()
    (checkout / "tests" / "__init__.py").write_text("")
    monkeypatch.chdir(checkout)
    result = runner.invoke(args=["connectors", "new", "word_count"])
    assert result.exit_code == 0, result.output
    assert "wrote connectors/word_count.py" in result.output
    assert not (checkout / "hub" / "builtin").exists()
    assert f'"word_count": "{package}.word_count:WordCountConnector"' in result.output
    source = (checkout / "connectors" / "word_count.py").read_text()
    assert "class WordCountConnector(Connector):" in source
    # The copy installed editable, as `make` installs the checkout: hub.builtin.word_count is
    # the new connectors/word_count.py.
    python = hub_venv(tmp_path / "venv")
    pip = [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    installed = subprocess.run(
        [*pip, "-e", str(checkout)], capture_output=True, text=True, env=outside_env(), timeout=120
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    ran = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_word_count.py"],
        cwd=checkout,
        env=outside_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "3 passed" in ran.stdout


@pytest.mark.parametrize(
    "name, reason",
    [
        ("Bad-Name", "not a usable name"),
        ("9lives", "not a usable name"),
        ("json", "taken"),
        ("connectors", "taken"),
        ("class", "taken"),
    ],
)
def test_new_refuses_unusable_names(runner, tmp_path, name, reason):
    target = tmp_path / "plugin"
    result = runner.invoke(args=["connectors", "new", name, "--dir", str(target)])
    assert result.exit_code == 1
    assert reason in result.output
    assert not target.exists()


def test_new_outside_the_checkout_without_dir_is_refused(runner, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(args=["connectors", "new", "greet"])
    assert result.exit_code == 1
    assert "not the hub's checkout" in result.output and "--dir" in result.output
    assert list(elsewhere.iterdir()) == []


def test_new_never_overwrites(runner, tmp_path):
    (tmp_path / "greet.py").write_text("# mine\n")
    result = runner.invoke(args=["connectors", "new", "greet", "--dir", str(tmp_path)])
    assert result.exit_code == 1 and "will not overwrite" in result.output
    assert (tmp_path / "greet.py").read_text() == "# mine\n"
    assert not (tmp_path / "tests").exists()


# --- the pytest plugin (hub.pytest_plugin, entry point pytest11) ---

RECORD_MODULES = """
import json, os, sys


def test_records_what_is_imported():
    with open(os.environ["MODULES_OUT"], "w") as out:
        json.dump(sorted(sys.modules), out)
"""


@pytest.mark.slow
def test_the_pytest_plugin_costs_a_project_that_does_not_use_it_nothing(tmp_path):
    """pytest loads the hub's plugin in every project installed beside the hub: it must add
    its fixtures and nothing else (no hub, Flask or database imports, no autouse fixture)."""
    (tmp_path / "test_other.py").write_text(RECORD_MODULES)
    imported = {}
    for plugin in ("hub.pytest_plugin", "no:hub.pytest_plugin"):
        out = tmp_path / f"{plugin}.json"
        # Bare pytest plus the hub's plugin or not (other plugins' imports would only blur the
        # difference; the entry point that loads it is proven by the test above).
        env = outside_env(MODULES_OUT=str(out), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
        ran = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", plugin],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr
        imported[plugin] = set(json.loads(out.read_text()))
    on, off = imported["hub.pytest_plugin"], imported["no:hub.pytest_plugin"]
    assert on - off == {"hub", "hub.pytest_plugin"}


def test_the_pytest_plugin_gives_the_servers_the_hub_tests_use(request, receiver, fake_openai):
    """The hub's own tests take these fixtures from the plugin, not from a copy in tests/."""
    plugin = request.config.pluginmanager.get_plugin("hub.pytest_plugin")
    assert plugin is not None and plugin.__name__ == "hub.pytest_plugin"
    conftest = importlib.import_module("tests.conftest")
    assert not hasattr(conftest, "receiver") and not hasattr(conftest, "fake_openai")
    reply = requests.post(receiver.url + "/x", json={"a": 1}, timeout=5)
    assert reply.json() == {"ok": True} and receiver.requests[0].json() == {"a": 1}
    chat = requests.post(
        fake_openai.base_url + "/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"},
        timeout=5,
    )
    assert chat.json()["choices"][0]["message"]["content"] == "echo: hi"


# --- hub.testing ---


class Good(Connector):
    name = "good"
    description = "Counts the keys of its input."

    def run(self, payload: Any, ctx: StepContext) -> Any:
        if not isinstance(payload, dict):
            raise PermanentError("input must be an object")
        return {"keys": len(payload), "route": ctx.route}


def test_check_connector_runs_and_returns_the_output():
    assert check_connector(Good, {"a": 1, "b": 2}) == {"keys": 2, "route": "test"}
    with pytest.raises(PermanentError, match="must be an object"):
        check_connector(Good, [1, 2])


def test_check_connector_gives_later_steps_the_earlier_outputs():
    output = check_connector(
        TextConnector, {"ignored": True}, {"field": "text"}, outputs=[{"text": "from step 0"}]
    )
    assert output["processed"] == "FROM STEP 0"


def test_the_builtins_pass_the_contract():
    for cls in (TextConnector, OpenAIChatConnector, HttpForwardConnector):
        check_class(cls)


def _variant(**attrs) -> type[Connector]:
    return type("Variant", (Good,), attrs)


class NotPydantic:
    pass


@pytest.mark.parametrize(
    "cls, message",
    [
        (_variant(description=""), "needs a description"),
        (_variant(description="two\nlines"), "must be one line"),
        (_variant(name="has space"), "needs a name of letters"),
        (_variant(Config=NotPydantic), "Config must be a pydantic BaseModel"),
        (_variant(run=lambda self, p, ctx: {"when": object()}), "not JSON-serialisable"),
        (_variant(run=lambda self, p, ctx: p["missing"]), "raised KeyError"),
    ],
)
def test_check_connector_names_what_breaks_the_contract(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_connector(cls, {"a": 1})


def test_check_connector_refuses_a_config_like_a_route_would():
    with pytest.raises(AssertionError, match="config refused: text: max_length"):
        check_connector(TextConnector, {"input": "x"}, {"max_length": "lots"})
    with pytest.raises(AssertionError, match="template does not parse"):
        check_connector(TextConnector, {"input": "x"}, {"field": "{{ payload."})


def test_check_connector_lets_retryable_errors_through():
    class Flaky(Good):
        name = "flaky"

        def run(self, payload, ctx):
            raise RetryableError("try later", retry_after=2)

    with pytest.raises(RetryableError) as info:
        check_connector(Flaky, {})
    assert info.value.retry_after == 2


def test_connectors_import_only_the_public_contract():
    """Built-ins keep to hub.connectors and hub.http, as third-party connectors must."""
    builtins = Path(importlib.util.find_spec(scaffold.builtin_package()).origin).parent
    for path in sorted(builtins.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hub"):
                imported = (
                    {node.module} if node.module != "hub" else {f"hub.{a.name}" for a in node.names}
                )
                assert imported <= {"hub.connectors", "hub.http"}, f"{path.name}: {imported}"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("hub"), f"{path.name}: {alias.name}"


# --- the docs: docs/writing-a-connector.md and docs/routes.md ---


def doc_block(tag: str) -> str:
    match = re.search(rf"^```{re.escape(tag)}\n(.*?)^```$", WRITING, re.DOTALL | re.MULTILINE)
    assert match, f"docs/writing-a-connector.md has no ```{tag} block"
    return match.group(1)


@pytest.fixture
def doc_connector(monkeypatch) -> type[Connector]:
    """The example of docs/writing-a-connector.md, imported as the module ``hub_slack``."""
    module = types.ModuleType("hub_slack")
    exec(
        compile(doc_block(EXAMPLE), "docs/writing-a-connector.md", "exec"),
        module.__dict__,
    )
    monkeypatch.setitem(sys.modules, "hub_slack", module)
    return module.SlackConnector


def test_documented_example_connector_is_short_and_whole():
    code = doc_block(EXAMPLE)
    assert len(code.splitlines()) < 40
    assert "import hub.models" not in code and "from hub.models" not in code


def test_documented_example_connector_runs_through_a_real_route(
    doc_connector, app, client, key, add_route, receiver, monkeypatch, db
):
    monkeypatch.setenv("SLACK_WEBHOOK_URL", receiver.url + "/services/T0/B0/x")
    app.extensions["hub.connectors"].register(doc_connector)
    add_route(
        "notify", [{"connector": "slack", "config": {"text": "New issue: {{ payload.title }}"}}]
    )
    response = client.post(
        "/hooks/notify", json={"title": "Login broken"}, headers={"X-API-Key": key}
    )

    assert response.status_code == 200, response.json
    assert response.json["result"] == {"status": 200, "sent": "New issue: Login broken"}
    [got] = receiver.requests
    assert (got.path, got.json()) == ("/services/T0/B0/x", {"text": "New issue: Login broken"})
    assert summary(db) == [(0, "slack", 1, "ok", 200)]
    listing = app.test_cli_runner().invoke(args=["connectors", "list"]).output
    assert "slack: Posts a message to a Slack incoming webhook." in listing

    monkeypatch.delenv("SLACK_WEBHOOK_URL")
    failed = client.post("/hooks/notify", json={"title": "x"}, headers={"X-API-Key": key})
    assert (failed.status_code, failed.json["code"]) == (500, "not_configured")


def test_documented_test_example_passes(doc_connector, receiver, monkeypatch):
    namespace: dict[str, Any] = {}
    exec(
        compile(doc_block(EXAMPLE_TEST), "docs/writing-a-connector.md", "exec"),
        namespace,
    )
    namespace["test_slack"](monkeypatch, receiver)


def test_documented_entry_point_snippet_names_the_group_and_the_example():
    snippet = tomllib.loads(doc_block(ENTRY_POINT_SNIPPET))
    assert snippet["project"]["entry-points"][ENTRY_POINT_GROUP] == {
        "slack": "hub_slack:SlackConnector"
    }


def test_routes_page_documents_every_builtin_config_field():
    for cls in (TextConnector, OpenAIChatConnector, HttpForwardConnector):
        heading = f"### `{cls.name}`"
        assert heading in ROUTES
        section = ROUTES.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
        config: type[BaseModel] = cls.Config
        for field in config.model_fields:
            assert f"| `{field}` |" in section, f"docs/routes.md lacks {cls.name}.{field}"
