"""The admin's side of sender authentication: routes add --verify, show masked, secret
rotation over the CLI (checked over HTTP), routes apply with secrets from the environment."""

from __future__ import annotations

import json

from sqlalchemy import select

from hub import signatures
from hub.store.models import ApiKey, Route

BODY = b'{"input": "rotate me"}'
JSON = {"Content-Type": "application/json"}
OLD = "old-github-secret-0123456789"
NEW = "new-github-secret-9876543210"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def post(client, secret: str, route: str = "gh"):
    headers = {**JSON, **signatures.sign("github", body=BODY, secret=secret)}
    return client.post(f"/hooks/{route}", data=BODY, headers=headers)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_routes_add_with_verify_and_show_masks(runner, client):
    ok(
        runner.invoke(
            args=["routes", "add", "gh", "--step", "text", "--verify", "github", "--secret", OLD]
        )
    )
    assert post(client, OLD).status_code == 200
    assert post(client, NEW).status_code == 401

    shown = ok(runner.invoke(args=["routes", "show", "gh"])).output
    data = json.loads(shown)
    assert data["auth"] == "signature"
    assert data["verify"] == {"scheme": "github", "options": {}, "secrets": ["…6789"]}
    listed = ok(runner.invoke(args=["routes", "list", "--json"])).output
    table = ok(runner.invoke(args=["routes", "list"])).output
    for output in (shown, listed, table):
        assert OLD not in output and OLD[:-4] not in output
    assert "signature (github)" in table


def test_routes_add_options_auth_and_rate(runner, db):
    ok(
        runner.invoke(
            args=[
                "routes",
                "add",
                "sw",
                "--verify",
                "standard-webhooks",
                "--secret",
                WHSEC,
                "--verify-option",
                "tolerance=600",
                "--auth",
                "key+signature",
                "--rate",
                "100/min",
            ]
        )
    )
    with db.session() as session:
        route = session.scalar(select(Route).where(Route.name == "sw"))
    assert (route.auth, route.verify_options, route.rate_limit) == (
        "key+signature",
        {"tolerance": 600},
        "100/minute",
    )
    shown = json.loads(ok(runner.invoke(args=["routes", "show", "sw"])).output)
    assert shown["verify"]["secrets"] == ["whsec_…LaSw"]
    assert WHSEC not in json.dumps(shown)


def test_routes_add_refusals_name_the_field_and_never_echo_the_secret(runner, db):
    bad = runner.invoke(
        args=["routes", "add", "x", "--verify", "standard-webhooks", "--secret", "whsec_@@@@"]
    )
    assert bad.exit_code == 1 and "verify.secrets[0]" in bad.output
    assert "@@@@" not in bad.output
    no_verifier = runner.invoke(args=["routes", "add", "x", "--auth", "signature"])
    assert no_verifier.exit_code == 1 and "needs a signature verifier" in no_verifier.output
    loose = runner.invoke(args=["routes", "add", "x", "--secret", "s"])
    assert loose.exit_code == 1 and "need --verify" in loose.output
    option = runner.invoke(
        args=["routes", "add", "x", "--verify", "github", "--secret", "s", "--verify-option", "t"]
    )
    assert option.exit_code == 1 and "KEY=VALUE" in option.output
    rate = runner.invoke(args=["routes", "add", "x", "--rate", "fast"])
    assert rate.exit_code == 1 and "rate_limit: not a rate" in rate.output
    with db.session() as session:
        assert session.scalar(select(Route)) is None


def test_rotation_without_downtime(runner, client):
    ok(runner.invoke(args=["routes", "add", "gh", "--verify", "github", "--secret", OLD]))
    # 1. add the new secret: both verify while the provider is switched over
    added = ok(runner.invoke(args=["routes", "secret", "add", "gh", NEW]))
    assert "2 secrets" in added.output and NEW not in added.output
    assert post(client, OLD).status_code == 200
    assert post(client, NEW).status_code == 200
    shown = json.loads(ok(runner.invoke(args=["routes", "show", "gh"])).output)
    assert shown["verify"]["secrets"] == ["…6789", "…3210"]
    again = runner.invoke(args=["routes", "secret", "add", "gh", NEW])
    assert again.exit_code == 1 and "already has this secret" in again.output
    # 2. remove the old one, named as `routes show` masks it
    ok(runner.invoke(args=["routes", "secret", "remove", "gh", "…6789"]))
    assert post(client, OLD).status_code == 401
    assert post(client, NEW).status_code == 200
    # 3. the last secret of a signature route stays
    last = runner.invoke(args=["routes", "secret", "remove", "gh", "1"])
    assert last.exit_code == 1 and "last secret" in last.output
    assert post(client, NEW).status_code == 200
    nothing = runner.invoke(args=["routes", "secret", "remove", "gh", "zzzzzz"])
    assert nothing.exit_code == 1 and "no secret matches" in nothing.output


def test_secret_remove_by_value_and_by_number(runner, client):
    ok(
        runner.invoke(
            args=["routes", "add", "gh", "--verify", "github", "--secret", OLD, "--secret", NEW]
        )
    )
    ok(runner.invoke(args=["routes", "secret", "remove", "gh", "2"]))
    assert post(client, NEW).status_code == 401
    ok(runner.invoke(args=["routes", "secret", "add", "gh"], input=NEW + "\n"))
    ok(runner.invoke(args=["routes", "secret", "remove", "gh", OLD]))
    assert post(client, OLD).status_code == 401 and post(client, NEW).status_code == 200


def test_secret_commands_on_routes_without_a_verifier(runner):
    ok(runner.invoke(args=["routes", "add", "plain", "--step", "text"]))
    added = runner.invoke(args=["routes", "secret", "add", "plain", NEW])
    assert added.exit_code == 1 and "no signature verifier" in added.output
    missing = runner.invoke(args=["routes", "secret", "add", "nope", NEW])
    assert missing.exit_code == 1 and "no route named" in missing.output


def test_apply_reads_secrets_from_the_environment_and_stays_idempotent(
    runner, client, tmp_path, monkeypatch
):
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", OLD)
    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET_NEXT", NEW)
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n"
        "  - name: gh\n"
        "    steps: [{connector: text}]\n"
        "    rate_limit: 50/second\n"
        "    verify:\n"
        "      scheme: github\n"
        "      secrets_env: [GITHUB_WEBHOOK_SECRET]\n"
        "  - name: gh2\n"
        "    auth: key|signature\n"
        "    verify: {scheme: github, secrets: ['${GITHUB_WEBHOOK_SECRET_NEXT}']}\n"
    )
    first = ok(runner.invoke(args=["routes", "apply", str(path)]))
    assert "created   gh" in first.output and "created   gh2" in first.output
    assert post(client, OLD).status_code == 200
    assert post(client, NEW, route="gh2").status_code == 200
    second = ok(runner.invoke(args=["routes", "apply", str(path)]))
    assert "unchanged gh\n" in second.output and "unchanged gh2" in second.output

    monkeypatch.setenv("GITHUB_WEBHOOK_SECRET", "a-rotated-secret-value")
    third = ok(runner.invoke(args=["routes", "apply", str(path)]))
    assert "updated   gh\n" in third.output and "unchanged gh2" in third.output
    assert post(client, OLD).status_code == 401

    monkeypatch.delenv("GITHUB_WEBHOOK_SECRET")
    missing = runner.invoke(args=["routes", "apply", str(path)])
    assert missing.exit_code == 1
    assert "verify.secrets_env[0]: environment variable GITHUB_WEBHOOK_SECRET is not set" in (
        missing.output
    )


def test_apply_refuses_what_routes_show_printed(runner, tmp_path):
    ok(runner.invoke(args=["routes", "add", "gh", "--verify", "github", "--secret", OLD]))
    shown = json.loads(ok(runner.invoke(args=["routes", "show", "gh"])).output)
    path = tmp_path / "shown.json"
    path.write_text(json.dumps([shown]))
    result = runner.invoke(args=["routes", "apply", str(path)])
    assert result.exit_code == 1 and "masked secret" in result.output


def test_keys_create_with_a_rate(runner, db):
    created = ok(runner.invoke(args=["keys", "create", "stripe", "--rate", "1000/h"]))
    assert "at most 1000/hour" in created.output
    with db.session() as session:
        assert session.scalar(select(ApiKey.rate_limit)) == "1000/hour"
    assert "1000/hour" in ok(runner.invoke(args=["keys", "list"])).output
    bad = runner.invoke(args=["keys", "create", "x", "--rate", "often"])
    assert bad.exit_code == 1 and "not a rate" in bad.output


def test_a_blank_secret_is_refused_when_the_route_is_saved(runner, client, db, tmp_path):
    """Spaces sign like any bytes, so a secret of spaces used to be accepted: anyone who
    guessed it could sign. Saved by `routes add`, `routes secret add` or `routes apply`."""
    for blank in ("   ", "\t "):
        added = runner.invoke(args=["routes", "add", "gh", "--verify", "github", "--secret", blank])
        assert added.exit_code == 1
        assert "verify.secrets[0]: A secret must not be empty or only whitespace" in added.output
    ok(runner.invoke(args=["routes", "add", "gh", "--verify", "github", "--secret", OLD]))
    rotated = runner.invoke(args=["routes", "secret", "add", "gh", "  "])
    assert rotated.exit_code == 1 and "only whitespace" in rotated.output
    routes_file = tmp_path / "routes.json"
    routes_file.write_text(
        json.dumps([{"name": "gh", "verify": {"scheme": "github", "secrets": [" "]}}])
    )
    applied = runner.invoke(args=["routes", "apply", str(routes_file)])
    assert applied.exit_code == 1 and "only whitespace" in applied.output
    # The route still verifies with its one real secret, and only with it.
    assert post(client, OLD).status_code == 200
    assert post(client, "  ").status_code == 401
