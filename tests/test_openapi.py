"""The OpenAPI document: generated from the models, complete, and true of real answers."""

from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator

from hub.services.keys import create_key
from hub.store.models import Event, first_delivery_id, new_event_id, utcnow

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"
NEW_SECRET = "whsec_" + "bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldy1zZWNyZXQ"


@pytest.fixture
def document(client) -> dict:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.get_json()


def test_the_document_is_openapi_3_1_with_valid_schemas(document):
    assert document["openapi"] == "3.1.0"
    for name, schema in document["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_every_public_and_admin_endpoint_is_documented(app, document):
    """Each URL rule the app serves (but the docs themselves, /admin's catch-all, the
    dashboard's HTML pages, which are no API, and Prometheus's /metrics, which answers its
    text format, not the API's JSON) is in it."""
    documented = {
        (method.upper(), re.sub(r"\{(\w+)\}", r"<\1>", path))
        for path, ops in document["paths"].items()
        for method in ops
    }
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint in (
            "static",
            "openapi.openapi_json",
            "openapi.docs_page",
            "admin.unknown",
            "system.metrics_text",
        ):
            continue
        if rule.endpoint.startswith("dashboard"):
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", rule.rule).replace("<route_name>", "<route>")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            webhook = rule.endpoint.startswith(("hooks.", "seed."))
            handshake = method == "GET" and path == "/hooks/<route>"
            if webhook and method != "POST" and "events" not in path and not handshake:
                continue  # webhooks answer other methods only with 405
            served.add((method, path))
    assert served == documented


def test_the_docs_page_renders_the_document_without_anything_from_elsewhere(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'fetch("openapi.json")' in html
    assert "http://" not in html and "https://" not in html and "src=" not in html


def calls(client, admin, key, db, receiver) -> list[tuple[str, str, object]]:
    """A real request for each documented operation (several answers for some), in order."""
    out = []

    def call(method: str, template: str, url: str | None = None, **kwargs):
        response = client.open(url or template, method=method, **kwargs)
        out.append((method, template, response))
        return response

    event = Event(
        id=new_event_id(),
        route="orders",
        method="POST",
        path="/hooks/orders",
        received_at=utcnow(),
        headers={"content-type": "application/json"},
        body=b'{"n": 1}',
        status="failed",
        attempts=1,
        completed_at=utcnow(),
        key_prefix=key.split("_")[1],
    )
    with db.session() as session:
        session.add(event)
    a = {"headers": admin}
    call("GET", "/health")
    call("GET", "/ready")
    call("GET", "/admin/api/connectors", **a)
    call("GET", "/admin/api/providers", **a)
    made = call("POST", "/admin/api/keys", json={"name": "doc", "scopes": ["orders"]}, **a)
    prefix = made.get_json()["prefix"]
    call("POST", "/admin/api/keys", json={"name": ""}, **a)
    call("POST", "/admin/api/keys", json={"name": "x"})
    call("GET", "/admin/api/keys", **a)
    call("GET", "/admin/api/keys", headers={"X-API-Key": key})
    call("GET", "/admin/api/keys/{prefix}", f"/admin/api/keys/{prefix}", **a)
    call("GET", "/admin/api/keys/{prefix}", "/admin/api/keys/nope", **a)
    call("DELETE", "/admin/api/keys/{prefix}", f"/admin/api/keys/{prefix}", **a)
    route = {
        "name": "orders",
        "mode": "sync",
        "steps": [{"connector": "http", "config": {"url": receiver.url}}],
    }
    call("POST", "/admin/api/routes", json=route, **a)
    call("POST", "/admin/api/routes", json=route, **a)
    call("POST", "/admin/api/routes", json={"name": "bad", "steps": [{"connector": "x"}]}, **a)
    call("GET", "/admin/api/routes", **a)
    call("GET", "/admin/api/routes/{name}", "/admin/api/routes/orders", **a)
    call(
        "PATCH", "/admin/api/routes/{name}", "/admin/api/routes/orders", json={"mode": "async"}, **a
    )
    signed = {"verify": {"scheme": "standard-webhooks", "secrets": [SECRET]}}
    call("PUT", "/admin/api/routes/{name}", "/admin/api/routes/signed", json=signed, **a)
    call("PUT", "/admin/api/routes/{name}", "/admin/api/routes/signed", json=signed, **a)
    secrets = "/admin/api/routes/signed/secrets"
    call("POST", "/admin/api/routes/{name}/secrets", secrets, json={"secret": NEW_SECRET}, **a)
    call("DELETE", "/admin/api/routes/{name}/secrets/{which}", secrets + "/1", **a)
    call("DELETE", "/admin/api/routes/{name}/secrets/{which}", secrets + "/1", **a)
    pause = "/admin/api/routes/{name}/destinations/{destination}/pause"
    resume = "/admin/api/routes/{name}/destinations/{destination}/resume"
    default = "/admin/api/routes/orders/destinations/default"
    call("POST", pause, default + "/pause", json={"reason": "upgrade"}, **a)
    call("POST", pause, default + "/pause", **a)  # no body, already paused
    call("POST", pause, default + "/pause", json={"reason": 5}, **a)
    call("POST", resume, default + "/resume", **a)
    call("POST", resume, "/admin/api/routes/orders/destinations/nope/resume", **a)
    circuit = "/admin/api/routes/{name}/destinations/{destination}/"
    call("POST", circuit + "open", default + "/open", **a)  # no breaker: 409
    call("POST", circuit + "close", default + "/close", json={"reason": "x"}, **a)
    call("POST", circuit + "close", "/admin/api/routes/orders/destinations/nope/close", **a)
    call("GET", circuit + "changes", default + "/changes", query_string={"limit": 5}, **a)
    call("GET", circuit + "changes", default + "/changes", query_string={"limit": 0}, **a)
    call("GET", circuit + "changes", "/admin/api/routes/orders/destinations/nope/changes", **a)
    listed = "/admin/api/routes/{name}/destinations"
    call("GET", listed, "/admin/api/routes/orders/destinations", **a)
    call("GET", listed, "/admin/api/routes/nope/destinations", **a)
    call("GET", listed + "/{destination}", default, **a)
    call("GET", listed + "/{destination}", "/admin/api/routes/orders/destinations/nope", **a)
    call("DELETE", "/admin/api/routes/{name}", "/admin/api/routes/signed", **a)
    call("GET", "/admin/api/events", query_string={"limit": 1}, **a)
    call("GET", "/admin/api/events", query_string={"q": "n", "route": "orders"}, **a)
    call("GET", "/admin/api/events", query_string={"cursor": "x"}, **a)
    call("GET", "/admin/api/events", query_string={"status": "x"}, **a)
    call("GET", "/admin/api/events/{event_id}", f"/admin/api/events/{event.id}", **a)
    call("POST", "/admin/api/events/{event_id}/replay", f"/admin/api/events/{event.id}/replay", **a)
    call("POST", "/admin/api/events/{event_id}/replay", f"/admin/api/events/{event.id}/replay", **a)
    skip = "/admin/api/deliveries/{delivery_id}/skip"
    replayed = "/admin/api/deliveries/dlv_" + event.id[4:] + "/skip"  # the replay made it
    call("POST", skip, replayed, **a)
    call("POST", skip, replayed, **a)  # ended already: 409
    call("POST", skip, "/admin/api/deliveries/dlv_nope/skip", **a)
    call("POST", "/admin/api/events/replay", json={}, **a)
    call("POST", "/admin/api/events/replay", json={"route": "orders"}, **a)
    aimed = {"route": "orders", "destination": "default", "status": "dead"}
    call("POST", "/admin/api/events/replay", json=aimed, **a)
    call("POST", "/admin/api/events/replay", json={"destination": "default"}, **a)
    one = "/admin/api/deliveries/{delivery_id}/replay"
    call("POST", one, f"/admin/api/deliveries/{first_delivery_id(event.id)}/replay", **a)
    call("POST", one, "/admin/api/deliveries/dlv_nope/replay", **a)
    call("GET", "/admin/api/stats", query_string={"since": "1h"}, **a)
    listened = "/listen/routes/{name}"
    call("GET", listened, "/listen/routes/orders", query_string={"wait": 0}, **a)
    far = {"wait": 0, "after": "evt_" + "z" * 26}  # an id from no time a clock can read
    call("GET", listened, "/listen/routes/orders", query_string=far, **a)
    call("GET", listened, "/listen/routes/orders", query_string={"after": "x"}, **a)
    call("GET", listened, "/listen/routes/nowhere", query_string={"wait": 0}, **a)
    with db.session() as session:
        _, elsewhere = create_key(session, "elsewhere", ["elsewhere"], None, None)
    call("GET", listened, "/listen/routes/orders", headers={"X-API-Key": elsewhere})
    one_event = "/listen/events/{event_id}"
    call("GET", one_event, f"/listen/events/{event.id}", **a)
    call("GET", one_event, "/listen/events/evt_nope", **a)
    answers = one_event + "/answers"
    answered = {"status": 200, "duration_ms": 12}
    call("POST", answers, f"/listen/events/{event.id}/answers", json=answered, **a)
    call("POST", answers, f"/listen/events/{event.id}/answers", json={"status": 1000}, **a)
    call("POST", answers, "/listen/events/evt_nope/answers", json=answered, **a)
    channels = "/admin/api/alert-channels"
    hook = {"name": "ops", "kind": "webhook", "url": receiver.url}
    call("POST", channels, json=hook, **a)
    call("POST", channels, json=hook, **a)  # exists: 409
    call("POST", channels, json={"name": "mail", "kind": "email"}, **a)  # no host: 422
    call("GET", channels, **a)
    call("POST", channels + "/{channel}/test", channels + "/ops/test", **a)
    call("POST", channels + "/{channel}/test", channels + "/nope/test", **a)
    rules = "/admin/api/alert-rules"
    late = {"name": "late", "kind": "oldest_due", "threshold": 60, "channels": ["ops"]}
    call("POST", rules, json=late, **a)
    call("POST", rules, json=late, **a)  # exists: 409
    call("POST", rules, json={"name": "x", "kind": "failure_ratio"}, **a)  # no threshold: 422
    call("GET", rules, **a)
    call("PATCH", rules + "/{rule}", rules + "/late", json={"enabled": False}, **a)
    call("PATCH", rules + "/{rule}", rules + "/nope", json={"enabled": True}, **a)
    call("DELETE", rules + "/{rule}", rules + "/dead-deliveries", **a)
    call("DELETE", rules + "/{rule}", rules + "/nope", **a)
    call("GET", "/admin/api/alerts", query_string={"limit": 5}, **a)
    call("GET", "/admin/api/alerts", query_string={"limit": 0}, **a)
    call("GET", "/admin/api/audit", query_string={"limit": 2}, **a)
    call("GET", "/admin/api/audit", query_string={"action": "key", "since": "1h"}, **a)
    call("GET", "/admin/api/audit", query_string={"since": "yesterday-ish"}, **a)  # 422
    call("GET", "/admin/api/audit", query_string={"cursor": "x"}, **a)  # 400
    call("DELETE", channels + "/{channel}", channels + "/ops", **a)
    call("DELETE", channels + "/{channel}", channels + "/ops", **a)
    call("GET", "/events/{event_id}", f"/events/{event.id}", headers={"X-API-Key": key})
    call("GET", "/events/{event_id}", f"/events/{event.id}", **a)  # the admin's whole view
    call("GET", "/events/{event_id}", "/events/evt_nope", headers={"X-API-Key": key})
    call("GET", "/events/{event_id}", f"/events/{event.id}")
    call(
        "PATCH", "/admin/api/routes/{name}", "/admin/api/routes/orders", json={"mode": "sync"}, **a
    )
    call("POST", "/hooks/{route}", "/hooks/orders", json={"n": 2}, headers={"X-API-Key": key})
    call("POST", "/hooks/{route}", "/hooks/orders", json={"n": 2})
    call("POST", "/hooks/{route}", "/hooks/nowhere", json={}, headers={"X-API-Key": key})
    dropbox = {"verify": {"scheme": "dropbox", "secrets": ["app-secret"]}}
    call("PUT", "/admin/api/routes/{name}", "/admin/api/routes/box", json=dropbox, **a)
    call("GET", "/hooks/{route}", "/hooks/box?challenge=abc")  # text/plain
    call("GET", "/hooks/{route}", "/hooks/box?challenge=" + "x" * 600)
    call("GET", "/hooks/{route}", "/hooks/orders?challenge=abc")
    call("POST", "/api/process", json={"input": "hello"}, headers={"X-API-Key": key})
    call("POST", "/api/process", json={}, headers={"X-API-Key": key})
    call("POST", "/api/chat", json={"message": "hi"}, headers={"X-API-Key": key})
    call("POST", "/api/chat", json={}, headers={"X-API-Key": key})
    return out


def test_every_operation_answers_as_the_document_says(
    client, document, make_key, key, db, receiver, seed_routes
):
    admin = {"X-API-Key": make_key(admin=True, name="admin")}
    answered = calls(client, admin, key, db, receiver)
    operations = {(m.upper(), p) for p, ops in document["paths"].items() for m in ops}
    assert {(m, t) for m, t, _ in answered} == operations  # every operation was called
    for method, template, response in answered:
        op = document["paths"][template][method.lower()]
        status = str(response.status_code)
        assert status in op["responses"], (method, template, status, response.get_json())
        content = op["responses"][status]["content"]
        if "text/plain" in content:
            assert response.mimetype == "text/plain", (method, template, status)
            continue
        schema = content["application/json"]["schema"]
        validator = Draft202012Validator({**schema, "components": document["components"]})
        problems = [e.message for e in validator.iter_errors(response.get_json())]
        assert not problems, (method, template, status, problems)
