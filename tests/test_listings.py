"""Keys and routes are listed in keyset pages like events; migration 0009 (the reason and
request id indexes, replayed_at) on a database the previous schema filled; route stats'
latency leaves replayed events out."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic import command

from hub.services import paging
from hub.store.db import alembic_config, upgrade
from hub.store.models import Event, new_event_id, utcnow
from tests.test_admin_api import add_event

LISTINGS = {"keys": "prefix", "routes": "name"}


@pytest.fixture
def admin(make_key) -> dict[str, str]:
    return {"X-API-Key": make_key(admin=True, name="admin")}


def make_routes(add_route, count: int) -> None:
    for i in range(count):
        add_route(f"r{i:03d}", [{"connector": "text"}])


def walk(client, headers, listing: str, limit: int | None) -> tuple[list[str], list[int]]:
    """Every page of a listing: the names (or prefixes) in order, and each page's size."""
    names, sizes, cursor = [], [], None
    while True:
        query = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
        page = client.get(f"/admin/api/{listing}", query_string=query, headers=headers)
        assert page.status_code == 200, page.get_json()
        data = page.get_json()
        names += [row[LISTINGS[listing]] for row in data[listing]]
        sizes.append(len(data[listing]))
        cursor = data["next_cursor"]
        if cursor is None:
            return names, sizes


def test_keys_are_listed_oldest_first_in_keyset_pages_of_50_by_default(client, admin, make_key):
    made = [make_key(name=f"k{i}").split("_")[1] for i in range(54)]
    names, sizes = walk(client, admin, "keys", None)
    assert sizes == [50, 5]  # the admin key and 54 more
    assert names[1:] == made and len(set(names)) == 55
    names, sizes = walk(client, admin, "keys", 20)
    assert sizes == [20, 20, 15] and names[1:] == made


def test_routes_are_listed_by_name_in_keyset_pages(client, admin, add_route):
    make_routes(add_route, 7)
    names, sizes = walk(client, admin, "routes", 3)
    assert sizes == [3, 3, 1] and names == [f"r{i:03d}" for i in range(7)]
    whole = client.get("/admin/api/routes", headers=admin).get_json()
    assert len(whole["routes"]) == 7 and whole["next_cursor"] is None


@pytest.mark.parametrize("listing", sorted(LISTINGS))
@pytest.mark.parametrize(
    "query,status,sentence",
    [
        ({"cursor": "not-a-cursor"}, 400, "query.cursor: not a cursor from this hub"),
        ({"cursor": paging.encode("elsewhere", "1")}, 400, "query.cursor: not a cursor"),
        ({"cursor": paging.encode("keys", "x")}, 400, "query.cursor: not a cursor"),
        ({"limit": 0}, 422, "query.limit"),
        ({"limit": paging.PAGE_MAX + 1}, 422, "query.limit"),
        ({"limit": "ten"}, 422, "query.limit"),
        ({"colour": "red"}, 422, "query.colour"),
    ],
)
def test_a_bad_cursor_or_limit_is_refused_with_a_sentence_naming_it(
    client, admin, listing, query, status, sentence
):
    response = client.get(f"/admin/api/{listing}", query_string=query, headers=admin)
    assert response.status_code == status
    assert sentence in response.get_json()["error"]
    assert response.get_json()["code"] in ("bad_cursor", "invalid")


def test_a_cursor_of_one_listing_is_refused_by_the_other(client, admin, make_key, add_route):
    for i in range(3):
        make_key(name=f"k{i}")
    make_routes(add_route, 3)
    keys = client.get("/admin/api/keys", query_string={"limit": 1}, headers=admin).get_json()
    routes = client.get("/admin/api/routes", query_string={"limit": 1}, headers=admin).get_json()
    for listing, cursor in (("routes", keys["next_cursor"]), ("keys", routes["next_cursor"])):
        got = client.get(f"/admin/api/{listing}", query_string={"cursor": cursor}, headers=admin)
        assert got.status_code == 400 and got.get_json()["code"] == "bad_cursor"
    events = client.get(
        "/admin/api/events", query_string={"cursor": keys["next_cursor"]}, headers=admin
    )
    assert events.status_code == 400 and events.get_json()["code"] == "bad_cursor"


def test_the_cli_lists_every_key_and_route_past_a_page(runner, make_key, add_route):
    for i in range(paging.PAGE_DEFAULT + 2):
        make_key(name=f"k{i}")
    make_routes(add_route, 3)
    keys = json.loads(runner.invoke(args=["keys", "list", "--json"]).stdout)
    assert len(keys) == paging.PAGE_DEFAULT + 2
    routes = json.loads(runner.invoke(args=["routes", "list", "--json"]).stdout)
    assert [r["name"] for r in routes] == ["r000", "r001", "r002"]


# --- stats: latency of the hub, not of a replay ---


def test_stats_latency_leaves_out_replayed_events_but_counts_them(
    client, admin, db, runner, add_route
):
    add_route("slow", [{"connector": "text"}], mode="async")
    # Delivered 200 ms after it came in, 40 minutes ago; then replayed now, and delivered
    # again by a worker: its completed_at is now 40 minutes after its receipt.
    received = utcnow() - timedelta(minutes=40)
    old = add_event(
        db,
        route="slow",
        body=b'{"input": "x"}',
        content_type="application/json",
        received=received,
        completed_at=received + timedelta(milliseconds=200),
    )
    fresh = add_event(
        db,
        route="slow",
        received=utcnow() - timedelta(seconds=1),
        completed_at=utcnow() - timedelta(milliseconds=700),
    )
    assert client.post(f"/admin/api/events/{old}/replay", headers=admin).status_code == 200
    assert runner.invoke(args=["worker", "--once"]).exit_code == 0
    with db.session() as session:
        assert session.get(Event, old).status == "delivered"
        assert session.get(Event, old).replayed_at is not None
        assert session.get(Event, fresh).replayed_at is None
    data = client.get("/admin/api/stats", query_string={"since": "1h"}, headers=admin).get_json()
    slow = data["routes"][0]
    assert slow["by_status"] == {"delivered": 2}  # the replayed one still counts
    assert slow["p50_ms"] == slow["p95_ms"] == pytest.approx(300, abs=100)  # only the fresh one


# --- migration 0009 on a database 0008 filled ---

EVENTS_0008 = sa.table(
    "events",
    *(sa.column(c) for c in ("id", "route", "method", "path", "status", "reason", "request_id")),
    sa.column("received_at", sa.DateTime(timezone=True)),
    sa.column("headers", sa.JSON),
    sa.column("attempts", sa.Integer),
    sa.column("retries", sa.Integer),
)


def index_names(db) -> set[str]:
    with db.engine.connect() as conn:
        return {i["name"] for i in sa.inspect(conn).get_indexes("events")}


def test_migration_0009_keeps_the_events_0008_wrote_and_lists_them_by_reason(db, client, admin):
    with db.engine.begin() as conn:
        command.downgrade(alembic_config(db, conn), "0008")
    try:
        assert "ix_events_reason_received_at_id" not in index_names(db)
        now = utcnow()
        rows = [
            {
                "id": new_event_id(),
                "route": "r",
                "method": "POST",
                "path": "/hooks/r",
                "status": "rejected" if i % 2 else "delivered",
                "reason": "unauthorized" if i % 2 else None,
                "request_id": "same-every-time",
                "received_at": now - timedelta(seconds=10 - i),
                "headers": {},
                "attempts": 0,
                "retries": 0,
            }
            for i in range(6)
        ]
        with db.engine.begin() as conn:
            conn.execute(EVENTS_0008.insert(), rows)
        upgrade(db)
        assert {"ix_events_reason_received_at_id", "ix_events_request_id_received_at_id"} <= (
            index_names(db)
        )
        query = {"reason": "unauthorized", "limit": 2}
        page = client.get("/admin/api/events", query_string=query, headers=admin).get_json()
        assert [e["id"] for e in page["events"]] == [rows[5]["id"], rows[3]["id"]]
        by_request = client.get(
            "/admin/api/events", query_string={"request_id": "same-every-time"}, headers=admin
        ).get_json()
        assert len(by_request["events"]) == 6
        with db.session() as session:
            assert all(e.replayed_at is None for e in session.scalars(sa.select(Event)))
        with db.engine.begin() as conn:
            command.downgrade(alembic_config(db, conn), "0008")
        assert "ix_events_request_id" in index_names(db)
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM events")).scalar() == 6
    finally:
        upgrade(db)


# Admin GET answers holding a list that are not paged, and why.
UNPAGED = {
    "/admin/api/connectors": "the connectors installed with the hub: a few dozen at most",
    "/admin/api/providers": "the signature providers installed with the hub: a few dozen at most",
    "/admin/api/stats": "one entry per route; bounded by HUB_ADMIN_STATS_MAX_ROWS events",
    "/admin/api/alert-channels": "at most HUB_ALERT_MAX_CHANNELS (50)",
    "/admin/api/alert-rules": "at most HUB_ALERT_MAX_RULES (100), and the two built-in ones",
    "/admin/api/alerts": "the newest alerts, `limit` of them (at most 200): a window, not a list",
}


def test_every_admin_listing_takes_the_events_paging_in_the_openapi_document(client):
    doc = client.get("/openapi.json").get_json()
    schemas = doc["components"]["schemas"]

    def paging_of(path: str) -> tuple[dict, dict]:
        get = doc["paths"][path]["get"]
        params = {p["name"]: p["schema"] for p in get["parameters"] if p["in"] == "query"}
        answer = get["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
        next_cursor = schemas[answer.rsplit("/", 1)[1]]["properties"].get("next_cursor")
        return {k: params.get(k) for k in ("limit", "cursor")}, next_cursor

    events = paging_of("/admin/api/events")
    assert events[0]["limit"]["maximum"] == paging.PAGE_MAX and events[1] is not None
    listings = [
        path
        for path, ops in doc["paths"].items()
        if path.startswith("/admin/api/") and "{" not in path and "get" in ops
    ]
    assert {"/admin/api/keys", "/admin/api/routes"} <= set(listings)
    for path in sorted(set(listings) - set(UNPAGED)):
        assert paging_of(path) == events, path


# --- two filters together: one index walked, within the window ---


def test_two_filters_together_look_at_most_at_the_window_a_call_and_page_on(app, client, admin, db):
    app.config["ADMIN_SEARCH_WINDOW"] = 3
    dead = []
    for i in range(8):  # newest last: route a alternates dead and delivered
        status = "dead" if i % 2 else "delivered"
        event_id = add_event(db, route="a", status=status, age=100 - i)
        if status == "dead":
            dead.append(event_id)
        add_event(db, route="b", status="dead", age=100 - i)
    found, scanned, cursor = [], [], None
    while True:
        query = {"route": "a", "status": "dead", **({"cursor": cursor} if cursor else {})}
        page = client.get("/admin/api/events", query_string=query, headers=admin).get_json()
        found += [e["id"] for e in page["events"]]
        scanned.append(page["scanned"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert found == dead[::-1]  # each once, newest first
    assert scanned == [3, 3, 2]  # route a's 8 events, 3 a call at most
    one = client.get("/admin/api/events", query_string={"route": "a"}, headers=admin).get_json()
    assert len(one["events"]) == 8 and one["scanned"] is None  # one filter: no window
