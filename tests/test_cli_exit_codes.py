"""The CLI in scripts: 0 done, 1 failed, 3 nothing to do, each reason one line on stderr;
`events purge` asks first (or takes --yes), and --dry-run only counts."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, update
from sqlalchemy import select as sql_select

from hub.store.models import Event, utcnow
from tests.procs import BIN, ROOT, hub_env


def old_events(client, db, key, add_route, count: int) -> list[str]:
    """``count`` delivered events received 40 days ago."""
    add_route("shout", [{"connector": "text"}])
    ids = [
        client.post("/hooks/shout", json={"input": "x"}, headers={"X-API-Key": key}).json["id"]
        for _ in range(count)
    ]
    with db.session() as session:
        session.execute(
            update(Event).where(Event.id.in_(ids)).values(received_at=utcnow() - timedelta(days=40))
        )
    return ids


def stored(db) -> int:
    with db.session() as session:
        return session.scalar(sql_select(func.count()).select_from(Event))


def test_what_is_missing_fails_with_its_name_on_stderr(runner, make_key):
    cases = {
        ("keys", "revoke", "ffffffff"): "Error: no key with prefix 'ffffffff'",
        ("routes", "show", "ghost"): "Error: no route named 'ghost'",
        ("routes", "remove", "ghost"): "Error: no route named 'ghost'",
        ("events", "show", "evt_nosuch"): "Error: no event 'evt_nosuch'",
        ("events", "replay", "evt_nosuch"): "Error: no such event: evt_nosuch",
    }
    for args, message in cases.items():
        result = runner.invoke(args=list(args))
        assert (result.exit_code, result.stdout) == (1, ""), args
        assert message in result.stderr, args


def test_nothing_to_do_exits_3_and_changes_nothing(runner, make_key, add_route, client, db):
    prefix = make_key().split("_")[1]
    assert runner.invoke(args=["keys", "revoke", prefix]).exit_code == 0
    again = runner.invoke(args=["keys", "revoke", prefix])
    assert again.exit_code == 3 and "already revoked" in again.stderr

    bulk = runner.invoke(args=["events", "replay", "--status", "dead"])
    assert bulk.exit_code == 3 and "no dead event to replay" in bulk.stderr
    once = runner.invoke(args=["worker", "--once"])
    assert once.exit_code == 3 and "no event was due" in once.stderr

    add_route("later", [{"connector": "text"}], mode="async")
    waiting = client.post(
        "/hooks/later", json={"input": "x"}, headers={"X-API-Key": make_key()}
    ).json["id"]
    replay = runner.invoke(args=["events", "replay", waiting])
    assert replay.exit_code == 3
    assert f"skipped {waiting}: pending: already waiting" in replay.stderr
    assert runner.invoke(args=["worker", "--once"]).output.startswith("delivered 1 event(s)")


def test_listings_exit_0_even_when_empty(runner):
    for args in (["keys", "list", "--json"], ["routes", "list", "--json"]):
        result = runner.invoke(args=args)
        assert (result.exit_code, json.loads(result.stdout)) == (0, []), args
    assert runner.invoke(args=["events", "list", "--json"]).exit_code == 0


def test_purge_dry_run_counts_and_deletes_nothing(runner, client, db, key, add_route):
    old_events(client, db, key, add_route, 3)
    recent = client.post("/hooks/shout", json={"input": "y"}, headers={"X-API-Key": key})
    assert recent.status_code == 200
    result = runner.invoke(args=["events", "purge", "--older-than", "30d", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("would purge 3 event(s) received before ")
    assert stored(db) == 4
    nothing = runner.invoke(args=["events", "purge", "--older-than", "90d", "--dry-run"])
    assert nothing.exit_code == 0 and nothing.stdout.startswith("would purge 0 event(s)")


def test_purge_without_a_terminal_needs_yes(runner, client, db, key, add_route):
    old_events(client, db, key, add_route, 2)
    refused = runner.invoke(args=["events", "purge", "--older-than", "30d"])
    assert refused.exit_code == 1
    assert "2 event(s) would be deleted: add --yes" in refused.stderr
    assert stored(db) == 2
    done = runner.invoke(args=["events", "purge", "--older-than", "30d", "--yes"])
    assert done.exit_code == 0 and "purged 2 event(s)" in done.stdout
    assert stored(db) == 0
    again = runner.invoke(args=["events", "purge", "--older-than", "30d", "--yes"])
    assert again.exit_code == 3 and "no finished event received before" in again.stderr


def test_connectors_list_json_gives_each_config_schema(runner):
    result = runner.invoke(args=["connectors", "list", "--json"])
    assert result.exit_code == 0
    connectors = {c["name"]: c for c in json.loads(result.stdout)}
    assert {"text", "openai", "http"} <= set(connectors)
    http = connectors["http"]
    assert http["description"].startswith("Sends the step's input")
    assert http["config_schema"]["required"] == ["url"]
    assert "timeout" in http["config_schema"]["properties"]


# --- the real `flask --app hub`, as a shell script runs it ---


def flask(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flask"), "--app", "hub", *args],
        cwd=ROOT,
        env=hub_env(database_url, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_the_real_cli_exit_statuses_and_streams(database_url_for_test, client, db, key, add_route):
    old_events(client, db, key, add_route, 2)
    missing = flask(database_url_for_test, "routes", "show", "ghost")
    assert (missing.returncode, missing.stdout) == (1, "")
    assert missing.stderr == "Error: no route named 'ghost'\n"

    refused = flask(database_url_for_test, "events", "purge", "--older-than", "30d")
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    assert stored(db) == 2
    purged = flask(database_url_for_test, "events", "purge", "--older-than", "30d", "--yes")
    assert purged.returncode == 0 and "purged 2 event(s)" in purged.stdout
    again = flask(database_url_for_test, "events", "purge", "--older-than", "30d", "--yes")
    assert again.returncode == 3 and again.stderr.startswith("Nothing to do: ")

    listed = flask(database_url_for_test, "connectors", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)


def test_an_unreachable_database_is_one_clear_line_not_a_traceback():
    closed = "postgresql://hub:pw-not-shown@127.0.0.1:9/hub"
    result = flask(closed, "keys", "list", HUB_DB_CONNECT_TIMEOUT="2")
    assert result.returncode == 1
    assert "Error: the database is unavailable (OperationalError)" in result.stderr
    assert "Traceback" not in result.stderr and "pw-not-shown" not in result.stderr


def at_terminal(database_url: str, answer: bytes, *args: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin/stdout, type ``answer`` at its prompt;
    (exit status, what the terminal showed)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [str(BIN / "flask"), "--app", "hub", *args],
        cwd=ROOT,
        env=hub_env(database_url),
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 60
    answered = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if not answered and b"[y/N]" in shown:
                os.write(leader, answer)
                answered = True
            if proc.poll() is not None and not ready:
                break
        return proc.wait(10), shown.decode(errors="replace")
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_purge_at_a_terminal_asks_first(database_url_for_test, client, db, key, add_route):
    old_events(client, db, key, add_route, 2)
    status, shown = at_terminal(
        database_url_for_test, b"n\n", "events", "purge", "--older-than", "30d"
    )
    assert "Delete 2 event(s) received before" in shown and "[y/N]" in shown
    assert status == 1 and stored(db) == 2
    status, shown = at_terminal(
        database_url_for_test, b"y\n", "events", "purge", "--older-than", "30d"
    )
    assert status == 0 and "purged 2 event(s)" in shown
    assert stored(db) == 0
