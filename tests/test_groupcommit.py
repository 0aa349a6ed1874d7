"""Group commit: threads share a transaction, and each still returns only once its own work
is committed, with its own result or its own error."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import event, exc, func, select

from hub.store.db import Database
from hub.store.groupcommit import GroupCommitter, row_of, update_by_id
from hub.store.models import (
    Delivery,
    Event,
    Route,
    columns_of,
    first_delivery_id,
    fresh,
    loaded,
    utcnow,
)
from tests.procs import closed_port


def new_event(route: str = "shared") -> Event:
    return Event(route=route, method="POST", path="/hooks/" + route, status="pending")


def stored(db: Database, event_id: str) -> bool:
    """Whether another connection sees the event: committed, not merely written."""
    with db.engine.connect() as conn:
        return conn.scalar(select(func.count()).where(Event.id == event_id)) == 1


def start_batch_behind_a_blocked_one(db: Database, committer: GroupCommitter, works: list):
    """Start one thread per piece of work while a first batch is held open, so that they all
    queue behind it; returns (threads, release, outcomes by index)."""
    release = threading.Event()
    entered = threading.Event()

    def held(session):
        entered.set()
        release.wait(10)
        return "first"

    outcomes: dict[int, object] = {}

    def call(index, work):
        try:
            outcomes[index] = work()
        except Exception as error:
            outcomes[index] = error

    first = threading.Thread(target=call, args=(-1, lambda: committer.run(held)))
    first.start()
    assert entered.wait(10)
    threads = [threading.Thread(target=call, args=(i, w)) for i, w in enumerate(works)]
    for thread in threads:
        thread.start()
    return [first, *threads], release, outcomes


def wait_queued(committer: GroupCommitter, count: int) -> None:
    for _ in range(500):
        with committer._lock:
            if len(committer._queue) >= count:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} pieces of work never queued")


def test_threads_arriving_together_share_one_commit_and_each_sees_its_own(db):
    committer = GroupCommitter(db)  # one writer: one batch held, the rest behind it
    events = [new_event() for _ in range(10)]
    seen_at_return: dict[str, bool] = {}

    def insert(event):
        def work():
            committer.insert(Event.__table__, row_of(event))
            seen_at_return[event.id] = stored(db, event.id)  # durable before it returned

        return work

    threads, release, outcomes = start_batch_behind_a_blocked_one(
        db, committer, [insert(e) for e in events]
    )
    wait_queued(committer, 10)
    release.set()
    for thread in threads:
        thread.join(10)

    assert outcomes[-1] == "first"
    assert all(outcomes[i] is None for i in range(10))
    assert seen_at_return == {e.id: True for e in events}
    # The held batch, then all ten in one transaction (one multi-row INSERT).
    assert (committer.batches, committer.pieces) == (2, 11)


def test_on_postgresql_a_second_batch_is_written_while_the_first_waits(app, db):
    """On PostgreSQL the app's committer of new events (``hub.inserts``) writes a batch while
    another is held in its transaction; a third batch waits for one of the two."""
    inserts = app.extensions["hub.inserts"]
    assert app.extensions["hub.commits"].max_writers == 1  # endings lock rows: one writer
    if db.dialect != "postgresql":
        assert inserts.max_writers == 1  # SQLite's one write lock: no second writer
        return
    assert inserts.max_writers == 2
    committer = GroupCommitter(db, writers=inserts.max_writers)
    early, late = new_event(), new_event()
    threads, release, outcomes = start_batch_behind_a_blocked_one(
        db, committer, [lambda: committer.insert(Event.__table__, row_of(early))]
    )
    threads[1].join(10)  # not held up by the first batch, still open
    assert outcomes.get(0, "waiting") is None and stored(db, early.id)
    second_held = threading.Event()
    second_release = threading.Event()

    def held(_conn):
        second_held.set()
        second_release.wait(10)

    holder = threading.Thread(target=committer.run, args=(held,))
    holder.start()
    assert second_held.wait(10)  # both writers busy now: the next piece queues
    third = threading.Thread(target=committer.insert, args=(Event.__table__, row_of(late)))
    third.start()
    wait_queued(committer, 1)
    assert not stored(db, late.id)
    release.set()
    third.join(10)
    assert stored(db, late.id)
    second_release.set()
    for thread in (*threads, holder):
        thread.join(10)
    assert outcomes[-1] == "first"


def test_one_bad_piece_fails_only_its_own_caller(db):
    committer = GroupCommitter(db)  # one writer: one batch held, the rest behind it
    good = [new_event() for _ in range(3)]
    taken = new_event()
    with db.session() as session:
        session.add(Event(**row_of(taken)))
    works = [lambda e=e: committer.insert(Event.__table__, row_of(e)) for e in good]
    works.insert(1, lambda: committer.insert(Event.__table__, row_of(taken)))  # same id again

    threads, release, outcomes = start_batch_behind_a_blocked_one(db, committer, works)
    wait_queued(committer, 4)
    release.set()
    for thread in threads:
        thread.join(10)

    assert isinstance(outcomes[1], exc.IntegrityError)
    assert [outcomes[i] for i in (0, 2, 3)] == [None, None, None]
    assert all(stored(db, e.id) for e in good)


def test_a_result_comes_back_to_its_caller(db):
    committer = GroupCommitter(db)
    event = new_event()
    committer.insert(Event.__table__, row_of(event))

    def mark(session):
        return session.execute(
            Event.__table__.update()
            .where(Event.id == event.id)
            .values(status="delivered", completed_at=utcnow())
        ).rowcount

    assert committer.run(mark) == 1
    with db.session() as session:
        assert session.get(Event, event.id).status == "delivered"


def test_pieces_run_together_are_written_by_one_call_and_each_gets_its_own_result(db):
    committer = GroupCommitter(db)  # one writer: one batch held, the rest behind it
    events = [new_event() for _ in range(5)]
    calls: list[list[str]] = []

    def deliver(conn, ids):
        calls.append(list(ids))
        conn.execute(Event.__table__.update().where(Event.id.in_(ids)).values(status="delivered"))
        return [f"done {event_id}" for event_id in ids]

    def work(event):
        row = row_of(event)  # gives the event its id
        return lambda: committer.run_together(deliver, event.id, [(Event.__table__, row)])

    threads, release, outcomes = start_batch_behind_a_blocked_one(
        db, committer, [work(e) for e in events]
    )
    wait_queued(committer, 5)
    release.set()
    for thread in threads:
        thread.join(10)

    assert [outcomes[i] for i in range(5)] == [f"done {e.id}" for e in events]
    # One call for the five, after their rows were written, in one transaction.
    assert len(calls) == 1 and sorted(calls[0]) == sorted(e.id for e in events)
    assert (committer.batches, committer.pieces) == (2, 6)
    with db.session() as session:
        assert {session.get(Event, e.id).status for e in events} == {"delivered"}


def test_rows_given_with_work_are_written_with_it_or_not_at_all(db):
    """``run(fn, inserts)``: the rows and the work commit together; when the work fails,
    its rows are not written, and rows of other callers in the batch still are."""
    committer = GroupCommitter(db)  # one writer: one batch held, the rest behind it
    with_work, with_failing_work, alone = new_event(), new_event(), new_event()

    def count(conn):
        return conn.scalar(select(func.count()).select_from(Event.__table__))

    def fail(conn):
        raise ValueError("the work failed")

    works = [
        lambda: committer.run(count, [(Event.__table__, row_of(with_work))]),
        lambda: committer.run(fail, [(Event.__table__, row_of(with_failing_work))]),
        lambda: committer.insert(Event.__table__, row_of(alone)),
    ]
    threads, release, outcomes = start_batch_behind_a_blocked_one(db, committer, works)
    wait_queued(committer, 3)
    release.set()
    for thread in threads:
        thread.join(10)

    assert isinstance(outcomes[1], ValueError)
    assert outcomes[0] >= 1  # the work saw its own row, written before it ran
    assert stored(db, with_work.id) and stored(db, alone.id)
    assert not stored(db, with_failing_work.id)


def test_a_guard_refuses_its_pieces_of_a_batch_and_the_rest_is_written(db):
    """``insert_rows(rows, guard=(check, item))``: the batch's transaction calls each check
    once, with the items of all its pieces, before writing; a refused piece writes nothing
    and its caller gets the refusal, the others are committed in the same batch."""
    committer = GroupCommitter(db)  # one writer: one batch held, the rest behind it
    events = {name: new_event() for name in ("kept", "refused", "unguarded")}
    asked: list[list[str]] = []

    def check(conn, items):
        asked.append(list(items))
        return [PermissionError(item) if item == "refused" else None for item in items]

    works = [
        lambda name=name: committer.insert_rows(
            [(Event.__table__, row_of(events[name]))],
            guard=(check, name) if name != "unguarded" else None,
        )
        for name in events
    ]
    threads, release, outcomes = start_batch_behind_a_blocked_one(db, committer, works)
    wait_queued(committer, 3)
    release.set()
    for thread in threads:
        thread.join(10)

    # Once for the batch, with both guarded pieces (in the order their threads queued).
    assert [sorted(items) for items in asked] == [["kept", "refused"]]
    assert outcomes[0] is None and outcomes[2] is None
    assert isinstance(outcomes[1], PermissionError)
    assert stored(db, events["kept"].id) and stored(db, events["unguarded"].id)
    assert not stored(db, events["refused"].id)
    assert (committer.batches, committer.pieces) == (2, 4)  # the held one, then the three


def test_an_unreachable_database_fails_every_caller_of_the_batch_at_once(db):
    if db.dialect != "postgresql":
        pytest.skip("a server that is down: PostgreSQL's case (SQLite is a file)")
    down = Database(
        db.engine.url.set(port=closed_port()).render_as_string(hide_password=False),
        connect_timeout=1,
    )
    connects = []
    event.listen(down.engine, "do_connect", lambda *args: connects.append(1))
    committer = GroupCommitter(down)
    committer._writers = committer.max_writers  # as if batches were being written: the four queue
    outcomes: dict[int, object] = {}

    def insert(index):
        try:
            committer.insert(Event.__table__, row_of(new_event()))
        except Exception as error:
            outcomes[index] = error

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    wait_queued(committer, 4)
    committer._write_next()  # that batch ends: the four are the next one
    for thread in threads:
        thread.join(20)

    assert all(isinstance(outcomes[i], exc.OperationalError) for i in range(4))
    # One try for the batch of four: no caller waits for a try of its own.
    assert (committer.batches, committer.pieces, len(connects)) == (1, 4, 1)
    down.dispose()


def test_row_of_fills_the_python_defaults_of_what_was_not_set():
    event = new_event()
    row = row_of(event)
    assert row["id"].startswith("evt_") and row["received_at"] is not None
    assert (row["headers"], row["attempts"], row["retries"]) == ({}, 0, 0)
    assert row["body"] is None
    assert event.retries == 0  # the default is on the object too


def add_with_delivery(db: Database, event: Event, **delivery: Any) -> None:
    """Add ``event`` (of route ``r``) and its first delivery, to destination ``d``, through
    a session: the event's row first, as intake's dedup path writes them."""
    with db.session() as session:
        session.add(event)
        session.flush()
        session.add(
            fresh(
                Delivery,
                id=first_delivery_id(event.id),
                event_id=event.id,
                route="r",
                destination="d",
                lane="r/d",
                **delivery,
            )
        )


def test_a_row_object_built_by_fresh_is_the_constructors_in_a_row_and_in_a_session(db):
    """Ingest builds its rows with models.fresh, not the ORM's constructor: the same row
    either way, whether written by the group committer or added to a session."""
    now = utcnow()
    values = {"route": "r", "method": "POST", "path": "/hooks/r", "headers": {"a": "b"}}
    values.update(received_at=now, status="pending")
    built, made = fresh(Event, id="evt_fresh", **values), Event(id="evt_made", **values)
    assert {**row_of(built), "id": None} == {**row_of(made), "id": None}
    assert (built.route, built.headers, built.body) == ("r", {"a": "b"}, None)
    add_with_delivery(db, fresh(Event, id="evt_added", **values), status="pending")
    with db.session() as session:
        stored = session.get(Event, "evt_added")
        assert (stored.route, stored.headers, stored.received_at, stored.retries) == (
            "r",
            {"a": "b"},
            now,
            0,
        )
        assert session.get(Delivery, first_delivery_id("evt_added")).lane == "r/d"


def test_a_row_object_built_by_loaded_reads_as_the_orms_own(db):
    """A worker's claim reads its deliveries and events back as plain rows (models.loaded):
    every mapped column reads as the ORM's loading of the same row gives it."""
    now = utcnow()
    event = fresh(
        Event,
        id="evt_loaded",
        route="r",
        method="POST",
        path="/hooks/r",
        headers={"a": ["b"]},
        body=b'{"n": 1}',
        received_at=now,
        status="processing",
        result={"ok": True},
    )
    add_with_delivery(db, event, status="processing", next_attempt_at=now)
    for cls, row_id in ((Event, "evt_loaded"), (Delivery, first_delivery_id("evt_loaded"))):
        with db.session() as session:
            orm = session.get(cls, row_id)
            row = session.execute(select(*columns_of(cls)).where(cls.id == row_id)).one()
        built = loaded(cls, row)
        keys = [prop.key for prop in cls.__mapper__.column_attrs]
        assert {key: getattr(built, key) for key in keys} == {
            key: getattr(orm, key) for key in keys
        }
        assert built.received_at == now if cls is Event else built.next_attempt_at == now


def test_rows_are_written_parents_first_whatever_order_they_come_in(db):
    """An event's delivery handed in before the event itself (and again, once the order is
    known) is written after it: the foreign key never sees a delivery of a missing event."""
    committer = GroupCommitter(db)
    for _ in range(2):
        event = new_event()
        row = row_of(event)
        delivery = Delivery(
            id=first_delivery_id(event.id),
            event_id=event.id,
            route=event.route,
            destination="default",
            lane="shared",
            position=0,
            status="pending",
        )
        committer.insert_rows([(Delivery.__table__, row_of(delivery)), (Event.__table__, row)])
        assert stored(db, event.id)


def test_update_by_id_sets_the_values_of_one_row_as_the_columns_store_them(db):
    """The sync run's endings: a prepared UPDATE by id, each value through its column's
    type (a UTC time, JSON, an escaped NUL), the rows it changed counted."""
    now = utcnow()
    with db.engine.begin() as conn:
        _insert_event(conn, "evt_upd")
        _insert_event(conn, "evt_other")
        values = {"status": "delivered", "completed_at": now, "result": {"a": [1, None]}}
        assert update_by_id(conn, Event.__table__, "evt_upd", values) == 1
        assert update_by_id(conn, Event.__table__, "evt_upd", {"last_error": "a\x00b"}) == 1
        assert update_by_id(conn, Event.__table__, "evt_missing", {"status": "failed"}) == 0
    with db.session() as session:
        stored, other = session.get(Event, "evt_upd"), session.get(Event, "evt_other")
        assert (stored.status, stored.completed_at, stored.result) == tuple(values.values())
        assert stored.last_error == "a\\u0000b"
        assert (other.status, other.completed_at, other.result) == ("pending", None, None)


def test_update_by_id_refuses_a_table_whose_columns_update_by_default(db):
    """Route.updated_at is set by an ``onupdate`` the prepared statement would skip."""
    with db.engine.begin() as conn, pytest.raises(ValueError, match="can't update routes"):
        update_by_id(conn, Route.__table__, 1, {"description": "x"})


def _insert_event(conn, event_id: str) -> None:
    row = row_of(fresh(Event, id=event_id, route="r", method="POST", path="/hooks/r", headers={}))
    conn.execute(Event.__table__.insert(), [{**row, "status": "pending"}])
