"""A route's JSON Schema (``schema``): a payload that does not match is refused 422 with where
and which rule (bounded, never quoting the payload), kept as a refused event and counted; a
schema is checked whole when saved on every face (its draft, its patterns, its size, no
remote $ref); routes without one take any payload as before. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import select, text

from hub.services import payload_schema
from hub.store.db import alembic_config, upgrade
from hub.store.models import Delivery, Event, Route
from tests.procs import ROOT
from tests.rows import events
from tests.test_dashboard import HOME, sign_in, token
from tests.test_metrics import parse, value
from tests.test_schema import fill_0010

ORDER_SCHEMA = {
    "type": "object",
    "required": ["order"],
    "properties": {
        "order": {
            "type": "object",
            "required": ["id"],
            "properties": {"id": {"type": "integer"}, "email": {"format": "email"}},
        },
        "sent_at": {"type": "string", "format": "date-time"},
    },
}
MISMATCH_ID = (
    "The payload does not match the route's schema at /order/id: the value is not of type "
    '"integer" (rule /properties/order/properties/id/type)'
)


@pytest.fixture
def orders(add_route):
    add_route("orders", [{"connector": "text"}], mode="async", schema=ORDER_SCHEMA)


def post(client, key, payload, route="orders"):
    return client.post(f"/hooks/{route}", json=payload, headers={"X-API-Key": key})


def metrics(client, admin) -> dict:
    return parse(client.get("/metrics", headers={"X-API-Key": admin}).text)


# --- at ingest ---


def test_a_payload_that_matches_the_schema_is_accepted(client, key, db, orders):
    answer = post(client, key, {"order": {"id": 7, "email": "a@example.com"}})
    assert answer.status_code == 202, answer.json
    (row,) = events(db)
    assert row.status == "pending" and row.reason is None


def test_a_payload_that_does_not_match_is_refused_422_with_path_and_rule(
    client, key, db, make_key, orders
):
    admin = make_key(admin=True)
    before = metrics(client, admin)
    wrong_type = post(client, key, {"order": {"id": "seven"}})
    assert wrong_type.status_code == 422
    assert wrong_type.json == {
        "error": MISMATCH_ID,
        "code": "schema_mismatch",
        "path": "/order/id",
        "rule": "/properties/order/properties/id/type",
    }
    missing = post(client, key, {"note": "no order"})
    assert missing.status_code == 422
    assert missing.json["error"] == (
        "The payload does not match the route's schema at the top level: "
        '"order" is a required property (rule /required)'
    )
    assert (missing.json["path"], missing.json["rule"]) == ("", "/required")

    # Recorded as refused, with the sentence, and nothing to deliver.
    rows = events(db)
    assert [(r.status, r.reason, r.response_status) for r in rows] == [
        ("rejected", "schema_mismatch", 422)
    ] * 2
    assert rows[0].last_error == MISMATCH_ID
    with db.session() as session:
        assert session.scalar(select(sa.func.count()).select_from(Delivery)) == 0
    # What an admin sees: the API's listing by reason, the metrics.
    listed = client.get(
        "/admin/api/events?reason=schema_mismatch", headers={"X-API-Key": admin}
    ).json["events"]
    assert {e["id"] for e in listed} == {r.id for r in rows}
    assert all(e["reason"] == "schema_mismatch" and e["status"] == "rejected" for e in listed)
    after = metrics(client, admin)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("hub_refusals_total", reason="schema_mismatch") == 2
    assert grew("hub_events_total", route="orders", status="rejected") == 2


def test_a_huge_or_secret_bad_value_is_never_echoed(client, key, db, add_route, orders):
    huge = post(client, key, {"order": {"id": "x" * 900_000}})
    assert huge.status_code == 422
    assert len(huge.data) < 600 and "xxxxx" not in huge.get_data(as_text=True)
    assert huge.json["error"] == MISMATCH_ID
    secret = post(client, key, {"order": {"id": "hunter2-card-4242"}})
    assert secret.status_code == 422 and "hunter2" not in secret.get_data(as_text=True)
    # A message that names keys (additionalProperties), or a path through one, is cut short.
    closed = {"properties": {"a": {}}, "additionalProperties": False}
    add_route("closed", [], mode="async", schema=closed)
    keys = post(client, key, {"k" * 300_000: 1, "z" * 300_000: 2}, route="closed")
    assert keys.status_code == 422
    assert len(keys.data) < 1000 and len(keys.json["error"]) < 500
    assert keys.json["error"].endswith("kkkk… (rule /additionalProperties)")
    add_route("numbers", [], mode="async", schema={"additionalProperties": {"type": "integer"}})
    path = post(client, key, {"k" * 300_000: "one"}, route="numbers")
    assert path.status_code == 422 and len(path.data) < 1000
    assert len(path.json["path"]) == 200 and path.json["path"].endswith("kk…")
    assert all(len(row.last_error) <= 500 and "hunter2" not in row.last_error for row in events(db))


@pytest.mark.parametrize(
    ("payload", "path"),
    [
        ({"order": {"id": 1, "email": "not-an-address"}}, "/order/email"),
        ({"order": {"id": 1}, "sent_at": "yesterday at noon"}, "/sent_at"),
        ({"order": {"id": 1}, "sent_at": "2026-02-30T10:00:00Z"}, "/sent_at"),
    ],
)
def test_formats_are_checked(client, key, orders, payload, path):
    refused = post(client, key, payload)
    assert refused.status_code == 422
    assert refused.json["path"] == path and refused.json["rule"].endswith("/format")
    good = {"order": {"id": 1, "email": "a@example.com"}, "sent_at": "2026-12-07T10:00:00Z"}
    assert post(client, key, good).status_code == 202


def test_a_sender_without_a_valid_key_hears_401_before_any_schema_check(client, db, orders):
    answer = post(client, "hk_0badc0de_" + "b" * 43, {"order": {"id": "seven"}})
    assert answer.status_code == 401
    assert [r.reason for r in events(db)] == ["unauthorized"]


def test_the_seeds_api_process_checks_the_process_routes_schema(client, key, add_route):
    schema = {"properties": {"input": {"type": "string", "maxLength": 10}}}
    add_route("process", [{"connector": "text"}], schema=schema)
    refused = client.post("/api/process", json={"input": "x" * 11}, headers={"X-API-Key": key})
    assert refused.status_code == 422 and refused.json["code"] == "schema_mismatch"
    assert refused.json["rule"] == "/properties/input/maxLength"
    done = client.post("/api/process", json={"input": "short"}, headers={"X-API-Key": key})
    assert done.status_code == 200 and done.json["result"]["processed"] == "SHORT"


def test_a_pattern_is_matched_in_linear_time_on_a_large_string(client, key, add_route):
    """``[a-z]+@x`` took Python's re 6 s on 100 KB (quadratic); the engine here is linear.
    The figures are docs/schemas.md's (bench.route_schema); this test checks the answer."""
    add_route("mail", [], mode="async", schema={"properties": {"to": {"pattern": "[a-z]+@x"}}})
    refused = post(client, key, {"to": "a" * 900_000}, route="mail")
    assert refused.status_code == 422 and refused.json["rule"] == "/properties/to/pattern"
    assert post(client, key, {"to": "ab@x"}, route="mail").status_code == 202


def test_a_payload_nested_past_the_validators_reach_is_refused_not_a_crash(
    app, client, key, add_route
):
    app.config["MAX_JSON_DEPTH"] = 500
    schema = {
        "$defs": {
            "node": {"anyOf": [{"type": "integer"}, {"$ref": "#/$defs/wrap"}]},
            "wrap": {"type": "object", "properties": {"a": {"$ref": "#/$defs/node"}}},
        },
        "$ref": "#/$defs/wrap",
    }
    add_route("deep", [], mode="async", schema=schema)
    payload: object = "leaf"
    for _ in range(480):
        payload = {"a": payload}
    answer = post(client, key, payload, route="deep")
    assert answer.status_code == 422 and answer.json["code"] == "schema_mismatch"
    assert answer.json["error"] == (
        "The payload does not match the route's schema at the top level: "
        "the payload nests too deeply for the schema to be checked"
    )
    shallow: object = 1
    for _ in range(50):
        shallow = {"a": shallow}
    assert post(client, key, shallow, route="deep").status_code == 202


def test_a_stored_schema_that_no_longer_compiles_is_a_server_error_not_a_pass(
    client, key, db, orders
):
    with db.engine.begin() as conn:  # as an older release or a hand-written UPDATE might
        conn.execute(
            sa.update(Route.__table__)
            .where(Route.__table__.c.name == "orders")
            .values(schema={"type": "nope"})
        )
    answer = post(client, key, {"order": {"id": 1}})
    assert answer.status_code == 500
    assert answer.json == {"error": "Server error", "code": "internal_error"}
    (row,) = events(db)
    assert row.reason == "bad_schema" and "does not compile" in row.last_error


# --- compiled once per schema ---


def test_each_schema_is_compiled_once_however_often_the_route_is_read(
    client, key, make_key, monkeypatch, orders
):
    """The app re-reads the route for every request here (HUB_ROUTE_CACHE_SECONDS=0): the
    validator still comes from the process's compiled schemas."""
    payload_schema._COMPILED.clear()
    compiles = []
    real = payload_schema.engine().validator_for

    def counting(schema, **options):
        if options.get("mask"):  # compiled for payloads (a save's check quotes the schema)
            compiles.append(schema)
        return real(schema, **options)

    monkeypatch.setattr(payload_schema.engine(), "validator_for", counting)
    for n in range(10):
        assert post(client, key, {"order": {"id": n}}).status_code == 202
        assert post(client, key, {"order": {"id": str(n)}}).status_code == 422
    assert len(compiles) == 1
    # A changed schema is compiled (once) and used at once.
    changed = {**ORDER_SCHEMA, "properties": {"order": {"type": "array"}}}
    admin = {"X-API-Key": make_key(admin=True)}
    patched = client.patch("/admin/api/routes/orders", json={"schema": changed}, headers=admin)
    assert patched.status_code == 200, patched.json
    for _ in range(3):
        assert post(client, key, {"order": {"id": 1}}).json["rule"] == "/properties/order/type"
    assert len(compiles) == 2 and compiles[1] == changed


def test_routes_without_a_schema_take_any_payload_as_before(client, key, db, add_route):
    add_route("plain", [], mode="async")
    for payload in ({"order": {"id": "seven"}}, [1, 2], "text", None):
        assert post(client, key, payload, route="plain").status_code == 202
    with db.session() as session:
        assert session.scalar(select(Route)).payload_schema is None
    assert {r.status for r in events(db)} == {"pending"}


# --- when saved, on each face ---

BAD_SCHEMAS = [
    ({"type": "nope"}, "schema at /type: "),
    ({"properties": {"id": {"minLength": -1}}}, "schema at /properties/id/minLength: "),
    (
        {"properties": {"id": {"pattern": "(a+)\\1"}}},
        'is not a "regex": patterns run on a linear-time engine, which has no lookaround',
    ),
    ({"patternProperties": {"(?<=a)b": {}}}, "no lookaround"),
    ({"$ref": "#/$defs/missing"}, "schema: a $ref does not resolve within the schema"),
    (
        {"$schema": "http://json-schema.org/draft-03/schema#"},
        "schema: $schema 'http://json-schema.org/draft-03/schema#' is not one of drafts 4, 6, "
        "7, 2019-09 and 2020-12",
    ),
]


@pytest.mark.parametrize(("schema", "sentence"), BAD_SCHEMAS)
def test_an_invalid_schema_is_refused_by_the_admin_api(client, make_key, db, schema, sentence):
    admin = {"X-API-Key": make_key(admin=True)}
    created = client.post(
        "/admin/api/routes", json={"name": "r", "steps": [], "schema": schema}, headers=admin
    )
    assert created.status_code == 422
    assert created.json["code"] == "invalid"
    assert any(sentence in e for e in created.json["errors"]), created.json
    assert client.post("/admin/api/routes", json={"name": "r"}, headers=admin).status_code == 201
    patched = client.patch("/admin/api/routes/r", json={"schema": schema}, headers=admin)
    assert patched.status_code == 422 and any(sentence in e for e in patched.json["errors"])
    with db.session() as session:
        assert session.scalar(select(Route)).payload_schema is None


def test_the_admin_api_writes_shows_replaces_and_removes_a_schema(client, make_key, key):
    admin = {"X-API-Key": make_key(admin=True)}
    body = {"name": "orders", "mode": "async", "schema": ORDER_SCHEMA}
    created = client.post("/admin/api/routes", json=body, headers=admin)
    assert created.status_code == 201 and created.json["schema"] == ORDER_SCHEMA
    assert "payload_schema" not in created.json
    assert client.get("/admin/api/routes/orders", headers=admin).json["schema"] == ORDER_SCHEMA
    listed = client.get("/admin/api/routes", headers=admin).json["routes"]
    assert listed[0]["schema"] == ORDER_SCHEMA
    # A patch of another field keeps it; a PUT without it, or a null, removes it.
    kept = client.patch("/admin/api/routes/orders", json={"rate_limit": "5/second"}, headers=admin)
    assert kept.json["schema"] == ORDER_SCHEMA
    assert post(client, key, {"nothing": 1}).status_code == 422
    removed = client.patch("/admin/api/routes/orders", json={"schema": None}, headers=admin)
    assert removed.status_code == 200 and removed.json["schema"] is None
    assert post(client, key, {"nothing": 1}).status_code == 202
    client.patch("/admin/api/routes/orders", json={"schema": ORDER_SCHEMA}, headers=admin)
    replaced = client.put("/admin/api/routes/orders", json={"mode": "async"}, headers=admin)
    assert replaced.status_code == 200 and replaced.json["schema"] is None
    # Only "schema" names it on the way in.
    other = client.post(
        "/admin/api/routes", json={"name": "x", "payload_schema": {}}, headers=admin
    )
    assert other.status_code == 422


def test_the_openapi_document_declares_schema_as_an_object(client):
    document = client.get("/openapi.json").json
    components = document["components"]["schemas"]
    for name in ("RouteIn", "RoutePatch", "RouteOut"):
        field = components[name]["properties"]["schema"]
        types = [option.get("type") for option in field.get("anyOf", [field])]
        assert "object" in types, (name, field)
        assert "payload_schema" not in components[name]["properties"]


def test_a_remote_ref_is_refused_when_saved_and_never_fetched(client, make_key, receiver, db):
    admin = {"X-API-Key": make_key(admin=True)}
    remote = f"{receiver.url}/order.json"
    for schema in (
        {"properties": {"order": {"$ref": remote}}},
        {"$id": f"{receiver.url}/root.json", "properties": {"order": {"$ref": "order.json"}}},
    ):
        refused = client.post(
            "/admin/api/routes", json={"name": "r", "schema": schema}, headers=admin
        )
        assert refused.status_code == 422
        (sentence,) = refused.json["errors"]
        assert sentence == (
            f"body.schema: $ref {remote} points outside the schema, and the hub never "
            'fetches one: copy what it names under "$defs" and refer to it as "#/$defs/NAME"'
        )
    assert receiver.requests == []
    # A $ref within the schema, or to a draft's own metaschema, needs no network.
    local = {
        "$defs": {"id": {"type": "integer"}},
        "properties": {
            "id": {"$ref": "#/$defs/id"},
            "shape": {"$ref": "https://json-schema.org/draft/2020-12/schema"},
        },
    }
    saved = client.post("/admin/api/routes", json={"name": "r", "schema": local}, headers=admin)
    assert saved.status_code == 201, saved.json
    assert receiver.requests == []


def test_a_schema_over_the_size_or_depth_limit_is_refused(app, client, make_key):
    admin = {"X-API-Key": make_key(admin=True)}
    app.config["ROUTE_SCHEMA_MAX_BYTES"] = 1000
    large = {"properties": {f"field{i}": {"type": "string"} for i in range(60)}}
    refused = client.post("/admin/api/routes", json={"name": "r", "schema": large}, headers=admin)
    size = len(json.dumps(large, separators=(",", ":")))
    assert refused.status_code == 422
    assert refused.json["errors"] == [
        f"body.schema: is {size} bytes as compact JSON, more than 1000 (HUB_ROUTE_SCHEMA_MAX_BYTES)"
    ]
    app.config["ROUTE_SCHEMA_MAX_BYTES"] = 65536
    deep: dict = {"type": "integer"}
    for _ in range(40):
        deep = {"properties": {"a": deep}}
    refused = client.post("/admin/api/routes", json={"name": "r", "schema": deep}, headers=admin)
    assert refused.json["errors"] == ["body.schema: nests objects and arrays deeper than 64 levels"]
    assert client.post("/admin/api/routes", json={"name": "r", "schema": large}, headers=admin)


def test_the_cli_adds_a_schema_from_a_file_and_refuses_a_bad_one(runner, db, tmp_path):
    good = tmp_path / "order.yaml"
    good.write_text("type: object\nrequired: [order]\n")
    added = runner.invoke(args=["routes", "add", "orders", "--schema", str(good)])
    assert added.exit_code == 0, added.output
    shown = json.loads(runner.invoke(args=["routes", "show", "orders"]).output)
    assert shown["schema"] == {"type": "object", "required": ["order"]}

    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nope"}')
    refused = runner.invoke(args=["routes", "add", "other", "--schema", str(bad)])
    assert refused.exit_code == 1
    assert "schema at /type: " in refused.output and "Traceback" not in refused.output
    broken = tmp_path / "broken.json"
    broken.write_text('{"type": ')
    unread = runner.invoke(args=["routes", "add", "other", "--schema", str(broken)])
    assert unread.exit_code == 1 and "not valid JSON or YAML" in unread.output
    missing = runner.invoke(args=["routes", "add", "other", "--schema", str(tmp_path / "no")])
    assert missing.exit_code == 1 and "can't be read" in missing.output

    routes = tmp_path / "routes.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: applied\n"
        "    schema: {properties: {when: {format: date-time}}}\n"
        "  - name: wrong\n"
        "    schema: {$ref: 'https://example.com/s.json'}\n"
    )
    applied = runner.invoke(args=["routes", "apply", str(routes)])
    assert applied.exit_code == 1
    assert "$ref https://example.com/s.json points outside the schema" in applied.output
    with db.session() as session:  # all or nothing
        assert [r.name for r in session.scalars(select(Route))] == ["orders"]
    routes.write_text("routes:\n  - name: applied\n    schema: {required: [id]}\n")
    assert runner.invoke(args=["routes", "apply", str(routes)]).output == "created   applied\n"
    assert runner.invoke(args=["routes", "apply", str(routes)]).output == "unchanged applied\n"
    routes.write_text("routes:\n  - name: applied\n    schema: {required: [order]}\n")
    assert runner.invoke(args=["routes", "apply", str(routes)]).output == "updated   applied\n"


def test_the_dashboard_form_edits_the_schema_and_shows_its_problems(client, make_key, db, key):
    assert sign_in(client, make_key(admin=True)).status_code == 303
    form = {
        "name": "orders",
        "mode": "async",
        "steps": "[]",
        "dedup_window": "86400",
        "enabled": "true",
        "schema": json.dumps(ORDER_SCHEMA),
        "csrf_token": token(client, HOME),
    }
    for schema, problem in (
        ('{"type": ', "schema: not valid JSON"),
        ('{"type": "nope"}', "schema at /type: "),
    ):
        refused = client.post("/dashboard/routes/new", data={**form, "schema": schema})
        assert refused.status_code == 422
        html = refused.get_data(as_text=True)
        field = html[html.index('id="schema"') : html.index('id="enabled"')]
        assert problem in field.replace("&#34;", '"')
    created = client.post("/dashboard/routes/new", data=form)
    assert created.status_code == 303
    page = client.get(created.location).get_data(as_text=True)
    assert 'id="route-schema"' in page and "every payload must match" in page
    # The edit form shows it back; saving another field keeps it; an empty box removes it.
    edit = client.get("/dashboard/routes/orders/edit").get_data(as_text=True)
    box = edit.index('<textarea id="schema"')
    shown = edit[box : edit.index("</textarea>", box)]
    assert "&#34;required&#34;" in shown
    client.post("/dashboard/routes/orders/edit", data={**form, "description": "shop"})
    assert post(client, key, {"order": {"id": "x"}}).status_code == 422
    client.post("/dashboard/routes/orders/edit", data={**form, "schema": ""})
    with db.session() as session:
        route = session.scalar(select(Route))
        assert route.payload_schema is None and route.description is None


# --- the migration ---


def test_migration_0018_adds_routes_schema_and_keeps_every_route(db, add_route, client, key):
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0010")
    try:
        events_0010 = fill_0010(db)
        with db.engine.begin() as conn:
            command.upgrade(alembic_config(db, conn), "0017")
        with db.engine.connect() as conn:
            before = conn.execute(text("SELECT id, name FROM routes ORDER BY id")).all()
            event_count = conn.execute(text("SELECT count(*) FROM events")).scalar()
        assert len(before) == 2 and event_count == len(events_0010)
        upgrade(db)
        with db.session() as session:
            routes = list(session.scalars(select(Route).order_by(Route.id)))
            assert [(r.id, r.name) for r in routes] == [tuple(r) for r in before]
            assert all(r.steps == [{"connector": "text", "config": {}}] for r in routes)
            assert all(r.payload_schema is None for r in routes)
        # The routes written by 0017 still take any payload; one can be given a schema.
        assert post(client, key, {"any": "thing"}, route="other").status_code == 202
        add_route("other", [{"connector": "text"}], schema={"required": ["input"]})
        assert post(client, key, {"any": "thing"}, route="other").status_code == 422

        with db.engine.begin() as conn:  # and back: the column goes, every route stays
            command.downgrade(alembic_config(db, conn), "0017")
        with db.engine.connect() as conn:
            columns = {c["name"] for c in sa.inspect(conn).get_columns("routes")}
            assert "schema" not in columns
            after = conn.execute(text("SELECT id, name FROM routes ORDER BY id")).all()
            assert [tuple(r) for r in after] == [tuple(r) for r in before]
            assert conn.execute(text("SELECT count(*) FROM events")).scalar() > event_count
    finally:
        upgrade(db)
    with db.session() as session:
        assert session.scalar(select(Event).limit(1)) is not None


ENGINE_LOADED = """
import sys
from hub import create_app
from hub.services.routes import save_routes
app = create_app({"DATABASE_URL": sys.argv[1], "SECRET_KEY": "k" * 32})
from hub.store.db import upgrade
upgrade(app.extensions["hub.db"])
app.test_client().post("/hooks/nothing", json={})
before = "jsonschema_rs" in sys.modules
with app.extensions["hub.db"].session() as session:
    save_routes(session, [{"name": "typed", "schema": {"type": "object"}}],
                app.extensions["hub.connectors"], app.extensions["hub.secrets"])
print(before, "jsonschema_rs" in sys.modules)
"""


def test_the_schema_engine_loads_only_when_a_schema_is_used(tmp_path):
    """A process whose routes have no schema (every worker, most hubs) never loads the
    validator (7 MB of memory); saving a route with one loads it. In a process of its own:
    this one has loaded it."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    env = {"PATH": "/usr/bin:/bin", "HUB_ENV_FILE": "", "HOME": str(tmp_path)}
    command = [sys.executable, "-c", ENGINE_LOADED, url]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True"]
