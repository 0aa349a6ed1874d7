"""A route fans out to destinations, each delivered on its own: a destination that was
reached is never called again because another one failed."""

from __future__ import annotations

import json
import threading
import time

import pytest
from sqlalchemy import select, update

from hub.services.delivery import Worker, rollup
from hub.store.models import Delivery, EventStatus
from hub.testing_servers import Receiver
from tests.rows import event_row
from tests.servers import Reply


@pytest.fixture
def admin(make_key) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(admin=True)}"}


@pytest.fixture
def receiver_b():
    with Receiver() as server:
        yield server


def http(receiver) -> list[dict]:
    return [{"connector": "http", "config": {"url": receiver.url + "/in"}}]


def fan_out(client, admin, receiver, receiver_b) -> dict:
    """Route "orders", async, to destinations a and b (an http step to each receiver)."""
    route = {
        "name": "orders",
        "mode": "async",
        "destinations": [
            {"name": "a", "steps": http(receiver)},
            {"name": "b", "steps": http(receiver_b)},
        ],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    return route


def wait_until(check, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def deliver(app, db, event_id: str, threads: int = 2) -> None:
    """Run a worker until the event is delivered."""
    worker = Worker(app, name="deliver")
    worker.start(threads)
    try:
        wait_until(lambda: event_row(db, event_id).status == "delivered")
    finally:
        worker.stop(grace=5)


def test_a_destination_reached_is_not_called_again_while_another_is_retried(
    app, client, db, key, admin, receiver, receiver_b
):
    """A receives the webhook exactly once; B answers 500 twice, is retried on its own
    schedule and gets it on its third call; the event ends delivered, and the admin API
    shows both deliveries with their calls."""
    app.config["STEP_TRIES"] = 1  # one call a run: each 500 is a durable retry
    route = {
        "name": "orders",
        "mode": "async",
        "destinations": [
            {"name": "a", "steps": http(receiver)},
            {"name": "b", "steps": http(receiver_b), "retry_schedule": [1, 1, 1]},
        ],
    }
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.json
    assert [d["name"] for d in created.json["destinations"]] == ["a", "b"]
    receiver_b.script(Reply(500, {"down": True}), Reply(500, {"down": True}))

    answer = client.post("/hooks/orders", json={"order": 1}, headers={"X-API-Key": key})
    assert answer.status_code == 202
    event_id = answer.json["id"]
    deliver(app, db, event_id)

    assert len(receiver.requests) == 1
    assert len(receiver_b.requests) == 3
    assert receiver.requests[0].json() == receiver_b.requests[-1].json() == {"order": 1}

    shown = client.get(f"/admin/api/events/{event_id}", headers=admin).json
    assert shown["status"] == "delivered"
    deliveries = {d["destination"]: d for d in shown["deliveries"]}
    assert [d["destination"] for d in shown["deliveries"]] == ["a", "b"]
    assert deliveries["a"]["status"] == "delivered"
    assert [a["outcome"] for a in deliveries["a"]["attempts"]] == ["ok"]
    assert deliveries["b"]["status"] == "delivered"
    assert [a["outcome"] for a in deliveries["b"]["attempts"]] == ["retryable", "retryable", "ok"]
    assert [a["http_status"] for a in deliveries["b"]["attempts"]] == [500, 500, 200]
    assert [a["run"] for a in deliveries["b"]["attempts"]] == [1, 2, 3]

    # `events show` lists them too.
    cli = app.test_cli_runner().invoke(args=["events", "show", event_id])
    assert [d["status"] for d in json.loads(cli.output)["deliveries"]] == ["delivered"] * 2

    # What the sender sees: acceptance and overall status, no destination.
    sender = client.get(f"/events/{event_id}", headers={"X-API-Key": key}).json
    assert sender["status"] == "delivered" and "deliveries" not in sender


def test_a_route_given_steps_is_one_default_destination(client, admin, receiver):
    """Today's route bodies keep working, and their JSON keeps its top-level steps."""
    route = {"name": "plain", "mode": "async", "steps": http(receiver), "retry_schedule": [5]}
    created = client.post("/admin/api/routes", json=route, headers=admin).json
    assert created["steps"] == http(receiver) and created["retry_schedule"] == [5]
    assert created["destinations"] == [
        {
            "name": "default",
            "steps": http(receiver),
            "filter": None,
            "retry_schedule": [5],
            "max_in_flight": None,
            "rate": None,
            "ordering_key": None,
            "breaker": None,
        }
    ]
    # What GET shows can be sent back as it is.
    again = client.put("/admin/api/routes/plain", json=created, headers=admin)
    assert again.status_code == 200, again.json
    patched = client.patch("/admin/api/routes/plain", json={"filter": "true"}, headers=admin)
    assert patched.json["destinations"][0]["filter"] == "true"


def test_a_destination_takes_its_delivery_controls_and_shows_them_back(client, admin, receiver):
    controls = {
        "max_in_flight": 4,
        "rate": "10/s",
        "ordering_key": "{{ payload.customer.id }}",
        "breaker": {},
    }
    route = {
        "name": "controlled",
        "mode": "async",
        "destinations": [{"name": "default", "steps": http(receiver), **controls}],
    }
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.json
    shown = created.json["destinations"][0]
    assert {key: shown[key] for key in controls} == {
        **controls,
        "rate": "10/second",
        "breaker": {"failures": 5, "cool_down": 30, "max_cool_down": 3600},
    }
    # A "default" destination with controls is shown as a destination, not as plain steps,
    # so sending back what GET shows keeps them.
    assert created.json["steps"] is None
    again = client.put("/admin/api/routes/controlled", json=created.json, headers=admin)
    assert again.status_code == 200, again.json
    assert again.json["destinations"] == [shown]

    bad = {
        "name": "bad",
        "destinations": [
            {
                "name": "a",
                "max_in_flight": 0,
                "rate": "fast",
                "breaker": {"cool_down": 60, "max_cool_down": 10},
            }
        ],
    }
    answer = client.post("/admin/api/routes", json=bad, headers=admin)
    assert answer.status_code == 422
    text = str(answer.json)
    assert "destinations[0].max_in_flight" in text
    assert "destinations[0].rate" in text and "not a rate" in text
    assert "max_cool_down must be at least cool_down" in text


def test_destination_problems_name_their_place(client, admin, receiver):
    route = {
        "name": "bad",
        "destinations": [
            {"name": "a", "steps": http(receiver)},
            {"name": "b", "steps": [{"config": {}}]},
            {"name": "a", "steps": []},
            {"name": "Not A Slug", "steps": []},
        ],
    }
    answer = client.post("/admin/api/routes", json=route, headers=admin)
    assert answer.status_code == 422
    text = str(answer.json)
    assert "destinations[1].steps[0].connector" in text
    assert "destinations[3].name" in text
    route["destinations"] = [route["destinations"][0], {"name": "b"}, {"name": "a"}]
    answer = client.post("/admin/api/routes", json=route, headers=admin)
    assert "destinations[2].name: 'a' is the name of another destination" in str(answer.json)
    both = {"name": "both", "steps": http(receiver), "destinations": [{"name": "x"}]}
    answer = client.post("/admin/api/routes", json=both, headers=admin)
    assert answer.status_code == 422 and "inside each destination" in str(answer.json)


def test_two_deliveries_ending_at_once_both_count_in_the_event(
    client, db, key, admin, receiver, receiver_b
):
    """Each ending locks the event before reading its deliveries: the second waits for the
    first's commit and sees it, so the event does not stay `processing`."""
    route = {
        "name": "pair",
        "mode": "async",
        "destinations": [{"name": "a", "steps": http(receiver)}, {"name": "b", "steps": []}],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    event_id = client.post("/hooks/pair", json={}, headers={"X-API-Key": key}).json["id"]
    with db.session() as session:
        ids = list(
            session.scalars(
                select(Delivery.id).where(Delivery.event_id == event_id).order_by(Delivery.position)
            )
        )
        session.execute(update(Delivery).values(status=EventStatus.PROCESSING))
    ended = {"status": EventStatus.DELIVERED, "completed_at": event_row(db, event_id).received_at}

    first = db.engine.connect()
    first.begin()
    first.execute(update(Delivery).where(Delivery.id == ids[0]).values(**ended))
    rollup(first, event_id, ids[0])  # holds the event's row until it commits

    def second_ends() -> None:
        with db.engine.begin() as second:
            second.execute(update(Delivery).where(Delivery.id == ids[1]).values(**ended))
            rollup(second, event_id, ids[1])

    other = threading.Thread(target=second_ends)
    other.start()
    time.sleep(0.5)  # the second reaches the event's lock (or SQLite's write lock) and waits
    first.commit()
    first.close()
    other.join(10)
    assert event_row(db, event_id).status == "delivered"


def test_a_sync_route_answers_with_its_first_destination_and_queues_the_others(
    app, client, db, key, admin, receiver
):
    route = {
        "name": "shout",
        "mode": "sync",
        "destinations": [
            {"name": "answer", "steps": [{"connector": "text"}]},
            {"name": "copy", "steps": http(receiver)},
        ],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    answer = client.post("/hooks/shout", json={"input": "hi"}, headers={"X-API-Key": key})
    assert answer.status_code == 200
    assert answer.json["result"]["processed"] == "HI"
    assert receiver.requests == []  # the other destination is the workers'
    event_id = answer.json["id"]
    assert event_row(db, event_id).status == "pending"
    assert Worker(app, name="after").run_once() == 1
    assert len(receiver.requests) == 1
    event = event_row(db, event_id)
    assert (event.status, event.result["processed"]) == ("delivered", "HI")
    shown = client.get(f"/admin/api/events/{event_id}", headers=admin).json
    assert [(d["destination"], d["status"]) for d in shown["deliveries"]] == [
        ("answer", "delivered"),
        ("copy", "delivered"),
    ]


def test_a_replay_calls_again_only_the_destinations_not_reached(
    app, client, db, key, admin, receiver, receiver_b
):
    app.config["STEP_TRIES"] = 1
    route = {
        "name": "pair",
        "mode": "async",
        "destinations": [
            {"name": "a", "steps": http(receiver)},
            {"name": "b", "steps": http(receiver_b), "retry_schedule": []},
        ],
    }
    assert client.post("/admin/api/routes", json=route, headers=admin).status_code == 201
    receiver_b.script(Reply(500, {"down": True}))
    event_id = client.post("/hooks/pair", json={}, headers={"X-API-Key": key}).json["id"]
    worker = Worker(app, name="once")
    worker.run_once()
    event = event_row(db, event_id)
    assert event.status == "partial" and "500" in event.last_error
    assert client.post(f"/admin/api/events/{event_id}/replay", headers=admin).status_code == 200
    worker.run_once()
    assert (len(receiver.requests), len(receiver_b.requests)) == (1, 2)
    assert event_row(db, event_id).status == "delivered"


def test_a_process_with_a_stale_route_cache_still_accepts_after_a_destination_is_removed(
    app, client, db, key, admin, receiver, receiver_b
):
    """Another process still has the route with both destinations in its cache when an admin
    removes one: its next webhook is accepted all the same (no row that fails to insert, no
    batch of other senders' events failed with it), and the delivery to the removed
    destination ends with a sentence saying so."""
    from hub import create_app

    route = fan_out(client, admin, receiver, receiver_b)
    stale = create_app({**{k: app.config[k] for k in ("TESTING", "DATABASE_URL", "SECRET_KEY")},
                        "ROUTE_CACHE_SECONDS": 300})  # fmt: skip
    try:
        sender = stale.test_client()
        first = sender.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
        assert first.status_code == 202  # the route, both destinations, now in its cache
        only_a = {**route, "destinations": route["destinations"][:1]}
        assert client.put("/admin/api/routes/orders", json=only_a, headers=admin).status_code == 200
        second = sender.post("/hooks/orders", json={"n": 2}, headers={"X-API-Key": key})
        assert second.status_code == 202, second.json
    finally:
        stale.extensions["hub.db"].dispose()

    worker = Worker(app, name="after-removal")
    worker.start(2)
    try:
        wait_until(lambda: event_row(db, second.json["id"]).status in ("partial", "dead"))
    finally:
        worker.stop(grace=5)
    shown = client.get(f"/admin/api/events/{second.json['id']}", headers=admin).json
    ended = {d["destination"]: d for d in shown["deliveries"]}
    assert ended["a"]["status"] == "delivered"
    assert ended["b"]["status"] == "failed"
    assert "no longer exists" in ended["b"]["last_error"]


def test_the_sender_sees_its_events_status_never_the_destinations(
    app, client, db, key, admin, receiver, receiver_b
):
    """GET /events/<id> with the key that sent the event answers its acceptance and overall
    status: no destination's name, URL, forwarded header or answer, no attempt, even for a
    sync route whose POST answered with its first destination's result."""
    receiver.script(Reply(200, {"backend": "internal-answer-77"}))
    forward = {
        "url": receiver.url + "/internal/crm",
        "headers": {"X-Trace": "trace-value-42", "Authorization": "Bearer crm-token-9"},
    }
    route = {
        "name": "orders",
        "mode": "sync",
        "destinations": [
            {"name": "crm", "steps": [{"connector": "http", "config": forward}]},
            {"name": "archive", "steps": http(receiver_b)},
        ],
    }
    created = client.post("/admin/api/routes", json=route, headers=admin)
    assert created.status_code == 201, created.json
    answer = client.post("/hooks/orders", json={"order": 1}, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.json
    event_id = answer.json["id"]
    deliver(app, db, event_id, threads=1)
    assert receiver.requests[0].headers["x-trace"] == "trace-value-42"
    # An admin sees where it went (so the sender's view below has something to hide).
    full = client.get(f"/events/{event_id}", headers=admin).get_data(as_text=True)
    assert "/internal/crm" in full and "internal-answer-77" in full

    sent = client.get(f"/events/{event_id}", headers={"X-API-Key": key})
    assert sent.status_code == 200
    shown = sent.json
    assert shown["id"] == event_id and shown["status"] == "delivered" and shown["accepted"]
    assert shown["received_at"] and shown["completed_at"]
    text = sent.get_data(as_text=True)
    for hidden in (
        receiver.url,
        receiver_b.url,
        "/internal/crm",
        "trace-value-42",
        "crm-token-9",
        "internal-answer-77",
        '"crm"',
        '"archive"',
    ):
        assert hidden not in text, hidden
    assert not {"deliveries", "destinations", "result", "last_error"} & set(shown)
    assert not isinstance(shown.get("attempts"), list)  # a count of runs, never the calls


def test_an_event_that_fans_out_is_counted_once_when_its_last_delivery_ends(
    app, client, db, key, admin, receiver, receiver_b
):
    """hub_events_total counts events that reached an end state: one event to two
    destinations is one `delivered`, counted when the second delivery ends, not one per
    delivery."""
    from tests.test_metrics import parse, value

    fan_out(client, admin, receiver, receiver_b)

    def delivered() -> float:
        scraped = parse(client.get("/metrics", headers=admin).get_data(as_text=True))
        return value(scraped, "hub_events_total", route="orders", status="delivered")

    before = delivered()
    answer = client.post("/hooks/orders", json={"n": 1}, headers={"X-API-Key": key})
    assert answer.status_code == 202
    worker = Worker(app, name="count-once")
    while worker.run_once():
        pass
    assert event_row(db, answer.json["id"]).status == "delivered"
    assert len(receiver.requests) == len(receiver_b.requests) == 1
    assert delivered() - before == 1
