"""Every filter of the events listing is answered along an index, or within a bound.

The filters are read from the faces themselves (the admin API's query model, which the
dashboard's events page parses too, and the CLI's `events list` options), so a filter added
to any of them without an index fails here. For each one, the database's own plan of the
listing query must read an index range on the filter's column, newest first, with no sort:
SQLite's EXPLAIN QUERY PLAN, and PostgreSQL's EXPLAIN with sequential scans and sorts priced
out (on a test's near-empty table the planner would rightly pick either; priced out, it
still does when no index serves the query). The body search has no index and is bounded
by its scan window instead, and so is a pair of filters no one index range answers.
bench/admin_scale.py times the same filters at 300,000 events.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re

import pytest
from sqlalchemy import Column, event
from sqlalchemy.sql import visitors

from hub.cli import events_list
from hub.dashboard.views import FILTER_FIELDS
from hub.services import events as event_store
from hub.store.db import Database, upgrade
from hub.web import schemas as m
from tests.schema_check import scratch_postgres

PAGING = {"limit", "cursor"}  # how to page, not what to find
BOUNDED = {"q": "a body substring: no index can serve it; at most the scan window's rows"}
API_FILTERS = sorted(set(m.EventQuery.model_fields) - PAGING - set(BOUNDED))
CLI_FILTERS = sorted(p.name for p in events_list.params if p.name not in {"limit", "as_json"})


@pytest.fixture(scope="module")
def pg_database():
    """A PostgreSQL database of this module's own, which no ANALYZE has seen.

    The planner reads the statistics the last ANALYZE left, and TRUNCATE keeps them: on the
    suite's shared database, after a test had analysed a backlog of 5,000 pending events,
    ``status=pending`` looked common enough that walking ``received_at`` and filtering
    seemed cheaper than the status index. Here every plan answers "can an index serve this
    filter?", whatever ran before."""
    with scratch_postgres(os.environ["HUB_TEST_DATABASE_URL"]) as url:
        db = Database(url)
        upgrade(db)
        db.dispose()
        yield url


def raw_sample(name: str) -> object:
    """What a user would send for one filter of the API: an age (a string too) or else a
    status; a filter that takes neither needs a value added here."""
    for value in ("2h", *event_store.STATUSES):
        try:
            m.EventQuery.model_validate({name: value})
            return value
        except ValueError:
            continue
    raise AssertionError(f"{name}: no sample value fits this filter: add one to raw_sample()")


def plan_of(session, statement) -> list:
    """The database's plan of ``statement``, run through SQLAlchemy as the hub runs it."""
    conn = session.connection()
    postgres = conn.dialect.name == "postgresql"
    if postgres:  # "could an index serve it?" rather than "is a scan cheaper on 0 rows?"
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        conn.exec_driver_sql("SET LOCAL enable_sort = off")

    def explain(_conn, _cursor, sql, params, _context, _many):
        return ("EXPLAIN (FORMAT JSON) " if postgres else "EXPLAIN QUERY PLAN ") + sql, params

    event.listen(conn, "before_cursor_execute", explain, retval=True)
    try:
        rows = [tuple(row) for row in conn.execute(statement)]
    finally:
        event.remove(conn, "before_cursor_execute", explain)
    if postgres:
        plan = rows[0][0]
        return list(nodes((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]))
    return [row[-1] for row in rows]


def nodes(node: dict):
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def filtered_columns(statement) -> set[str]:
    """The events columns the statement's WHERE names: the filter's own."""
    if statement.whereclause is None:
        return set()
    return {
        element.name
        for element in visitors.iterate(statement.whereclause)
        if isinstance(element, Column) and element.table.name == "events"
    }


def assert_index_range(plan: list, columns: set[str]) -> None:
    """The plan reads an index range on one of ``columns`` and sorts nothing."""
    word = re.compile(rf"\b({'|'.join(sorted(columns))})\b")
    if plan and isinstance(plan[0], dict):  # PostgreSQL
        assert not [n for n in plan if n["Node Type"] in ("Seq Scan", "Sort")], plan
        conditions = [n.get("Index Cond", "") for n in plan]
    else:  # SQLite: SEARCH events USING [COVERING] INDEX name (column=?)
        assert not [d for d in plan if "TEMP B-TREE" in d or d.startswith("SCAN")], plan
        conditions = [
            m.group(1)
            for d in plan
            if (m := re.match(r"SEARCH events USING (?:COVERING )?INDEX \S+ \((.*)\)", d))
        ]
    assert any(word.search(c) for c in conditions), (columns, plan)


@pytest.mark.parametrize("name", API_FILTERS)
def test_each_admin_api_and_dashboard_filter_reads_an_index_range(db, name):
    query = m.EventQuery.model_validate({name: raw_sample(name)})
    with db.session() as session:
        statement = event_store.listing_query(
            session, event_store.Listing(event_store.Filters.of(query))
        )
        columns = filtered_columns(statement)
        assert columns, f"{name}: the filter does not reach the listing's query"
        assert_index_range(plan_of(session, statement), columns)


@pytest.mark.parametrize("name", CLI_FILTERS)
def test_each_cli_events_list_filter_reads_an_index_range(db, name):
    wants_time = "datetime" in str(inspect.signature(event_store.find_query).parameters[name])
    value = event_store.parse_time("2h") if wants_time else "2h"
    statement = event_store.find_query(**{name: value}, limit=50)
    columns = filtered_columns(statement)
    assert columns, f"{name}: the option does not reach the query"
    with db.session() as session:
        assert_index_range(plan_of(session, statement), columns)


@pytest.mark.parametrize("pair", list(itertools.combinations(API_FILTERS, 2)), ids="+".join)
def test_each_pair_of_filters_is_one_index_range_or_bounded_by_the_window(db, pair):
    """Two filters: one index range answers both (a column and the time range), or the
    listing walks the index of one and checks the other within the scan window."""
    given = {name: raw_sample(name) for name in pair}
    query = m.EventQuery.model_validate(given)
    with db.session() as session:
        statement = event_store.listing_query(
            session, event_store.Listing(event_store.Filters.of(query), window=1234)
        )
        plan = plan_of(session, statement)
        columns = filtered_columns(statement)
    if statement._limit == 1234:  # bounded: the walk is one filter's index range
        assert_index_range(plan, columns)
        hit = statement.selected_columns["hit"]
        checked = {c.name for c in visitors.iterate(hit) if isinstance(c, Column)}
        assert len(columns | checked) == 2, (columns, checked)  # the other one is checked
    else:  # unbounded: one index range must hold every filter
        assert statement._limit == 51
        for column in columns:
            assert_index_range(plan, {column})


def test_the_dashboard_filters_are_the_api_filters():
    assert set(FILTER_FIELDS) <= set(API_FILTERS) | set(BOUNDED)


@pytest.mark.parametrize("name", sorted(BOUNDED))
def test_each_unindexed_filter_reads_at_most_its_window_newest_first(db, name):
    query = m.EventQuery.model_validate({name: raw_sample(name)})
    with db.session() as session:
        statement = event_store.listing_query(
            session, event_store.Listing(event_store.Filters.of(query), text=query.q, window=1234)
        )
        assert statement._limit == 1234
        plan = plan_of(session, statement)
    # The window is the newest rows, read along the received_at index: no sort of the table.
    if isinstance(plan[0], dict):
        assert "ix_events_received_at_id" in {n.get("Index Name") for n in plan}, plan
        assert not [n for n in plan if n["Node Type"] in ("Seq Scan", "Sort")], plan
    else:
        assert any("ix_events_received_at_id" in d for d in plan), plan
        assert not [d for d in plan if "TEMP B-TREE" in d], plan
