"""SQLite's write transactions queue at a lock file beside the database (hub.store.writerlock):
held from a write transaction's BEGIN to its commit or rollback, whichever way it ends, never
by a read, and given back by a connection the pool takes back with its transaction open."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
from sqlalchemy import text

from hub.store import writerlock
from hub.store.db import Database, upgrade


@pytest.fixture
def sqlite_db(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'hub.db'}")
    upgrade(db)
    yield db
    db.dispose()


def lock_is_free(db: Database) -> bool:
    """Whether another open file (as another process would have) can take the lock now."""
    fd = os.open(f"{db.engine.url.database}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # closing gives back a lock it took
    return True


def test_a_write_transaction_holds_the_lock_from_begin_to_commit(sqlite_db):
    assert lock_is_free(sqlite_db)
    with sqlite_db.engine.begin() as conn:
        conn.execute(text("UPDATE api_keys SET name = name"))
        assert not lock_is_free(sqlite_db)
    assert lock_is_free(sqlite_db)  # given back once committed
    with sqlite_db.session() as session:  # an ORM session's write transaction too
        session.execute(text("SELECT 1"))
        assert not lock_is_free(sqlite_db)
    assert lock_is_free(sqlite_db)


def test_a_read_never_takes_it(sqlite_db):
    with sqlite_db.read_session() as reading:
        reading.execute(text("SELECT count(*) FROM events"))
        assert lock_is_free(sqlite_db)


def test_a_rollback_or_a_connection_given_back_mid_transaction_releases_it(sqlite_db):
    with pytest.raises(RuntimeError), sqlite_db.engine.begin():
        assert not lock_is_free(sqlite_db)
        raise RuntimeError("the transaction fails")
    assert lock_is_free(sqlite_db)
    session = sqlite_db.sessionmaker()
    session.execute(text("UPDATE api_keys SET name = name"))
    assert not lock_is_free(sqlite_db)
    session.close()  # never committed: the pool rolls it back
    assert lock_is_free(sqlite_db)
    conn = sqlite_db.engine.connect()
    conn.begin()
    assert not lock_is_free(sqlite_db)
    conn.invalidate()  # a connection thrown away
    assert lock_is_free(sqlite_db)


def test_a_second_writer_waits_for_the_lock_then_goes_on_once_it_is_free(sqlite_db, tmp_path):
    """Two databases on one file stand for two processes: the second writer's BEGIN waits
    while the first holds the lock, and goes on soon after its commit."""
    other = Database(sqlite_db.url)
    try:
        committed_at: list[float] = []
        began_at: list[float] = []
        first_in = threading.Event()

        def first():
            with sqlite_db.engine.begin() as conn:
                conn.execute(text("UPDATE api_keys SET name = name"))
                first_in.set()
                # SQLite's busy handler tries again 328 and 428 ms after its first try: a
                # commit at 340 ms would keep its writer waiting about 90 ms more.
                time.sleep(0.34)
            committed_at.append(time.monotonic())

        def second():
            first_in.wait(5)
            with other.engine.begin() as conn:
                began_at.append(time.monotonic())
                conn.execute(text("UPDATE api_keys SET name = name"))

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert began_at and committed_at and began_at[0] >= committed_at[0] - 0.005
        # The lock file is tried every 2 ms at most.
        assert began_at[0] - committed_at[0] < 0.05
    finally:
        other.dispose()


def test_an_in_memory_database_has_no_lock_file():
    db = Database("sqlite://")
    try:
        with db.engine.begin() as conn:
            conn.execute(text("SELECT 1"))
            assert not isinstance(conn.connection.driver_connection, writerlock.LockingConnection)
    finally:
        db.dispose()
