"""A paused destination holds its deliveries (the route keeps accepting webhooks, no run is
counted) and on resume they go out in the order they were received; disabling a route
refuses new webhooks but still delivers what it accepted."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from hub.services.delivery import Worker
from hub.store.models import Attempt, Delivery
from tests import test_destinations
from tests.rows import event_row

admin = test_destinations.admin  # fixtures
receiver_b = test_destinations.receiver_b
http = test_destinations.http
fan_out = test_destinations.fan_out


def post(client, key, n: int) -> list[str]:
    ids = []
    for i in range(n):
        answer = client.post("/hooks/orders", json={"n": i}, headers={"X-API-Key": key})
        assert answer.status_code == 202, answer.json
        ids.append(answer.json["id"])
    return ids


def drain(app, name: str = "drain") -> None:
    worker = Worker(app, name=name)
    while worker.run_once():
        pass


def deliveries_of(db, destination: str) -> list[Delivery]:
    with db.session() as session:
        return list(
            session.scalars(
                select(Delivery)
                .where(Delivery.destination == destination)
                .order_by(Delivery.created_at, Delivery.id)
            )
        )


def attempts_of(db, destination: str) -> int:
    with db.session() as session:
        return session.scalar(
            select(func.count())
            .select_from(Attempt)
            .join(Delivery, Delivery.id == Attempt.delivery_id)
            .where(Delivery.destination == destination)
        )


def test_a_paused_destination_holds_its_deliveries_and_resume_sends_them_in_order(
    app, client, db, key, admin, receiver, receiver_b
):
    fan_out(client, admin, receiver, receiver_b)
    paused = client.post(
        "/admin/api/routes/orders/destinations/b/pause",
        json={"reason": "receiver upgrade"},
        headers=admin,
    )
    assert paused.status_code == 200, paused.json
    assert paused.json["state"] == "paused" and paused.json["state_reason"] == "receiver upgrade"
    assert paused.json["state_changed_at"] and paused.json["held"] == 0

    ids = post(client, key, 3)
    # Held from the start, before any worker looks at them.
    assert [d.status for d in deliveries_of(db, "b")] == ["held"] * 3
    assert {event_row(db, i).status for i in ids} == {"pending"}

    drain(app)
    assert [r.json() for r in receiver.requests] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert receiver_b.requests == []
    held = deliveries_of(db, "b")
    assert [(d.status, d.attempts) for d in held] == [("held", 0)] * 3
    assert attempts_of(db, "b") == 0
    assert [event_row(db, i).status for i in ids] == ["held"] * 3
    shown = client.get(f"/admin/api/events/{ids[0]}", headers=admin).json
    assert shown["status"] == "held"
    assert {d["destination"]: d["status"] for d in shown["deliveries"]} == {
        "a": "delivered",
        "b": "held",
    }
    listed = client.get("/admin/api/events?status=held", headers=admin).json
    assert sorted(e["id"] for e in listed["events"]) == sorted(ids)

    again = client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    assert again.status_code == 200
    assert again.json["held"] == 3 and again.json["state_reason"] == "receiver upgrade"
    assert again.json["state_changed_at"] == paused.json["state_changed_at"]

    resumed = client.post("/admin/api/routes/orders/destinations/b/resume", headers=admin)
    assert resumed.status_code == 200, resumed.json
    assert resumed.json["state"] == "active" and resumed.json["held"] == 0
    drain(app)
    assert [r.json() for r in receiver_b.requests] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 3
    assert len(receiver.requests) == 3


def test_pausing_waiting_deliveries_holds_them(app, client, db, key, admin, receiver, receiver_b):
    """Deliveries already pending when the pause comes are held, not called."""
    fan_out(client, admin, receiver, receiver_b)
    ids = post(client, key, 2)
    paused = client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    assert paused.json["held"] == 2
    drain(app)
    assert receiver_b.requests == [] and len(receiver.requests) == 2
    assert [event_row(db, i).status for i in ids] == ["held"] * 2


def test_unknown_route_or_destination_is_404(client, admin, receiver, receiver_b):
    fan_out(client, admin, receiver, receiver_b)
    for path in ("nope/destinations/b", "orders/destinations/nope"):
        for action in ("pause", "resume"):
            answer = client.post(f"/admin/api/routes/{path}/{action}", headers=admin)
            assert answer.status_code == 404
            assert answer.json["error"]


def test_pause_and_resume_from_the_cli(app, client, db, key, admin, receiver, receiver_b):
    fan_out(client, admin, receiver, receiver_b)
    cli = app.test_cli_runner()
    paused = cli.invoke(args=["routes", "pause", "orders", "b", "--reason", "maintenance"])
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.output)["state"] == "paused"
    ids = post(client, key, 2)
    drain(app)
    assert receiver_b.requests == [] and len(receiver.requests) == 2
    resumed = cli.invoke(args=["routes", "resume", "orders", "b"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output)["state"] == "active"
    drain(app)
    assert [r.json() for r in receiver_b.requests] == [{"n": 0}, {"n": 1}]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 2
    unknown = cli.invoke(args=["routes", "pause", "orders", "nope"])
    assert unknown.exit_code != 0 and "no destination" in unknown.output


def test_a_stale_route_cache_in_another_process_still_makes_no_call(
    app, client, db, key, admin, receiver, receiver_b
):
    """Another process cached the route while b was active: its intake creates b's
    delivery pending, and its worker, whose cache still says active, finds the pause in the
    database and holds the delivery without a run or an attempt."""
    from hub import create_app

    fan_out(client, admin, receiver, receiver_b)
    stale = create_app({**{k: app.config[k] for k in ("TESTING", "DATABASE_URL", "SECRET_KEY")},
                        "ROUTE_CACHE_SECONDS": 300})  # fmt: skip
    try:
        sender = stale.test_client()
        post(sender, key, 1)  # the route, b active, now in its cache
        drain(stale, "stale-1")
        assert len(receiver_b.requests) == 1
        assert (
            client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin).status_code
            == 200
        )
        [event_id] = post(sender, key, 1)
        drain(stale, "stale-2")
    finally:
        stale.extensions["hub.db"].dispose()
    assert len(receiver_b.requests) == 1 and len(receiver.requests) == 2
    second = deliveries_of(db, "b")[1]
    assert (second.status, second.attempts) == ("held", 0)
    assert attempts_of(db, "b") == 1
    assert event_row(db, event_id).status == "held"


def test_a_disabled_route_still_delivers_what_it_accepted(app, client, db, key, admin, receiver):
    route = {"name": "orders", "mode": "async", "steps": http(receiver)}
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    [event_id] = post(client, key, 1)
    disabled = client.patch("/admin/api/routes/orders", json={"enabled": False}, headers=admin)
    assert disabled.status_code == 200, disabled.json
    refused = client.post("/hooks/orders", json={"n": 9}, headers={"X-API-Key": key})
    assert refused.status_code == 404
    drain(app)
    assert [r.json() for r in receiver.requests] == [{"n": 0}]
    assert event_row(db, event_id).status == "delivered"


def test_pause_and_resume_from_the_dashboard(app, client, db, key, admin, receiver, receiver_b):
    from tests.test_dashboard import sign_in, token

    fan_out(client, admin, receiver, receiver_b)
    dashboard = app.test_client()
    assert sign_in(dashboard, admin["Authorization"].split()[1]).status_code == 303
    page = "/dashboard/routes/orders"
    shown = dashboard.get(page).get_data(as_text=True)
    assert 'id="destination-b"' in shown and 'id="pause-b"' in shown
    paused = dashboard.post(
        f"{page}/destinations/b/pause",
        data={"csrf_token": token(dashboard, page), "reason": "upgrade"},
    )
    assert paused.status_code == 303
    ids = post(client, key, 2)
    drain(app)
    assert receiver_b.requests == [] and len(receiver.requests) == 2
    shown = dashboard.get(page).get_data(as_text=True)
    assert 'id="resume-b"' in shown and "2 held" in shown and "upgrade" in shown
    resumed = dashboard.post(
        f"{page}/destinations/b/resume", data={"csrf_token": token(dashboard, page)}
    )
    assert resumed.status_code == 303
    drain(app)
    assert [r.json() for r in receiver_b.requests] == [{"n": 0}, {"n": 1}]
    assert [event_row(db, i).status for i in ids] == ["delivered"] * 2


def test_metrics_count_held_deliveries(app, client, key, admin, receiver, receiver_b):
    fan_out(client, admin, receiver, receiver_b)
    client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    post(client, key, 2)
    scraped = client.get("/metrics", headers=admin).get_data(as_text=True)
    assert "hub_queue_held_deliveries 2.0" in scraped


def test_a_delivery_called_when_the_pause_comes_is_held_instead_of_retried(
    app, client, db, key, admin, receiver, receiver_b
):
    """The call in progress finishes; its retryable failure makes it held, not retrying,
    and the resume sends it again."""
    import threading
    import time

    from tests.servers import Reply

    app.config["STEP_TRIES"] = 1
    fan_out(client, admin, receiver, receiver_b)
    receiver_b.script(Reply(500, {"down": True}, delay=1.0))
    [event_id] = post(client, key, 1)
    worker = Worker(app, name="mid-call")
    b_id = deliveries_of(db, "b")[0].id
    for _ in range(2):
        [claimed] = worker.claim(limit=1)
        if claimed != b_id:
            worker.process(claimed)  # a's
    runs = [threading.Thread(target=worker.process, args=(b_id,))]
    for run in runs:
        run.start()
    end = time.monotonic() + 10
    while not receiver_b.requests and time.monotonic() < end:
        time.sleep(0.01)
    assert (
        client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin).json["held"]
        == 0
    )  # being called: not waiting
    for run in runs:
        run.join(10)
    [b] = deliveries_of(db, "b")
    assert (b.status, b.attempts) == ("held", 1) and attempts_of(db, "b") == 1
    assert event_row(db, event_id).status == "held"
    client.post("/admin/api/routes/orders/destinations/b/resume", headers=admin)
    drain(app)
    assert len(receiver_b.requests) == 2
    assert event_row(db, event_id).status == "delivered"


def test_a_sync_route_whose_first_destination_is_paused_answers_202_held(
    app, client, db, key, admin, receiver
):
    """A paused destination is not called, even by a sync route's request: the sender hears
    202 with the event held (as from an async route), and the resume delivers it."""
    route = {"name": "orders", "mode": "sync", "steps": http(receiver)}
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    pause = "/admin/api/routes/orders/destinations/default/pause"
    assert client.post(pause, json={}, headers=admin).status_code == 200
    answer = client.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
    assert answer.status_code == 202, answer.json
    assert answer.json["status"] == "held" and "status_url" in answer.json
    drain(app)
    assert receiver.requests == []
    resume = "/admin/api/routes/orders/destinations/default/resume"
    assert client.post(resume, headers=admin).status_code == 200
    drain(app)
    assert [r.json() for r in receiver.requests] == [{"n": 1}]
    assert event_row(db, answer.json["id"]).status == "delivered"


def test_a_pause_committed_while_a_claimed_group_waits_holds_the_rest_of_it(
    app, client, db, key, admin, receiver, receiver_b, monkeypatch
):
    """Deliveries claimed together wait for their turn; one whose destination's state was
    read longer than PREFETCH_AGE ago reads it again before its call, with the rest of its
    group in one read, so a pause that came meanwhile holds them all."""
    import time

    from sqlalchemy import event

    from hub.services import delivery

    fan_out(client, admin, receiver, receiver_b)
    post(client, key, 3)
    worker = Worker(app, name="group")
    worker._quick.add("orders/b")  # as a receiver that answers fast makes it: claimed in groups
    b_ids = [d.id for d in deliveries_of(db, "b")]
    claimed: list[str] = []
    while not set(b_ids) <= set(claimed):  # read at the claim: active
        taken = worker.claim(limit=6)
        assert taken, "every delivery claimable"
        claimed += taken
    paused = client.post("/admin/api/routes/orders/destinations/b/pause", headers=admin)
    assert paused.json["held"] == 0  # claimed: not waiting in the database
    monkeypatch.setattr(delivery, "PREFETCH_AGE", 0.3)
    time.sleep(0.4)  # every claim's read is older than that now
    reads: list[str] = []

    def count(conn, cursor, statement, *args):
        if "breaker_probe FROM destinations JOIN routes" in " ".join(statement.split()):
            reads.append(statement)  # a read of destinations' states

    event.listen(db.engine, "before_cursor_execute", count)
    try:
        worker.process_group(b_ids)
    finally:
        event.remove(db.engine, "before_cursor_execute", count)
    assert receiver_b.requests == []
    assert [(d.status, d.attempts) for d in deliveries_of(db, "b")] == [("held", 0)] * 3
    assert len(reads) == 1, reads  # one read for the group's three
