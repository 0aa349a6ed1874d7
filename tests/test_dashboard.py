"""The admin dashboard through Flask's test client, on SQLite and PostgreSQL: signing in and
out, the session cookie, CSRF, the security headers, the prefix and the off switch, each
page over real rows, and hostile bodies shown as text."""

from __future__ import annotations

import json
import re
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from hub import create_app
from hub.config import SettingsError
from hub.dashboard import session as dash_session
from hub.services import keys as key_store
from hub.store.models import (
    ApiKey,
    Attempt,
    Base,
    DashboardSession,
    Delivery,
    Event,
    Route,
    first_delivery_id,
    new_event_id,
    utcnow,
)

HOME = "/dashboard/"
PAGES = [
    "/dashboard/",
    "/dashboard/events",
    "/dashboard/routes",
    "/dashboard/routes/new",
    "/dashboard/keys",
    "/dashboard/alerts",
    "/dashboard/connectors",
    "/dashboard/events/replay?status=dead",
    "/dashboard/audit",
]
TOKEN_RE = re.compile(r'name="csrf-token" content="([^"]+)"')


def token(client, path: str = "/dashboard/sign-in") -> str:
    return TOKEN_RE.search(client.get(path).get_data(as_text=True)).group(1)


def sign_in(client, key: str, prefix: str = "/dashboard"):
    return client.post(
        f"{prefix}/sign-in", data={"key": key, "csrf_token": token(client, f"{prefix}/sign-in")}
    )


@pytest.fixture
def admin_key(make_key) -> str:
    return make_key(admin=True, name="admin")


@pytest.fixture
def signed_in(client, admin_key):
    assert sign_in(client, admin_key).status_code == 303
    return client


def other_app(app, **config):
    """A second app on the same database with different settings."""
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": app.config["DATABASE_URL"],
            "SECRET_KEY": "test-secret-key-for-the-hub",
            "ROUTE_CACHE_SECONDS": 0,
            **config,
        }
    )


def add_events(db, route: str, statuses: list[str], **fields) -> list[str]:
    """Events as ingest stores them, received a second apart, newest last."""
    ids = []
    now = utcnow()
    with db.session() as session:
        for i, status in enumerate(statuses):
            event = Event(
                id=new_event_id(),
                route=route,
                method="POST",
                path=f"/hooks/{route}",
                received_at=now - timedelta(seconds=len(statuses) - i),
                headers={"content-type": "application/json"},
                body=json.dumps({"n": i}).encode(),
                status=status,
                attempts=1,
                completed_at=now if status in ("delivered", "failed", "dead") else None,
                next_attempt_at=now - timedelta(seconds=30) if status == "pending" else None,
                **{"reason": "unauthorized" if status == "rejected" else None, **fields},
            )
            session.add(event)
            ids.append(event.id)
            if status not in ("rejected", "duplicate"):  # and its delivery, as ingest writes
                session.flush()
                session.add(
                    Delivery(
                        id=first_delivery_id(event.id),
                        event_id=event.id,
                        route=route,
                        destination="default",
                        status=status,
                        attempts=1,
                        completed_at=event.completed_at,
                        next_attempt_at=event.next_attempt_at,
                    )
                )
    return ids


# --- signing in ---


def test_root_opens_on_the_sign_in_page(client):
    first = client.get("/")
    assert first.status_code == 302 and first.location == HOME
    second = client.get(HOME)
    assert second.status_code == 302 and second.location.startswith("/dashboard/sign-in")
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "Sign in" in html and 'name="key"' in html and 'type="password"' in html


def test_an_admin_key_signs_in_with_a_session_cookie(client, admin_key):
    answer = sign_in(client, admin_key)
    assert answer.status_code == 303 and answer.location == HOME
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{dash_session.COOKIE}=")
    for flag in ("HttpOnly", "SameSite=Lax", "Path=/dashboard/", "Max-Age=28800"):
        assert flag in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    assert admin_key not in cookie  # the secret is never in the cookie
    page = client.get(HOME)
    assert page.status_code == 200
    assert "Overview" in page.get_data(as_text=True)


def test_the_cookie_is_secure_behind_tls(app, admin_key):
    direct = app.test_client()
    tls = direct.post(
        "https://localhost/dashboard/sign-in",
        data={"key": admin_key, "csrf_token": token(direct, "https://localhost/dashboard/sign-in")},
    )
    assert tls.status_code == 303 and "Secure" in tls.headers["Set-Cookie"]
    # Behind a trusted proxy that terminated TLS, X-Forwarded-Proto says so.
    proxied = other_app(app, TRUSTED_PROXIES=1)
    try:
        client = proxied.test_client()
        forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
        page = client.get("/dashboard/sign-in", headers=forwarded)
        assert "Secure" in page.headers["Set-Cookie"]
        untrusted = app.test_client().get("/dashboard/sign-in", headers=forwarded)
        assert "Secure" not in untrusted.headers["Set-Cookie"]
    finally:
        proxied.extensions["hub.db"].dispose()


def test_keys_that_may_not_sign_in_are_refused_with_a_reason(client, make_key, db):
    plain = make_key(name="sender")
    answer = sign_in(client, plain)
    assert answer.status_code == 403
    assert "not an admin key" in answer.get_data(as_text=True)
    assert "Set-Cookie" not in answer.headers or "prefix" not in answer.headers["Set-Cookie"]
    assert client.get(HOME).status_code == 302  # still signed out

    bad = sign_in(client, "hk_00000000_" + "x" * 43)
    assert bad.status_code == 401 and "Invalid API key" in bad.get_data(as_text=True)

    revoked = make_key(admin=True, name="gone")
    with db.session() as session:
        key_store.revoke(session, revoked.split("_")[1])
    answer = sign_in(client, revoked)
    assert answer.status_code == 401 and "revoked" in answer.get_data(as_text=True)
    assert client.get(HOME).status_code == 302


def test_failed_sign_ins_spend_the_refusal_budget(app, admin_key):
    limited = other_app(app, REFUSAL_LIMIT="3/minute")
    try:
        client = limited.test_client()
        for _ in range(3):
            assert sign_in(client, "hk_00000000_" + "y" * 43).status_code == 401
        throttled = sign_in(client, "hk_00000000_" + "y" * 43)
        assert throttled.status_code == 429
        assert "Too many refused requests" in throttled.get_data(as_text=True)
        # The admin's own key still signs in from the same address.
        assert sign_in(client, admin_key).status_code == 303
    finally:
        limited.extensions["hub.db"].dispose()


def test_sign_in_goes_back_to_the_page_asked_for_and_never_off_site(client, admin_key):
    asked = client.get("/dashboard/keys")
    assert asked.location == "/dashboard/sign-in?next=/dashboard/keys"
    tok = token(client)
    back = client.post(
        "/dashboard/sign-in", data={"key": admin_key, "csrf_token": tok, "next": "/dashboard/keys"}
    )
    assert back.location == "/dashboard/keys"
    client.post("/dashboard/sign-out", data={"csrf_token": token(client, HOME)})
    tok = token(client)
    away = client.post(
        "/dashboard/sign-in",
        data={"key": admin_key, "csrf_token": tok, "next": "//evil.example/dashboard/"},
    )
    assert away.location == HOME


def test_sign_out_ends_the_session(signed_in):
    answer = signed_in.post("/dashboard/sign-out", data={"csrf_token": token(signed_in, HOME)})
    assert answer.status_code == 303 and answer.location == "/dashboard/sign-in"
    assert signed_in.get(HOME).status_code == 302
    assert "You are signed out" in signed_in.get("/dashboard/sign-in").get_data(as_text=True)


def test_revoking_the_admin_key_ends_its_sessions(signed_in, admin_key, db):
    assert signed_in.get(HOME).status_code == 200
    with db.session() as session:
        key_store.revoke(session, admin_key.split("_")[1])
    answer = signed_in.get(HOME)
    assert answer.status_code == 302 and "sign-in" in answer.location
    page = signed_in.get(answer.location).get_data(as_text=True)
    assert "was revoked" in page
    # A poll from an open page gets 401, so its script reloads onto the sign-in page.
    poll = signed_in.get("/dashboard/?fragment=1", headers={"X-Dashboard-Fetch": "1"})
    assert poll.status_code == 401


def test_sign_out_everywhere_ends_every_session_of_the_key_and_keeps_the_key(
    app, client, admin_key, make_key
):
    other_admin = make_key(admin=True, name="other admin")
    browsers = [app.test_client() for _ in range(2)]
    for browser in (client, *browsers):
        assert sign_in(browser, admin_key).status_code == 303
    bystander = app.test_client()
    assert sign_in(bystander, other_admin).status_code == 303
    page = client.get("/dashboard/keys").get_data(as_text=True)
    assert "in 3 sessions, this one included" in page
    answer = client.post("/dashboard/sign-out-everywhere", data={"csrf_token": token(client, HOME)})
    assert answer.status_code == 303 and answer.location == "/dashboard/sign-in"
    assert "Every session of key" in client.get(answer.location).get_data(as_text=True)
    for browser in (client, *browsers):
        assert browser.get(HOME).status_code == 302
    assert bystander.get(HOME).status_code == 200  # another key's session stays
    assert sign_in(client, admin_key).status_code == 303  # the key itself still works
    assert client.get(HOME).status_code == 200
    assert client.post("/dashboard/sign-out-everywhere").status_code == 403  # CSRF


def test_revoking_the_key_elsewhere_ends_its_sessions_at_once(app, admin_key, db):
    """Another process revokes the key: this one's session of it ends on its next page."""
    cached = other_app(app)
    browser = cached.test_client()
    assert sign_in(browser, admin_key).status_code == 303
    assert browser.get(HOME).status_code == 200
    with db.session() as session:  # as `keys revoke` or the admin API would, elsewhere
        key_store.revoke(session, admin_key.split("_")[1])
    answer = browser.get(HOME)
    assert answer.status_code == 302 and "sign-in" in answer.location
    cached.extensions["hub.db"].dispose()


def session_cookie(client) -> str:
    return client.get_cookie(dash_session.COOKIE, path="/dashboard/").value


def test_sign_out_ends_every_copy_of_the_session(signed_in, app, db):
    kept = session_cookie(signed_in)  # as a stolen or backed-up cookie would be
    assert signed_in.get(HOME).status_code == 200
    signed_in.post("/dashboard/sign-out", data={"csrf_token": token(signed_in, HOME)})
    with db.session() as session:
        rows = session.query(DashboardSession).all()
    assert len(rows) == 1 and rows[0].ended_at is not None
    assert kept not in str(rows[0].id)  # the table keeps a digest, not the id
    signed_in.set_cookie(dash_session.COOKIE, kept, path="/dashboard/")
    answer = signed_in.get(HOME)
    assert answer.status_code == 302 and "sign-in" in answer.location
    assert "session has ended" in signed_in.get(answer.location).get_data(as_text=True)


def test_signing_in_again_replaces_the_session(signed_in, admin_key, db):
    first = session_cookie(signed_in)
    tok = token(signed_in, HOME)
    signed_in.post("/dashboard/sign-in", data={"key": admin_key, "csrf_token": tok})
    assert signed_in.get(HOME).status_code == 200
    with db.session() as session:
        ended = [r.ended_at is not None for r in session.query(DashboardSession)]
    assert sorted(ended) == [False, True]
    signed_in.set_cookie(dash_session.COOKIE, first, path="/dashboard/")
    assert signed_in.get(HOME).status_code == 302


def test_a_session_ends_at_its_lifetime(app, signed_in):
    lifetime = app.config["DASHBOARD_SESSION_SECONDS"]
    with app.test_request_context():
        data = dash_session._serializer().loads(session_cookie(signed_in))

    def signed_in_at(when: int) -> str:
        with app.test_request_context():
            return dash_session._serializer().dumps({**data, "since": when})

    signed_in.set_cookie(
        dash_session.COOKIE, signed_in_at(int(time.time()) - lifetime + 60), path="/dashboard/"
    )
    assert signed_in.get(HOME).status_code == 200
    stale = signed_in_at(int(time.time()) - lifetime - 1)
    signed_in.set_cookie(dash_session.COOKIE, stale, path="/dashboard/")
    answer = signed_in.get(HOME)
    assert answer.status_code == 302
    assert "session expired" in signed_in.get(answer.location).get_data(as_text=True)


def test_a_forged_cookie_is_ignored(client, admin_key):
    data = {"csrf": "t" * 43, "prefix": admin_key.split("_")[1], "since": int(time.time())}
    data["digest"] = key_store.digest(admin_key)
    forged = create_app({"SECRET_KEY": "another-key", "DATABASE_URL": "sqlite://"})
    with forged.test_request_context():
        cookie = dash_session._serializer().dumps(data)
    forged.extensions["hub.db"].dispose()
    client.set_cookie(dash_session.COOKIE, cookie, path="/dashboard/")
    assert client.get(HOME).status_code == 302


# --- CSRF ---


def test_a_change_without_the_csrf_token_is_refused(signed_in, db):
    def key_count() -> int:
        with db.session() as session:
            return session.query(ApiKey).count()

    before = key_count()
    missing = signed_in.post("/dashboard/keys", data={"name": "sneaky"})
    assert missing.status_code == 403
    assert "CSRF" in missing.get_data(as_text=True)
    wrong = signed_in.post("/dashboard/keys", data={"name": "sneaky", "csrf_token": "x" * 43})
    assert wrong.status_code == 403
    assert key_count() == before
    # Signing out is a change too; the session survives a forged sign-out.
    assert signed_in.post("/dashboard/sign-out").status_code == 403
    assert signed_in.get(HOME).status_code == 200
    # The token in the form field, or in the header a script sends, is accepted.
    tok = token(signed_in, HOME)
    assert signed_in.post("/dashboard/keys", data={"name": "ok", "csrf_token": tok}).status_code
    by_header = signed_in.post(
        "/dashboard/keys", data={"name": "ok2"}, headers={"X-CSRF-Token": tok}
    )
    assert by_header.status_code == 201
    assert key_count() == before + 2


def every_row(db) -> dict[str, list[tuple]]:
    """Every row of every table of the hub's schema, in primary-key order."""
    with db.engine.connect() as conn:
        return {
            table.name: [
                tuple(row)
                for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns))
            ]
            for table in Base.metadata.sorted_tables
        }


def test_every_dashboard_change_without_a_valid_csrf_token_is_refused_and_changes_nothing(
    app, signed_in, admin_key, make_key, add_route, db
):
    """Every rule of the dashboard's URL map that takes a change (POST, PUT, PATCH, DELETE),
    filled with things that exist (a key, a route, an event), so that a form whose check
    were skipped would act: forms added later are covered too."""
    add_route("orders", [{"connector": "text", "config": {"field": "text"}}])
    (event_id,) = add_events(db, "orders", ["dead"])
    victim = make_key(name="victim").split("_")[1]
    values = {"prefix": victim, "name": "orders", "event_id": event_id, "rest": "x"}
    form = {"name": "sneaky", "key": admin_key, "enabled": "false", "status": "dead"}
    adapter = app.url_map.bind("localhost")
    walked = []
    for rule in app.url_map.iter_rules():
        if not rule.endpoint.startswith("dashboard."):  # the blueprint's, at its prefix
            continue
        arguments = {
            a: values.get(a, "x") for a in rule.arguments if a not in (rule.defaults or {})
        }
        for method in sorted((rule.methods or set()) & dash_session.CHANGES):
            walked.append((method, adapter.build(rule.endpoint, arguments, method=method)))
    paths = {path for _, path in walked}
    assert f"/dashboard/keys/{victim}/revoke" in paths and "/dashboard/sign-out" in paths
    assert len(walked) >= 10
    before = every_row(db)
    wrong = []
    for method, path in walked:
        for token_sent in ({}, {"csrf_token": "x" * 43}):
            answer = signed_in.open(path, method=method, data={**form, **token_sent})
            if answer.status_code != 403 or "CSRF" not in answer.get_data(as_text=True):
                wrong.append(f"{method} {path} {sorted(token_sent)}: {answer.status_code}")
    assert not wrong, "a change without a valid CSRF token was not refused: " + "; ".join(wrong)
    assert every_row(db) == before
    assert signed_in.get(HOME).status_code == 200  # still signed in: sign-out was refused too


def test_sign_in_needs_the_csrf_token_too(client, admin_key):
    answer = client.post("/dashboard/sign-in", data={"key": admin_key})
    assert answer.status_code == 403
    assert client.get(HOME).status_code == 302


def test_a_new_session_gets_a_new_csrf_token(client, admin_key):
    before = token(client)
    sign_in(client, admin_key)
    assert token(client, HOME) != before


def test_every_form_carries_the_csrf_token(signed_in, add_route, db):
    add_route("orders", [{"connector": "text"}])
    (event_id,) = add_events(db, "orders", ["delivered"])
    for path in [*PAGES, "/dashboard/routes/orders", f"/dashboard/events/{event_id}"]:
        html = signed_in.get(path).get_data(as_text=True)
        for form in re.findall(r"<form[^>]*>.*?</form>", html, re.S):
            if 'method="post"' in form:
                assert 'name="csrf_token"' in form, (path, form[:200])


# --- headers, markup ---


@pytest.mark.parametrize("path", [*PAGES, "/dashboard/nothing-here", "/dashboard/events/evt_x"])
def test_every_page_sends_the_security_headers_and_no_inline_code(signed_in, path):
    answer = signed_in.get(path)
    assert answer.status_code in (200, 404)
    csp = answer.headers["Content-Security-Policy"]
    for directive in ("script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"):
        assert directive in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert answer.headers["Referrer-Policy"] == "no-referrer"
    assert answer.headers["Cache-Control"] == "no-store"
    html = answer.get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\sstyle=", html), "inline style attribute"
    assert not re.search(r"<style", html), "inline style element"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


def test_signed_out_pages_send_the_headers_too(client):
    page = client.get("/dashboard/sign-in")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for name in ("dashboard.css", "dashboard.js"):
        static = client.get(f"/dashboard/static/{name}")
        assert static.status_code == 200
        assert static.headers["X-Content-Type-Options"] == "nosniff"
        static.close()


def test_hostile_bodies_and_headers_are_shown_as_text(signed_in, add_route, make_key, db):
    add_route("evil", [])
    key = make_key()
    script = "<script>alert(1)</script>"
    sent = signed_in.post(
        "/hooks/evil",
        data=json.dumps({"note": script, "html": "</pre><img src=x onerror=alert(2)>"}),
        headers={
            "X-API-Key": key,
            "Content-Type": "application/json",
            "X-Note": '"><svg onload=alert(3)>',
        },
    )
    event_id = sent.get_json()["id"]
    # Not JSON at all, and a made-up route name that is itself markup.
    signed_in.post(
        "/hooks/evil", data="</pre><script>alert(4)</script>", headers={"X-API-Key": key}
    )
    signed_in.post("/hooks/<b>knock<b>", data="x")
    for path in [f"/dashboard/events/{event_id}", "/dashboard/events", "/dashboard/"]:
        html = signed_in.get(path).get_data(as_text=True)
        assert "<script>alert" not in html and "<img src=x" not in html
        assert "<svg onload" not in html and "<b>knock" not in html
    detail = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail
    assert "&lt;svg onload=alert(3)&gt;" in detail
    assert "&lt;b&gt;knock&lt;b&gt;" in signed_in.get("/dashboard/events").get_data(as_text=True)


# --- off, and under a prefix ---


def test_the_dashboard_can_be_turned_off(app):
    off = other_app(app, DASHBOARD=False)
    try:
        client = off.test_client()
        for path in ("/", "/dashboard/", "/dashboard/sign-in", "/dashboard/static/dashboard.js"):
            answer = client.get(path)
            assert answer.status_code == 404
            assert answer.get_json()["code"] == "not_found"
        assert client.get("/health").status_code == 200
    finally:
        off.extensions["hub.db"].dispose()


def test_the_dashboard_can_live_under_a_prefix(app, admin_key):
    moved = other_app(app, DASHBOARD_PREFIX="/admin/ui")
    try:
        client = moved.test_client()
        assert client.get("/").location == "/admin/ui/"
        assert client.get("/dashboard/").status_code == 404
        assert client.get("/admin/ui/").location.startswith("/admin/ui/sign-in")
        answer = sign_in(client, admin_key, prefix="/admin/ui")
        assert answer.status_code == 303 and answer.location == "/admin/ui/"
        assert "Path=/admin/ui/" in answer.headers["Set-Cookie"]
        html = client.get("/admin/ui/").get_data(as_text=True)
        assert 'href="/admin/ui/static/dashboard.css"' in html
        assert 'href="/admin/ui/events"' in html
        css = client.get("/admin/ui/static/dashboard.css")
        assert css.status_code == 200 and css.mimetype == "text/css"
        css.close()
        # The admin API beside it is untouched.
        api = client.get("/admin/api/keys", headers={"X-API-Key": admin_key})
        assert api.status_code == 200
    finally:
        moved.extensions["hub.db"].dispose()


@pytest.mark.parametrize(
    "prefix", ["dashboard", "/", "/hooks", "/api/ui", "/a b", "/events", "/admin", "/admin/api/x"]
)
def test_a_prefix_that_cannot_work_stops_the_start(prefix):
    with pytest.raises(ValueError, match="HUB_DASHBOARD_PREFIX"):
        create_app({"DASHBOARD_PREFIX": prefix, "DATABASE_URL": "sqlite://", "SECRET_KEY": "k"})


def test_bad_dashboard_settings_stop_the_start():
    base = {"DATABASE_URL": "sqlite://", "SECRET_KEY": "k"}
    with pytest.raises(SettingsError, match="HUB_DASHBOARD"):
        create_app({**base, "DASHBOARD": "maybe"})
    with pytest.raises(SettingsError, match="HUB_DASHBOARD_SESSION_SECONDS"):
        create_app({**base, "DASHBOARD_SESSION_SECONDS": 5})
    with pytest.raises(SettingsError, match="HUB_DASHBOARD_OVERVIEW_MAX_ROWS"):
        create_app({**base, "DASHBOARD_OVERVIEW_MAX_ROWS": 0})


# --- the pages ---


def test_overview_charts_the_last_hour_per_route(signed_in, add_route, db):
    add_route("orders", [{"connector": "text"}])
    add_events(db, "orders", ["delivered", "delivered", "failed", "dead", "rejected", "pending"])
    add_events(db, "no-such-route", ["rejected"], reason="unknown_route")
    html = signed_in.get(HOME).get_data(as_text=True)
    card = html[html.index('href="/dashboard/routes/orders"') :]
    assert card.count('class="bar bar-delivered"') >= 1
    assert 'class="bar bar-failed"' in card and 'class="bar bar-dead"' in card
    assert 'class="bar bar-refused"' in card
    assert "2 delivered, 1 failed, 1 dead, 1 refused" in card  # the chart's label
    assert "Names with no route" in html and "no-such-route" in html
    assert "unknown_route" in html and "unauthorized" in html  # top refusal reasons
    queue = re.search(r"Queue depth</span><span class=\"tile-value\">(\d+)", html)
    assert queue and queue.group(1) == "1"
    oldest = re.search(r"Oldest due</span><span class=\"tile-value\">([^<]+)<", html)
    assert oldest and oldest.group(1).endswith(" s")
    fragment = signed_in.get("/dashboard/?fragment=1").get_data(as_text=True)
    assert "<html" not in fragment and "bar-delivered" in fragment


def test_the_overview_tiles_count_the_hour_by_status_and_link_the_refusals(signed_in, db):
    add_events(db, "orders", ["delivered"] * 3 + ["failed"] * 2 + ["dead"] + ["rejected"] * 4)
    html = signed_in.get(HOME).get_data(as_text=True)

    def tile(label: str) -> str:
        found = re.search(rf'tile-label">{label}</span><span class="tile-value">(\d+)<', html)
        return found.group(1) if found else ""

    assert [tile(n) for n in ("Delivered", "Failed", "Dead", "Refused")] == ["3", "2", "1", "4"]
    assert 'href="/dashboard/events?status=rejected&amp;reason=unauthorized&amp;since=1h"' in html


def test_an_event_page_shows_the_next_try_only_while_the_event_waits_for_one(signed_in, db):
    waiting, done = add_events(db, "orders", ["retrying", "failed"])
    with db.session() as session:
        for event_id in (waiting, done):  # a failed event's stale time is not shown
            session.get(Event, event_id).next_attempt_at = utcnow()
        session.add(
            Attempt(
                event_id=waiting,
                step_index=0,
                connector="http",
                outcome="retryable",
                http_status=503,
            )
        )
    html = signed_in.get(f"/dashboard/events/{waiting}").get_data(as_text=True)
    assert "<dt>Next try</dt>" in html
    assert '<span class="badge badge-retrying">retryable</span>' in html
    assert "<dt>Next try</dt>" not in signed_in.get(f"/dashboard/events/{done}").get_data(
        as_text=True
    )


def test_events_are_listed_newest_first_and_paged_by_cursor(signed_in, db):
    ids = add_events(db, "orders", ["delivered"] * 55 + ["failed"] * 5)
    html = signed_in.get("/dashboard/events").get_data(as_text=True)
    shown = re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', html)
    assert shown == list(reversed(ids))[:50]
    older = re.search(r'href="(/dashboard/events\?cursor=[^"]+)" rel="next"', html).group(1)
    rest = signed_in.get(older.replace("&amp;", "&")).get_data(as_text=True)
    assert re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', rest) == list(reversed(ids))[50:]
    failed = signed_in.get("/dashboard/events?status=failed").get_data(as_text=True)
    assert re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', failed) == list(
        reversed(ids[55:])
    )
    texted = signed_in.get('/dashboard/events?q="n": 7}').get_data(as_text=True)
    assert re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', texted) == [ids[7]]


def test_a_bad_filter_is_named_beside_its_field(signed_in):
    answer = signed_in.get("/dashboard/events?since=yesterday-ish&status=lost")
    assert answer.status_code == 400
    html = answer.get_data(as_text=True)
    assert 'id="since-error"' in html and "not a time" in html
    assert 'id="status-error"' in html
    bad_cursor = signed_in.get("/dashboard/events?cursor=bm90LWEtY3Vyc29y")
    assert bad_cursor.status_code == 400
    assert "not a cursor from this hub" in bad_cursor.get_data(as_text=True)


def test_the_live_tail_sends_only_newer_events(signed_in, db):
    add_events(db, "orders", ["delivered"] * 3)
    html = signed_in.get("/dashboard/events").get_data(as_text=True)
    tail = re.search(r'data-tail-url="([^"]+)" data-tail-after="([^"]+)"', html)
    url, after = tail.group(1).replace("&amp;", "&"), tail.group(2)
    assert signed_in.get(url, query_string={"after": after}).status_code == 204
    (new_id,) = add_events(db, "orders", ["failed"])
    with db.session() as session:  # received now, after the three
        session.get(Event, new_id).received_at = utcnow()
    rows = signed_in.get(url, query_string={"after": after})
    assert rows.status_code == 200
    body = rows.get_data(as_text=True)
    assert re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', body) == [new_id]
    # With a filter the new event does not match, nothing comes.
    filtered = signed_in.get(
        "/dashboard/events/tail", query_string={"after": after, "status": "dead"}
    )
    assert filtered.status_code == 204


def test_event_detail_shows_headers_body_and_attempts_and_replays(
    signed_in, add_route, make_key, receiver
):
    add_route("fwd", [{"connector": "http", "config": {"url": receiver.url + "/in"}}])
    key = make_key()
    sent = signed_in.post(
        "/hooks/fwd",
        json={"order": {"id": 7, "total": 12}},
        headers={"X-API-Key": key, "X-Request-ID": "req-7.from_shop"},
    )
    assert sent.status_code == 200, sent.get_json()
    event_id = sent.get_json()["id"]
    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    assert '<dt>Request id</dt><dd><a href="/dashboard/events?request_id=req-7.from_shop"' in html
    assert '"order": {\n    "id": 7,' in html.replace("&#34;", '"')  # pretty-printed JSON
    assert "x-api-key" in html and key not in html  # the stored, redacted headers
    attempt = re.search(r'<li class="attempt outcome-ok">(.*?)</li>', html, re.S).group(1)
    assert "<code>http</code>" in attempt and "HTTP 200" in attempt and " ms " in attempt
    assert "Request" in attempt and "Response" in attempt

    replay = signed_in.post(
        f"/dashboard/events/{event_id}/replay", data={"csrf_token": token(signed_in, HOME)}
    )
    assert replay.status_code == 303
    page = signed_in.get(replay.location).get_data(as_text=True)
    assert "is queued again" in page and "badge-pending" in page
    assert 'data-poll-url="/dashboard/events/' in page  # refreshes while in flight
    again = signed_in.post(
        f"/dashboard/events/{event_id}/replay", data={"csrf_token": token(signed_in, HOME)}
    )
    assert "Not replayed: pending: already waiting" in signed_in.get(again.location).get_data(
        as_text=True
    )
    assert signed_in.get("/dashboard/events/evt_nothing").status_code == 404


def test_bulk_replay_says_how_many_before_it_replays(signed_in, db):
    failed = add_events(db, "orders", ["failed"] * 3)
    add_events(db, "orders", ["delivered"] * 2)
    add_events(db, "other", ["failed"])
    confirm = signed_in.get("/dashboard/events/replay?route=orders&status=failed")
    html = confirm.get_data(as_text=True)
    assert "<strong>3</strong> matching events will be queued again" in html
    done = signed_in.post(
        "/dashboard/events/replay",
        data={"route": "orders", "status": "failed", "csrf_token": token(signed_in, HOME)},
    )
    assert done.status_code == 303
    assert done.location == "/dashboard/events?route=orders&status=failed"
    assert "Replayed 3 of the 3" in signed_in.get(done.location).get_data(as_text=True)
    with db.session() as session:
        assert {session.get(Event, i).status for i in failed} == {"pending"}
    with_text = signed_in.get("/dashboard/events/replay?status=failed&q=x")
    assert with_text.status_code == 400
    assert "cannot filter by body text" in with_text.get_data(as_text=True)


def test_a_route_with_a_bad_config_gets_the_apis_reasons_beside_its_fields(
    signed_in, admin_key, db
):
    steps = [{"connector": "http", "config": {"url": "ftp://nowhere", "timeout": -1}}]
    form = {
        "name": "hooks-in",
        "mode": "async",
        "steps": json.dumps(steps),
        "rate_limit": "lots",
        "dedup_window": "86400",
        "enabled": "true",
        "csrf_token": token(signed_in, HOME),
    }
    answer = signed_in.post("/dashboard/routes/new", data=form)
    assert answer.status_code == 422
    html = answer.get_data(as_text=True)
    api = signed_in.post(
        "/admin/api/routes",
        json={"name": "hooks-in", "mode": "async", "steps": steps, "rate_limit": "lots"},
        headers={"X-API-Key": admin_key},
    )
    assert api.status_code == 422
    for reason in api.get_json()["errors"]:
        text = reason.removeprefix("body.")
        assert text.replace("'", "&#39;") in html, text
    steps_field = html[html.index('id="steps"') : html.index('id="filter"')]
    assert "steps[0] (http)" in steps_field and 'id="steps-error"' in steps_field
    rate_field = html[html.index('id="rate_limit"') : html.index('id="dedup_path"')]
    assert "rate_limit: not a rate" in rate_field
    with db.session() as session:
        assert session.query(Route).count() == 0
    bad_json = signed_in.post("/dashboard/routes/new", data={**form, "steps": "[{"})
    assert bad_json.status_code == 422
    assert "steps: not valid JSON" in bad_json.get_data(as_text=True)


def test_routes_are_created_shown_edited_and_disabled(signed_in, receiver, db, app):
    steps = [
        {"connector": "text", "config": {}},
        {
            "connector": "http",
            "config": {"url": receiver.url, "headers": {"X-Auth-Token": "s3cret-value"}},
        },
    ]
    form = {
        "name": "orders",
        "mode": "async",
        "steps": json.dumps(steps),
        "rate_limit": "100/min",
        "retry_schedule": "10, 60",
        "dedup_window": "600",
        "dedup_path": "order.id",
        "verify_scheme": "github",
        "verify_options": "{}",
        "verify_secrets": "gh-secret-1234567890",
        "enabled": "true",
        "csrf_token": token(signed_in, HOME),
    }
    created = signed_in.post("/dashboard/routes/new", data=form)
    assert created.status_code == 303 and created.location == "/dashboard/routes/orders"
    page = signed_in.get(created.location).get_data(as_text=True)
    assert "s3cret-value" not in page and "gh-secret-1234567890" not in page
    assert "&#34;X-Auth-Token&#34;: &#34;…&#34;" in page and "…7890" in page  # masked
    pipeline = re.findall(r'<span class="step-no">(\d)</span> <code>(\w+)</code>', page)
    assert pipeline == [("0", "text"), ("1", "http")]
    for fact in ("100/minute", "10 s, 60 s, then dead", "signature", "order.id"):
        assert fact in page

    edit = signed_in.get("/dashboard/routes/orders/edit").get_data(as_text=True)
    assert "s3cret-value" not in edit and "gh-secret" not in edit
    shown_steps = re.search(r'<textarea id="steps"[^>]*>(.*?)</textarea>', edit, re.S).group(1)
    changed = {**form, "description": "Orders from the shop"}
    changed["steps"] = shown_steps.replace("&#34;", '"')  # as a browser sends it back
    changed["verify_secrets"] = ""  # keeps the stored secret
    saved = signed_in.post("/dashboard/routes/orders/edit", data=changed)
    assert saved.status_code == 303
    with db.session() as session:
        route = session.query(Route).filter_by(name="orders").one()
        assert route.description == "Orders from the shop"
        kept = route.steps[1]["config"]["headers"]["X-Auth-Token"]  # the mask kept the secret
        assert app.extensions["hub.secrets"].open_one(kept) == "s3cret-value"
        assert route.secrets_encrypted  # still verified

    off = signed_in.post(
        "/dashboard/routes/orders/enabled",
        data={"enabled": "false", "csrf_token": token(signed_in, HOME)},
    )
    assert off.status_code == 303
    assert "is disabled" in signed_in.get(off.location).get_data(as_text=True)
    with db.session() as session:
        assert session.query(Route).filter_by(name="orders").one().enabled is False
    listed = signed_in.get("/dashboard/routes").get_data(as_text=True)
    assert "<code>text</code> → <code>http</code>" in listed and "disabled" in listed
    assert signed_in.get("/dashboard/routes/nope").status_code == 404


def test_keys_are_created_shown_once_and_revoked(signed_in, add_route):
    add_route("orders", [])
    tok = token(signed_in, HOME)
    bad = signed_in.post(
        "/dashboard/keys", data={"name": "", "expires_in": "soon", "csrf_token": tok}
    )
    assert bad.status_code == 422
    html = bad.get_data(as_text=True)
    assert 'id="name-error"' in html and 'id="expires_in-error"' in html
    created = signed_in.post(
        "/dashboard/keys",
        data={
            "name": "billing",
            "scopes": "orders, refunds",
            "rate_limit": "10/minute",
            "csrf_token": tok,
        },
    )
    assert created.status_code == 201
    html = created.get_data(as_text=True)
    secret = re.search(r'<code id="new-key">(hk_[0-9a-f]{8}_[A-Za-z0-9_-]{43})</code>', html)
    assert secret and 'data-copy="new-key"' in html
    key = secret.group(1)
    prefix = key.split("_")[1]
    row = re.search(rf'<tr id="key-{prefix}">(.*?)</tr>', html, re.S).group(1)
    assert "orders, refunds" in row and "10/minute" in row
    assert key not in signed_in.get("/dashboard/keys").get_data(as_text=True)  # shown once
    assert signed_in.post("/hooks/orders", json={}, headers={"X-API-Key": key}).status_code == 200

    revoked = signed_in.post(f"/dashboard/keys/{prefix}/revoke", data={"csrf_token": tok})
    assert revoked.status_code == 303
    html = signed_in.get("/dashboard/keys").get_data(as_text=True)
    assert "is revoked" in html
    row = re.search(rf'<tr id="key-{prefix}">(.*?)</tr>', html, re.S).group(1)
    assert "revoked" in row and "Revoke</button>" not in row
    refused = signed_in.post("/hooks/orders", json={}, headers={"X-API-Key": key})
    assert refused.status_code == 401


def test_revoking_your_own_key_first_warns_that_it_signs_you_out(signed_in, admin_key, db):
    prefix = admin_key.split("_")[1]
    html = signed_in.get("/dashboard/keys").get_data(as_text=True)
    row = re.search(rf'<tr id="key-{prefix}">(.*?)</tr>', html, re.S).group(1)
    assert "data-confirm" not in row  # the server asks, with or without script
    tok = token(signed_in, HOME)
    asked = signed_in.post(f"/dashboard/keys/{prefix}/revoke", data={"csrf_token": tok})
    page = asked.get_data(as_text=True)
    assert asked.status_code == 200 and "is the key you are signed in with" in page
    assert "signs you out" in page and 'name="sign_out" value="yes"' in page
    with db.session() as session:  # nothing revoked yet, still signed in
        assert key_store.get(session, prefix).revoked_at is None
    assert signed_in.get(HOME).status_code == 200
    confirmed = signed_in.post(
        f"/dashboard/keys/{prefix}/revoke", data={"csrf_token": tok, "sign_out": "yes"}
    )
    assert confirmed.status_code == 303
    gone = signed_in.get(confirmed.location)
    assert gone.status_code == 302 and "sign-in" in gone.location
    assert "was revoked" in signed_in.get(gone.location).get_data(as_text=True)
    with db.session() as session:
        assert key_store.get(session, prefix).revoked_at is not None


def test_a_key_form_sent_again_makes_no_second_key(signed_in, db):
    html = signed_in.get("/dashboard/keys").get_data(as_text=True)
    form_id = re.search(r'name="form_id" value="([^"]+)"', html).group(1)
    form = {"name": "ci", "csrf_token": token(signed_in, HOME), "form_id": form_id}
    assert signed_in.post("/dashboard/keys", data=form).status_code == 201
    again = signed_in.post("/dashboard/keys", data=form)  # the browser's reload
    assert again.status_code == 303
    page = signed_in.get(again.location).get_data(as_text=True)
    assert "already sent" in page and "new-key" not in page
    with db.session() as session:
        assert session.query(ApiKey).filter_by(name="ci").count() == 1
    # The page after a key was made carries a new form: the next key is made.
    fresh = re.search(r'name="form_id" value="([^"]+)"', page).group(1)
    assert signed_in.post("/dashboard/keys", data={**form, "form_id": fresh}).status_code == 201


def test_the_connectors_page_lists_each_connector_and_its_fields(signed_in, app):
    html = signed_in.get("/dashboard/connectors").get_data(as_text=True)
    for cls in app.extensions["hub.connectors"]:
        assert f"<code>{cls.name}</code>" in html
        assert str(cls.description).replace("'", "&#39;") in html
    assert '<code>url</code> <span class="req">required</span>' in html  # http's url


def test_a_body_search_reads_a_bounded_window_per_page_and_pages_on(app, admin_key, db):
    ids = add_events(db, "orders", ["delivered"] * 30)  # bodies {"n": 0} ... {"n": 29}
    small = other_app(app, ADMIN_SEARCH_WINDOW=20)
    try:
        client = small.test_client()
        sign_in(client, admin_key)
        html = client.get('/dashboard/events?q="n": 3}').get_data(as_text=True)
        assert "looked at 20 events" in html
        assert not re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', html)
        older = re.search(r'href="(/dashboard/events\?cursor=[^"]+)" rel="next"', html).group(1)
        rest = client.get(older.replace("&amp;", "&")).get_data(as_text=True)
        assert re.findall(r'href="/dashboard/events/(evt_[0-9a-z]+)"', rest) == [ids[3]]
    finally:
        small.extensions["hub.db"].dispose()


def test_a_route_with_several_destinations_is_never_collapsed_by_the_route_form(
    signed_in, receiver, db, client, admin_key
):
    """The form edits one pipeline: on a route that fans out it says where to change it and
    saves nothing, so the route keeps every destination."""
    route = {
        "name": "fanned",
        "mode": "async",
        "destinations": [
            {"name": "crm", "steps": [{"connector": "text", "config": {}}]},
            {"name": "archive", "steps": [{"connector": "http", "config": {"url": receiver.url}}]},
        ],
    }
    made = client.put("/admin/api/routes/fanned", json=route, headers={"X-API-Key": admin_key})
    assert made.status_code in (200, 201), made.get_json()

    shown = signed_in.get("/dashboard/routes/fanned/edit").get_data(as_text=True)
    assert "delivers to several destinations" in shown
    form = {
        "name": "fanned",
        "mode": "async",
        "steps": json.dumps([{"connector": "text", "config": {}}]),
        "enabled": "true",
        "csrf_token": token(signed_in, HOME),
    }
    refused = signed_in.post("/dashboard/routes/fanned/edit", data=form)
    assert refused.status_code == 422
    assert "hub routes apply" in refused.get_data(as_text=True)
    answer = client.get("/admin/api/routes/fanned", headers={"X-API-Key": admin_key})
    assert [d["name"] for d in answer.get_json()["destinations"]] == ["crm", "archive"]


def test_an_event_of_a_route_that_fans_out_shows_each_delivery_with_its_own_attempts(
    signed_in, receiver, db, client, app, admin_key, make_key
):
    """The event page puts the deliveries side by side, each with its status and its own
    calls; the routes page lists each destination with its steps."""
    from hub.services.delivery import Worker

    route = {
        "name": "fanned",
        "mode": "async",
        "destinations": [
            {"name": "shout", "steps": [{"connector": "text", "config": {"field": "msg"}}]},
            {"name": "archive", "steps": [{"connector": "http", "config": {"url": receiver.url}}]},
        ],
    }
    made = client.put("/admin/api/routes/fanned", json=route, headers={"X-API-Key": admin_key})
    assert made.status_code in (200, 201), made.get_json()
    sent = client.post("/hooks/fanned", json={"msg": "hi"}, headers={"X-API-Key": make_key()})
    assert sent.status_code == 202
    event_id = sent.get_json()["id"]
    worker = Worker(app, name="fan-page")
    worker.start(2)
    try:
        end = time.monotonic() + 20
        while db_status(db, event_id) != "delivered":
            assert time.monotonic() < end, "the event was not delivered in time"
            time.sleep(0.05)
    finally:
        worker.stop(grace=5)

    html = signed_in.get(f"/dashboard/events/{event_id}").get_data(as_text=True)
    cards = dict(
        re.findall(
            r'<section class="card delivery" data-destination="(\w+)">(.*?)</section>', html, re.S
        )
    )
    assert list(cards) == ["shout", "archive"]
    for card in cards.values():
        assert "badge-delivered" in card and "<dt>Runs</dt><dd>1</dd>" in card
    assert "<code>text</code>" in cards["shout"] and "<code>http</code>" not in cards["shout"]
    assert "<code>http</code>" in cards["archive"] and "HTTP 200" in cards["archive"]
    assert "<code>text</code>" not in cards["archive"]

    listed = signed_in.get("/dashboard/routes").get_data(as_text=True)
    row = re.search(r'href="/dashboard/routes/fanned">.*?</tr>', listed, re.S).group(0)
    assert "<strong>shout</strong>: <code>text</code>" in row
    assert "<strong>archive</strong>: <code>http</code>" in row
    assert "no steps" not in row


def db_status(db, event_id: str) -> str:
    with db.session() as session:
        return session.get(Event, event_id).status
