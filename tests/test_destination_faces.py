"""Destinations in every face: the admin API, the CLI and the dashboard show each
destination's state, deliveries in flight and backlog; a replay takes one delivery, and a
bulk replay can aim at one destination, leaving the events' other destinations alone; the
sender's own view of an event never names where it went."""

from __future__ import annotations

import json
import re

from sqlalchemy import select, update

from hub.services import destinations as destination_store
from hub.services.delivery import Worker
from hub.store.models import Delivery, Destination, utcnow
from tests import test_destinations
from tests.rows import event_row, insert_events
from tests.servers import Reply
from tests.test_dashboard import HOME, sign_in, token

admin = test_destinations.admin  # fixtures
receiver_b = test_destinations.receiver_b
http = test_destinations.http
wait_until = test_destinations.wait_until


def route_to_a_and_b(client, admin, receiver, receiver_b, **b_settings) -> None:
    """Route "orders", async: a (the receiver), b (receiver_b, no durable retry)."""
    route = {
        "name": "orders",
        "mode": "async",
        "destinations": [
            {"name": "a", "steps": http(receiver)},
            {"name": "b", "steps": http(receiver_b), "retry_schedule": [], **b_settings},
        ],
    }
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.json


def post(client, key, n: int) -> list[str]:
    ids = []
    for i in range(n):
        answer = client.post("/hooks/orders", json={"n": i}, headers={"X-API-Key": key})
        assert answer.status_code == 202, answer.json
        ids.append(answer.json["id"])
    return ids


def drain(app) -> None:
    worker = Worker(app, name="drain")
    while worker.run_once():
        pass


def delivery_to(db, event_id: str, destination: str) -> Delivery:
    with db.session() as session:
        return session.scalar(
            select(Delivery).where(
                Delivery.event_id == event_id, Delivery.destination == destination
            )
        )


def b_dead(app, client, key, admin, receiver, receiver_b, n: int = 1) -> list[str]:
    """n events of "orders" delivered to a and dead at b (b answered 500, no retry)."""
    app.config["STEP_TRIES"] = 1
    route_to_a_and_b(client, admin, receiver, receiver_b)
    receiver_b.script(*[Reply(500, {"down": True})] * n)
    ids = post(client, key, n)
    drain(app)
    assert {event_row(app.extensions["hub.db"], i).status for i in ids} == {"partial"}
    return ids


# --- seeing destinations ---


def test_the_api_shows_each_destination_with_its_state_in_flight_and_backlog(
    app, client, db, key, admin, receiver, receiver_b
):
    route_to_a_and_b(client, admin, receiver, receiver_b, max_in_flight=2, rate="5/second")
    paused = client.post(
        "/admin/api/routes/orders/destinations/b/pause", json={"reason": "upgrade"}, headers=admin
    )
    assert paused.status_code == 200
    receiver.script(Reply(200, None, delay=1.5))  # a's first call is slow: in flight a while
    post(client, key, 3)
    worker = Worker(app, name="slow")
    worker.start(1)
    try:
        wait_until(lambda: len(receiver.requests) == 1, timeout=10)
        listed = client.get("/admin/api/routes/orders/destinations", headers=admin)
    finally:
        worker.stop(grace=5)
    assert listed.status_code == 200, listed.json
    shown = {d["name"]: d for d in listed.json["destinations"]}
    assert list(shown) == ["a", "b"]
    a, b = shown["a"], shown["b"]
    assert (a["state"], a["in_flight"]) == ("active", 1)
    assert a["backlog"] == {"pending": 2, "retrying": 0, "held": 0, "queued": 0}
    assert (b["state"], b["state_reason"], b["in_flight"]) == ("paused", "upgrade", 0)
    assert b["backlog"]["held"] == 3 and b["backlog_total"] == 3 and not b["backlog_capped"]
    assert b["oldest_waiting_at"] and b["oldest_waiting_seconds"] >= 0
    assert b["settings"]["max_in_flight"] == 2 and b["settings"]["rate"] == "5/second"
    assert b["settings"]["steps"][0]["connector"] == "http"

    one = client.get("/admin/api/routes/orders/destinations/b", headers=admin)
    assert one.status_code == 200 and one.json["backlog"]["held"] == 3
    for path, says in (
        ("nope/destinations", "No route is named 'nope'"),
        ("nope/destinations/b", "No route is named 'nope'"),
        ("orders/destinations/c", "Route 'orders' has no destination named 'c'"),
    ):
        missing = client.get(f"/admin/api/routes/{path}", headers=admin)
        assert missing.status_code == 404 and missing.json["error"] == says, path


def test_a_backlog_stops_counting_at_its_cap_and_says_so(
    app, client, db, key, admin, receiver, receiver_b
):
    """Each destination's due, held, queued and in-flight deliveries are counted along their
    own index; each read stops past the cap and the figure says "at least"."""
    route_to_a_and_b(client, admin, receiver, receiver_b)
    post(client, key, 3)
    client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    with db.session() as session:
        a, b = destination_store.overview(session, "orders", cap=2)
        assert (a.waiting, a.backlog_capped, a.backlog["pending"]) == (2, True, 2)
        assert (b.backlog_capped, b.backlog["pending"], b.backlog["held"]) == (True, 0, 2)
        exact = destination_store.overview(session, "orders", cap=3)
    assert [(v.name, v.waiting, v.backlog_capped) for v in exact] == [
        ("a", 3, False),
        ("b", 3, False),
    ]
    shown = client.get("/admin/api/routes/orders/destinations/b", headers=admin).json
    assert (shown["backlog_total"], shown["backlog_capped"]) == (3, False)


def test_a_circuits_state_shows_in_every_face(app, client, db, admin, receiver, receiver_b):
    """open and half_open are set by the breaker; the faces show whichever state is stored."""
    route_to_a_and_b(client, admin, receiver, receiver_b)
    with db.session() as session:
        session.execute(
            update(Destination).where(Destination.name == "b").values(state="half_open")
        )
    api = client.get("/admin/api/routes/orders/destinations/b", headers=admin).json
    assert api["state"] == "half_open"
    cli = app.test_cli_runner()
    listed = cli.invoke(args=["routes", "list"])
    assert listed.exit_code == 0 and "a: http; b: http [half_open]" in listed.output
    table = cli.invoke(args=["routes", "destinations", "orders"])
    assert re.search(r"^b\s+half_open\s+0\s+0\s", table.output, re.M), table.output


def test_the_cli_lists_a_routes_destinations(app, client, db, key, admin, receiver, receiver_b):
    route_to_a_and_b(client, admin, receiver, receiver_b, max_in_flight=4)
    cli = app.test_cli_runner()
    assert cli.invoke(args=["routes", "pause", "orders", "b", "--reason", "upgrade"]).exit_code == 0
    post(client, key, 2)
    table = cli.invoke(args=["routes", "destinations", "orders"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "IN", "FLIGHT", "BACKLOG", "OLDEST", "SETTINGS"]
    assert re.match(r"a\s+active\s+0\s+2 \(pending 2\)\s+\d+ s\s+http\s*$", lines[1]), lines[1]
    assert re.match(r"b\s+paused \(upgrade\)\s+0\s+2 \(held 2\)", lines[2]), lines[2]
    assert lines[2].rstrip().endswith("http; no retries; max 4 in flight"), lines[2]
    as_json = json.loads(cli.invoke(args=["routes", "destinations", "orders", "--json"]).output)
    assert [(d["name"], d["backlog_total"]) for d in as_json] == [("a", 2), ("b", 2)]
    listed = cli.invoke(args=["routes", "list"])
    assert "a: http; b: http [paused]" in listed.output
    unknown = cli.invoke(args=["routes", "destinations", "nope"])
    assert unknown.exit_code == 1 and "No route is named 'nope'" in unknown.output


# --- replaying one delivery ---


def test_replaying_one_delivery_calls_only_its_destination_and_keeps_its_history(
    app, client, db, key, admin, receiver, receiver_b
):
    (event_id,) = b_dead(app, client, key, admin, receiver, receiver_b)
    b = delivery_to(db, event_id, "b")
    replayed = client.post(f"/admin/api/deliveries/{b.id}/replay", headers=admin)
    assert replayed.status_code == 200, replayed.json
    assert replayed.json == {
        "id": b.id,
        "event_id": event_id,
        "destination": "b",
        "status": "pending",
        "event_status": "pending",
    }
    again = client.post(f"/admin/api/deliveries/{b.id}/replay", headers=admin)
    assert again.status_code == 409 and again.json["code"] == "not_replayable"
    assert "'b' is pending: already waiting" in again.json["error"]
    assert delivery_to(db, event_id, "a").status == "delivered"  # left as it was
    drain(app)
    assert (len(receiver.requests), len(receiver_b.requests)) == (1, 2)
    shown = client.get(f"/admin/api/events/{event_id}", headers=admin).json
    assert shown["status"] == "delivered"
    runs = {d["destination"]: d for d in shown["deliveries"]}
    assert runs["b"]["runs"] == 2
    assert [x["http_status"] for x in runs["b"]["attempts"]] == [500, 200]

    # A delivered delivery, named on purpose, is called again (an event replay would not).
    a = delivery_to(db, event_id, "a")
    assert client.post(f"/admin/api/deliveries/{a.id}/replay", headers=admin).status_code == 200
    drain(app)
    assert (len(receiver.requests), len(receiver_b.requests)) == (2, 2)
    missing = client.post("/admin/api/deliveries/dlv_nope/replay", headers=admin)
    assert missing.status_code == 404 and "dlv_nope" in missing.json["error"]


def test_the_cli_replays_one_destination_of_an_event(
    app, client, db, key, admin, receiver, receiver_b
):
    (event_id,) = b_dead(app, client, key, admin, receiver, receiver_b)
    cli = app.test_cli_runner()
    done = cli.invoke(args=["events", "replay", event_id, "--destination", "b"])
    assert done.exit_code == 0, done.output
    assert f"replayed {event_id} to b" in done.output
    assert delivery_to(db, event_id, "b").status == "pending"
    assert delivery_to(db, event_id, "a").status == "delivered"
    waiting = cli.invoke(args=["events", "replay", event_id, "--destination", "b"])
    assert waiting.exit_code == 3 and "is pending: already waiting" in waiting.output
    unknown = cli.invoke(args=["events", "replay", event_id, "--destination", "c"])
    assert unknown.exit_code == 1 and "its destinations: a, b" in unknown.output
    drain(app)
    assert (len(receiver.requests), len(receiver_b.requests)) == (1, 2)


# --- a bulk replay aimed at one destination ---


def test_a_bulk_replay_aimed_at_one_destination_leaves_the_others_alone(
    app, client, db, key, admin, receiver, receiver_b
):
    ids = b_dead(app, client, key, admin, receiver, receiver_b, n=3)
    aimed = {"route": "orders", "destination": "b", "status": "dead"}
    done = client.post("/admin/api/events/replay", json=aimed, headers=admin)
    assert done.status_code == 200, done.json
    assert done.json == {"replayed": 3, "examined": 3, "next_cursor": None}
    assert {delivery_to(db, i, "b").status for i in ids} == {"pending"}
    assert {delivery_to(db, i, "a").status for i in ids} == {"delivered"}
    drain(app)
    assert (len(receiver.requests), len(receiver_b.requests)) == (3, 6)
    assert {event_row(db, i).status for i in ids} == {"delivered"}
    # Nothing dead at b any more.
    none = client.post("/admin/api/events/replay", json=aimed, headers=admin)
    assert none.json["replayed"] == 0

    for body, says in (
        ({"destination": "b", "status": "dead"}, "body.destination: give the route too"),
        ({**aimed, "status": "partial"}, "body.status: with a destination"),
        ({**aimed, "destination": "b\u0000"}, "body.destination: not a destination's name"),
    ):
        refused = client.post("/admin/api/events/replay", json=body, headers=admin)
        assert refused.status_code == 422 and says in refused.json["error"], refused.json


def test_a_bulk_replay_aimed_at_one_destination_is_bounded_per_call(
    app, client, db, key, admin, receiver, receiver_b
):
    app.config["ADMIN_REPLAY_MAX"] = 2
    ids = b_dead(app, client, key, admin, receiver, receiver_b, n=3)
    aimed = {"route": "orders", "destination": "b", "status": "dead"}
    first = client.post("/admin/api/events/replay", json=aimed, headers=admin).json
    assert first["replayed"] == 2 and first["next_cursor"]
    rest = client.post(
        "/admin/api/events/replay", json={**aimed, "cursor": first["next_cursor"]}, headers=admin
    ).json
    assert rest == {"replayed": 1, "examined": 1, "next_cursor": None}
    assert {delivery_to(db, i, "b").status for i in ids} == {"pending"}


def test_the_cli_bulk_replays_one_destinations_dead_deliveries(
    app, client, db, key, admin, receiver, receiver_b
):
    ids = b_dead(app, client, key, admin, receiver, receiver_b, n=2)
    cli = app.test_cli_runner()
    args = ["events", "replay", "--route", "orders", "--destination", "b", "--status", "dead"]
    done = cli.invoke(args=args)
    assert done.exit_code == 0, done.output
    assert "replayed 2 delivery(ies) to b" in done.output
    assert {delivery_to(db, i, "b").status for i in ids} == {"pending"}
    assert {delivery_to(db, i, "a").status for i in ids} == {"delivered"}
    assert cli.invoke(args=args).exit_code == 3  # none dead now
    no_route = cli.invoke(args=["events", "replay", "--destination", "b", "--status", "dead"])
    assert no_route.exit_code == 1 and "--destination: give the route too" in no_route.output


# --- the dashboard ---


def test_the_route_page_shows_each_destinations_state_in_flight_and_backlog(
    app, client, db, key, admin, make_key, receiver, receiver_b
):
    route_to_a_and_b(client, admin, receiver, receiver_b, max_in_flight=3)
    client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    post(client, key, 2)
    assert sign_in(client, make_key(admin=True, name="dash")).status_code == 303
    html = client.get("/dashboard/routes/orders").get_data(as_text=True)
    table = re.search(r'<table class="destination-figures".*?</table>', html, re.S).group(0)
    row_b = re.search(r'<tr id="figures-b">(.*?)</tr>', table, re.S).group(1)
    assert '<span class="badge badge-state-paused">paused</span>' in row_b
    assert '<td class="in-flight">0</td>' in row_b
    assert re.search(r'<td class="backlog">2\s*<span class="badge badge-held">held 2</span>', row_b)
    assert "max 3 in flight" in row_b
    assert "/dashboard/events/replay?route=orders&amp;destination=b&amp;status=dead" in row_b
    row_a = re.search(r'<tr id="figures-a">(.*?)</tr>', table, re.S).group(1)
    assert "badge-state-active" in row_a and "pending 2" in row_a


def test_the_event_page_replays_one_delivery_and_the_bulk_page_aims_at_one_destination(
    app, client, db, key, admin, make_key, receiver, receiver_b
):
    ids = b_dead(app, client, key, admin, receiver, receiver_b, n=2)
    assert sign_in(client, make_key(admin=True, name="dash")).status_code == 303
    html = client.get(f"/dashboard/events/{ids[0]}").get_data(as_text=True)
    b = delivery_to(db, ids[0], "b")
    assert f'action="/dashboard/deliveries/{b.id}/replay"' in html
    replay = client.post(
        f"/dashboard/deliveries/{b.id}/replay", data={"csrf_token": token(client, HOME)}
    )
    assert replay.status_code == 303 and replay.location == f"/dashboard/events/{ids[0]}"
    page = client.get(replay.location).get_data(as_text=True)
    assert "The delivery to b is queued again." in page
    assert f'action="/dashboard/deliveries/{b.id}/replay"' not in page  # pending: no button
    assert delivery_to(db, ids[0], "a").status == "delivered"

    confirm = client.get("/dashboard/events/replay?route=orders&destination=b&status=dead")
    text = confirm.get_data(as_text=True)
    assert "<strong>1</strong> delivery to b will be queued again" in text
    done = client.post(
        "/dashboard/events/replay",
        data={
            "route": "orders",
            "status": "dead",
            "destination": "b",
            "csrf_token": token(client, HOME),
        },
    )
    assert done.status_code == 303 and done.location == "/dashboard/routes/orders"
    assert "Replayed 1 deliveries to b" in client.get(done.location).get_data(as_text=True)
    assert {delivery_to(db, i, "b").status for i in ids} == {"pending"}
    assert {delivery_to(db, i, "a").status for i in ids} == {"delivered"}
    no_route = client.get("/dashboard/events/replay?destination=b&status=dead")
    assert no_route.status_code == 400
    assert "give the route too" in no_route.get_data(as_text=True)


# --- what the sender sees ---


def test_the_sender_never_sees_a_failing_destinations_name_url_or_answer(
    app, client, db, key, admin, receiver, receiver_b
):
    """An async fan-out whose b fails: b's error names its URL and its answer; the sender's
    GET /events/<id> shows the overall status (partial) and none of it."""
    app.config["STEP_TRIES"] = 1
    route_to_a_and_b(client, admin, receiver, receiver_b)
    receiver.script(Reply(200, {"backend": "answer-of-a-31"}))
    receiver_b.script(Reply(500, {"backend": "answer-of-b-77"}))
    (event_id,) = post(client, key, 1)
    drain(app)
    full = client.get(f"/admin/api/events/{event_id}", headers=admin).get_data(as_text=True)
    assert receiver_b.url in full and "answer-of-b-77" in full  # the admin sees them
    sent = client.get(f"/events/{event_id}", headers={"X-API-Key": key})
    assert sent.status_code == 200
    assert sent.json["status"] == "partial" and sent.json["accepted"] is True
    text = sent.get_data(as_text=True)
    for hidden in (receiver.url, receiver_b.url, "answer-of-a-31", "answer-of-b-77", '"b"'):
        assert hidden not in text, hidden
    assert not {"deliveries", "destinations", "result", "last_error"} & set(sent.json)


def test_the_figures_read_no_delivery_that_has_ended(app, db, add_route):
    """Each kind of waiting delivery is read along its own partial index: however many
    delivered ones the table keeps, showing a destination reads none of them."""
    add_route("orders", [{"connector": "text"}], mode="async")
    insert_events(db, "orders", 5_000, status="delivered")
    insert_events(db, "orders", 3, status="pending")
    query = destination_store.figures_query("orders", ["default"], utcnow(), 10_000)
    with db.engine.begin() as conn:
        sql = str(query.compile(conn, compile_kwargs={"literal_binds": True}))
        if db.dialect == "postgresql":
            conn.exec_driver_sql("ANALYZE deliveries")
            steps = [r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql)]
            reads = [s for s in steps if re.search(r"Scan .*\bon deliveries\b", s)]
            tables = [s for s in reads if "Seq Scan" in s]
        else:
            steps = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
            reads = [s for s in steps if re.match(r"(SCAN|SEARCH) deliveries\b", s)]
            tables = [s for s in reads if "INDEX" not in s]
    plan = "\n".join(steps)
    assert len(reads) == 4 and not tables, plan  # four index reads, no table read
    with db.session() as session:
        (view,) = destination_store.overview(session, "orders")
    assert (view.backlog["pending"], view.in_flight) == (3, 0)
