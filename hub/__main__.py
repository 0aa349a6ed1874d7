"""``hub ...`` and ``python -m hub``: the hub's own command (pyproject's [project.scripts]).

It runs the commands of ``flask --app hub`` (hub.cli: one definition of each serves both
entries), building the app with ``create_app`` as ``flask --app hub`` does, plus three of its
own that build no app: ``hub serve`` (gunicorn with hub/gunicorn_conf.py), ``hub config``
and ``hub listen`` (hub/cli/listen.py).
"""

from __future__ import annotations

import os
import sys

import click
from flask.cli import ScriptInfo

from hub import create_app
from hub.cli import COMMANDS
from hub.cli.listen import listen_command


class HubGroup(click.Group):
    """`hub ...`: each run gets a fresh ScriptInfo, so that `with_appcontext` builds the app
    the way `flask --app hub` does; `hub --help`, `hub config` and `hub serve` build none."""

    def make_context(self, info_name, args, parent=None, **extra):
        extra.setdefault("obj", ScriptInfo(create_app=create_app, set_debug_flag=False))
        return super().make_context(info_name, args, parent=parent, **extra)


@click.group(cls=HubGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The webhook hub: serve it, run workers, and manage its keys, routes and events."""


for _command in COMMANDS:
    main.add_command(_command)
# `hub listen` speaks HTTP to a running hub: it builds no app (not a `flask --app hub` command).
main.add_command(listen_command)


@main.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--host", help="Address to listen on.  [default: HUB_HOST, 127.0.0.1]")
@click.option(
    "--port", type=click.IntRange(0, 65535), help="Port to listen on.  [default: HUB_PORT, 8000]"
)
@click.argument("gunicorn_args", nargs=-1, type=click.UNPROCESSED)
def serve(host: str | None, port: int | None, gunicorn_args: tuple[str, ...]) -> None:
    """Serve the hub under gunicorn with its shipped settings (hub/gunicorn_conf.py).

    Further arguments go to gunicorn as they are, e.g. `hub serve --port 9000 --workers 4`."""
    # As settings, so that gunicorn's configuration and its messages ("set HUB_PORT") agree.
    if host is not None:
        os.environ["HUB_HOST"] = host
    if port is not None:
        os.environ["HUB_PORT"] = str(port)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:hub.gunicorn_conf", *gunicorn_args]
    # gunicorn takes this process's place (its pid, its signals): stopping `hub serve` with
    # SIGTERM stops gunicorn gracefully, as stopping gunicorn itself does.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*argv, "hub:create_app()"])


@main.command("config")
def config_command() -> None:
    """Where the database, the secret key and the metrics are, then every setting (secrets
    masked): the same as `python -m hub.config`."""
    from hub.config import main as show

    sys.exit(show([]))


if __name__ == "__main__":
    main()
