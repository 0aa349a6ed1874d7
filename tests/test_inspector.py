"""The developer's inspector on the dashboard, through Flask's test client on SQLite and
PostgreSQL: each attempt's call read as HTTP, the webhook copied as a curl command (parsed,
and run by the real curl against a real receiver), and test events sent from a route's page
through the same intake as a webhook."""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import shlex
import shutil
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import func, null, select, update

from hub.services import intake
from hub.store.models import Attempt, Event, new_event_id, utcnow
from tests.servers import Reply
from tests.test_dashboard import sign_in, token

CURL = shutil.which("curl")


@pytest.fixture
def admin_key(make_key) -> str:
    return make_key(admin=True, name="admin")


@pytest.fixture
def signed_in(client, admin_key):
    assert sign_in(client, admin_key).status_code == 303
    return client


def text_of(html: str) -> str:
    """A page's markup with its entities read, to compare with what was sent."""
    return html_lib.unescape(html)


def attempt_block(html: str) -> str:
    return re.search(r'<li class="attempt outcome-\w+">(.*?)</li>', html, re.S).group(1)


def curl_of(html: str) -> str:
    return text_of(re.search(r'<pre class="curl" id="curl">(.*?)</pre>', html, re.S).group(1))


def events_count(db) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Event))


def latest_event(db, route: str) -> Event:
    with db.session() as session:
        event = session.scalars(
            select(Event).where(Event.route == route).order_by(Event.received_at.desc()).limit(1)
        ).one()
        session.expunge(event)
        return event


# --- attempts read as HTTP ---


def test_an_attempt_shows_its_request_and_response_as_http_with_json_indented(
    signed_in, add_route, make_key, receiver
):
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url + "/in?x=1"}}])
    sent = signed_in.post(
        "/hooks/fwd", json={"order": {"id": 7, "total": 12}}, headers={"X-API-Key": make_key()}
    )
    assert sent.status_code == 200, sent.get_json()
    html = signed_in.get(f"/dashboard/events/{sent.get_json()['id']}").get_data(as_text=True)
    attempt = text_of(attempt_block(html))
    request = re.search(r'exchange-request">(.*?)</details>\s*</details>', attempt, re.S).group(1)
    assert f"POST {receiver.url}/in?x=1" in request  # the request line
    assert re.search(r"<code>content-type</code></td><td[^>]*>application/json<", request, re.I)
    assert '{\n  "order": {\n    "id": 7,\n    "total": 12\n  }\n}' in request  # indented
    response = re.search(r'exchange-response">(.*?)</details>\s*</details>', attempt, re.S)
    assert "HTTP 200" in response.group(1)
    assert '{\n  "ok": true\n}' in response.group(1)  # the receiver's JSON answer, indented


def test_html_in_a_payload_is_shown_as_text_everywhere_on_the_event_page(
    signed_in, add_route, make_key, receiver
):
    add_route("evil", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    hostile = {"note": "</pre><script>alert(1)</script>", "x": "</details><img src=x onerror=a()>"}
    sent = signed_in.post(
        "/hooks/evil",
        json=hostile,
        headers={"X-API-Key": make_key(), "X-Note": "'\"><svg onload=alert(3)>"},
    )
    html = signed_in.get(f"/dashboard/events/{sent.get_json()['id']}").get_data(as_text=True)
    for raw in ("<script>alert", "<img src=x", "<svg onload"):
        assert raw not in html
    attempt = attempt_block(html)
    assert "&lt;/pre&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in attempt  # the call's body
    assert "&lt;img src=x onerror=a()&gt;" in attempt
    curl = re.search(r'<pre class="curl" id="curl">(.*?)</pre>', html, re.S).group(1)
    assert "&lt;svg onload=alert(3)&gt;" in curl and "&lt;script&gt;" in curl


def test_no_secret_is_shown_a_key_or_a_step_secret(signed_in, add_route, make_key, receiver):
    step_secret = "step-secret-0f9e8d7c6b5a"
    add_route(
        "guarded",
        [
            {
                "connector": "http",
                "config": {"url": receiver.url + "/in", "headers": {"X-Api-Key": step_secret}},
            }
        ],
    )
    key = make_key()
    sent = signed_in.post(
        "/hooks/guarded?api_key=" + key,
        json={"order": 1},
        headers={"Authorization": f"Bearer {key}", "X-Shop-Token": "shop-token-123"},
    )
    assert sent.status_code == 200, sent.get_json()
    assert receiver.requests[-1].headers["x-api-key"] == step_secret  # it was really sent
    html = signed_in.get(f"/dashboard/events/{sent.get_json()['id']}").get_data(as_text=True)
    secret_part = key.split("_", 2)[2]
    for secret in (step_secret, secret_part, "shop-token-123"):
        assert secret not in html and secret not in text_of(html)
    words = shlex.split(curl_of(html))
    assert "authorization: Bearer $HUB_API_KEY" in words  # a placeholder to fill, never a value
    assert "x-shop-token: $X_SHOP_TOKEN" in words
    assert any("api_key=$HUB_API_KEY" in w for w in words)


# --- the headers of each attempt's request and answer ---

SIGNING_SECRET = "whsec_" + "c2lnbmluZy1zZWNyZXQtb2YtdGhlLWh1Yi0zMmI="


def block(attempt_html: str, part: str) -> str:
    """The request's or the response's part of one attempt's markup, entities read."""
    found = re.search(rf'exchange-{part}">(.*?)</details>\s*(?:</details>|$)', attempt_html, re.S)
    return text_of(found.group(1))


def header_row(part_html: str, name: str) -> str | None:
    """The value cell of header ``name`` in a part's table (its badge included), or None."""
    found = re.search(
        rf"<tr[^>]*><td><code>{re.escape(name)}</code></td><td[^>]*>(.*?)</td></tr>",
        part_html,
        re.I,
    )
    return found.group(1) if found else None


def test_the_receivers_response_headers_are_shown_by_the_api_and_the_page_cookies_redacted(
    signed_in, add_route, make_key, receiver, admin_key, monkeypatch
):
    """A destination answering with its own headers, two Set-Cookie among them: the API and
    the event page show its custom header and value, in order; the cookies, the signature
    the hub added and a step secret the receiver echoes back read [redacted], stored nowhere."""
    step_secret = "step-secret-4b3a2918"
    monkeypatch.setenv("FWD_SIGNING_SECRET", SIGNING_SECRET)
    add_route(
        "fwd",
        [
            {
                "connector": "http",
                "config": {
                    "url": receiver.url + "/in",
                    "headers": {"X-Api-Key": step_secret, "X-Source": "hub"},
                    "sign_secret_env": "FWD_SIGNING_SECRET",
                },
            }
        ],
    )
    receiver.script(
        Reply(
            201,
            {"accepted": True},
            [
                ("X-Receiver-Trace", "trace-7f3e"),
                ("Set-Cookie", "sid=cookie-secret-1; HttpOnly"),
                ("Set-Cookie", "theme=cookie-secret-2"),
                ("X-Echo", f"saw {step_secret}"),
            ],
        )
    )
    sent = signed_in.post("/hooks/fwd", json={"order": 7}, headers={"X-API-Key": make_key()})
    assert sent.status_code == 200, sent.get_json()
    event_id = sent.get_json()["id"]
    signature = receiver.requests[-1].headers["webhook-signature"]

    api = signed_in.get(f"/admin/api/events/{event_id}", headers={"X-API-Key": admin_key})
    [attempt] = api.get_json()["attempt_log"]
    answered = attempt["response_headers"]
    assert ["X-Receiver-Trace", "trace-7f3e"] in answered
    assert [v for n, v in answered if n == "Set-Cookie"] == ["[redacted]", "[redacted]"]
    assert ["X-Echo", "saw [redacted]"] in answered  # the step's secret, echoed, is cut
    sent_headers = dict(attempt["request_headers"])
    assert sent_headers["X-Source"] == "hub"
    assert sent_headers["webhook-signature"] == sent_headers["X-Api-Key"] == "[redacted]"
    assert sent_headers["webhook-id"] == f"{event_id}_0"

    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    for shown in (html, text_of(html), api.get_data(as_text=True)):
        for secret in ("cookie-secret-1", "cookie-secret-2", step_secret, signature[3:]):
            assert secret not in shown
    one = attempt_block(html)
    response = block(one, "response")
    assert "HTTP 201" in response
    assert header_row(response, "X-Receiver-Trace") == "trace-7f3e"
    assert header_row(response, "Set-Cookie").startswith("[redacted] <span class=")
    assert "2 values redacted" in response
    request = block(one, "request")
    assert header_row(request, "X-Source") == "hub"
    assert header_row(request, "webhook-signature").startswith("[redacted]")
    assert "not recorded" not in one


def test_an_answer_of_95_headers_keeps_50_and_says_how_many_there_were(
    signed_in, add_route, make_key, receiver, admin_key
):
    """HUB_ATTEMPT_HEADERS (50) and HUB_ATTEMPT_HEADER_BYTES (8 KiB): the first headers are
    kept, the rest counted, and a value past the bytes is cut with a mark. (An answer of more
    than 100 headers never reaches the record: Python's http.client refuses it, and the call
    fails as a connection error.)"""
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    many = [(f"X-Many-{n:03d}", f"value-{n}") for n in range(90)]
    long_value = "L" * 9000
    receiver.script(
        Reply(200, {"ok": True}, many), Reply(200, {"ok": True}, [("X-Long", long_value)])
    )
    key = make_key()
    ids = []
    for n in range(2):
        sent = signed_in.post("/hooks/fwd", json={"n": n}, headers={"X-API-Key": key})
        assert sent.status_code == 200, sent.get_json()
        ids.append(sent.get_json()["id"])

    api = signed_in.get(f"/admin/api/events/{ids[0]}", headers={"X-API-Key": admin_key})
    answered = api.get_json()["attempt_log"][0]["response_headers"]
    *kept, (cut_name, cut_says) = answered
    assert len(kept) == 50 and cut_name == "(cut)"
    assert ["X-Many-000", "value-0"] in kept and ["X-Many-089", "value-89"] not in answered
    # and Server, Date, Content-Type, Content-Length, Connection
    assert cut_says.startswith(f"kept 50 of {len(many) + 5} headers, ")
    page = block(
        attempt_block(signed_in.get(f"/dashboard/events/{ids[0]}").get_data(as_text=True)),
        "response",
    )
    assert "Not every header was kept: kept 50 of" in page
    assert page.count("<tr") == 50

    api = signed_in.get(f"/admin/api/events/{ids[1]}", headers={"X-API-Key": admin_key})
    answered = api.get_json()["attempt_log"][0]["response_headers"]
    value = dict(answered)["X-Long"]
    assert value.startswith("L" * 7000) and re.search(r"\.\.\.\[\d+ more bytes\]$", value)
    assert sum(len(n) + len(v) for n, v in answered if n != "(cut)") <= 8192
    page = block(
        attempt_block(signed_in.get(f"/dashboard/events/{ids[1]}").get_data(as_text=True)),
        "response",
    )
    assert re.search(
        r"more bytes\] <span class=\"badge[^>]*>truncated</span>$", header_row(page, "X-Long")
    )
    assert "1 value truncated" in page


def test_an_attempt_recorded_before_headers_were_kept_reads_not_recorded(
    signed_in, db, add_route, make_key, receiver, admin_key
):
    """An attempt row as migration 0016 leaves the older ones (both header columns NULL, the
    request's headers inside its copy): the API says null, the page "not recorded" for the
    answer, and still shows the request's headers it kept."""
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    sent = signed_in.post("/hooks/fwd", json={"n": 1}, headers={"X-API-Key": make_key()})
    event_id = sent.get_json()["id"]
    older = json.dumps(
        {"method": "POST", "url": receiver.url + "/in", "headers": {"X-Old": "kept"}, "body": "{}"}
    )
    with db.session() as session:
        session.execute(
            update(Attempt)
            .where(Attempt.event_id == event_id)
            .values(request=older, request_headers=null(), response_headers=null())
        )
    with db.session() as session:
        # NULL in SQL, as ADD COLUMN leaves the rows that were there (not JSON's null)
        assert (
            session.scalar(
                select(func.count())
                .select_from(Attempt)
                .where(Attempt.event_id == event_id, Attempt.response_headers.is_(None))
            )
            == 1
        )

    api = signed_in.get(f"/admin/api/events/{event_id}", headers={"X-API-Key": admin_key})
    [attempt] = api.get_json()["attempt_log"]
    assert attempt["response_headers"] is None and attempt["request_headers"] is None
    one = attempt_block(signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True))
    response = block(one, "response")
    assert "Headers: not recorded" in response and "<table" not in response
    assert header_row(block(one, "request"), "X-Old") == "kept"


# --- copy as curl ---


def curl_parts(command: str) -> tuple[str, str, dict[str, str], str]:
    """(method, url, headers, body) of a ``curl -X M URL -H ... --data-raw BODY`` command."""
    words = shlex.split(command)
    assert words[:2] == ["curl", "-X"]
    method, url = words[2], words[3]
    headers, body = {}, None
    rest = words[4:]
    while rest:
        flag, value, *rest = rest
        if flag == "-H":
            name, _, given = value.partition(": ")
            headers[name] = given
        else:
            assert flag == "--data-raw", flag
            body = value
    return method, url, headers, body


def test_copy_as_curl_reproduces_the_request_byte_for_byte(
    app, signed_in, add_route, make_key, receiver
):
    add_route("orders", [])
    key = make_key()
    body = '{"note": "it\'s $HOME `date` \\"quoted\\"\\n\\u00e9t\\u00e9 \u00e9t\u00e9", "n": 1}\n'
    sent = signed_in.post(
        "/hooks/orders?source=shop&x=a%20b",
        data=body.encode(),
        headers={
            "X-API-Key": key,
            "Content-Type": "application/json; charset=utf-8",
            "X-Shop-Topic": 'orders/create; it\'s "new"',
            "User-Agent": "Shop-Hookshot/1.0",
        },
    )
    assert sent.status_code == 200, sent.get_json()
    event_id = sent.get_json()["id"]
    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    assert 'data-copy="curl"' in html  # the copy button, over the text in the <pre>
    command = curl_of(html)
    method, url, headers, sent_body = curl_parts(command)
    assert method == "POST"
    assert url == "http://localhost/hooks/orders?source=shop&x=a+b"
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["x-shop-topic"] == 'orders/create; it\'s "new"'
    assert headers["user-agent"] == "Shop-Hookshot/1.0"
    assert headers["x-api-key"] == "$HUB_API_KEY"
    assert "host" not in headers and "content-length" not in headers
    assert sent_body.encode() == body.encode()
    if CURL is None:
        return
    # The real curl, through a real shell, with the key set as the page says: the receiver
    # gets what the hub got.
    to_receiver = command.replace(shlex.quote(url), shlex.quote(receiver.url + "/again"))
    run = subprocess.run(
        ["bash", "-c", to_receiver + " -sS -o /dev/null"],
        env={**os.environ, "HUB_API_KEY": key},
        capture_output=True,
        timeout=10,
    )
    assert run.returncode == 0, run.stderr
    got = receiver.requests[-1]
    assert got.method == "POST" and got.body == body.encode()
    assert got.headers["x-api-key"] == key
    assert got.headers["x-shop-topic"] == 'orders/create; it\'s "new"'
    assert got.headers["content-type"] == "application/json; charset=utf-8"


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_a_body_that_is_not_text_goes_through_base64_and_arrives_whole(signed_in, db, receiver):
    body = bytes(range(256)) + b"\x00@end"
    event_id = new_event_id()
    with db.session() as session:
        session.add(
            Event(
                id=event_id,
                route="blobs",
                method="POST",
                path="/hooks/blobs",
                received_at=utcnow() - timedelta(seconds=1),
                headers={"content-type": "application/octet-stream"},
                body=body,
                body_size=len(body),
                status="delivered",
            )
        )
    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    command = curl_of(html)
    assert command.startswith("printf %s ") and "| base64 -d | curl" in command
    assert command.endswith("--data-binary @-")
    url = "http://localhost/hooks/blobs"
    run = subprocess.run(
        ["bash", "-c", command.replace(url, receiver.url + "/blob") + " -sS -o /dev/null"],
        capture_output=True,
        timeout=10,
    )
    assert run.returncode == 0, run.stderr
    assert receiver.requests[-1].body == body
    saved = signed_in.get(f"/dashboard/events/{event_id}/body")  # the download link's body
    assert saved.data == body and "attachment" in saved.headers["Content-Disposition"]


def test_a_large_body_is_sent_from_the_file_the_page_links(signed_in, add_route, make_key):
    add_route("orders", [])
    body = json.dumps({"items": ["x" * 100] * 700}).encode()  # about 72 KiB
    sent = signed_in.post(
        "/hooks/orders",
        data=body,
        headers={"X-API-Key": make_key(), "Content-Type": "application/json"},
    )
    event_id = sent.get_json()["id"]
    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    words = shlex.split(curl_of(html))
    assert words[-2:] == ["--data-binary", f"@{event_id}.body"]
    assert "x" * 100 not in curl_of(html)  # not written into the command
    link = re.search(r'<a href="([^"]+)" download>save it</a>', html).group(1)
    assert signed_in.get(link).data == body


# --- test events ---


def send_test(client, route: str, body: str, headers: str = "", csrf: bool = True):
    data = {"body": body, "headers": headers}
    if csrf:
        data["csrf_token"] = token(client, f"/dashboard/routes/{route}")
    return client.post(f"/dashboard/routes/{route}/test", data=data)


def test_a_test_event_goes_through_intake_as_the_admin_and_opens_its_page(
    signed_in, add_route, admin_key, make_key, receiver, db
):
    add_route("orders", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    page = signed_in.get("/dashboard/routes/orders").get_data(as_text=True)
    assert re.search(r'<textarea id="test-body" name="body"[^>]*>{}</textarea>', page)
    signed_in.post("/hooks/orders", json={"last": {"n": 3}}, headers={"X-API-Key": make_key()})
    page = signed_in.get("/dashboard/routes/orders").get_data(as_text=True)
    assert '{\n  "last": {\n    "n": 3\n  }\n}</textarea>' in text_of(page)  # its last payload

    sent = send_test(signed_in, "orders", '{"test": true}', "X-Shop-Topic: orders/create")
    assert sent.status_code == 303
    event = latest_event(db, "orders")
    assert sent.location == f"/dashboard/events/{event.id}"
    prefix = admin_key.split("_")[1]
    assert event.remote_addr == f"{intake.TEST_SENDER}{prefix}" and event.key_prefix == prefix
    assert event.body == b'{"test": true}' and event.status == "delivered"
    assert event.headers["x-shop-topic"] == "orders/create"
    assert receiver.requests[-1].json() == {"test": True}  # delivered like any event
    shown = signed_in.get(sent.location).get_data(as_text=True)
    assert 'id="test-event"' in shown and f"sent from the dashboard by key <code>{prefix}" in shown


def test_a_signature_route_takes_a_test_event_from_the_admin_and_says_so(signed_in, add_route, db):
    add_route("gh", [], auth="signature", verify={"scheme": "github", "secrets": ["gh-secret"]})
    page = signed_in.get("/dashboard/routes/gh").get_data(as_text=True)
    assert "this route checks a signature (signature), and a test event is accepted" in page
    unsigned = signed_in.post("/hooks/gh", json={"a": 1})  # a webhook needs its signature
    assert unsigned.status_code == 401
    assert send_test(signed_in, "gh", '{"a": 1}').status_code == 303
    event = latest_event(db, "gh")
    assert event.status == "delivered" and event.remote_addr.startswith(intake.TEST_SENDER)


def test_bad_json_is_refused_on_the_form_and_nothing_is_stored(signed_in, add_route, db):
    add_route("orders", [])
    before = events_count(db)
    for body, said in [
        ('{"a": 1,}', "body: Request body is not valid JSON"),
        ('{"n": NaN}', "NaN is not a JSON number"),
    ]:
        answer = send_test(signed_in, "orders", body)
        assert answer.status_code == 422
        page = answer.get_data(as_text=True)
        assert said in text_of(page) and 'aria-invalid="true"' in page
        assert f">{body}</textarea>" in text_of(page)  # what was typed stays in the form
    answer = send_test(signed_in, "orders", "{}", "not a header line")
    assert answer.status_code == 422 and "headers: line 1 is not" in answer.get_data(as_text=True)
    assert events_count(db) == before


def test_a_test_event_honours_the_routes_rate_limit(signed_in, add_route, db):
    # Windows are aligned to the clock: a minute's could end between the two test events.
    add_route("orders", [], rate_limit="1/hour")
    assert send_test(signed_in, "orders", "{}").status_code == 303
    again = send_test(signed_in, "orders", "{}")
    assert again.status_code == 429
    assert "Refused (429): Too many requests" in again.get_data(as_text=True)
    refused = latest_event(db, "orders")  # recorded as a webhook's refusal is
    assert refused.status == "rejected" and refused.reason == "rate_limited"


def test_a_disabled_route_takes_no_test_event(signed_in, add_route, db):
    add_route("orders", [], enabled=False)
    before = events_count(db)
    answer = send_test(signed_in, "orders", "{}")
    assert answer.status_code == 409
    assert "This route is disabled" in answer.get_data(as_text=True)
    assert events_count(db) == before


def test_a_test_event_needs_the_forms_csrf_token(signed_in, add_route, db):
    add_route("orders", [])
    before = events_count(db)
    answer = send_test(signed_in, "orders", "{}", csrf=False)
    assert answer.status_code == 403 and "CSRF" in answer.get_data(as_text=True)
    forged = signed_in.post(
        "/dashboard/routes/orders/test", data={"body": "{}", "csrf_token": "x" * 43}
    )
    assert forged.status_code == 403
    assert events_count(db) == before
