"""The compose stack and its image, checked without a Docker engine (there is none here):
the compose file's services and their order, every command they run against the hub's own
CLI and gunicorn, every file the Dockerfile copies, the image's user and contents, its health
check against a real gunicorn, the nginx config through `nginx -t`, and .env.example against
every variable the stack reads."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.procs import BIN, NGINX, ROOT, closed_port, gunicorn, hub_env, nginx_main_conf

COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SERVICES = COMPOSE["services"]
HUB_SERVICES = ("migrate", "web", "worker")
NGINX_SITE = ROOT / "deploy" / "nginx-compose.conf"


@dataclass
class Instruction:
    stage: int  # 0 for the first FROM's stage
    keyword: str
    args: str


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    logical, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line.strip())
        pending = ""
    instructions, stage = [], -1
    for text in logical:
        keyword, _, args = text.partition(" ")
        if keyword.upper() == "FROM":
            stage += 1
        instructions.append(Instruction(stage, keyword.upper(), args.strip()))
    return instructions


INSTRUCTIONS = dockerfile()
FINAL = [i for i in INSTRUCTIONS if i.stage == INSTRUCTIONS[-1].stage]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"use the exec (JSON) form: {args}"
    return json.loads(args)


def copies(stage: list[Instruction] | None = None) -> list[tuple[list[str], str, dict]]:
    """(sources, destination, flags) of every COPY from the build context."""
    found = []
    for instruction in stage or INSTRUCTIONS:
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction.args)
        flags = dict(w[2:].partition("=")[::2] for w in words if w.startswith("--"))
        paths = [w for w in words if not w.startswith("--")]
        if "from" not in flags:
            found.append((paths[:-1], paths[-1], flags))
    return found


# --- the compose file ---


def test_the_stack_has_its_services():
    assert set(SERVICES) == {"db", "migrate", "web", "worker", "nginx"}
    db = SERVICES["db"]
    assert "pgdata:/var/lib/postgresql/data" in db["volumes"] and "pgdata" in COMPOSE["volumes"]
    assert "pg_isready" in db["healthcheck"]["test"]
    for name in HUB_SERVICES:
        assert SERVICES[name]["build"] == "." and SERVICES[name]["image"] == "webhook-hub:latest"
        assert SERVICES[name]["environment"]["HUB_ENV"] == "production"


def test_migrations_run_once_before_web_and_workers_start():
    migrate = SERVICES["migrate"]
    assert migrate["command"] == ["flask", "--app", "hub", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"] == {"db": {"condition": "service_healthy"}}
    for name in ("web", "worker"):
        assert SERVICES[name]["depends_on"] == {
            "db": {"condition": "service_healthy"},
            "migrate": {"condition": "service_completed_successfully"},
        }
        # Scaled replicas racing to migrate was the old layout's flaw.
        assert "upgrade" not in " ".join(SERVICES[name]["command"])


def test_web_serves_behind_nginx_and_workers_scale():
    web, worker, front = SERVICES["web"], SERVICES["worker"], SERVICES["nginx"]
    assert web["environment"]["HUB_EMBEDDED_WORKER"] == "false"
    assert web["environment"]["HUB_TRUSTED_PROXIES"] == "1"
    assert "ports" not in web, "gunicorn is reached through nginx only"
    # `--scale worker=4` needs replicas without a fixed name or host port.
    assert "ports" not in worker and "container_name" not in worker
    assert worker["command"][:4] == ["flask", "--app", "hub", "worker"]
    assert worker["environment"]["HUB_EMBEDDED_WORKER"] == "false"
    assert front["depends_on"] == {"web": {"condition": "service_healthy"}}
    assert "./deploy/nginx-compose.conf:/etc/nginx/conf.d/default.conf:ro" in front["volumes"]
    assert [p.rsplit(":", 1)[1] for p in front["ports"]] == ["80"]
    # Only web has a server to ask: the image's HEALTHCHECK is turned off for the others.
    for name in ("migrate", "worker"):
        assert SERVICES[name]["healthcheck"] == {"disable": True}
    assert "healthcheck" not in web


def test_every_flask_command_of_the_stack_exists_in_the_hub_cli(app):
    commands = [SERVICES[name]["command"] for name in HUB_SERVICES]
    flask_commands = [c for c in commands if c[0] == "flask"]
    assert len(flask_commands) == 2
    runner = app.test_cli_runner()
    for command in flask_commands:
        assert command[:3] == ["flask", "--app", "hub"]
        # --help after the arguments: an unknown command or option still fails (exit 2).
        result = runner.invoke(args=[*command[3:], "--help"])
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert runner.invoke(args=["worker", "--concurrency", "4", "--bogus", "--help"]).exit_code == 2


def test_the_gunicorn_command_uses_the_config_the_image_holds(tmp_path):
    command = SERVICES["web"]["command"]
    assert command == exec_form(FINAL[-1].args) and FINAL[-1].keyword == "CMD"
    assert command[:2] == ["gunicorn", "-c"]
    conf, app_spec = command[2], command[3]
    destinations = {dest: sources for sources, dest, _ in copies(FINAL)}
    assert destinations.get(conf) == ["gunicorn.conf.py"], f"the image has no {conf}"
    # gunicorn loads that config and builds the app with the web service's settings.
    env = {k: v for k, v in SERVICES["web"]["environment"].items() if "$" not in v}
    env = hub_env(f"sqlite:///{tmp_path / 'hub.db'}", **env)
    done = subprocess.run(
        [BIN / "gunicorn", "--check-config", "-c", ROOT / "gunicorn.conf.py", app_spec],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- the Dockerfile ---


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_context():
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [source for paths, _, _ in copies() for source in paths]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"
        assert Path(source).parts[0] not in ignored, f".dockerignore leaves {source} out"


def test_the_image_is_built_from_the_wheel_and_carries_no_test_tools():
    stages = [i for i in INSTRUCTIONS if i.keyword == "FROM"]
    assert len(stages) == 2 and stages[0].args.endswith(" AS build")
    assert all(s.args.split()[0].endswith("-slim") for s in stages)
    final = "\n".join(f"{i.keyword} {i.args}" for i in FINAL)
    assert "from=build" in final and "--no-index" in final
    for tool in ("pytest", "ruff", "schemathesis", "requirements.txt", "[test]", "[dev]", "tests"):
        assert tool not in final, f"the runtime image mentions {tool}"
    # Only the hub's runtime dependencies come with its wheel.
    declared = " ".join(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    )
    # jsonschema (the contract tests' checker) is a test tool; jsonschema-rs checks routes'
    # schemas at run time.
    assert not re.search(r"pytest|ruff|schemathesis|jsonschema(?!-rs)", declared, re.IGNORECASE)
    assert [(paths, dest) for paths, dest, _ in copies(FINAL)] == [
        (["gunicorn.conf.py"], "/app/gunicorn.conf.py")
    ]


def test_the_image_runs_as_a_user_it_creates_not_root():
    users = [i.args for i in FINAL if i.keyword == "USER"]
    assert users, "the runtime stage never leaves root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(i.args for i in FINAL if i.keyword == "RUN")
    assert re.search(rf"useradd [^&]*\b{re.escape(user)}\b", created)
    last_user = max(n for n, i in enumerate(FINAL) if i.keyword == "USER")
    assert all(i.keyword != "RUN" for i in FINAL[last_user:]), "a RUN after USER runs as it"


@pytest.mark.slow
def test_the_image_health_check_asks_health_of_a_real_gunicorn(sqlite_template, tmp_path):
    (check,) = [i.args for i in FINAL if i.keyword == "HEALTHCHECK"]
    options, _, command = check.partition(" CMD ")
    assert "--interval" in options
    command = exec_form(command)
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]

    def health_check(port: int) -> int:
        env = hub_env("", HUB_PORT=str(port))
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    url = f"sqlite:///{sqlite_template}"
    with gunicorn(url, tmp_path / "gunicorn.log", workers=1, HUB_EMBEDDED_WORKER="false") as (
        _,
        base,
    ):
        assert health_check(int(base.rsplit(":", 1)[1])) == 0
    assert health_check(closed_port()) != 0


# --- nginx ---


def directives(text: str) -> list[str]:
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


# What the compose variant may change: the listener and TLS, the upstream's address, the logs.
DIFFERS = re.compile(r"^(listen|server_name|ssl_\w+|access_log|error_log|server \S+:8000;)")


def test_the_compose_nginx_config_is_the_shipped_one_but_for_listener_upstream_and_logs():
    shipped = directives((ROOT / "deploy" / "nginx.conf").read_text())
    variant = directives(NGINX_SITE.read_text())
    assert [d for d in variant if not DIFFERS.match(d)] == [
        d for d in shipped if not DIFFERS.match(d)
    ]
    assert "server web:8000;" in variant and "listen 80 default_server;" in variant


@pytest.mark.skipif(not NGINX.exists(), reason="nginx is not installed: apt-get install nginx")
def test_the_compose_nginx_config_passes_nginx_t(tmp_path):
    site = NGINX_SITE.read_text()
    # The service name resolves only inside compose's network, port 80 needs root.
    swaps = {"server web:8000;": "server 127.0.0.1:8000;", "listen 80 ": "listen 127.0.0.1:8080 "}
    for old, new in swaps.items():
        assert old in site, f"{NGINX_SITE.name} no longer has {old!r}: update this test"
        site = site.replace(old, new)
    (tmp_path / "hub.conf").write_text(site)
    main = nginx_main_conf(tmp_path, tmp_path / "hub.conf")
    done = subprocess.run(
        [NGINX, "-t", "-c", main, "-p", tmp_path, "-e", tmp_path / "error.log"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr


# --- .env.example ---


def test_env_example_names_every_variable_the_stack_reads():
    example = (ROOT / ".env.example").read_text()
    named = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    set_here = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_TEXT))
    required = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):\?", COMPOSE_TEXT))
    assert required == {"HUB_SECRET_KEY", "POSTGRES_PASSWORD"}
    assert required <= set_here, "a required variable is missing from .env.example"
    assert used <= named, f"not in .env.example: {used - named}"


def test_every_hub_setting_the_deployment_names_is_in_the_configuration_table():
    readme = (ROOT / "docs" / "configuration.md").read_text()
    table = set(re.findall(r"^\| `(HUB_[A-Z0-9_]+)`", readme, re.MULTILINE))
    table |= set(re.findall(r"\| `HUB_[A-Z0-9_]+` / `(HUB_[A-Z0-9_]+)`", readme))
    files = [COMPOSE_TEXT, (ROOT / ".env.example").read_text(), (ROOT / "Dockerfile").read_text()]
    named = {name for text in files for name in re.findall(r"\bHUB_[A-Z0-9_]+", text)}
    assert named and named <= table, f"not in docs/configuration.md's table: {named - table}"


# --- the Deploy section of docs/operations.md ---


def deploy_commands() -> list[str]:
    readme = (ROOT / "docs" / "operations.md").read_text()
    section = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```sh\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
    assert blocks, "docs/operations.md's Deploy section has no ```sh block"
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("docker compose")]


def test_the_documented_deploy_steps_name_services_and_commands_that_exist(app):
    commands = deploy_commands()
    assert any("--scale worker=4" in c for c in commands)
    runner = app.test_cli_runner()
    hub_commands = 0
    for line in commands:
        words = shlex.split(line)
        verb = words[2]
        if verb in ("run", "exec", "logs"):
            named = [w for w in words[3:] if not w.startswith("-")]
            services = named if verb == "logs" else named[:1]
            assert set(services) <= set(SERVICES), line
        if "flask" in words:
            hub_commands += 1
            start = words.index("flask")
            assert words[start : start + 3] == ["flask", "--app", "hub"], line
            result = runner.invoke(args=[*words[start + 3 :], "--help"])
            assert result.exit_code == 0, f"{line}: {result.output}"
    assert hub_commands >= 3
