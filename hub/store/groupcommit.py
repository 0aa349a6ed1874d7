"""Group commit: the writes of several threads share one transaction and one commit.

A commit that must survive power loss waits for the disk (PostgreSQL's WAL flush, SQLite's
fsync in WAL mode with ``synchronous=FULL``). Each request thread committing on its own pays
that wait once per request, and on SQLite each one also queues for the single write lock.
Here the first thread to arrive writes, in one transaction, every piece of work queued by
the time it starts; threads that arrive meanwhile queue up, and the first of them writes the
next batch as soon as this one is committed. Every caller still returns only after its own
work is committed, with its own result or its own exception: durability is unchanged, only
the cost of a commit is shared.

A batch that fails is written again one piece at a time, each in its own transaction, so
that one bad value fails only its own caller. A database that can't be reached fails every
caller of the batch at once (they answer 503), without trying each one.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import Connection, Table, bindparam, insert, inspect, literal, select, update
from sqlalchemy.exc import IntegrityError

from hub.store.db import Database, is_unavailable

T = TypeVar("T")

# Pieces of work written in one transaction at most; the rest wait for the next one.
MAX_BATCH = 64


class _Work:
    __slots__ = ("done", "error", "fn", "guard", "item", "lead", "refused", "result", "rows")
    # ``lead``: None, or the batch this piece's thread is woken to write (itself first).

    def __init__(
        self,
        fn: Callable[[Connection], Any] | None,
        rows: Iterable[tuple[Table, dict]] = (),
        item: tuple | None = None,
        guard: tuple[Guard, Any] | None = None,
    ):
        self.fn = fn
        self.item = item  # for a ``fn`` of ``run_together``: this caller's items of its list
        self.rows = tuple(rows)  # read again if the batch is written a second time
        self.guard = guard
        self.refused: BaseException | None = None  # by its guard, in the last transaction
        # Held until the work is written or its thread is to write the next batch: a lock
        # released by the writer is a cheaper hand-off than threading.Event's condition.
        self.done = threading.Lock()
        self.done.acquire()
        self.lead: list[_Work] | None = None  # woken to write this batch, not because done
        self.result: Any = None
        self.error: BaseException | None = None

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.refused is not None:
            raise self.refused
        return self.result


# A guard's check: given the batch's connection and the items of the pieces that carry it,
# what refuses each piece (an exception its caller gets, its rows left out) or None.
Guard = Callable[[Connection, list[Any]], list[BaseException | None]]
# An UPDATE of one row by its id: (table, id, {column: value}).
Update = tuple[Table, Any, dict[str, Any]]
# A row's column holding a value: (table, id, column, value).
Condition = tuple[Table, Any, str, Any]


class GroupCommitter:
    """Shares commits between the threads of one process (``run`` and ``insert``).

    ``writers`` batches may be written at once, each on its own connection: while one waits
    for its commit's round trips and WAL flush, the threads that came meanwhile write the
    next instead of waiting for it (PostgreSQL flushes concurrent commits together). Only
    for work that locks no rows another batch may lock in another order (inserts of new
    rows): two batches ending deliveries of one event would deadlock on its roll-up. On
    SQLite one: a second writer would only wait for the file's one write lock.
    """

    def __init__(self, db: Database, max_batch: int = MAX_BATCH, writers: int = 1):
        self.db = db
        self.max_batch = max_batch
        self.max_writers = writers
        self._lock = threading.Lock()
        self._queue: list[_Work] = []
        # Batches being written; the queue waits while there are max_writers of them.
        self._writers = 0
        self.batches = 0  # batches written, and pieces of work in them (for benchmarks)
        self.pieces = 0
        self._idle: list[Connection] = []  # kept connections no batch is using
        db.on_dispose(self.close)

    @classmethod
    def of(cls, db: Database, tracing: Any, name: str, **kwargs: Any) -> GroupCommitter:
        """A committer for ``db``; one whose batches are spans when ``tracing`` (the app's
        hub.ops.tracing.Tracing, HUB_OTEL=true) is given, else a plain one."""
        if tracing is None:
            return cls(db, **kwargs)
        return TracedGroupCommitter(db, tracing, name, **kwargs)

    def run(self, fn: Callable[[Connection], T], inserts: Iterable[tuple[Table, dict]] = ()) -> T:
        """Run ``fn(conn)`` in a transaction shared with other threads' work (``conn`` is a
        Core connection: statements, no ORM); its result once committed. ``inserts``, rows
        as ``(table, row)``, are written in the same transaction before ``fn`` runs, beside
        the batch's other rows. ``fn`` may run twice (the second time alone, if the shared
        transaction failed), so it must only write through the connection it is given."""
        return self._submit(_Work(fn, inserts))

    def run_together(
        self,
        fn: Callable[[Connection, list[Any]], list[Any]],
        item: Any,
        inserts: Iterable[tuple[Table, dict]] = (),
    ) -> Any:
        """Like ``run``, but the pieces of a batch given the same ``fn`` are written by one
        call ``fn(conn, items)`` (in the order they came), which returns one result for
        each item: one statement for the batch's outcomes, say, not one for each."""
        return self._submit(_Work(fn, inserts, item=(item,)))[0]

    def run_together_all(
        self,
        fn: Callable[[Connection, list[Any]], list[Any]],
        items: Iterable[Any],
        inserts: Iterable[tuple[Table, dict]] = (),
    ) -> list[Any]:
        """``run_together`` for several items of one caller (a delivery thread's group of
        endings): written by the same one call as the batch's other items of ``fn``; their
        results, in their order."""
        return self._submit(_Work(fn, inserts, item=tuple(items)))

    def insert(self, table: Table, row: dict[str, Any]) -> None:
        """Insert ``row`` into ``table``, committed when this returns; rows of one batch go
        to the database as one multi-row INSERT."""
        self._submit(_Work(None, [(table, row)]))

    def insert_rows(
        self, rows: Iterable[tuple[Table, dict[str, Any]]], guard: tuple[Guard, Any] | None = None
    ) -> None:
        """Insert ``rows`` (``(table, row)``: an event and its deliveries, say) in one
        transaction, committed when this returns.

        ``guard``, ``(check, item)``: the transaction first calls ``check(conn, items)``
        once for the items of every piece of the batch that has the same check, before
        anything is written; a piece it refuses writes nothing and its caller gets the
        exception (an async event whose key was revoked since it was accepted, say)."""
        self._submit(_Work(None, rows, guard=guard))

    def insert_new(
        self, rows: list[tuple[Table, dict[str, Any]]], guard: tuple[Guard, Any] | None = None
    ) -> None:
        """``insert_rows``, except that nothing is written when the first row (an event, by
        its primary key) is there already: for rows another process may have committed
        before its answer was lost (hub.services.writer)."""
        table, first = rows[0]

        def write(conn: Connection) -> None:
            if _stored(conn, table, first):
                return
            if guard is not None:
                (refused,) = guard[0](conn, [guard[1]])
                if refused is not None:
                    raise refused
            for each, row in rows:
                _insert_many(conn, each, [row])

        try:
            self.run(write)
        except IntegrityError:  # committed by the other process meanwhile, or a real conflict
            with self.db.engine.connect() as conn:
                if not _stored(conn, table, first):
                    raise

    def write_ending(
        self,
        rows: list[tuple[Table, dict[str, Any]]],
        updates: list[Update],
        only_if: Condition | None = None,
    ) -> None:
        """Insert ``rows`` and apply ``updates`` in one transaction shared with the batch
        (a sync run's attempts and the ending of its delivery and event). With ``only_if``,
        nothing is written unless that row's column still holds its value: for an ending
        another process may have committed before its answer was lost (hub.services.writer)."""
        if only_if is None:
            self.run(lambda conn: apply_updates(conn, updates), inserts=rows)
            return

        def write(conn: Connection) -> None:
            if not _holds(conn, only_if):
                return
            for table, row in rows:
                _insert_many(conn, table, [row])
            apply_updates(conn, updates)

        self.run(write)

    def write_pieces(
        self,
        pieces: list[
            tuple[
                list[tuple[Table, dict[str, Any]]],
                tuple[Guard, Any] | None,
                Callable[[Connection], Any] | None,
            ]
        ],
    ) -> list[BaseException | None]:
        """Write ``pieces`` as one batch in the calling thread, at most ``max_batch`` of
        them: each the ``rows`` and ``guard`` of an ``insert_rows``, and a function of the
        connection called after the batch's rows are written, or None. What refused or
        failed each, or None when it is committed. For a process whose one thread writes
        what other processes hand it (hub.services.writer)."""
        works = [_Work(fn, rows, guard=guard) for rows, guard, fn in pieces]
        self._write(works)
        return [work.error or work.refused for work in works]

    def _submit(self, work: _Work) -> Any:
        with self._lock:
            self._queue.append(work)
            lead = self._writers < self.max_writers
            if lead:
                self._writers += 1
        if not lead:
            work.done.acquire()
            if work.lead is None:
                return work.outcome()
        self._write_next(work, work.lead)
        return work.outcome()

    def _write_next(self, own: _Work | None = None, batch: list[_Work] | None = None) -> None:
        """Write ``batch`` (handed over by the writer before), or the one at the head of the
        queue (it holds the caller's own work), then hand the queue's next batch to the
        thread at its head, or stand down. A batch leaves the queue as it is handed over,
        so two writers finishing at once never hand the same one."""
        if batch is None:
            with self._lock:
                batch = self._queue[: self.max_batch]
                del self._queue[: len(batch)]
        try:
            self._write(batch)
        except BaseException as exc:  # interrupted: no caller of the batch may think it done
            for work in batch:
                work.error = work.error or exc
            raise
        finally:
            with self._lock:
                if self._queue:
                    following = self._queue[: self.max_batch]
                    del self._queue[: len(following)]
                    following[0].lead = following
                    following[0].done.release()
                else:
                    self._writers -= 1
            for work in batch:
                work.lead = None
                if work is not own:  # the writer's own piece is not waiting
                    work.done.release()

    def _connection(self) -> Connection:
        """A connection to write a batch on, kept between batches: checking one out of the
        pool and back in for every batch (with the pool's rollback on return) was a sixth
        of the group commit's CPU. A batch's writer has it to itself until ``_keep``."""
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return self.db.engine.connect()

    def _keep(self, conn: Connection) -> None:
        with self._lock:
            self._idle.append(conn)

    def close(self) -> None:
        """Give the kept connections back (when the database is disposed)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _give_back(conn)

    def _write(self, batch: list[_Work]) -> None:
        self.batches += 1
        self.pieces += len(batch)
        conn = None
        try:
            conn = self._connection()
            with conn.begin():
                results = self._apply(conn, batch)
        except Exception as exc:
            if conn is not None:  # it may be broken: the next batch takes a fresh one
                _give_back(conn)
            if len(batch) == 1 or is_unavailable(exc):
                for work in batch:
                    work.error = exc
                return
            for work in batch:  # one piece may be the cause: each alone, its own outcome
                try:
                    with self.db.engine.begin() as conn:
                        (work.result,) = self._apply(conn, [work])
                except Exception as alone:
                    work.error = alone
            return
        self._keep(conn)
        for work, result in zip(batch, results, strict=True):
            work.result = result

    @staticmethod
    def _apply(conn: Connection, batch: list[_Work]) -> list[Any]:
        guarded: dict[Guard, list[_Work]] = {}
        for work in batch:
            work.refused = None
            if work.guard is not None:
                guarded.setdefault(work.guard[0], []).append(work)
        for check, works in guarded.items():
            for work, refused in zip(works, check(conn, [w.guard[1] for w in works]), strict=True):
                work.refused = refused
        rows: dict[Table, list[dict]] = {}
        for work in batch:
            if work.refused is not None:
                continue
            for table, row in work.rows:
                rows.setdefault(table, []).append(row)
        # Tables a row refers to first (an event before its deliveries), whatever the order
        # the pieces came in.
        order = {table: n for n, table in enumerate(_sorted_tables(rows))}
        for table, group in sorted(rows.items(), key=lambda item: order[item[0]]):
            for same_columns in _by_columns(group):
                _insert_many(conn, table, same_columns)
        together: dict[Callable, list[_Work]] = {}
        for work in batch:
            if work.item is not None:
                together.setdefault(work.fn, []).append(work)
        results: dict[int, Any] = {}
        for fn, works in together.items():
            out = fn(conn, [item for work in works for item in work.item])
            at = 0
            for work in works:
                results[id(work)] = out[at : at + len(work.item)]
                at += len(work.item)
        return [
            results[id(work)]
            if work.item is not None
            else work.fn(conn)
            if work.fn is not None
            else None
            for work in batch
        ]


class TracedGroupCommitter(GroupCommitter):
    """A GroupCommitter whose every batch is a span (``hub.group_commit``) linked to the span
    each of its callers had open: which requests and deliveries shared one transaction.
    Made only when tracing is on, so the plain committer's path has no test for it."""

    def __init__(self, db: Database, tracing: Any, name: str, **kwargs: Any):
        super().__init__(db, **kwargs)
        self.tracing = tracing
        self.name = name
        self._callers: dict[int, Any] = {}  # id of each piece of work queued: its span

    def _submit(self, work: _Work) -> Any:
        self._callers[id(work)] = self.tracing.current()
        try:
            return super()._submit(work)
        finally:
            self._callers.pop(id(work), None)

    def _write(self, batch: list[_Work]) -> None:
        with self.tracing.batch(self.name, [self._callers.get(id(work)) for work in batch]):
            super()._write(batch)


def apply_updates(conn: Connection, updates: Iterable[Update]) -> None:
    """Each UPDATE of ``updates`` (``update_by_id``), in their order."""
    for table, row_id, values in updates:
        update_by_id(conn, table, row_id, values)


def _holds(conn: Connection, condition: Condition) -> bool:
    table, row_id, column, value = condition
    return _exists(conn, table, table.c.id == row_id, table.c[column] == value)


def _stored(conn: Connection, table: Table, row: dict[str, Any]) -> bool:
    """Whether ``row`` of ``table`` is there, by its primary key."""
    return _exists(conn, table, *(c == row[c.key] for c in table.primary_key.columns))


def _exists(conn: Connection, table: Table, *where: Any) -> bool:
    return conn.execute(select(literal(1)).select_from(table).where(*where)).first() is not None


def _give_back(conn: Connection) -> None:
    with contextlib.suppress(Exception):  # one already broken has nothing to give back
        conn.close()


def _sorted_tables(rows: dict[Table, list[dict]]) -> list[Table]:
    tables = list(rows)
    if len(tables) < 2:
        return tables
    known = _dependency_order(tables[0].metadata)
    return sorted(tables, key=lambda t: known.get(t, len(known)))


# Each MetaData's tables in dependency order, by position, kept in its ``info``.
# MetaData.sorted_tables sorts the whole schema's foreign keys again at each call (about
# 0.2 ms of every accepted webhook's CPU); the schema does not change while the process
# runs, and a MetaData given more tables (a test's) is sorted again.
def _dependency_order(metadata: Any) -> dict[Table, int]:
    seen = metadata.info.get("hub.dependency_order")
    if seen is None or seen[0] != len(metadata.tables):
        seen = (len(metadata.tables), {t: n for n, t in enumerate(metadata.sorted_tables)})
        metadata.info["hub.dependency_order"] = seen
    return seen[1]


def _insert_many(conn: Connection, table: Table, rows: list[dict]) -> None:
    """INSERT ``rows`` (each setting the same columns) into ``table``: the statement is
    compiled once per table, columns and dialect, and its rows' values are turned into the
    driver's by each column's own bind processor, then sent with the driver's executemany.
    The compiled path (``conn.execute(insert(table), rows)``) looked its statement up in
    the compiled cache and built its parameters again for every batch: 9 % of an accepted
    webhook's CPU."""
    sql, names, processors = _prepared_insert(conn.dialect, table, tuple(rows[0]))
    params = [
        tuple(row[name] if process is None else process(row[name]) for name, process in processors)
        for row in rows
    ]
    if names is not None:  # a named paramstyle (psycopg's %(name)s)
        params = [dict(zip(names, values, strict=True)) for values in params]
    conn.exec_driver_sql(sql, params if len(params) > 1 else params[0])


_PREPARED_INSERTS: dict[tuple, tuple[str, tuple[str, ...] | None, tuple]] = {}


def _prepared_insert(dialect: Any, table: Table, columns: tuple[str, ...]):
    """(SQL, parameter names or None when positional, ((column, bind processor), ...) in the
    order the SQL takes them) for an INSERT of ``columns`` into ``table``."""
    key = (dialect.name, dialect.driver, table, columns)
    known = _PREPARED_INSERTS.get(key)
    if known is None:
        statement = insert(table).values({name: bindparam(name) for name in columns})
        compiled = statement.compile(dialect=dialect)
        order = tuple(compiled.positiontup) if compiled.positional else columns
        processors = tuple(
            (name, table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
            for name in order
        )
        names = None if compiled.positional else order
        known = _PREPARED_INSERTS[key] = (compiled.string, names, processors)
    return known


def update_by_id(conn: Connection, table: Table, row_id: Any, values: dict[str, Any]) -> int:
    """UPDATE ``table`` SET ``values`` WHERE id = ``row_id``; the number of rows changed.
    Prepared like ``_insert_many``'s INSERT, once per table, columns and dialect, each value
    through its column's bind processor: through the compiled path (a statement's cache
    key, the compiled cache's lookup, its parameters built again), a sync run's two
    endings and its attempts were three quarters of its ending's commit."""
    sql, names, processors = _prepared_update(conn.dialect, table, tuple(values))
    params = []
    for column, process in processors:
        value = row_id if column is None else values[column]
        params.append(value if process is None else process(value))
    if names is not None:  # a named paramstyle (psycopg's %(name)s)
        return conn.exec_driver_sql(sql, dict(zip(names, params, strict=True))).rowcount
    return conn.exec_driver_sql(sql, tuple(params)).rowcount


_PREPARED_UPDATES: dict[tuple, tuple[str, tuple[str, ...] | None, tuple]] = {}
_ROW_ID = "hub_row_id"  # the WHERE's parameter: a name no column has


def _prepared_update(dialect: Any, table: Table, columns: tuple[str, ...]):
    """(SQL, parameter names or None when positional, ((column or None for the id, bind
    processor), ...) in the order the SQL takes them) for an UPDATE of ``columns`` of the
    row of ``table`` with a given id."""
    key = (dialect.name, dialect.driver, table, columns)
    known = _PREPARED_UPDATES.get(key)
    if known is None:
        statement = (
            update(table)
            .where(table.c.id == bindparam(_ROW_ID))
            .values({name: bindparam(f"set_{name}") for name in columns})
        )
        compiled = statement.compile(dialect=dialect)
        order = tuple(compiled.positiontup) if compiled.positional else tuple(compiled.binds)
        if set(order) != {_ROW_ID, *(f"set_{name}" for name in columns)}:
            # A column updated by default (``onupdate``) would need its value made here.
            raise ValueError(f"update_by_id can't update {table.name}: it sets other columns")
        processors = tuple(
            (None, table.c.id.type.dialect_impl(dialect).bind_processor(dialect))
            if name == _ROW_ID
            else (
                name[len("set_") :],
                table.c[name[len("set_") :]].type.dialect_impl(dialect).bind_processor(dialect),
            )
            for name in order
        )
        names = None if compiled.positional else order
        known = _PREPARED_UPDATES[key] = (compiled.string, names, processors)
    return known


def _by_columns(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by the columns they set: one multi-row INSERT names one set of columns."""
    groups: dict[frozenset, list[dict]] = {}
    for row in rows:
        groups.setdefault(frozenset(row), []).append(row)
    return list(groups.values())


def row_of(obj: Any) -> dict[str, Any]:
    """The column values of a new ORM object, for a Core INSERT: what was set on it, and
    each other column's Python-side default, set on the object too (its generated id, say).
    A column left to the database (a server default, an autoincrementing key) is left out."""
    state = inspect(obj)
    values: dict[str, Any] = {}
    given = state.dict
    for attr, key, kind, default in _insert_columns(state.mapper):
        if attr in given:
            values[key] = given[attr]
            continue
        if kind is _LEFT_TO_DATABASE:
            continue
        value = default(None) if kind is _CALLED else default
        # Into the object's values directly: it is new, so there is no change to track, and
        # an instrumented setattr for each column left unset was half of this function.
        given[attr] = value
        values[key] = value
    return values


_LEFT_TO_DATABASE, _CALLED, _VALUE = object(), object(), object()
_INSERT_COLUMNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _insert_columns(mapper: Any) -> tuple[tuple[str, str, object, Any], ...]:
    """(attribute, column, kind, default) for each column of ``mapper``, read once per
    mapper: walking the mapper's columns and their defaults at every row cost 85 µs of each
    accepted webhook's CPU. ``kind``: _VALUE (``default`` is the value), _CALLED (called
    with no context) or _LEFT_TO_DATABASE."""
    known = _INSERT_COLUMNS.get(mapper)
    if known is None:
        rows = []
        for prop in mapper.column_attrs:
            column = prop.columns[0]
            default = column.default
            if default is not None and default.is_scalar:
                rows.append((prop.key, column.key, _VALUE, default.arg))
            elif default is not None and default.is_callable:
                rows.append((prop.key, column.key, _CALLED, default.arg))
            elif column.server_default is None and not column.primary_key:
                rows.append((prop.key, column.key, _VALUE, None))
            else:
                rows.append((prop.key, column.key, _LEFT_TO_DATABASE, None))
        known = _INSERT_COLUMNS[mapper] = tuple(rows)
    return known
