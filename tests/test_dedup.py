"""Dedup that can't be abused: per route and per sender, only accepted deliveries count as
originals, and on signed routes the id the signature covers wins."""

from __future__ import annotations

import threading

from hub import signatures
from tests.procs import wait_until
from tests.rows import events
from tests.servers import Reply
from tests.test_sender_auth import verify_spec

SW_SECRET = verify_spec("standard-webhooks")["secrets"][0]


def forward(receiver) -> list[dict]:
    return [{"connector": "http", "config": {"url": receiver.url + "/in"}}]


def post(client, key, route="now", body=None, **headers):
    return client.post(
        f"/hooks/{route}", json=body or {"n": 1}, headers={"X-API-Key": key, **headers}
    )


def test_a_failed_sync_delivery_is_no_original_its_retry_runs(
    app, client, db, key, add_route, receiver
):
    """A sync event that failed (502) used to count as the original: the sender's retry was
    answered `duplicate` and dropped."""
    app.config["STEP_TRIES"] = 1
    add_route("now", forward(receiver))
    receiver.script(Reply(status=400, body={"error": "not now"}))
    failed = post(client, key, **{"Idempotency-Key": "order-1"})
    assert failed.status_code == 502
    retry = post(client, key, **{"Idempotency-Key": "order-1"})
    assert retry.status_code == 200, retry.json
    assert retry.json["status"] == "delivered" and retry.json["id"] != failed.json["id"]
    assert len(receiver.requests) == 2
    # Once delivered, the next copy is the duplicate of the delivered one.
    again = post(client, key, **{"Idempotency-Key": "order-1"})
    assert again.json == {"id": retry.json["id"], "duplicate": True}
    assert [e.status for e in events(db)] == ["failed", "delivered", "duplicate"]
    assert [e.response_status for e in events(db)] == [502, 200, 200]


def test_one_key_cannot_suppress_another_keys_delivery_or_learn_its_id(
    client, db, make_key, add_route, receiver
):
    add_route("now", forward(receiver))
    alice, mallory = make_key(name="alice"), make_key(name="mallory")
    first = post(client, alice, **{"Idempotency-Key": "shared-7"})
    assert first.status_code == 200
    other = post(client, mallory, **{"Idempotency-Key": "shared-7"})
    assert other.status_code == 200
    assert other.json.get("duplicate") is None and other.json["status"] == "delivered"
    assert first.json["id"] not in other.get_data(as_text=True)
    assert len(receiver.requests) == 2
    # Each key's own copy is still its duplicate.
    assert post(client, alice, **{"Idempotency-Key": "shared-7"}).json == {
        "id": first.json["id"],
        "duplicate": True,
    }
    assert post(client, mallory, **{"Idempotency-Key": "shared-7"}).json == {
        "id": other.json["id"],
        "duplicate": True,
    }


def sw_request(body: bytes, msg_id: str) -> dict:
    headers = signatures.sign("standard-webhooks", body=body, secret=SW_SECRET, msg_id=msg_id)
    return {**headers, "Content-Type": "application/json"}


def test_the_signed_webhook_id_wins_over_an_unsigned_idempotency_key(
    client, db, add_route, receiver
):
    """A captured Standard Webhooks request replayed with a new Idempotency-Key is still a
    copy: the id the signature covers is looked up first."""
    add_route("sw", forward(receiver), verify=verify_spec("standard-webhooks"))
    body = b'{"amount": 100}'
    captured = sw_request(body, "msg_captured")
    first = client.post("/hooks/sw", data=body, headers=captured)
    assert first.status_code == 200, first.json
    replay = client.post(
        "/hooks/sw", data=body, headers={**captured, "Idempotency-Key": "brand-new-id"}
    )
    assert replay.json == {"id": first.json["id"], "duplicate": True}
    # A new delivery, signed with its own id, runs.
    fresh = client.post("/hooks/sw", data=body, headers=sw_request(body, "msg_next"))
    assert fresh.json["status"] == "delivered"
    assert len(receiver.requests) == 2
    assert [e.dedup_key for e in events(db)] == ["msg_captured", "msg_captured", "msg_next"]


def test_a_copy_of_a_sync_delivery_still_running_is_told_to_retry(
    app, client, db, key, add_route, receiver
):
    """The first copy may still fail, so a concurrent copy is not answered `duplicate`: 409
    with Retry-After, and once the first delivered, the next copy is its duplicate."""
    add_route("now", forward(receiver))
    receiver.script(Reply(body=None, delay=3.0))  # long enough for a copy on a busy machine
    answers = {}
    first = threading.Thread(
        target=lambda: answers.update(
            first=post(app.test_client(), key, **{"Idempotency-Key": "slow-1"})
        )
    )
    first.start()
    try:
        wait_until(lambda: [e.status for e in events(db)] == ["processing"], 10, what="a run")
        copy = post(client, key, **{"Idempotency-Key": "slow-1"})
        assert copy.status_code == 409
        assert copy.json["code"] == "in_progress" and copy.headers["Retry-After"].isdigit()
    finally:
        first.join(10)
    assert answers["first"].status_code == 200
    later = post(client, key, **{"Idempotency-Key": "slow-1"})
    assert later.json == {"id": answers["first"].json["id"], "duplicate": True}
    assert len(receiver.requests) == 1


def test_a_generic_request_id_header_names_no_delivery_but_a_provider_s_id_does(
    client, db, key, add_route, receiver
):
    """Proxies and clients set Request-ID for their own reasons: on a key route two different
    webhooks carrying the same one are two events. A provider's own id (GitHub's delivery
    id) still names a relayed delivery."""
    add_route("now", forward(receiver))
    first = post(client, key, body={"n": 1}, **{"Request-ID": "same"})
    second = post(client, key, body={"n": 2}, **{"Request-ID": "same"})
    assert first.status_code == second.status_code == 200
    assert second.json.get("duplicate") is None
    relayed = post(client, key, **{"X-GitHub-Delivery": "d-1"})
    again = post(client, key, **{"X-GitHub-Delivery": "d-1"})
    assert again.json == {"id": relayed.json["id"], "duplicate": True}
    assert len(receiver.requests) == 3
