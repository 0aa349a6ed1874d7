"""The admin API: keys, routes, connectors, events, replay and statistics over HTTP."""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta

import pytest

from hub.store.models import Attempt, Event, new_event_id, utcnow


@pytest.fixture
def admin(make_key) -> dict[str, str]:
    return {"X-API-Key": make_key(admin=True, name="admin")}


def add_event(
    db, route="orders", status="delivered", age=0.0, body=b"{}", received=None, **fields
) -> str:
    """An event row received ``age`` seconds ago (the listing's order is by receipt)."""
    received = received or utcnow() - timedelta(seconds=age)
    event = Event(
        id=new_event_id(),
        route=route,
        method="POST",
        path=f"/hooks/{route}",
        received_at=received,
        headers={},
        body=body,
        status=status,
        attempts=1,
        **fields,
    )
    with db.session() as session:
        session.add(event)
    return event.id


# --- who may call ---


@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/admin/api/keys"),
        ("POST", "/admin/api/keys"),
        ("GET", "/admin/api/events"),
        ("DELETE", "/admin/api/routes/x"),
        ("GET", "/admin/api/nothing-here"),
        ("GET", "/admin/"),
    ],
)
def test_no_key_is_401_and_a_plain_key_is_403_everywhere_under_admin(client, key, method, path):
    no_key = client.open(path, method=method)
    assert no_key.status_code == 401
    assert no_key.get_json()["code"] == "unauthorized"
    plain = client.open(path, method=method, headers={"X-API-Key": key})
    assert plain.status_code == 403
    assert plain.get_json() == {
        "error": "This API key is not an admin key; make one with `hub keys create --admin NAME`",
        "code": "forbidden",
    }


def admin_endpoints(app) -> list[tuple[str, str, str]]:
    """(method, path, endpoint) for every rule of the app's URL map under the admin prefix and
    every method it allows, placeholders filled in: endpoints added later are walked too."""
    prefix = app.blueprints["admin"].url_prefix
    adapter = app.url_map.bind("localhost")
    found = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(prefix):
            continue
        values = {name: "x" for name in rule.arguments if name not in (rule.defaults or {})}
        for method in sorted(rule.methods or ()):
            path = adapter.build(rule.endpoint, values, method=method)
            found.append((method, path, rule.endpoint))
    return found


def test_every_admin_endpoint_and_method_is_401_without_a_key_and_403_with_a_plain_one(
    app, client, key
):
    walked = admin_endpoints(app)
    endpoints = {endpoint for _, _, endpoint in walked}
    # The walk is the URL map's, not a list: the replays and every other view are in it.
    assert {"admin.replay_event", "admin.replay_events", "admin.create_key"} <= endpoints
    assert len(walked) > 40
    wrong = []
    for method, path, endpoint in walked:
        no_key = client.open(path, method=method)
        plain = client.open(path, method=method, headers={"X-API-Key": key})
        if (no_key.status_code, plain.status_code) != (401, 403):
            wrong.append(f"{method} {path} ({endpoint}): {no_key.status_code}, {plain.status_code}")
        elif method != "HEAD":
            assert no_key.get_json()["code"] == "unauthorized", path
            assert plain.get_json()["code"] == "forbidden", path
    assert not wrong, "not 401 without a key and 403 with a plain key: " + "; ".join(wrong)


def test_an_unknown_admin_path_is_404_only_for_an_admin(client, admin):
    response = client.get("/admin/api/nothing-here", headers=admin)
    assert response.status_code == 404
    assert response.get_json()["code"] == "not_found"


def test_bearer_works_and_a_revoked_admin_key_is_401(client, make_key):
    secret = make_key(admin=True)
    bearer = {"Authorization": f"Bearer {secret}"}
    assert client.get("/admin/api/keys", headers=bearer).status_code == 200
    prefix = secret.split("_")[1]
    assert client.delete(f"/admin/api/keys/{prefix}", headers=bearer).status_code == 200
    again = client.get("/admin/api/keys", headers=bearer)
    assert again.status_code == 401
    assert again.get_json()["error"] == "API key has been revoked"


# --- keys ---


def test_keys_create_list_get_revoke_and_the_secret_is_shown_once(client, admin, add_route):
    add_route("orders", [{"connector": "text"}])
    made = client.post(
        "/admin/api/keys",
        json={"name": "billing", "scopes": ["orders"], "expires_in": "30d", "rate_limit": "10/m"},
        headers=admin,
    )
    assert made.status_code == 201
    body = made.get_json()
    secret, prefix = body["key"], body["prefix"]
    assert secret.startswith(f"hk_{prefix}_")
    assert body["scopes"] == ["orders"] and body["admin"] is False
    assert body["rate_limit"] == "10/minute" and body["expires_at"]
    listed = client.get("/admin/api/keys", headers=admin)
    assert secret not in listed.get_data(as_text=True)
    assert prefix in [k["prefix"] for k in listed.get_json()["keys"]]
    one = client.get(f"/admin/api/keys/{prefix}", headers=admin)
    assert one.get_json()["name"] == "billing" and "key" not in one.get_json()
    sent = client.post("/hooks/orders", json={"input": "a"}, headers={"X-API-Key": secret})
    assert sent.status_code == 200
    revoked = client.delete(f"/admin/api/keys/{prefix}", headers=admin)
    assert revoked.get_json()["revoked_at"]
    refused = client.post("/hooks/orders", json={}, headers={"X-API-Key": secret})
    assert refused.status_code == 401


def test_a_key_made_admin_by_the_api_may_use_the_api(client, admin):
    made = client.post("/admin/api/keys", json={"name": "ops", "admin": True}, headers=admin)
    assert made.get_json()["admin"] is True
    assert (
        client.get("/admin/api/keys", headers={"X-API-Key": made.get_json()["key"]}).status_code
        == 200
    )


@pytest.mark.parametrize(
    "body,field",
    [
        ({"name": "x", "expires_in": "soon"}, "body.expires_in"),
        ({"name": "x", "rate_limit": "lots"}, "body.rate_limit"),
        ({"name": ""}, "body.name"),
        ({"name": "x", "colour": "red"}, "body.colour"),
        ({}, "body.name"),
    ],
)
def test_bad_key_fields_are_422_naming_the_field(client, admin, body, field):
    response = client.post("/admin/api/keys", json=body, headers=admin)
    assert response.status_code == 422
    data = response.get_json()
    assert data["code"] == "invalid"
    assert any(e.startswith(field + ":") for e in data["errors"]), data


def test_a_body_that_is_not_json_is_415_and_broken_json_400(client, admin):
    assert client.post("/admin/api/keys", data="name=x", headers=admin).status_code == 415
    broken = client.post(
        "/admin/api/keys", data="{", content_type="application/json", headers=admin
    )
    assert broken.status_code == 400 and broken.get_json()["code"] == "bad_json"


def test_unknown_keys_are_404(client, admin):
    assert client.get("/admin/api/keys/00000000", headers=admin).status_code == 404
    assert client.delete("/admin/api/keys/00000000", headers=admin).status_code == 404


# --- routes ---


def test_routes_create_show_replace_patch_delete(client, admin, receiver):
    route = {"name": "orders", "mode": "async", "steps": [{"connector": "text"}]}
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.get_json()
    assert created.get_json()["mode"] == "async"
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 409
    assert client.get("/admin/api/routes/orders", headers=admin).get_json()["name"] == "orders"
    put = client.put(
        "/admin/api/routes/orders",
        json={"steps": [{"connector": "http", "config": {"url": receiver.url}}]},
        headers=admin,
    )
    assert put.status_code == 200
    assert put.get_json()["mode"] == "sync"  # a replacement: unspecified fields are defaults
    patched = client.patch("/admin/api/routes/orders", json={"enabled": False}, headers=admin)
    assert patched.get_json()["enabled"] is False
    assert patched.get_json()["steps"][0]["connector"] == "http"
    names = [r["name"] for r in client.get("/admin/api/routes", headers=admin).get_json()["routes"]]
    assert names == ["orders"]
    assert client.delete("/admin/api/routes/orders", headers=admin).get_json()["removed"]
    assert client.get("/admin/api/routes/orders", headers=admin).status_code == 404
    assert client.delete("/admin/api/routes/orders", headers=admin).status_code == 404


def test_a_put_of_a_new_name_creates_the_route(client, admin):
    response = client.put("/admin/api/routes/fresh", json={}, headers=admin)
    assert response.status_code == 201
    mismatch = client.put("/admin/api/routes/fresh", json={"name": "other"}, headers=admin)
    assert mismatch.status_code == 422 and mismatch.get_json()["errors"][0].startswith("body.name")


def test_a_bad_step_config_is_422_with_the_same_reasons_as_routes_add(client, admin, runner):
    step = {"connector": "http", "config": {"url": "ftp://x", "timeout": "long"}}
    response = client.post(
        "/admin/api/routes", json={"name": "bad", "steps": [step]}, headers=admin
    )
    assert response.status_code == 422
    errors = response.get_json()["errors"]
    cli = runner.invoke(
        args=["routes", "add", "bad", "--step", 'http:{"url": "ftp://x", "timeout": "long"}']
    )
    assert cli.exit_code == 1
    for error in errors:
        assert error.startswith("body.steps[0] (http): ")
        assert error.removeprefix("body.") in cli.output
    assert any("timeout" in e for e in errors)


def test_unknown_connector_and_unknown_field_are_422(client, admin):
    unknown = client.post(
        "/admin/api/routes", json={"name": "r", "steps": [{"connector": "nope"}]}, headers=admin
    )
    assert unknown.status_code == 422 and "nope" in unknown.get_json()["error"]
    extra = client.patch("/admin/api/routes/r", json={"colour": 1}, headers=admin)
    assert extra.status_code == 422 and extra.get_json()["errors"] == [
        "body.colour: Extra inputs are not permitted"
    ]


SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
NEW_SECRET = "whsec_" + "bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldy1zZWNyZXQ"


def test_secrets_are_write_only_masked_and_rotated(client, admin):
    route = {"name": "signed", "verify": {"scheme": "standard-webhooks", "secrets": [SECRET]}}
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.get_json()
    text = client.get("/admin/api/routes/signed", headers=admin).get_data(as_text=True)
    assert SECRET not in text and SECRET[-4:] in text
    added = client.post(
        "/admin/api/routes/signed/secrets", json={"secret": NEW_SECRET}, headers=admin
    )
    assert added.status_code == 201 and added.get_json() == {"route": "signed", "secrets": 2}
    # A change of options without secrets keeps both secrets.
    patched = client.patch(
        "/admin/api/routes/signed", json={"verify": {"options": {"tolerance": 600}}}, headers=admin
    )
    assert patched.status_code == 200, patched.get_json()
    assert len(patched.get_json()["verify"]["secrets"]) == 2
    removed = client.delete("/admin/api/routes/signed/secrets/1", headers=admin)
    assert removed.get_json() == {"route": "signed", "secrets": 1}
    last = client.delete("/admin/api/routes/signed/secrets/1", headers=admin)
    assert last.status_code == 422 and "last secret" in last.get_json()["error"]
    masked = client.put(
        "/admin/api/routes/signed",
        json={"verify": {"scheme": "standard-webhooks", "secrets": ["whsec_…abcd"]}},
        headers=admin,
    )
    assert masked.status_code == 422 and "masked" in masked.get_json()["error"]
    missing = client.post("/admin/api/routes/nope/secrets", json={"secret": "x"}, headers=admin)
    assert missing.status_code == 404


def test_env_references_are_not_read_through_the_api(client, admin, monkeypatch):
    monkeypatch.setenv("SERVER_SECRET", NEW_SECRET)
    route = {
        "name": "env",
        "verify": {"scheme": "standard-webhooks", "secrets": ["${SERVER_SECRET}"]},
    }
    response = client.post("/admin/api/routes", json=route, headers=admin)
    assert response.status_code == 422
    assert "SERVER_SECRET is not set" in response.get_json()["error"]


def test_connectors_lists_each_with_its_config_schema(client, admin):
    connectors = client.get("/admin/api/connectors", headers=admin).get_json()["connectors"]
    http = next(c for c in connectors if c["name"] == "http")
    assert "url" in http["config_schema"]["properties"] and http["description"]


# --- events ---


def test_events_are_listed_newest_first_in_keyset_pages(client, admin, db):
    ids = [add_event(db, age=100 - i) for i in range(7)]  # ids[-1] is the newest
    seen, cursor = [], None
    for _ in range(5):  # 7 events in pages of 3: three pages, then no cursor
        query = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/admin/api/events", query_string=query, headers=admin).get_json()
        seen += [e["id"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]


def test_events_filter_by_route_status_reason_key_and_time(client, admin, db):
    old = add_event(db, route="a", status="failed", age=7200, key_prefix="aaaa1111")
    new = add_event(db, route="b", status="rejected", reason="unauthorized", age=10)
    add_event(db, route="a", status="delivered", age=5)

    def ids(**query):
        response = client.get("/admin/api/events", query_string=query, headers=admin)
        assert response.status_code == 200, response.get_json()
        return [e["id"] for e in response.get_json()["events"]]

    assert ids(route="b") == [new]
    assert ids(status="failed") == [old]
    assert ids(reason="unauthorized") == [new]
    assert ids(key="aaaa1111") == [old]
    assert ids(until="1h") == [old]
    assert len(ids(since="1h")) == 2
    assert ids(route="a", status="failed", since="3h") == [old]
    iso = (utcnow() - timedelta(minutes=30)).isoformat()
    assert len(ids(since=iso)) == 2


def test_q_finds_a_body_substring(client, admin, db):
    hit = add_event(db, body=b'{"order": "A-1234-XYZ"}')
    add_event(db, body=b'{"order": "B-9"}')
    page = client.get("/admin/api/events", query_string={"q": "1234-X"}, headers=admin)
    assert [e["id"] for e in page.get_json()["events"]] == [hit]
    assert page.get_json()["scanned"] == 2


def test_q_scans_a_bounded_window_and_hands_a_cursor_past_it(app, client, admin, db):
    app.config["ADMIN_SEARCH_WINDOW"] = 3
    hit = add_event(db, age=50, body=b"needle")
    for i in range(4):
        add_event(db, age=10 - i, body=b"hay")
    first = client.get("/admin/api/events", query_string={"q": "needle"}, headers=admin)
    assert first.get_json()["events"] == [] and first.get_json()["scanned"] == 3
    cursor = first.get_json()["next_cursor"]
    assert cursor
    second = client.get(
        "/admin/api/events", query_string={"q": "needle", "cursor": cursor}, headers=admin
    )
    assert [e["id"] for e in second.get_json()["events"]] == [hit]
    assert second.get_json()["next_cursor"] is None


@pytest.mark.parametrize(
    "query,status,names",
    [
        ({"cursor": "not-a-cursor"}, 400, "query.cursor"),
        ({"cursor": "ZXZ0X3h4eA"}, 400, "query.cursor"),
        ({"status": "lost"}, 422, "query.status"),
        ({"limit": 0}, 422, "query.limit"),
        ({"limit": 501}, 422, "query.limit"),
        ({"limit": "ten"}, 422, "query.limit"),
        ({"since": "yesterday"}, 422, "query.since"),
        ({"until": "2026-13-45"}, 422, "query.until"),
        ({"colour": "red"}, 422, "query.colour"),
    ],
)
def test_bad_listing_parameters_name_the_parameter(client, admin, query, status, names):
    response = client.get("/admin/api/events", query_string=query, headers=admin)
    assert response.status_code == status
    assert names in response.get_json()["error"]


def test_an_event_with_its_attempts_headers_and_body(client, admin, db):
    event_id = add_event(db, body=b'{"x": 1}', status="failed", last_error="boom")
    with db.session() as session:
        session.add(Attempt(event_id=event_id, step_index=0, connector="http", outcome="permanent"))
    data = client.get(f"/admin/api/events/{event_id}", headers=admin).get_json()
    assert data["body"] == '{"x": 1}' and data["last_error"] == "boom"
    assert data["attempt_log"][0]["connector"] == "http"
    assert client.get("/admin/api/events/evt_nope", headers=admin).status_code == 404


def test_replay_one_event(client, admin, db):
    failed = add_event(db, status="failed")
    rejected = add_event(db, status="rejected", reason="unauthorized")
    response = client.post(f"/admin/api/events/{failed}/replay", headers=admin)
    assert response.get_json() == {"id": failed, "status": "pending"}
    with db.session() as session:
        assert session.get(Event, failed).status == "pending"
    refused = client.post(f"/admin/api/events/{rejected}/replay", headers=admin)
    assert refused.status_code == 409 and refused.get_json()["code"] == "not_replayable"
    assert client.post("/admin/api/events/evt_nope/replay", headers=admin).status_code == 404


def test_bulk_replay_needs_a_filter_or_all_and_answers_how_many(client, admin, db):
    for _ in range(3):
        add_event(db, route="a", status="dead")
    add_event(db, route="b", status="dead")
    refused = client.post("/admin/api/events/replay", json={}, headers=admin)
    assert refused.status_code == 400 and refused.get_json()["code"] == "filter_required"
    some = client.post("/admin/api/events/replay", json={"route": "a"}, headers=admin)
    assert some.get_json() == {"replayed": 3, "examined": 3, "next_cursor": None}
    rest = client.post("/admin/api/events/replay", json={"all": True}, headers=admin)
    assert rest.get_json()["replayed"] == 1


def test_bulk_replay_looks_at_a_bounded_number_per_call(app, client, admin, db):
    app.config["ADMIN_REPLAY_MAX"] = 2
    for i in range(3):
        add_event(db, status="dead", age=i)
    first = client.post("/admin/api/events/replay", json={"status": "dead"}, headers=admin)
    assert first.get_json()["replayed"] == 2 and first.get_json()["next_cursor"]
    body = {"status": "dead", "cursor": first.get_json()["next_cursor"]}
    second = client.post("/admin/api/events/replay", json=body, headers=admin)
    assert second.get_json() == {"replayed": 1, "examined": 1, "next_cursor": None}


# --- statistics ---


def test_stats_per_route_counts_and_percentiles(client, admin, db):
    now = utcnow()
    received = now - timedelta(seconds=60)
    for ms in range(1, 21):  # 20 delivered events taking 100 ms .. 2000 ms
        add_event(
            db,
            route="a",
            status="delivered",
            received=received,
            completed_at=received + timedelta(milliseconds=ms * 100),
        )
    add_event(db, route="a", status="rejected", reason="unauthorized", completed_at=now)
    add_event(db, route="b", status="failed", completed_at=now, age=1)
    add_event(db, route="old", status="delivered", age=3 * 86400)
    data = client.get("/admin/api/stats", query_string={"since": "1h"}, headers=admin).get_json()
    routes = {r["route"]: r for r in data["routes"]}
    assert set(routes) == {"a", "b"} and data["events"] == 22 and not data["truncated"]
    a = routes["a"]
    assert a["by_status"] == {"delivered": 20, "rejected": 1}
    assert a["by_reason"] == {"unauthorized": 1}
    assert a["p50_ms"] == pytest.approx(1000, abs=20)  # the 10th of 20
    assert a["p95_ms"] == pytest.approx(1900, abs=20)  # the 19th of 20


def test_stats_are_bounded_to_the_newest_rows(app, client, admin, db):
    app.config["ADMIN_STATS_MAX_ROWS"] = 2
    for i in range(3):
        add_event(db, route=f"r{i}", age=i)
    data = client.get("/admin/api/stats", headers=admin).get_json()
    assert data["truncated"] is True and data["events"] == 2
    assert [r["route"] for r in data["routes"]] == ["r0", "r1"]
    bad = client.get("/admin/api/stats", query_string={"since": "tuesday"}, headers=admin)
    assert bad.status_code == 422 and "query.since" in bad.get_json()["error"]


# --- the log ---


def test_every_change_is_logged_with_the_admin_prefix_and_no_secret(client, admin, caplog):
    prefix = admin["X-API-Key"].split("_")[1]
    with caplog.at_level(logging.INFO, logger="hub.admin"):
        made = client.post("/admin/api/keys", json={"name": "k"}, headers=admin)
        client.get("/admin/api/keys", headers=admin)
    lines = [r.getMessage() for r in caplog.records if r.name == "hub.admin"]
    assert lines == [f"admin key {prefix}: POST /admin/api/keys -> 201"]
    assert made.get_json()["key"] not in caplog.text and admin["X-API-Key"] not in caplog.text


# --- the indexes of migration 0005 carry the listing ---


@pytest.mark.parametrize(
    "filters,index",
    [
        ({}, "ix_events_received_at_id"),
        ({"route": "a"}, "ix_events_route_received_at_id"),
        ({"status": "dead"}, "ix_events_status_received_at_id"),
        ({"key_prefix": "aaaa1111"}, "ix_events_key_prefix_received_at_id"),
    ],
)
def test_a_page_is_one_index_range_without_a_sort(sqlite_template, tmp_path, filters, index):
    """SQLite's plan for each listing query walks the migration's index, in order."""
    from sqlalchemy import event as sa_event

    from hub.services import events as event_store
    from hub.store.db import Database

    path = tmp_path / "plan.db"
    shutil.copy(sqlite_template, path)
    db = Database(f"sqlite:///{path}")
    statements = []
    sa_event.listen(
        db.engine,
        "before_cursor_execute",
        lambda c, cur, sql, params, *_: statements.append((sql, params)),
    )
    cursor = event_store.encode_cursor(utcnow(), "evt_zzzz")
    with db.session() as session:
        event_store.search(
            session, event_store.Listing(event_store.Filters(**filters), limit=50, cursor=cursor)
        )
        sql, params = next((s, p) for s, p in statements if "LIMIT" in s)
        plan = " ".join(
            row[-1]
            for row in session.connection().exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params)
        )
    db.dispose()
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan
    assert "TEMP B-TREE" not in plan, plan
