"""Retention per route: each route keeps its finished events its own number of days (or the
hub's default), the workers purge the rest in small batches, the dry run counts what then
goes, and a purged event's dedup key is still recognised until its window closes."""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, update

from hub.services import retention
from hub.store.db import alembic_config, upgrade
from hub.store.models import (
    Attempt,
    DedupKey,
    Delivery,
    Event,
    EventStatus,
    RetentionState,
    Route,
    utcnow,
)
from tests.conftest import PG_URL
from tests.procs import stop, wait_until, worker
from tests.rows import insert_events

DAY = timedelta(days=1)


def aged(db, route: str, count: int, days: float, status: str = "delivered") -> list[str]:
    """``count`` events of ``route`` in ``status`` (with their deliveries, as ingest leaves
    them), received ``days`` ago; their ids."""
    before = set(ids_of(db, route))
    insert_events(db, route, count, status=status)
    new = sorted(set(ids_of(db, route)) - before)
    when = utcnow() - timedelta(days=days)
    with db.session() as session:
        session.execute(update(Event).where(Event.id.in_(new)).values(received_at=when))
    return new


def ids_of(db, route: str | None = None) -> list[str]:
    query = select(Event.id).order_by(Event.id)
    if route is not None:
        query = query.where(Event.route == route)
    with db.read_session() as session:
        return list(session.scalars(query))


def rows(db, model) -> int:
    with db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def with_attempts(db, event_ids: list[str]) -> None:
    """An attempt row for each event's delivery, as a run leaves it."""
    with db.session() as session:
        for event_id in event_ids:
            session.add(
                Attempt(
                    event_id=event_id,
                    delivery_id="dlv_" + event_id[4:],
                    step_index=0,
                    connector="text",
                    outcome="ok",
                )
            )


def on_its_way(db, event_ids: list[str]) -> list[str]:
    """The events' deliveries put back on their way, their rows still saying delivered
    (an event whose roll-up a tool never wrote)."""
    with db.session() as session:
        session.execute(
            update(Delivery)
            .where(Delivery.event_id.in_(event_ids))
            .values(status=EventStatus.PENDING, completed_at=None)
        )
    return event_ids


def purge_cli(runner, *args: str):
    return runner.invoke(args=["events", "purge", *args])


def test_each_route_keeps_its_events_its_own_days_and_the_rest_the_default(
    app, db, add_route, runner
):
    """Payments kept a year and CI noise a day, every other route the hub's 30 days."""
    app.config["RETENTION_DAYS"] = 30
    add_route("payments", retention_days=365)
    add_route("ci", retention_days=1)
    add_route("orders")
    old_payments = aged(db, "payments", 3, days=40)
    old_ci, new_ci = aged(db, "ci", 4, days=2), aged(db, "ci", 2, days=0.5)
    old_orders, new_orders = aged(db, "orders", 5, days=31), aged(db, "orders", 2, days=29)
    gone_route = aged(db, "removed-route", 2, days=31)  # a route since removed: the default

    result = purge_cli(runner, "--yes")

    assert result.exit_code == 0, result.output
    assert "purged 11 event(s) past their route's retention" in result.stdout
    assert "  ci: 4\n" in result.stdout and "  orders: 5\n" in result.stdout
    kept = sorted(old_payments + new_ci + new_orders)
    assert ids_of(db) == kept
    assert not set(ids_of(db)) & set(old_ci + old_orders + gone_route)
    # Without a default, only the routes that set a retention purge anything.
    app.config["RETENTION_DAYS"] = 0
    aged(db, "orders", 2, days=400)
    again = purge_cli(runner, "--yes")
    assert again.exit_code == 3 and "no finished event past their route's retention" in again.stderr
    assert len(ids_of(db, "orders")) == 4


def test_only_finished_events_go_and_their_deliveries_and_attempts_with_them(
    app, db, add_route, runner
):
    app.config["RETENTION_DAYS"] = 7
    add_route("shop")
    ended = {s: aged(db, "shop", 2, 10, s) for s in ("delivered", "failed", "dead", "filtered")}
    refused = aged(db, "shop", 2, 10, "rejected") + aged(db, "shop", 1, 10, "duplicate")
    on_their_way = {s: aged(db, "shop", 2, 10, s) for s in ("pending", "retrying", "processing")}
    finished = [i for ids in ended.values() for i in ids] + refused
    with_attempts(db, ended["delivered"] + on_their_way["retrying"])
    # A row that says delivered while one of its deliveries is still on its way (an event
    # whose roll-up a tool never wrote) stays until the delivery ends.
    (odd,) = on_its_way(db, aged(db, "shop", 1, 10, "delivered"))

    # A pending event with no delivery yet (written by a tool: a replay gives it its
    # deliveries) is on its way too.
    (bare,) = aged(db, "shop", 1, 10, "pending")
    with db.session() as session:
        session.execute(sa.delete(Delivery).where(Delivery.event_id == bare))

    result = purge_cli(runner, "--yes")

    assert result.exit_code == 0 and f"purged {len(finished)} event(s)" in result.stdout
    waiting = sorted([i for ids in on_their_way.values() for i in ids] + [odd, bare])
    assert ids_of(db) == waiting
    with db.read_session() as session:
        left = set(session.scalars(select(Delivery.event_id)))
        tried = set(session.scalars(select(Attempt.event_id)))
    assert left == set(waiting) - {bare} and tried == set(on_their_way["retrying"])


def test_the_dry_run_counts_by_route_what_the_purge_then_deletes(app, db, add_route, runner):
    app.config["RETENTION_DAYS"] = 30
    add_route("ci", retention_days=1)
    add_route("orders")
    add_route("payments", retention_days=365)
    aged(db, "ci", 6, days=3)
    aged(db, "ci", 2, days=3, status="pending")  # not finished: not counted, not purged
    on_its_way(db, aged(db, "ci", 1, days=3))  # nor one with a delivery on its way
    aged(db, "orders", 4, days=45)
    aged(db, "legacy", 3, days=45)
    aged(db, "payments", 2, days=45)

    dry = purge_cli(runner, "--dry-run")

    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would purge 13 event(s) past their route's retention\n")
    table = {
        line.split()[0]: line.split()
        for line in dry.stdout.splitlines()[2:]  # past the sentence and the table's head
    }
    assert table["ci"] == ["ci", "1", "day", "retention_days", "6"]
    assert table["payments"] == ["payments", "365", "days", "retention_days", "0"]
    assert table["orders"] == ["orders", "30", "days", "HUB_RETENTION_DAYS", "4"]
    assert table["legacy"] == ["legacy", "30", "days", "HUB_RETENTION_DAYS", "3"]
    assert rows(db, Event) == 18  # the dry run deleted nothing

    done = purge_cli(runner, "--yes")
    counted = dict(re.findall(r"^  (\S+): (\d+)$", done.stdout, re.M))
    assert counted == {"ci": "6", "orders": "4", "legacy": "3"}
    assert "purged 13 event(s)" in done.stdout and rows(db, Event) == 5

    # --older-than keeps its meaning (one age for every route), with counts by route too.
    aged(db, "payments", 2, days=100)
    by_hand = purge_cli(runner, "--older-than", "90d", "--dry-run")
    assert by_hand.stdout.startswith("would purge 2 event(s) received before ")
    assert re.search(r"^payments +- +--older-than +2$", by_hand.stdout, re.M)


def test_with_no_retention_set_the_dry_run_says_events_are_kept(db, add_route, runner):
    add_route("orders")
    aged(db, "orders", 2, days=4000)
    dry = purge_cli(runner, "--dry-run")
    assert dry.exit_code == 0
    assert dry.stdout.startswith("would purge 0 event(s)")
    assert "HUB_RETENTION_DAYS is 0: events are kept until purged with --older-than" in dry.stdout
    assert purge_cli(runner, "--yes").exit_code == 3 and rows(db, Event) == 2


def test_batches_are_bounded_and_ingest_goes_on_during_a_purge(app, db, add_route, client, key):
    """3,000 events purged 200 at a time: no statement deletes more than a batch, each
    batch is its own transaction, and webhooks posted meanwhile are committed between them."""
    add_route("noise", retention_days=1)
    add_route("live", mode="async")
    aged(db, "noise", 3000, days=2)
    deleted: list[int] = []
    committed: list[float] = []  # when each purge batch ended

    def count_deletes(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("DELETE FROM EVENTS"):
            deleted.append(cursor.rowcount)

    sa_event.listen(db.engine, "after_cursor_execute", count_deletes)
    accepted: list[tuple[float, int]] = []
    purging = threading.Event()

    def post_while_purging() -> None:
        sender = app.test_client()
        purging.wait(10)
        while purging.is_set():
            answer = sender.post("/hooks/live", json={"n": 1}, headers={"X-API-Key": key})
            accepted.append((time.monotonic(), answer.status_code))

    def keep_going() -> bool:
        committed.append(time.monotonic())
        return True

    poster = threading.Thread(target=post_while_purging)
    poster.start()
    try:
        with db.read_session() as session:
            walks = retention.scopes(session, 0)
        purging.set()
        done = retention.purge(db, walks, batch=200, pause=0.01, keep_going=keep_going)
    finally:
        purging.clear()
        poster.join(30)
        sa_event.remove(db.engine, "after_cursor_execute", count_deletes)

    assert done.total == 3000 and done.batches == 16  # 15 full, and the one that found none
    assert max(deleted) <= 200 and sum(deleted) == 3000
    assert {status for _, status in accepted} == {202}
    first, last = committed[1], committed[-1]  # after the first batch, before the last
    between = [at for at, _ in accepted if first < at < last]
    assert len(between) >= 3, (len(accepted), last - first)
    assert len(ids_of(db, "live")) == len(accepted)


def test_a_purged_events_dedup_key_is_recognised_until_its_window_closes(
    app, db, add_route, client, make_key, runner
):
    """A provider retrying a delivery after its event was purged still hears `duplicate`
    with the original's id inside the dedup window (3 days here), and is taken as new after
    it; another sender's delivery of the same id is never the purged one's duplicate."""
    add_route("pay", dedup_window=3 * 86400, retention_days=1)
    alice, bob = make_key(name="alice"), make_key(name="bob")

    def send(key: str, delivery_id: str):
        headers = {"X-API-Key": key, "Idempotency-Key": delivery_id}
        return client.post("/hooks/pay", json={"amount": 5}, headers=headers)

    first = send(alice, "ch_1")
    assert first.status_code == 200 and first.json["status"] == "delivered"
    assert send(alice, "ch_1").json == {"id": first.json["id"], "duplicate": True}
    with db.session() as session:  # two days on: past the route's retention, in the window
        session.execute(update(Event).values(received_at=utcnow() - 2 * DAY))

    purged = purge_cli(runner, "--yes")

    assert purged.exit_code == 0 and "purged 2 event(s)" in purged.stdout
    assert "kept the dedup keys of 1 purged event(s) for their window" in purged.stdout
    assert rows(db, Event) == 0
    retry = send(alice, "ch_1")
    assert retry.status_code == 200
    assert retry.json == {"id": first.json["id"], "duplicate": True}
    assert send(bob, "ch_1").json["status"] == "delivered"  # another sender's own delivery

    with db.session() as session:  # two more days: the window has closed
        session.execute(
            update(DedupKey).values(received_at=utcnow() - 4 * DAY, expires_at=utcnow() - DAY)
        )
    late = send(alice, "ch_1")
    assert late.status_code == 200 and late.json["status"] == "delivered"
    assert late.json["id"] != first.json["id"]
    # The next purge drops the expired key.
    purge_cli(runner, "--yes")
    assert rows(db, DedupKey) == 0


def test_a_refused_or_failed_original_leaves_no_dedup_key(app, db, add_route, runner, key):
    """Only what a later copy would be a duplicate of is kept: not a refusal, a duplicate,
    a sync run whose sender heard an error, nor an event whose window already closed."""
    add_route("pay", dedup_window=3 * 86400, retention_days=1)
    aged(db, "pay", 2, days=2, status="rejected")
    aged(db, "pay", 2, days=2, status="duplicate")
    failed = aged(db, "pay", 1, days=2, status="failed")
    closed = aged(db, "pay", 1, days=4)
    original = aged(db, "pay", 1, days=2)
    with db.session() as session:
        session.execute(update(Event).values(dedup_key="k-1", key_prefix="abcd1234"))
        session.execute(update(Event).where(Event.id.in_(failed)).values(response_status=502))

    assert purge_cli(runner, "--yes").exit_code == 0

    with db.read_session() as session:
        kept = session.scalars(select(DedupKey)).all()
    assert [(k.event_id, k.key_prefix, k.dedup_key) for k in kept] == [
        (original[0], "abcd1234", "k-1")
    ]
    assert closed[0] not in {k.event_id for k in kept}


@pytest.mark.skipif(not PG_URL, reason="needs HUB_TEST_DATABASE_URL (PostgreSQL)")
@pytest.mark.parametrize("database_url_for_test", ["postgresql"], indirect=True)
def test_a_purge_skips_rows_someone_holds_instead_of_waiting(app, db, add_route):
    """Two purges (two workers, or a worker and the CLI) never wait on each other: a row
    locked elsewhere is left for the next pass (PostgreSQL's FOR UPDATE SKIP LOCKED)."""
    add_route("ci", retention_days=1)
    held, *others = aged(db, "ci", 5, days=2)
    with db.read_session() as session:
        walks = retention.scopes(session, 0)
    done: list[retention.Purged] = []
    with db.engine.connect() as conn, conn.begin():
        conn.execute(select(Event.id).where(Event.id == held).with_for_update())
        purging = threading.Thread(target=lambda: done.append(retention.purge(db, walks, batch=2)))
        purging.start()
        purging.join(10)
        waited = purging.is_alive()
    purging.join(10)
    assert not waited, "the purge waited for the locked row"
    assert done[0].total == 4 and ids_of(db) == [held]
    assert retention.purge(db, walks, batch=2).total == 1  # the next pass takes it


def test_one_process_at_a_time_takes_a_pass(app, db):
    me, other = "host:1", "host:2"
    assert retention.take_turn(db, me)
    assert not retention.take_turn(db, other)  # the lease holds it
    retention.end_turn(db, me, interval=300, purged=7)
    assert not retention.take_turn(db, other)  # not due for 300 s
    with db.session() as session:
        session.execute(update(RetentionState).values(next_run_at=utcnow() - DAY))
    assert retention.take_turn(db, other)
    # A process that died mid-pass leaves a lease that runs out; its renewal then fails.
    with db.session() as session:
        session.execute(update(RetentionState).values(lease_until=utcnow() - DAY))
    assert retention.take_turn(db, me)
    assert not retention.renew(db, other) and retention.renew(db, me)
    with db.read_session() as session:
        state = session.get(RetentionState, retention.STATE_ID)
    assert (state.lease_owner, state.ran_by, state.purged) == (me, me, 7)


def test_workers_purge_on_their_own_one_pass_at_a_time(
    app, db, add_route, database_url_for_test, tmp_path
):
    """Two real `hub worker` processes: the events past their retention go, each deleted
    once, and neither process's pass fails on the other's."""
    add_route("ci", retention_days=1)
    add_route("orders")
    old = aged(db, "ci", 1200, days=2)
    kept = aged(db, "ci", 3, days=0.5) + aged(db, "orders", 4, days=40)
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    settings = {"HUB_RETENTION_INTERVAL": "1", "HUB_RETENTION_BATCH": "100"}
    procs = [worker(database_url_for_test, log, **settings) for log in logs]
    try:
        wait_until(lambda: ids_of(db) == sorted(kept), 60, interval=0.2, what="the purge")

        def pass_ended() -> bool:
            with db.read_session() as session:
                state = session.get(RetentionState, retention.STATE_ID)
            return state is not None and state.ran_by is not None

        wait_until(pass_ended, 10, what="the pass to end")
    finally:
        for proc in procs:
            stop(proc)
    text = "".join(log.read_text() for log in logs)
    assert "retention pass failed" not in text
    purged = [int(n) for n in re.findall(r"purged (\d+) event\(s\) in", text)]
    assert sum(purged) == len(old)


def test_retention_days_is_checked_wherever_a_route_is_written(
    app, db, client, runner, make_key, add_route
):
    admin = {"X-API-Key": make_key(admin=True)}
    route = {"name": "ci", "steps": []}
    for bad in (0, -1, 36_501, "a week", 1.5):
        answer = client.post(
            "/admin/api/routes", json={**route, "retention_days": bad}, headers=admin
        )
        assert answer.status_code == 422, (bad, answer.json)
        assert "retention_days" in answer.json["error"], answer.json
    made = client.post("/admin/api/routes", json={**route, "retention_days": 3}, headers=admin)
    assert made.status_code in (200, 201) and made.json["retention_days"] == 3
    patched = client.patch("/admin/api/routes/ci", json={"retention_days": 90}, headers=admin)
    assert patched.json["retention_days"] == 90
    reset = client.patch("/admin/api/routes/ci", json={"retention_days": None}, headers=admin)
    assert reset.status_code == 200 and reset.json["retention_days"] is None

    refused = runner.invoke(args=["routes", "add", "cli", "--retention-days", "0"])
    assert refused.exit_code == 1 and "retention_days" in refused.stderr
    assert "Traceback" not in refused.output
    added = runner.invoke(args=["routes", "add", "cli", "--retention-days", "14"])
    assert added.exit_code == 0, added.output
    with db.read_session() as session:
        days = dict(session.execute(select(Route.name, Route.retention_days)).all())
    assert days == {"ci": None, "cli": 14}


def test_the_dashboard_route_form_edits_retention(app, db, client, make_key, add_route):
    from tests.test_dashboard import sign_in, token

    add_route("ci", retention_days=5)
    assert sign_in(client, make_key(admin=True)).status_code == 303
    page = client.get("/dashboard/routes/ci/edit").get_data(as_text=True)
    assert re.search(r'name="retention_days" value="5"', page)
    form = {
        "mode": "sync",
        "steps": "[]",
        "dedup_window": "86400",
        "enabled": "true",
        "csrf_token": token(client, "/dashboard/routes/ci/edit"),
    }
    edit = "/dashboard/routes/ci/edit"
    bad = client.post(edit, data={**form, "retention_days": "soon"})
    assert bad.status_code == 422
    assert "retention_days: a whole number of days" in bad.get_data(as_text=True)
    too_long = client.post(edit, data={**form, "retention_days": "99999"})
    assert too_long.status_code == 422 and "retention_days" in too_long.get_data(as_text=True)
    assert client.post(edit, data={**form, "retention_days": "30"}).status_code == 303
    assert "30 day(s)" in client.get("/dashboard/routes/ci").get_data(as_text=True)
    assert client.post(edit, data={**form, "retention_days": ""}).status_code == 303
    with db.read_session() as session:
        assert session.scalar(select(Route.retention_days).where(Route.name == "ci")) is None
    shown = client.get("/dashboard/routes/ci").get_data(as_text=True)
    assert "kept until purged by hand" in shown


# --- migration 0020 on a database 0019 filled ---


def test_migration_0020_keeps_every_route_and_event_and_adds_the_retention_tables(db):
    """Routes written by 0019 read back with retention_days NULL (the default), and every
    event stays; the downgrade drops the new tables and the column and keeps every row."""
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0019")
    try:
        now = utcnow()
        with db.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO routes (name, mode, steps, auth, dedup_window, enabled,"
                    " created_at, updated_at) VALUES ('orders', 'async', '[]', 'key', 60,"
                    " :t, :now, :now)"
                ),
                {"t": True, "now": now},
            )
        insert_events(db, "orders", 5, status="delivered")
        with db.engine.connect() as conn:
            before = conn.execute(sa.text("SELECT id, route, status FROM events ORDER BY id")).all()
        upgrade(db)
        with db.read_session() as session:
            stored = session.execute(select(Route.name, Route.retention_days)).all()
            after = session.execute(
                select(Event.id, Event.route, Event.status).order_by(Event.id)
            ).all()
        assert [tuple(r) for r in stored] == [("orders", None)]
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        with db.session() as session:
            session.add(
                DedupKey(
                    event_id="evt_x",
                    route="orders",
                    dedup_key="k",
                    received_at=now,
                    expires_at=now + DAY,
                )
            )

        with db.engine.begin() as conn:  # and back: the new tables and column go
            command.downgrade(alembic_config(db, conn), "0019")
        with db.engine.connect() as conn:
            inspector = sa.inspect(conn)
            assert not {"dedup_keys", "retention_state"} & set(inspector.get_table_names())
            assert "retention_days" not in {c["name"] for c in inspector.get_columns("routes")}
            assert (
                conn.execute(sa.text("SELECT id, route, status FROM events ORDER BY id")).all()
                == before
            )
            assert conn.execute(sa.text("SELECT name FROM routes")).scalars().all() == ["orders"]
    finally:
        upgrade(db)


@pytest.mark.parametrize(
    ("name", "value", "expects"),
    [
        ("HUB_RETENTION_DAYS", "-1", "a whole number of days, 0 (keep every one)"),
        ("HUB_RETENTION_DAYS", "36501", "a whole number of days, 0 (keep every one)"),
        ("HUB_RETENTION_BATCH", "0", "a whole number, 1 to 10000"),
        ("HUB_RETENTION_BATCH", "50000", "a whole number, 1 to 10000"),
        ("HUB_RETENTION_INTERVAL", "0", "a number of seconds, more than 0"),
        ("HUB_RETENTION_PAUSE", "soon", "a number of seconds, 0 or more"),
    ],
)
def test_the_retention_settings_refuse_a_bad_value_in_a_sentence(monkeypatch, name, value, expects):
    from hub.config import SettingsError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    [line] = info.value.problems
    assert line.startswith(f"{name}: expected {expects}") and line.endswith(f"got {value!r}")
