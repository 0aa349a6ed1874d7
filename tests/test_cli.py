"""The admin's commands: keys, routes (add/list/show/remove/apply), connectors, init."""

from __future__ import annotations

import json

from sqlalchemy import select

from hub.services.keys import digest
from hub.store.models import ApiKey, Route


def test_keys_create_prints_once_and_stores_only_the_digest(runner, db):
    result = runner.invoke(
        args=["keys", "create", "github", "--scope", "gh", "--expires-in", "30d"]
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[0]
    assert key.startswith("hk_") and len(key.split("_", 2)[2]) == 43  # 256 bits
    with db.session() as session:
        row = session.scalar(select(ApiKey))
    assert row.digest == digest(key)
    assert row.prefix == key.split("_")[1]
    assert row.scopes == ["gh"]
    assert row.expires_at is not None
    columns = [getattr(row, c.key) for c in ApiKey.__table__.columns]
    assert key not in json.dumps(columns, default=str)


def test_keys_list_and_revoke(runner, make_key):
    key = make_key(name="stripe")
    prefix = key.split("_")[1]
    listing = runner.invoke(args=["keys", "list"]).output
    assert prefix in listing and "stripe" in listing and key not in listing
    assert runner.invoke(args=["keys", "revoke", prefix]).exit_code == 0
    data = json.loads(runner.invoke(args=["keys", "list", "--json"]).output)
    assert data[0]["revoked_at"] is not None
    missing = runner.invoke(args=["keys", "revoke", "ffffffff"])
    assert missing.exit_code == 1 and "no key" in missing.output


def test_routes_list_shows_each_destination_of_a_route_that_fans_out(runner, tmp_path):
    routes = tmp_path / "fanout.yaml"
    routes.write_text(
        "routes:\n"
        "  - name: fanout\n"
        "    mode: async\n"
        "    destinations:\n"
        "      - {name: shout, steps: [{connector: text}]}\n"
        "      - {name: twice, steps: [{connector: text}, {connector: text}]}\n"
    )
    assert runner.invoke(args=["routes", "apply", str(routes)]).exit_code == 0
    listed = runner.invoke(args=["routes", "list"])
    assert listed.exit_code == 0, listed.output
    assert "shout: text; twice: text > text" in listed.output


def test_keys_create_rejects_a_bad_duration(runner):
    result = runner.invoke(args=["keys", "create", "x", "--expires-in", "soon"])
    assert result.exit_code == 1
    assert "not a duration" in result.output


def test_routes_add_list_show_remove(runner, db):
    result = runner.invoke(
        args=[
            "routes",
            "add",
            "gh",
            "--mode",
            "sync",
            "--step",
            'text:{"field": "message", "operations": ["lower"]}',
        ]
    )
    assert result.exit_code == 0, result.output
    assert "gh" in runner.invoke(args=["routes", "list"]).output
    shown = json.loads(runner.invoke(args=["routes", "show", "gh"]).output)
    assert shown["steps"] == [
        {"connector": "text", "config": {"field": "message", "operations": ["lower"]}}
    ]
    again = runner.invoke(args=["routes", "add", "gh", "--step", "text"])
    assert again.exit_code == 1 and "exists" in again.output
    assert runner.invoke(args=["routes", "remove", "gh"]).exit_code == 0
    with db.session() as session:
        assert session.scalar(select(Route)) is None


def test_routes_add_refuses_a_bad_config_with_field_and_reason(runner, db):
    result = runner.invoke(args=["routes", "add", "bad", "--step", 'text:{"max_length": "lots"}'])
    assert result.exit_code == 1
    assert "steps[0] (text): max_length" in result.output
    assert "integer" in result.output
    unknown = runner.invoke(args=["routes", "add", "bad", "--step", "teleport"])
    assert unknown.exit_code == 1 and "unknown connector 'teleport'" in unknown.output
    broken = runner.invoke(args=["routes", "add", "bad", "--step", "text:{not json"])
    assert broken.exit_code == 1 and "not valid JSON" in broken.output
    with db.session() as session:
        assert session.scalar(select(Route)) is None


def test_routes_apply_is_idempotent_and_all_or_nothing(runner, db, tmp_path):
    good = tmp_path / "routes.yaml"
    good.write_text(
        "routes:\n"
        "  - name: a\n    steps: [{connector: text}]\n"
        "  - name: b\n    mode: async\n    steps: [{connector: text, config: {field: body}}]\n"
    )
    first = runner.invoke(args=["routes", "apply", str(good)])
    assert first.exit_code == 0, first.output
    assert "created   a" in first.output and "created   b" in first.output
    second = runner.invoke(args=["routes", "apply", str(good)])
    assert "unchanged a" in second.output and "unchanged b" in second.output

    bad = tmp_path / "routes.json"
    bad.write_text(
        json.dumps(
            [
                {"name": "a", "steps": [{"connector": "text", "config": {"field": "changed"}}]},
                {
                    "name": "c",
                    "steps": [{"connector": "text", "config": {"operations": ["explode"]}}],
                },
            ]
        )
    )
    result = runner.invoke(args=["routes", "apply", str(bad)])
    assert result.exit_code == 1
    assert "steps[0] (text): operations.0" in result.output
    with db.session() as session:
        names = sorted(session.scalars(select(Route.name)))
        a = session.scalar(select(Route).where(Route.name == "a"))
    assert names == ["a", "b"]
    assert a.steps == [{"connector": "text", "config": {}}]


def test_bad_template_is_refused_when_saved(runner):
    result = runner.invoke(args=["routes", "add", "t", "--step", 'text:{"field": "{{ payload.x "}'])
    assert result.exit_code == 1
    assert "template does not parse" in result.output


def test_connectors_list_shows_fields(runner):
    output = runner.invoke(args=["connectors", "list"]).output
    assert "text:" in output and "openai:" in output
    assert "operations" in output and "api_key_env" in output


def test_init_creates_demo_routes_and_one_admin_key(runner, db):
    first = runner.invoke(args=["init"])
    assert first.exit_code == 0, first.output
    assert "created demo route 'process'" in first.output
    key = [line.strip() for line in first.output.splitlines() if line.strip().startswith("hk_")]
    assert len(key) == 1
    second = runner.invoke(args=["init"])
    assert "hk_" not in second.output
    with db.session() as session:
        rows = list(session.scalars(select(ApiKey)))
    assert len(rows) == 1 and rows[0].is_admin and rows[0].scopes == ["*"]
