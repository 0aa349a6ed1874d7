"""``hub ...`` and ``flask --app hub ...``: the admin's commands for keys, routes, connectors,
events, alerts, the audit log and the database (the same commands under both; ``hub``
itself, with ``hub serve`` and ``hub config``, is hub/__main__.py).

Every command that changes something hands its service ``audit.cli_actor()`` (``cli:<os
user>`` from ``cli@<host>``), which records it in the audit log.

Safe for scripts: a command exits 0 when it did what it was asked, 1 when it failed (a name
that doesn't exist, bad input, a refusal, the database unreachable), 2 on a usage error
(click's own), and 3 when it found nothing to do (a purge or bulk replay that matches no
event, a `worker --once` with nothing due, revoking a key already revoked); the reason is
always one line on stderr. Listings exit 0 even when empty (an empty list is an answer), and
commands that make a state hold (`db upgrade`, `init`, `routes apply`) exit 0 when it holds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from hub import providers
from hub.cli import scaffold
from hub.connectors import Registry, config_fields
from hub.services import alerts as alert_store
from hub.services import audit, delivery, ordering, paging, ratelimit, retention
from hub.services import destinations as destination_store
from hub.services import events as event_store
from hub.services import keys as key_store
from hub.services import routes as route_store
from hub.signatures import SCHEMES
from hub.store.crypto import SecretsUnreadable, get_box
from hub.store.db import (
    SCHEMA_OUTDATED,
    Database,
    current_revision,
    get_db,
    head_revision,
    is_schema_outdated,
    is_unavailable,
    upgrade,
)
from hub.store.models import Event, utcnow

# Exit statuses (2 is click's usage error).
FAILED = 1
NOTHING_TO_DO = 3


class ScriptSafeCommand(click.Command):
    """A command whose unexpected failure is one line on stderr and exit status 1, never a
    traceback (whose text could carry SQL or a secret)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            if is_unavailable(exc):
                fail(
                    f"the database is unavailable ({type(exc).__name__}); check "
                    "HUB_DATABASE_URL and that the server is up"
                )
            if is_schema_outdated(exc, get_db()):
                fail(SCHEMA_OUTDATED)
            fail(f"the command failed ({type(exc).__name__})")


class Commands(AppGroup):
    command_class = ScriptSafeCommand


keys_cli = Commands("keys", help="Create, list and revoke API keys.")
routes_cli = Commands(
    "routes",
    help="Add, list, show, remove and apply routes; pause and resume destinations, open "
    "and close their circuits.",
)
secret_cli = Commands("secret", help="Add or remove a route's signing secrets (rotation).")
routes_cli.add_command(secret_cli)
db_cli = Commands("db", help="Database schema.")
connectors_cli = Commands("connectors", help="The connectors this hub has loaded.")
providers_cli = Commands("providers", help="The signature providers routes may verify with.")
events_cli = Commands("events", help="List, show, replay and purge stored events.")
audit_cli = Commands("audit", help="The audit log: every admin action (read only).")


def registry() -> Registry:
    return current_app.extensions["hub.connectors"]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers)] + [line(r) for r in rows]).rstrip()


def emit(
    rows: list[dict], as_json: bool, headers: Sequence[str], cells: Callable[[dict], Sequence]
) -> None:
    """A list command's output: the rows as JSON, or as a table of ``cells(row)``."""
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        click.echo(table(headers, [cells(r) for r in rows]))


def fail(message: str) -> NoReturn:
    """Exit 1: the command could not do what it was asked."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(FAILED)


def nothing_to_do(message: str) -> NoReturn:
    """Exit 3: there was nothing to do, and nothing was changed."""
    click.echo(f"Nothing to do: {message}", err=True)
    sys.exit(NOTHING_TO_DO)


# --- db ---


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration the database does not have yet; seal step secrets that an
    older release stored in clear."""
    upgrade(get_db())
    click.echo("database is at the newest schema")
    seal_stored_secrets(get_db())


def seal_stored_secrets(db: Database) -> None:
    with db.session() as session:
        sealed = route_store.seal_stored_secrets(session, registry(), get_box(), audit.cli_actor())
        for name in sealed:
            click.echo(f"route {name!r}: step secrets stored in clear are now encrypted")


@click.command("init", cls=ScriptSafeCommand)
@with_appcontext
def init_command() -> None:
    """Migrate, make sure the demo routes exist, and create a first admin key if none."""
    db: Database = get_db()
    upgrade(db)
    seal_stored_secrets(db)
    with db.session() as session:
        created = route_store.ensure_demo_routes(session, registry(), audit.cli_actor())
        for name in created:
            click.echo(f"created demo route {name!r}")
        if not key_store.list_keys(session):
            _, key = key_store.create_key(
                session, "first admin key", admin=True, actor=audit.cli_actor()
            )
            click.echo("A first admin key was created. It is shown only this once; keep it:")
            click.echo(f"\n    {key}\n")


# --- keys ---


# The options of `keys create` by the fields of keys.create_from_input.
KEY_OPTIONS = {
    "name": "NAME",
    "scopes": "--scope",
    "expires_in": "--expires-in",
    "rate_limit": "--rate",
}


@keys_cli.command("create")
@click.argument("name")
@click.option(
    "--scope", "scopes", multiple=True, help="A route this key may post to (repeat); default all."
)
@click.option("--admin", is_flag=True, help="The key may use the admin API and every route.")
@click.option("--expires-in", help="Lifetime such as 30d, 12h, 2w.")
@click.option("--rate", help="Most requests this key may make, e.g. 1000/hour.")
def keys_create(
    name: str, scopes: tuple[str, ...], admin: bool, expires_in: str | None, rate: str | None
) -> None:
    """Create a key and print it once (only its digest is stored)."""
    with get_db().session() as session:
        try:
            row, key = key_store.create_from_input(
                session,
                name,
                scopes,
                admin=admin,
                expires_in=expires_in,
                rate_limit=rate,
                actor=audit.cli_actor(),
            )
        except key_store.KeyInvalid as exc:
            fail("; ".join(f"{KEY_OPTIONS[f]}: {reason}" for f, reason in exc.problems))
        click.echo(key)
        click.echo(
            f"prefix {row.prefix}{', admin' if row.is_admin else ''}, "
            f"scopes {', '.join(row.scopes)}"
            + (f", expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else "")
            + (f", at most {row.rate_limit}" if row.rate_limit else "")
            + ". Shown once: store it now.",
            err=True,
        )


@keys_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(as_json: bool) -> None:
    """Every key: prefix, name, admin, scopes, created, expires, last used, revoked."""
    with get_db().read_session() as session:
        rows = [k.to_dict() for k in key_store.list_keys(session)]
    emit(
        rows,
        as_json,
        ["PREFIX", "NAME", "ADMIN", "SCOPES", "RATE", "CREATED", "EXPIRES", "LAST USED", "REVOKED"],
        lambda r: [
            r["prefix"],
            r["name"],
            "yes" if r["admin"] else "-",
            ",".join(r["scopes"]),
            r["rate_limit"] or "-",
            _short(r["created_at"]),
            _short(r["expires_at"]),
            _short(r["last_used_at"]),
            _short(r["revoked_at"]),
        ],
    )


def _short(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else "-"


@keys_cli.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key with this prefix; its next request is refused, in every process."""
    with get_db().session() as session:
        row = key_store.get(session, prefix)
        if row is None:
            fail(f"no key with prefix {prefix!r}")
        if row.revoked_at is not None:
            nothing_to_do(
                f"key {prefix} was already revoked on {row.revoked_at:%Y-%m-%d %H:%M} UTC"
            )
        key_store.revoke(session, prefix, audit.cli_actor())
    click.echo(f"revoked {prefix}")


# --- routes ---


def _seconds_list(_ctx, param: click.Parameter, value: str | None) -> list[int] | None:
    """``30,120,600`` as whole seconds; a usage error naming the option and the bad value."""
    if value is None:
        return None
    parts = [part.strip() for part in value.split(",")]
    for part in parts:
        if not part.isdigit():
            raise click.BadParameter(
                f"{part!r} is not a whole number of seconds; give a comma list such as 30,120,600",
                param=param,
            )
    return [int(part) for part in parts]


@routes_cli.command("add")
@click.argument("name")
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync", show_default=True)
@click.option("--step", "steps", multiple=True, help="CONNECTOR or CONNECTOR:{json config}.")
@click.option("--filter", "filter_", help="Jinja expression; events where it is false are dropped.")
@click.option("--description")
@click.option("--dedup-path", help="Dotted path of an id in the body, e.g. id.")
@click.option("--dedup-window", type=int, help="Seconds a duplicate is remembered.")
@click.option(
    "--retention-days",
    type=int,
    help="Days its finished events are kept [default: HUB_RETENTION_DAYS].",
)
@click.option(
    "--retry-schedule", callback=_seconds_list, help="Comma list of seconds, e.g. 30,120,600."
)
@click.option(
    "--auth",
    type=click.Choice(route_store.AUTH_MODES),
    help="What a sender must show [default: signature with --verify, else key].",
)
@click.option(
    "--verify",
    "scheme",
    help="Signature provider: " + ", ".join(SCHEMES) + ", or any other loaded one "
    "(`providers list`).",
)
@click.option("--secret", "secrets", multiple=True, help="A signing secret (repeat to rotate).")
@click.option(
    "--secret-env", "secrets_env", multiple=True, help="Read a signing secret from this variable."
)
@click.option(
    "--verify-option", "verify_options", multiple=True, help="KEY=VALUE, e.g. tolerance=600."
)
@click.option("--rate", help="Most requests the route takes, e.g. 100/minute.")
@click.option(
    "--schema",
    "schema_file",
    type=click.Path(dir_okay=False),
    help="A JSON or YAML file holding a JSON Schema every payload must match.",
)
@click.option("--replace", is_flag=True, help="Overwrite a route of the same name.")
def routes_add(
    name,
    mode,
    steps,
    filter_,
    description,
    dedup_path,
    dedup_window,
    retention_days,
    retry_schedule,
    auth,
    scheme,
    secrets,
    secrets_env,
    verify_options,
    rate,
    schema_file,
    replace,
) -> None:
    """Add a route; each step's config, its verifier and its schema are checked first."""
    try:
        data = {"name": name, "mode": mode, "steps": [route_store.parse_step(s) for s in steps]}
        if schema_file is not None:
            data["schema"] = route_store.load_schema_file(schema_file)
        if retry_schedule:
            data["retry_schedule"] = retry_schedule
        if scheme:
            data["verify"] = {
                "scheme": scheme,
                "options": dict(_option(o) for o in verify_options),
                "secrets": list(secrets),
                "secrets_env": list(secrets_env),
            }
        elif secrets or secrets_env or verify_options:
            raise ValueError("--secret and --verify-option need --verify SCHEME")
    except ValueError as exc:
        fail(str(exc))
    optional = {
        "filter": filter_,
        "description": description,
        "dedup_path": dedup_path,
        "dedup_window": dedup_window,
        "retention_days": retention_days,
        "auth": auth,
        "rate_limit": rate,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    with get_db().session() as session:
        if not replace and route_store.get(session, name) is not None:
            fail(f"route {name!r} exists; use --replace to overwrite it")
        try:
            route_store.save_routes(session, [data], registry(), get_box(), actor=audit.cli_actor())
        except route_store.RouteInvalid as exc:
            fail(_invalid(exc))
    click.echo(f"route {name!r} saved: POST /hooks/{name}")


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE as JSON when it parses (tolerance=600 is a number)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--verify-option {text!r}: expected KEY=VALUE")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _invalid(exc: route_store.RouteInvalid) -> str:
    return "invalid route:\n  " + "\n  ".join(exc.errors)


@routes_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def routes_list(as_json: bool) -> None:
    """Every route: name, mode, steps (each destination's, for a route that fans out), enabled."""
    with get_db().read_session() as session:
        listed = route_store.list_routes(session)
        rows = [route_store.to_dict(r, get_box(), registry()) for r in listed]
        states = {r.name: {d.name: d.state for d in route_store.destinations_of(r)} for r in listed}
    emit(
        rows,
        as_json,
        ["NAME", "MODE", "AUTH", "RATE", "STEPS", "ENABLED"],
        lambda r: [
            r["name"],
            r["mode"],
            r["auth"] + (f" ({r['verify']['scheme']})" if r["verify"] else ""),
            r["rate_limit"] or "-",
            pipelines(r, states.get(r["name"])),
            "yes" if r["enabled"] else "no",
        ],
    )


def pipelines(route: dict, states: dict[str, str] | None = None) -> str:
    """A route's steps as `text > http`, or each destination's as `crm: http; log: text`;
    a destination not active says its state: `crm: http [paused]`."""

    def chain(steps: list[dict]) -> str:
        return " > ".join(s["connector"] for s in steps) or "-"

    def state(name: str) -> str:
        shown = (states or {}).get(name) or destination_store.ACTIVE
        return "" if shown == destination_store.ACTIVE else f" [{shown}]"

    if route["steps"] is not None:
        return chain(route["steps"]) + state(route["destinations"][0]["name"])
    return "; ".join(
        f"{d['name']}: {chain(d['steps'])}{state(d['name'])}" for d in route["destinations"]
    )


@routes_cli.command("show")
@click.argument("name")
def routes_show(name: str) -> None:
    """A route as JSON, in the shape `routes apply` reads; its secrets are masked."""
    with get_db().read_session() as session:
        route = route_store.get(session, name)
        if route is None:
            fail(f"no route named {name!r}")
        click.echo(
            json.dumps(
                route_store.to_dict(route, get_box(), registry()), indent=2, ensure_ascii=False
            )
        )


@routes_cli.command("pause")
@click.argument("route")
@click.argument("destination")
@click.option("--reason", help="Why, shown with the destination's state.")
def routes_pause(route: str, destination: str, reason: str | None) -> None:
    """Pause a destination: the route still accepts webhooks, its deliveries are held."""
    change_destination(
        lambda session: destination_store.pause(
            session, route, destination, reason, actor=audit.cli_actor()
        )
    )


@routes_cli.command("resume")
@click.argument("route")
@click.argument("destination")
def routes_resume(route: str, destination: str) -> None:
    """Resume a paused destination: its held deliveries go out, oldest first."""
    change_destination(
        lambda session: destination_store.resume(
            session, route, destination, current_app, actor=audit.cli_actor()
        )
    )


@routes_cli.command("open")
@click.argument("route")
@click.argument("destination")
@click.option("--reason", help="Why, shown with the destination's state.")
def routes_open(route: str, destination: str, reason: str | None) -> None:
    """Open a destination's circuit: its deliveries are held until a probe succeeds."""
    change_destination(
        lambda session: destination_store.open_circuit(
            session, route, destination, reason, actor=audit.cli_actor()
        )
    )


@routes_cli.command("close")
@click.argument("route")
@click.argument("destination")
@click.option("--reason", help="Why, shown with the change.")
def routes_close(route: str, destination: str, reason: str | None) -> None:
    """Close a destination's circuit: its held deliveries go out, oldest first."""
    change_destination(
        lambda session: destination_store.close_circuit(
            session, route, destination, current_app, reason, actor=audit.cli_actor()
        )
    )


@routes_cli.command("changes")
@click.argument("route")
@click.argument("destination")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
def routes_changes(route: str, destination: str, limit: int) -> None:
    """The changes of a destination's state (pause, resume, its circuit), newest first."""
    with get_db().session() as session:
        try:
            rows = destination_store.changes(session, route, destination, limit)
        except destination_store.NoSuchDestination as exc:
            fail(str(exc))
        shown = [row.to_dict() for row in rows]
    click.echo(json.dumps(shown, indent=2, ensure_ascii=False))


@routes_cli.command("destinations")
@click.argument("route")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, with each one's settings.")
def routes_destinations(route: str, as_json: bool) -> None:
    """A route's destinations: state, deliveries in flight and waiting, settings."""
    now = utcnow()
    with get_db().read_session() as session:
        try:
            views = destination_store.overview(session, route, get_box(), registry(), now=now)
        except destination_store.NoSuchDestination as exc:
            fail(str(exc))
    emit(
        [view.to_dict(now) for view in views],
        as_json,
        ["NAME", "STATE", "IN FLIGHT", "BACKLOG", "OLDEST", "SETTINGS"],
        lambda d: [
            d["name"],
            d["state"] + (f" ({d['state_reason']})" if d["state_reason"] else ""),
            f"{d['in_flight']}{'+' if d['in_flight_capped'] else ''}",
            backlog_text(d),
            _age(d["oldest_waiting_seconds"]),
            settings_text(d["settings"]),
        ],
    )


def backlog_text(view: dict) -> str:
    """`12 (pending 10, held 2)`; `10000+ (...)` when counting stopped at the cap."""
    parts = [f"{status} {n}" for status, n in view["backlog"].items() if n]
    total = f"{view['backlog_total']}{'+' if view['backlog_capped'] else ''}"
    return total + (f" ({', '.join(parts)})" if parts else "")


def settings_text(settings: dict) -> str:
    """A destination's steps and the controls it sets, on one line."""
    shown = [" > ".join(s["connector"] for s in settings["steps"]) or "no steps"]
    if settings["filter"]:
        shown.append("filtered")
    if settings["retry_schedule"] is not None:
        delays = ",".join(str(s) for s in settings["retry_schedule"])
        shown.append(f"retries {delays}" if delays else "no retries")
    if settings["max_in_flight"] is not None:
        shown.append(f"max {settings['max_in_flight']} in flight")
    if settings["rate"]:
        shown.append(f"rate {settings['rate']}")
    if settings["ordering_key"]:
        shown.append(f"ordered by {settings['ordering_key']}")
    if settings["breaker"]:
        shown.append(f"breaker after {settings['breaker'].get('failures')} failures")
    return "; ".join(shown)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def change_destination(change) -> None:
    """Run a pause, resume, open or close and print the destination as JSON (an unknown
    one, or a change that does not apply, fails)."""
    with get_db().sessionmaker() as session:  # the change commits itself
        try:
            state = change(session)
        except (destination_store.NoSuchDestination, destination_store.StateConflict) as exc:
            fail(str(exc))
    click.echo(json.dumps(state.to_dict(), indent=2, ensure_ascii=False))


@routes_cli.command("remove")
@click.argument("name")
def routes_remove(name: str) -> None:
    """Remove a route (its events stay)."""
    with get_db().session() as session:
        if not route_store.remove(session, name, audit.cli_actor(), get_box(), registry()):
            fail(f"no route named {name!r}")
    click.echo(f"removed route {name!r}")


@routes_cli.command("apply")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def routes_apply(path: str) -> None:
    """Create or update the routes in a JSON or YAML file; all or nothing."""
    try:
        items = route_store.load_file(path)
    except ValueError as exc:
        fail(str(exc))
    if not items:
        nothing_to_do(f"{path} holds no routes")
    with get_db().session() as session:
        try:
            results = route_store.save_routes(
                session, items, registry(), get_box(), actor=audit.cli_actor()
            )
        except route_store.RouteInvalid as exc:
            fail(_invalid(exc))
    for name, action in results:
        click.echo(f"{action:9} {name}")


@secret_cli.command("add")
@click.argument("name")
@click.argument("secret", required=False)
def secret_add(name: str, secret: str | None) -> None:
    """Add a signing secret; old and new both verify until the old one is removed.

    Without SECRET it is asked for (not echoed), which keeps it out of shell history.
    """
    if secret is None:
        secret = click.prompt("Secret", hide_input=True)
    with get_db().session() as session, route_change(name):
        count = route_store.add_secret(
            session, name, secret, registry(), get_box(), audit.cli_actor()
        )
    click.echo(f"route {name!r} now has {count} secrets; any one verifies")


@secret_cli.command("remove")
@click.argument("name")
@click.argument("which")
def secret_remove(name: str, which: str) -> None:
    """Remove a secret named by its value, its number in `routes show` (from 1), or its
    last characters (as `routes show` masks it)."""
    with get_db().session() as session, route_change(name):
        count = route_store.remove_secret(
            session, name, which, registry(), get_box(), audit.cli_actor()
        )
    click.echo(f"route {name!r} now has {count} secret{'s' if count != 1 else ''}")


@contextmanager
def route_change(name: str) -> Iterator[None]:
    """One way to say why a change to route ``name``'s secrets was refused: no such route,
    secrets sealed under another key, or a route the change would make invalid."""
    try:
        yield
    except LookupError as exc:
        fail(str(exc))
    except SecretsUnreadable:
        fail(_unreadable(name))
    except route_store.RouteInvalid as exc:
        fail(_invalid(exc))


def _unreadable(name: str) -> str:
    return (
        f"route {name!r}: its stored secrets do not decrypt with this HUB_SECRET_KEY "
        "(was it changed?); set them again with `routes apply` or `routes add --replace`"
    )


# --- providers ---


@providers_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, every field of each.")
def providers_list(as_json: bool) -> None:
    """Each provider: its headers, what its secret is, its dedup id and challenge."""
    shown = [providers.describe(p) for p in providers.registry()]
    if as_json:
        click.echo(json.dumps(shown, indent=2, ensure_ascii=False))
        return
    click.echo(
        table(
            ["NAME", "TITLE", "SIGNATURE HEADERS", "SECRET", "DEDUP ID", "CHALLENGE"],
            [
                [
                    p["name"],
                    p["title"],
                    ", ".join(p["signature_headers"]) or "(the route's header option)",
                    p["secret"],
                    ", ".join(p["id_headers"]) or "-",
                    p["challenge"] or "-",
                ]
                for p in shown
            ],
        )
    )


# --- connectors ---


@connectors_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, with each config's schema.")
def connectors_list(as_json: bool) -> None:
    """Each connector's name, description and config fields."""
    if as_json:
        rows = [
            {
                "name": cls.name,
                "description": cls.description,
                "config_schema": cls.Config.model_json_schema(),
            }
            for cls in registry()
        ]
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    for cls in registry():
        click.echo(f"{cls.name}: {cls.description}")
        for field in config_fields(cls):
            default = f" = {field.default}" if field.default is not None else ""
            need = " (required)" if field.required else ""
            need += " (secret)" if field.secret else ""
            line = f"    {field.name}: {field.kind}{default}{need}  {field.description}"
            click.echo(line.rstrip())


@connectors_cli.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write a package of its own here (with a pyproject.toml declaring the entry point) "
    "instead of connectors/NAME.py and tests/test_NAME.py in the hub's checkout "
    "(the current directory).",
)
def connectors_new(name: str, directory: Path | None) -> None:
    """Write a starter connector and its test (which passes as written)."""
    try:
        result = scaffold.write_connector(name, directory, Path.cwd())
    except (ValueError, FileExistsError) as exc:
        fail(str(exc))
    for path in result.written:
        shown = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
        click.echo(f"wrote {shown}")
    click.echo("next:")
    for step in result.next_steps:
        click.echo(f"  - {step}")


# --- events ---


def _since(value: str | None):
    if not value:
        return None
    try:
        return event_store.parse_time(value)
    except ValueError as exc:
        fail(f"{value!r}: {exc}")


@events_cli.command("list")
@click.option("--route", help="Only this route.")
@click.option(
    "--status", type=click.Choice([s.value for s in event_store.STATUSES]), help="Only this status."
)
@click.option("--since", help="Received after an ISO time or within an age such as 2h.")
@click.option("--request-id", help="Only events this X-Request-ID brought (from a log, an answer).")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def events_list(route, status, since, request_id, limit, as_json) -> None:
    """The newest events first."""
    with get_db().read_session() as session:
        rows = [
            e.to_dict()
            for e in event_store.find(
                session,
                route=route,
                status=status,
                since=_since(since),
                request_id=request_id,
                limit=limit,
            )
        ]
    emit(
        rows,
        as_json,
        ["ID", "ROUTE", "STATUS", "REASON", "ATTEMPTS", "RECEIVED", "LAST ERROR"],
        lambda r: [
            r["id"],
            r["route"][:24],
            r["status"],
            r["reason"] or "-",
            r["attempts"],
            _short(r["received_at"]),
            (r["last_error"] or "-")[:60],
        ],
    )


@events_cli.command("show")
@click.argument("event_id")
def events_show(event_id: str) -> None:
    """An event with its headers, body, deliveries and every connector call."""
    with get_db().read_session() as session:
        event = session.get(Event, event_id)
        if event is None:
            fail(f"no event {event_id!r}")
        data = event.to_dict(with_attempts=True)
        data["deliveries"] = event_store.deliveries(session, event.id)
        data["headers"] = event.headers
        data["query"] = event.query
        data["body"] = (event.body or b"").decode("utf-8", "replace")
    click.echo(json.dumps(data, indent=2))


@events_cli.command("replay")
@click.argument("event_ids", nargs=-1)
@click.option(
    "--status",
    type=click.Choice([s.value for s in event_store.REPLAYABLE]),
    help="Replay every such event.",
)
@click.option("--route", help="With --status: only this route.")
@click.option("--since", help="With --status: received after an ISO time or within an age.")
@click.option(
    "--destination",
    help="Only this destination's delivery of each event (called again even if delivered); "
    "in a bulk replay, of --route, --status being the delivery's.",
)
def events_replay(event_ids, status, route, since, destination) -> None:
    """Put events that are not in flight back in the queue; their attempts keep counting.

    Delivered, failed, dead and filtered events, and processing or retrying ones whose lease
    has run out. Rejected and duplicate events never are: they were never accepted. With
    --destination, only that destination's deliveries that ended are replayed.
    """
    db = get_db()
    bulk = bool(status) or (destination is not None and not event_ids)
    if bool(event_ids) == bulk:
        fail("give event ids, or --status (with --route/--since) for a bulk replay")
    if destination is not None:
        replay_destination(db, event_ids, destination, status, route, since)
        return
    if event_ids:
        with db.session() as session:
            done = event_store.replay(session, event_ids, audit.cli_actor())
            skipped = event_store.why_not_replayed(
                session, [i for i in dict.fromkeys(event_ids) if i not in set(done)]
            )
        for event_id in done:
            click.echo(f"replayed {event_id}")
        for event_id, reason in skipped.items():
            click.echo(f"skipped {event_id}: {reason}", err=True)
        missing = [i for i, reason in skipped.items() if reason == event_store.NO_SUCH_EVENT]
        if missing:
            _wake(done)
            fail(f"no such event: {', '.join(missing)}")
        if not done:
            nothing_to_do("none of these events can be replayed now")
    else:
        when = _since(since)
        total = event_store.count(db, status=status, route=route, since=when)
        with click.progressbar(
            length=total, label=f"replaying {status} events", file=sys.stderr
        ) as bar:
            replayed = event_store.replay_all(
                db,
                status=status,
                route=route,
                since=when,
                actor=audit.cli_actor(),
                progress=bar.update,
            )
        if not replayed:
            nothing_to_do(f"no {status} event to replay matches")
        delivery.wake(current_app)
        click.echo(f"replayed {replayed} event(s)")
        return
    _wake(done)


def replay_destination(
    db: Database,
    event_ids: Sequence[str],
    destination: str,
    status: str | None,
    route: str | None,
    since: str | None,
) -> None:
    """`events replay --destination`: each named event's delivery to it, or (bulk) every
    delivery of it matching --status, --route and --since."""
    if event_ids:
        done, missing, found = [], [], {}
        with db.session() as session:
            for event_id in dict.fromkeys(event_ids):
                try:
                    found[event_id] = event_store.delivery_of(session, event_id, destination)
                except event_store.NoSuchDelivery as exc:
                    missing.append(event_id)
                    click.echo(f"skipped {event_id}: {exc}", err=True)
                except event_store.DeliveryNotReplayable as exc:
                    click.echo(f"skipped {event_id}: {exc}", err=True)
            # One replay (and one audit entry) for every delivery named.
            replayed = set(
                event_store.replay_deliveries(
                    session, [row.id for row in found.values()], audit.cli_actor()
                )
            )
            for event_id, row in found.items():
                if row.id in replayed:
                    done.append(event_id)
                    click.echo(f"replayed {event_id} to {destination}")
                else:
                    reason = event_store.why_delivery_not_replayed(row)
                    click.echo(f"skipped {event_id}: {reason}", err=True)
        _wake(done)
        if missing:
            fail(f"nothing to replay to {destination!r} for: {', '.join(missing)}")
        if not done:
            nothing_to_do(f"none of these deliveries to {destination!r} can be replayed now")
        return
    problems = event_store.aimed_problems(route, status, destination)
    if problems:
        fail("; ".join(f"--{p}" for p in problems))
    filters = event_store.Filters(route=route, status=status, since=_since(since))
    # Every match in one call (batches of their own transactions), one audit entry.
    replayed, examined, _ = event_store.replay_matching(
        db, filters, examine=sys.maxsize, destination=destination, actor=audit.cli_actor()
    )
    if replayed:
        delivery.wake(current_app)
    if not replayed:
        nothing_to_do(f"no delivery to {destination!r} of route {route!r} to replay matches")
    click.echo(f"replayed {replayed} delivery(ies) to {destination} of {examined} looked at")


def _wake(replayed: list[str]) -> None:
    """Tell workers, here and elsewhere, that replayed events are due."""
    if replayed:
        delivery.wake(current_app)


@events_cli.command("skip")
@click.argument("delivery_id")
def events_skip(delivery_id: str) -> None:
    """End a delivery that blocks its ordering key as failed ("skipped by an admin"); the
    next delivery of its key goes. Exits 3 if it ended already."""
    try:
        skipped = ordering.skip(get_db(), delivery_id[:32], audit.cli_actor())
    except ordering.NoSuchDelivery as exc:
        fail(str(exc))
    except ordering.AlreadyEnded as exc:
        nothing_to_do(str(exc))
    except ordering.NotSkippable as exc:
        fail(str(exc))
    delivery.wake(current_app)
    click.echo(f"skipped {skipped['id']} (event {skipped['event_id']}: {skipped['event_status']})")


@events_cli.command("purge")
@click.option(
    "--older-than",
    help="An age such as 30d: every route's finished events older than it, whatever its "
    "retention. Without it, each route's retention applies (retention_days, else "
    "HUB_RETENTION_DAYS).",
)
@click.option("--dry-run", is_flag=True, help="Print how many events would go, by route.")
@click.option("--yes", is_flag=True, help="Delete without asking (needed when not at a terminal).")
def events_purge(older_than: str | None, dry_run: bool, yes: bool) -> None:
    """Delete finished events (with their deliveries and attempts) past their route's
    retention, or older than an age, in small batches, as the workers do every
    HUB_RETENTION_INTERVAL. Dedup keys of purged events are kept for their window.

    Asks before deleting unless --yes; without a terminal to ask at, refuses (exit 1)."""
    db = get_db()
    config = current_app.config
    if older_than is not None:
        try:
            cutoff = utcnow() - key_store.parse_duration(older_than)
        except ValueError as exc:
            fail(str(exc))
        walks = retention.older_than(cutoff)
        what = f"received before {cutoff:%Y-%m-%d %H:%M} UTC"
    else:
        with db.read_session() as session:
            walks = retention.scopes(session, int(config["RETENTION_DAYS"]))
        what = "past their route's retention"
    counted = retention.count(db, walks)
    matching = sum(n for _, by_route in counted for n in by_route.values())
    if dry_run:
        click.echo(f"would purge {matching} event(s) {what}")
        if walks:
            click.echo(table(["ROUTE", "KEPT", "SET BY", "EVENTS"], _purge_rows(counted)))
        else:
            click.echo(KEPT_FOREVER)
        return
    if matching and not yes:
        if not sys.stdin.isatty():
            fail(f"{matching} event(s) would be deleted: add --yes to purge without a terminal")
        click.confirm(f"Delete {matching} event(s) {what}?", abort=True, err=True)
    done = retention.purge(
        db,
        walks if matching else [],
        batch=int(config["RETENTION_BATCH"]),
        pause=float(config["RETENTION_PAUSE"]),
        actor=audit.cli_actor(),
    )
    limiter = current_app.extensions["hub.ratelimit"]
    if isinstance(limiter, ratelimit.DatabaseLimiter):  # windows of keys and routes gone quiet
        with db.session() as session:
            dropped = limiter.purge(session)
        click.echo(f"dropped {dropped} expired rate-limit window(s)")
    if done.dropped_keys:
        click.echo(f"dropped {done.dropped_keys} expired dedup key(s)")
    if not done.total:
        nothing_to_do(f"no finished event {what}" if walks else KEPT_FOREVER)
    click.echo(f"purged {done.total} event(s) {what}")
    for route, n in sorted(done.events.items()):
        click.echo(f"  {route}: {n}")
    if done.kept_keys:
        click.echo(f"kept the dedup keys of {done.kept_keys} purged event(s) for their window")


KEPT_FOREVER = (
    "no route sets retention_days and HUB_RETENTION_DAYS is 0: events are kept until "
    "purged with --older-than"
)


def _purge_rows(counted: list[tuple[retention.Scope, dict[str, int]]]) -> list[list[object]]:
    """The dry run's table: each route's count, how long it keeps events, and what says so."""
    rows: list[list[object]] = []
    for scope, by_route in counted:
        kept = "-" if scope.days is None else f"{scope.days} day{'s' if scope.days != 1 else ''}"
        set_by = {"route": "retention_days", "default": "HUB_RETENTION_DAYS"}.get(
            scope.set_by, "--older-than"
        )
        if scope.route is not None:
            rows.append([scope.route, kept, set_by, by_route.get(scope.route, 0)])
        elif by_route:
            rows += [[route, kept, set_by, n] for route, n in by_route.items()]
        else:
            rows.append(["(every other route)", kept, set_by, 0])
    return rows


# --- worker ---


@click.command("worker", cls=ScriptSafeCommand)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Events delivered at once by this process.",
)
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
@with_appcontext
def worker_command(concurrency: int, once: bool) -> None:
    """Deliver async events: run beside gunicorn, as many as you like, on any machine."""
    import signal
    import threading

    from hub.ops import metrics
    from hub.services.delivery import Worker

    app = current_app._get_current_object()
    # A worker on a database it can't use would log the same failure forever: say so, once.
    if current_revision(get_db()) != head_revision(get_db()):
        fail(SCHEMA_OUTDATED)
    # Counts go where the web processes' /metrics adds them up (HUB_METRICS_DIR).
    metrics.use(metrics.directory_for(app))
    worker = Worker(app)
    if once:
        delivered = worker.run_once(limit=10**9)
        if not delivered:
            nothing_to_do("no event was due")
        click.echo(f"delivered {delivered} event(s)")
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker.start(concurrency)
    metrics.process_started("worker")
    # Log lines, not echoes: in JSON mode each is one object like every other line.
    log = logging.getLogger("hub.worker")
    log.info("worker %s delivering with %d thread(s)", worker.name, concurrency)
    stop.wait()
    log.info("stopping: finishing in-flight deliveries")
    worker.stop()
    metrics.process_died(os.getpid())


# --- alerts ---

alerts_cli = Commands("alerts", help="Alert channels and rules, and the alerts sent.")
channels_cli = Commands("channels", help="Where alerts go: webhook, slack or email.")
rules_cli = Commands("rules", help="When to alert (built-in: dead deliveries, open circuits).")
alerts_cli.add_command(channels_cli)
alerts_cli.add_command(rules_cli)


def _alert_invalid(exc: alert_store.AlertInvalid) -> str:
    return "invalid: " + "; ".join(exc.errors)


@channels_cli.command("add")
@click.argument("name")
@click.argument("kind", type=click.Choice(alert_store.CHANNEL_KINDS))
@click.option("--url", help="webhook, slack: where to POST (stored encrypted).")
@click.option("--host", help="email: the SMTP server.")
@click.option("--port", type=click.IntRange(1, 65535), help="email: its port (default 25).")
@click.option("--username", help="email: SMTP login.")
@click.option("--password-env", help="email: the environment variable holding the SMTP password.")
@click.option("--starttls", is_flag=True, help="email: upgrade the connection with STARTTLS.")
@click.option("--ssl", "use_ssl", is_flag=True, help="email: connect over TLS (port 465).")
@click.option("--sender", help="email: the From address.")
@click.option("--to", "to", multiple=True, help="email: an address to alert (repeat).")
def channels_add(
    name: str,
    kind: str,
    url: str | None,
    host: str | None,
    port: int | None,
    username: str | None,
    password_env: str | None,
    starttls: bool,
    use_ssl: bool,
    sender: str | None,
    to: tuple[str, ...],
) -> None:
    """Add a channel NAME of KIND (webhook, slack or email)."""
    password = None
    if password_env:
        password = os.environ.get(password_env)
        if not password:
            fail(f"the environment variable {password_env} is not set")
    data = {
        "name": name,
        "kind": kind,
        "url": url,
        "host": host,
        "port": port,
        "username": username,
        "password": password,
        "starttls": starttls,
        "ssl": use_ssl,
        "sender": sender,
        "to": list(to),
    }
    with get_db().session() as session:
        try:
            row = alert_store.add_channel(
                session,
                get_box(),
                data,
                current_app.config["ALERT_MAX_CHANNELS"],
                audit.cli_actor(),
            )
        except alert_store.AlertInvalid as exc:
            fail(_alert_invalid(exc))
        except alert_store.AlreadyExists as exc:
            fail(str(exc))
        shown = alert_store.channel_to_dict(row, get_box())
    click.echo(f"added alert channel {shown['name']} ({shown['kind']})")


@channels_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def channels_list(as_json: bool) -> None:
    """Every channel, its secrets masked."""
    with get_db().read_session() as session:
        rows = [
            alert_store.channel_to_dict(c, get_box()) for c in alert_store.list_channels(session)
        ]
    emit(
        rows,
        as_json,
        ["NAME", "KIND", "TARGET"],
        lambda r: [r["name"], r["kind"], r.get("url") or ",".join(r.get("to") or [])],
    )


@channels_cli.command("remove")
@click.argument("name")
def channels_remove(name: str) -> None:
    """Remove the channel NAME."""
    with get_db().session() as session:
        try:
            alert_store.remove_channel(session, name, audit.cli_actor(), get_box())
        except alert_store.NoSuchAlertThing as exc:
            fail(str(exc))
    click.echo(f"removed alert channel {name}")


@channels_cli.command("test")
@click.argument("name")
def channels_test(name: str) -> None:
    """Send a test alert through NAME now, from this command, and say whether it arrived."""
    db = get_db()
    with db.session() as session:
        try:
            row = alert_store.queue_test(
                session, name, current_app.config.get("PUBLIC_URL"), audit.cli_actor()
            )
        except alert_store.NoSuchAlertThing as exc:
            fail(str(exc))
        send_id = row.id
    status = alert_store.send_one(
        db, get_box(), send_id, float(current_app.config["ALERT_SEND_TIMEOUT"])
    )
    with db.read_session() as session:
        sent = alert_store.send_to_dict(session.get(alert_store.AlertSend, send_id))
    if status != alert_store.SENT:
        fail(f"the test alert to {name} failed: {sent['error'] or 'taken by another process'}")
    click.echo(f"sent a test alert to {name} ({sent['attempts']} tries)")


@rules_cli.command("add")
@click.argument("name")
@click.argument("kind", type=click.Choice(list(alert_store.RULE_KINDS)))
@click.option("--route", help="Only this route.")
@click.option("--destination", help="Only this destination (of --route).")
@click.option("--threshold", type=float, help="failure_ratio (0-1), oldest_due (s), refusal_rate.")
@click.option("--window", type=int, help="Seconds the rule looks back.")
@click.option("--channel", "channels", multiple=True, help="A channel (repeat); default: all.")
@click.option("--disabled", is_flag=True, help="Add it turned off.")
def rules_add(
    name: str,
    kind: str,
    route: str | None,
    destination: str | None,
    threshold: float | None,
    window: int | None,
    channels: tuple[str, ...],
    disabled: bool,
) -> None:
    """Add a rule NAME of KIND; named dead-deliveries or open-circuits, it replaces that
    built-in rule."""
    data = {
        "name": name,
        "kind": kind,
        "route": route,
        "destination": destination,
        "threshold": threshold,
        "window": window,
        "channels": list(channels),
        "enabled": not disabled,
    }
    with get_db().session() as session:
        try:
            alert_store.add_rule(
                session, data, current_app.config["ALERT_MAX_RULES"], audit.cli_actor()
            )
        except alert_store.AlertInvalid as exc:
            fail(_alert_invalid(exc))
        except alert_store.AlreadyExists as exc:
            fail(str(exc))
    click.echo(f"added alert rule {name} ({kind})")


@rules_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def rules_list(as_json: bool) -> None:
    """Every rule, the built-in ones included."""
    with get_db().read_session() as session:
        rows = [r.to_dict() for r in alert_store.rules(session)]
    emit(
        rows,
        as_json,
        ["NAME", "KIND", "ROUTE", "DESTINATION", "THRESHOLD", "WINDOW", "CHANNELS", "STATE"],
        lambda r: [
            r["name"],
            r["kind"],
            r["route"] or "*",
            r["destination"] or "*",
            "-" if r["threshold"] is None else f"{r['threshold']:g}",
            r["window"] or "-",
            ",".join(r["channels"]) or "all",
            ("on" if r["enabled"] else "off") + (" (built-in)" if r["builtin"] else ""),
        ],
    )


@rules_cli.command("remove")
@click.argument("name")
def rules_remove(name: str) -> None:
    """Remove the rule NAME (a built-in one is turned off)."""
    with get_db().session() as session:
        try:
            alert_store.remove_rule(session, name, audit.cli_actor())
        except alert_store.NoSuchAlertThing as exc:
            fail(str(exc))
    click.echo(f"removed alert rule {name}")


@rules_cli.command("enable")
@click.argument("name")
def rules_enable(name: str) -> None:
    """Turn the rule NAME on again (a built-in one applies again)."""
    set_rule(name, True)


@rules_cli.command("disable")
@click.argument("name")
def rules_disable(name: str) -> None:
    """Turn the rule NAME off, its thresholds kept (a built-in one too)."""
    set_rule(name, False)


def set_rule(name: str, enabled: bool) -> None:
    with get_db().session() as session:
        try:
            alert_store.set_rule_enabled(session, name, enabled, audit.cli_actor())
        except alert_store.NoSuchAlertThing as exc:
            fail(str(exc))
    click.echo(f"alert rule {name} is {'on' if enabled else 'off'}")


@alerts_cli.command("list")
@click.option("--limit", type=click.IntRange(1, 200), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON, with each message sent.")
def alerts_list(limit: int, as_json: bool) -> None:
    """The newest alerts: rule, subject, state, count, and how their messages went."""
    with get_db().read_session() as session:
        rows = alert_store.recent(session, limit)["alerts"]
    emit(
        rows,
        as_json,
        ["ID", "RULE", "SUBJECT", "STATE", "COUNT", "OPENED", "RESOLVED", "SENT"],
        lambda r: [
            r["id"],
            r["rule"],
            r["subject"],
            r["state"],
            f"{r['count']:,}",
            _short(r["opened_at"]),
            _short(r["resolved_at"]),
            " ".join(f"{s['kind']}:{s['channel']}:{s['status']}" for s in r["sends"]) or "-",
        ],
    )


# --- the audit log ---


@audit_cli.command("list")
@click.option("--actor", help='Who: a key\'s prefix, "cli:<user>", or "cli" for every CLI user.')
@click.option("--action", help='What: "route.update", or a family such as "route".')
@click.option("--since", help="At or after an ISO time, or within an age such as 7d.")
@click.option("--limit", type=click.IntRange(1, paging.PAGE_MAX), default=50, show_default=True)
@click.option("--cursor", help="Older entries: the cursor the previous listing ended with.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, each entry's change whole.")
def audit_list(actor, action, since, limit, cursor, as_json) -> None:
    """The newest entries first: when, who, through which face, from where, what, on what.

    The log is read only: entries are added by every change, from every face, and deleted
    only by its retention (HUB_AUDIT_RETENTION_DAYS)."""
    with get_db().read_session() as session:
        try:
            rows, next_cursor = audit.listing(
                session,
                actor=actor,
                action=action,
                since=_since(since),
                cursor=cursor,
                limit=limit,
            )
        except paging.BadCursor:
            fail(f"--cursor {cursor!r}: not a cursor from this hub (use the one printed last)")
        shown = [row.to_dict() for row in rows]
    emit(
        shown,
        as_json,
        ["AT", "ACTOR", "FACE", "FROM", "ACTION", "TARGET", "CHANGE"],
        lambda r: [
            _short(r["at"]),
            r["actor"],
            r["face"],
            r["origin"] or "-",
            r["action"],
            r["target"] or "-",
            _change_text(r["change"]),
        ],
    )
    if next_cursor and not as_json:
        click.echo(f"older entries: --cursor {next_cursor}", err=True)


def _change_text(change) -> str:
    """An entry's change on one line of a table (--json prints it whole)."""
    if change is None:
        return "-"
    text = json.dumps(change, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 80 else text[:77] + "..."


# The commands of both entries, `flask --app hub ...` and `hub ...`: one definition each.
COMMANDS = (
    worker_command,
    keys_cli,
    routes_cli,
    db_cli,
    connectors_cli,
    providers_cli,
    events_cli,
    alerts_cli,
    audit_cli,
    init_command,
)


def init_app(app: Flask) -> None:
    for command in COMMANDS:
        app.cli.add_command(command)
