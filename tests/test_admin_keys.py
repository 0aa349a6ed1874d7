"""Admin rights are a flag of their own, not a route name: `--scope admin` is the route
called admin, `--admin` makes an admin key, and the migration moves old admin scopes over."""

from __future__ import annotations

import html
import json

import pytest
import sqlalchemy as sa
from alembic import command

from hub.services import keys as key_store
from hub.store.db import alembic_config, upgrade
from hub.store.models import JSONType, utcnow
from tests.rows import events
from tests.test_dashboard import sign_in, token

API_KEYS = sa.table(
    "api_keys",
    sa.column("name", sa.String()),
    sa.column("prefix", sa.String()),
    sa.column("digest", sa.String()),
    sa.column("scopes", JSONType),
    sa.column("created_at", sa.DateTime(timezone=True)),
)


def created_key(result) -> str:
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[0]


def test_scope_admin_is_the_route_called_admin_and_admin_is_a_flag(runner, client, add_route, db):
    add_route("admin", [{"connector": "text", "config": {"field": "text"}}])
    add_route("other", [{"connector": "text", "config": {"field": "text"}}])
    ops = created_key(runner.invoke(args=["keys", "create", "ops", "--scope", "admin"]))
    boss = created_key(runner.invoke(args=["keys", "create", "boss", "--admin"]))
    someone = created_key(runner.invoke(args=["keys", "create", "someone"]))

    # The scope lets the key post to the route named admin, and nowhere else ...
    posted = client.post("/hooks/admin", json={"text": "hi"}, headers={"X-API-Key": ops})
    assert posted.status_code == 200
    assert client.post("/hooks/other", json={}, headers={"X-API-Key": ops}).status_code == 403
    # ... and gives no admin rights: another key's event stays out of its sight.
    theirs = client.post("/hooks/other", json={"text": "x"}, headers={"X-API-Key": someone})
    event_id = theirs.json["id"]
    assert client.get(f"/events/{event_id}", headers={"X-API-Key": ops}).status_code == 404
    # The admin key sees every event and may post to every route.
    assert client.get(f"/events/{event_id}", headers={"X-API-Key": boss}).status_code == 200
    assert (
        client.post("/hooks/admin", json={"text": "x"}, headers={"X-API-Key": boss}).json["status"]
        == "delivered"
    )
    assert [e.status for e in events(db)].count("delivered") == 3

    listed = {
        k["name"]: k for k in json.loads(runner.invoke(args=["keys", "list", "--json"]).output)
    }
    assert (listed["ops"]["admin"], listed["ops"]["scopes"]) == (False, ["admin"])
    assert (listed["boss"]["admin"], listed["boss"]["scopes"]) == (True, ["*"])
    table = runner.invoke(args=["keys", "list"]).output.splitlines()
    assert "ADMIN" in table[0]
    boss_line = next(line for line in table if "boss" in line).split()
    assert boss_line[2] == "yes"


def test_a_scope_is_a_whole_route_name_never_a_prefix_or_a_part(client, add_route, make_key, db):
    for name in ("pay", "payments", "repay"):
        add_route(name, [{"connector": "text", "config": {"field": "text"}}])
    pay = {"X-API-Key": make_key(scopes=["pay"], name="pay")}
    payments = {"X-API-Key": make_key(scopes=["payments"], name="payments")}
    assert client.post("/hooks/pay", json={"text": "a"}, headers=pay).status_code == 200
    for route in ("payments", "repay"):
        refused = client.post(f"/hooks/{route}", json={"text": "b"}, headers=pay)
        assert refused.status_code == 403, route
        assert refused.json == {
            "error": f"This API key may not post to route '{route}'",
            "code": "forbidden",
        }
    assert client.post("/hooks/payments", json={"text": "c"}, headers=payments).status_code == 200
    assert client.post("/hooks/pay", json={"text": "d"}, headers=payments).status_code == 403
    assert [e.status for e in events(db)].count("delivered") == 2


def test_create_prints_that_a_key_is_admin(runner):
    result = runner.invoke(args=["keys", "create", "boss", "--admin"])
    assert ", admin, scopes *" in result.stderr


def test_the_migration_turns_admin_scopes_into_admin_keys_and_back(db):
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0003")
    try:
        with db.engine.begin() as conn:
            for prefix, scopes in [
                ("aaaa0001", ["admin"]),
                ("aaaa0002", ["admin", "billing"]),
                ("aaaa0003", ["billing"]),
            ]:
                conn.execute(
                    API_KEYS.insert().values(
                        name=prefix,
                        prefix=prefix,
                        digest="0" * 64,
                        scopes=scopes,
                        created_at=utcnow(),
                    )
                )
        upgrade(db)
        with db.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT prefix, scopes, is_admin FROM api_keys ORDER BY prefix")
            ).all()
        found = [(p, s if isinstance(s, list) else json.loads(s), bool(a)) for p, s, a in rows]
        assert found == [
            ("aaaa0001", ["*"], True),
            ("aaaa0002", ["billing"], True),
            ("aaaa0003", ["billing"], False),
        ]
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0003")
        with db.engine.connect() as conn:
            back = conn.execute(sa.text("SELECT scopes FROM api_keys ORDER BY prefix")).scalars()
            assert [s if isinstance(s, list) else json.loads(s) for s in back] == [
                ["admin", "*"],
                ["admin", "billing"],
                ["billing"],
            ]
    finally:
        upgrade(db)


@pytest.mark.parametrize(
    "field,value,sentence",
    [
        ("name", "", "give the key a name of 1 to 100 characters"),
        ("name", "n" * 101, "give the key a name of 1 to 100 characters"),
        ("expires_in", "soon", "not a duration: 'soon' (use a number and s, m, h, d or w"),
        ("expires_in", "9999999w", "duration too long: '9999999w' (at most 100 years)"),
        ("expires_in", "1" * 40 + "d", "too long: at most 32 characters"),
        ("rate_limit", "lots", "not a rate: 'lots' (use a number per second, minute or hour)"),
        ("rate_limit", "0/hour", "not a rate: '0/hour' (the number must be at least 1)"),
    ],
)
def test_a_new_keys_input_is_refused_in_the_same_words_on_every_face(
    app, runner, client, make_key, db, field, value, sentence
):
    """The admin API, the dashboard's key form and `keys create` check a new key's input
    with one function: each names the field its own way, and says the same about it."""
    given = {"name": "ok", field: value}
    api = client.post("/admin/api/keys", json=given, headers={"X-API-Key": make_key(admin=True)})
    assert api.status_code == 422 and api.json["code"] == "invalid"
    assert [e for e in api.json["errors"] if e.startswith(f"body.{field}: {sentence}")], api.json

    signed_in = app.test_client()
    assert sign_in(signed_in, make_key(admin=True)).status_code == 303
    form = signed_in.post(
        "/dashboard/keys", data={**given, "csrf_token": token(signed_in, "/dashboard/keys")}
    )
    assert form.status_code == 422
    assert f"{field}: {sentence}" in html.unescape(form.get_data(as_text=True))

    option = {"expires_in": "--expires-in", "rate_limit": "--rate"}.get(field)
    args = ["keys", "create", value] if field == "name" else ["keys", "create", "ok", option, value]
    cli = runner.invoke(args=args)
    assert cli.exit_code == 1
    assert f"{option or 'NAME'}: {sentence}" in cli.stderr

    with db.session() as session:  # nothing was made by any of them
        assert {k.name for k in key_store.list_keys(session)} == {"test"}
