"""``flask --app hub ...``: the admin's commands for keys, routes, connectors and the database."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence

import click
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext

from hub import keys as key_store
from hub import ratelimit
from hub import routes as route_store
from hub.connectors import Registry
from hub.crypto import SecretBox, SecretsUnreadable
from hub.db import Database, get_db, upgrade
from hub.signatures import SCHEMES

keys_cli = AppGroup("keys", help="Create, list and revoke API keys.")
routes_cli = AppGroup("routes", help="Add, list, show, remove and apply routes.")
secret_cli = AppGroup("secret", help="Add or remove a route's signing secrets (rotation).")
routes_cli.add_command(secret_cli)
db_cli = AppGroup("db", help="Database schema.")
connectors_cli = AppGroup("connectors", help="The connectors this hub has loaded.")


def registry() -> Registry:
    return current_app.extensions["hub.connectors"]


def secret_box() -> SecretBox:
    return current_app.extensions["hub.secrets"]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    rows = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(headers)] + [line(r) for r in rows]).rstrip()


def fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


# --- db ---


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Apply every migration the database does not have yet."""
    upgrade(get_db())
    click.echo("database is at the newest schema")


@click.command("init")
@with_appcontext
def init_command() -> None:
    """Migrate, make sure the demo routes exist, and create a first admin key if none."""
    db: Database = get_db()
    upgrade(db)
    with db.session() as session:
        created = route_store.ensure_demo_routes(session, registry())
        for name in created:
            click.echo(f"created demo route {name!r}")
        if not key_store.list_keys(session):
            _, key = key_store.create_key(session, "first admin key", [key_store.ADMIN_SCOPE])
            click.echo("A first admin key was created. It is shown only this once; keep it:")
            click.echo(f"\n    {key}\n")


# --- keys ---


@keys_cli.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, help="A route this key may post to (repeat).")
@click.option("--admin", is_flag=True, help="The key may use the admin API and every route.")
@click.option("--expires-in", help="Lifetime such as 30d, 12h, 2w.")
@click.option("--rate", help="Most requests this key may make, e.g. 1000/hour.")
def keys_create(
    name: str, scopes: tuple[str, ...], admin: bool, expires_in: str | None, rate: str | None
) -> None:
    """Create a key and print it once (only its digest is stored)."""
    try:
        lifetime = key_store.parse_duration(expires_in) if expires_in else None
        if rate:
            rate = ratelimit.normalise(rate)
    except ValueError as exc:
        fail(str(exc))
    chosen = ([key_store.ADMIN_SCOPE] if admin else []) + list(scopes)
    with get_db().session() as session:
        row, key = key_store.create_key(session, name, chosen or None, lifetime, rate)
        click.echo(key)
        click.echo(
            f"prefix {row.prefix}, scopes {', '.join(row.scopes)}"
            + (f", expires {row.expires_at:%Y-%m-%d %H:%M} UTC" if row.expires_at else "")
            + (f", at most {row.rate_limit}" if row.rate_limit else "")
            + ". Shown once: store it now.",
            err=True,
        )


@keys_cli.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(as_json: bool) -> None:
    """Every key: prefix, name, scopes, created, expires, last used, revoked."""
    with get_db().session() as session:
        rows = [k.to_dict() for k in key_store.list_keys(session)]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        table(
            ["PREFIX", "NAME", "SCOPES", "RATE", "CREATED", "EXPIRES", "LAST USED", "REVOKED"],
            [
                [
                    r["prefix"],
                    r["name"],
                    ",".join(r["scopes"]),
                    r["rate_limit"] or "-",
                    _short(r["created_at"]),
                    _short(r["expires_at"]),
                    _short(r["last_used_at"]),
                    _short(r["revoked_at"]),
                ]
                for r in rows
            ],
        )
    )


def _short(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else "-"


@keys_cli.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key with this prefix; it stops working within HUB_KEY_CACHE_SECONDS."""
    with get_db().session() as session:
        row = key_store.revoke(session, prefix)
        if row is None:
            fail(f"no key with prefix {prefix!r}")
    current_app.extensions["hub.keys"].clear()
    click.echo(f"revoked {prefix}")


# --- routes ---


@routes_cli.command("add")
@click.argument("name")
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync", show_default=True)
@click.option("--step", "steps", multiple=True, help="CONNECTOR or CONNECTOR:{json config}.")
@click.option("--filter", "filter_", help="Jinja expression; events where it is false are dropped.")
@click.option("--description")
@click.option("--dedup-path", help="Dotted path of an id in the body, e.g. id.")
@click.option("--dedup-window", type=int, help="Seconds a duplicate is remembered.")
@click.option("--retry-schedule", help="Comma list of seconds, e.g. 30,120,600.")
@click.option(
    "--auth",
    type=click.Choice(route_store.AUTH_MODES),
    help="What a sender must show [default: signature with --verify, else key].",
)
@click.option("--verify", "scheme", help="Signature scheme: " + ", ".join(SCHEMES) + ".")
@click.option("--secret", "secrets", multiple=True, help="A signing secret (repeat to rotate).")
@click.option(
    "--secret-env", "secrets_env", multiple=True, help="Read a signing secret from this variable."
)
@click.option(
    "--verify-option", "verify_options", multiple=True, help="KEY=VALUE, e.g. tolerance=600."
)
@click.option("--rate", help="Most requests the route takes, e.g. 100/minute.")
@click.option("--replace", is_flag=True, help="Overwrite a route of the same name.")
def routes_add(
    name,
    mode,
    steps,
    filter_,
    description,
    dedup_path,
    dedup_window,
    retry_schedule,
    auth,
    scheme,
    secrets,
    secrets_env,
    verify_options,
    rate,
    replace,
) -> None:
    """Add a route; each step's config and its verifier are checked first."""
    try:
        data = {"name": name, "mode": mode, "steps": [route_store.parse_step(s) for s in steps]}
        if retry_schedule:
            data["retry_schedule"] = [int(v) for v in retry_schedule.split(",")]
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
        "auth": auth,
        "rate_limit": rate,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    with get_db().session() as session:
        if not replace and route_store.get(session, name) is not None:
            fail(f"route {name!r} exists; use --replace to overwrite it")
        try:
            route_store.save_routes(session, [data], registry(), secret_box())
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
    """Every route: name, mode, steps, enabled."""
    with get_db().session() as session:
        rows = [route_store.to_dict(r, secret_box()) for r in route_store.list_routes(session)]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=False))
        return
    click.echo(
        table(
            ["NAME", "MODE", "AUTH", "RATE", "STEPS", "ENABLED"],
            [
                [
                    r["name"],
                    r["mode"],
                    r["auth"] + (f" ({r['verify']['scheme']})" if r["verify"] else ""),
                    r["rate_limit"] or "-",
                    " > ".join(s["connector"] for s in r["steps"]) or "-",
                    "yes" if r["enabled"] else "no",
                ]
                for r in rows
            ],
        )
    )


@routes_cli.command("show")
@click.argument("name")
def routes_show(name: str) -> None:
    """A route as JSON, in the shape `routes apply` reads; signing secrets are masked."""
    with get_db().session() as session:
        route = route_store.get(session, name)
        if route is None:
            fail(f"no route named {name!r}")
        click.echo(
            json.dumps(route_store.to_dict(route, secret_box()), indent=2, ensure_ascii=False)
        )


@routes_cli.command("remove")
@click.argument("name")
def routes_remove(name: str) -> None:
    """Remove a route (its events stay)."""
    with get_db().session() as session:
        if not route_store.remove(session, name):
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
    with get_db().session() as session:
        try:
            results = route_store.save_routes(session, items, registry(), secret_box())
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
    with get_db().session() as session:
        try:
            count = route_store.add_secret(session, name, secret, registry(), secret_box())
        except LookupError as exc:
            fail(str(exc))
        except SecretsUnreadable:
            fail(_unreadable(name))
        except route_store.RouteInvalid as exc:
            fail(_invalid(exc))
    click.echo(f"route {name!r} now has {count} secrets; any one verifies")


@secret_cli.command("remove")
@click.argument("name")
@click.argument("which")
def secret_remove(name: str, which: str) -> None:
    """Remove a secret named by its value, its number in `routes show` (from 1), or its
    last characters (as `routes show` masks it)."""
    with get_db().session() as session:
        try:
            count = route_store.remove_secret(session, name, which, registry(), secret_box())
        except LookupError as exc:
            fail(str(exc))
        except SecretsUnreadable:
            fail(_unreadable(name))
        except route_store.RouteInvalid as exc:
            fail(_invalid(exc))
    click.echo(f"route {name!r} now has {count} secret{'s' if count != 1 else ''}")


def _unreadable(name: str) -> str:
    return (
        f"route {name!r}: its stored secrets do not decrypt with this HUB_SECRET_KEY "
        "(was it changed?); set them again with `routes apply` or `routes add --replace`"
    )


# --- connectors ---


@connectors_cli.command("list")
def connectors_list() -> None:
    """Each connector's name, description and config fields."""
    for cls in registry():
        click.echo(f"{cls.name}: {cls.description}")
        schema = cls.Config.model_json_schema()
        required = set(schema.get("required", []))
        for field, spec in schema.get("properties", {}).items():
            kind = spec.get("type") or "/".join(a.get("type", "?") for a in spec.get("anyOf", []))
            default = f" = {json.dumps(spec['default'])}" if "default" in spec else ""
            need = " (required)" if field in required else ""
            click.echo(
                f"    {field}: {kind}{default}{need}  {spec.get('description', '')}".rstrip()
            )


def init_app(app: Flask) -> None:
    for group in (keys_cli, routes_cli, db_cli, connectors_cli):
        app.cli.add_command(group)
    app.cli.add_command(init_command)
