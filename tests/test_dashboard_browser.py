"""The dashboard in a real browser: Debian's headless chromium driven by Playwright, against
the hub under real gunicorn with its embedded worker, delivering to a real local receiver.

No browser is downloaded: Playwright launches /usr/bin/chromium. Where it is missing these
tests skip and say so. The run takes the docs' screenshots (docs/admin.md); `make screenshots`
(HUB_TEST_SCREENSHOTS=docs/screenshots) keeps them in docs/screenshots/, any other run in a
temporary folder, so a test run leaves the checkout as it found it.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from hub import create_app
from hub.services.keys import create_key
from hub.services.routes import save_routes
from hub.store.db import upgrade
from hub.store.models import AlertState, Event, new_event_id, utcnow
from tests.procs import ROOT, gunicorn, wait_until
from tests.servers import Receiver

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian chromium not installed: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed: pip install -r requirements.txt"
)
expect = sync_api.expect


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the screenshots go: HUB_TEST_SCREENSHOTS (relative to the checkout), or a
    temporary folder."""
    wanted = os.environ.get("HUB_TEST_SCREENSHOTS")
    folder = ROOT / wanted if wanted else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


VIEWPORT = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 10_000


class Hub:
    def __init__(
        self,
        base: str,
        admin: str,
        sender: str,
        plain_admin: str,
        receiver: Receiver,
        database_url: str = "",
    ):
        self.base = base
        self.database_url = database_url
        self.admin = admin  # the key the browser signs in with
        self.sender = sender  # a key that posts webhooks (not an admin)
        self.plain_admin = plain_admin
        self.receiver = receiver

    def url(self, path: str = "/") -> str:
        return self.base + path

    def post(self, route: str, body: dict, key: str | None = None) -> requests.Response:
        headers = {"X-API-Key": key or self.sender}
        return requests.post(self.url(f"/hooks/{route}"), json=body, headers=headers, timeout=5)


def seed_hour(db, route: str) -> None:
    """An hour of earlier traffic on a second route, so the overview has a chart to draw."""
    now = utcnow()
    with db.session() as session:
        for i in range(120):
            status = "rejected" if i % 9 == 0 else "failed" if i % 17 == 0 else "delivered"
            status = "dead" if i % 41 == 0 else status
            received = now - timedelta(seconds=3590 - i * 29 + (i % 7) * 40)
            session.add(
                Event(
                    id=new_event_id(),
                    route=route,
                    method="POST",
                    path=f"/hooks/{route}",
                    received_at=received,
                    headers={},
                    body=b"{}",
                    status=status,
                    reason="bad_signature" if status == "rejected" else None,
                    attempts=0 if status == "rejected" else 1,
                    completed_at=received + timedelta(milliseconds=40),
                )
            )


@pytest.fixture(scope="module")
def hub(tmp_path_factory, sqlite_template) -> Iterator[Hub]:
    folder = tmp_path_factory.mktemp("browser")
    path = folder / "hub.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    with Receiver() as receiver, pytest.MonkeyPatch.context() as env:
        env.setenv("HUB_ALLOW_PRIVATE_TARGETS", "true")  # the receiver is on 127.0.0.1
        app = create_app({"DATABASE_URL": url, "SECRET_KEY": "test-secret-key-for-the-hub"})
        db = app.extensions["hub.db"]
        upgrade(db)
        with db.session() as session:
            _, admin = create_key(session, "browser", admin=True)
            _, other_admin = create_key(session, "spare admin", admin=True)
            _, sender = create_key(session, "shop", ["orders"])
            save_routes(
                session,
                [
                    {
                        "name": "orders",
                        "description": "Orders from the shop, upper-cased and forwarded.",
                        "mode": "async",
                        "steps": [
                            {"connector": "text", "config": {"field": "note"}},
                            {
                                "connector": "http",
                                "config": {
                                    "url": receiver.url + "/orders",
                                    "headers": {"X-Shop-Token": "not-for-screens"},
                                },
                            },
                        ],
                        "rate_limit": "600/minute",
                        "retry_schedule": [30, 120, 600],
                        "dedup_path": "order.id",
                    },
                    {"name": "billing", "mode": "async", "steps": [{"connector": "text"}]},
                ],
                app.extensions["hub.connectors"],
                app.extensions["hub.secrets"],
            )
        seed_hour(db, "billing")
        db.dispose()
        # Alerts are evaluated every half second: the alerts page's state is made in moments.
        with gunicorn(url, folder / "gunicorn.log", workers=1, HUB_ALERT_INTERVAL="0.5") as (
            _,
            base,
        ):
            yield Hub(base, admin, sender, other_admin, receiver, url)
        log = (folder / "gunicorn.log").read_text()
        assert "Traceback" not in log and admin not in log


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def console() -> list[str]:
    """Every console message and page error of the module's pages."""
    return []


@pytest.fixture(scope="module")
def context(browser, console):
    """One signed-in browser session shared by the tests, in order."""
    ctx = browser.new_context(viewport=VIEWPORT)
    yield ctx
    ctx.close()


@pytest.fixture
def page(context, console):
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    watch(page, console)
    page.on("dialog", lambda d: d.accept())
    yield page
    page.close()


def watch(page, console: list[str]) -> None:
    """Record what the browser complains about: console errors (a CSP refusal is one),
    script errors, and any script, stylesheet, image or fetch that failed. A page itself
    answering 401, 403 or 422 is the dashboard saying no, not a fault."""
    page.on(
        "console",
        lambda m: (
            console.append(f"{m.type}: {m.text}")
            if m.type == "error" and not m.text.startswith("Failed to load resource")
            else None
        ),
    )
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.on(
        "response",
        lambda r: (
            console.append(f"failed {r.request.resource_type}: {r.status} {r.url}")
            if r.status >= 400 and r.request.resource_type != "document"
            else None
        ),
    )


def no_violations(console: list[str]) -> None:
    assert not console, console


def test_sign_in_refuses_other_keys_then_opens_the_overview(hub, page, console, screenshots):
    page.goto(hub.url("/"))
    expect(page).to_have_url(re.compile(r"/dashboard/sign-in"))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("Admin API key").fill(hub.sender)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not an admin key")

    # Webhooks for the chart: delivered ones, and refusals with and without a key.
    for i in range(4):
        assert hub.post("orders", {"note": f"order {i}", "order": {"id": i}}).status_code == 202
    requests.post(hub.url("/hooks/orders"), json={}, timeout=5)
    requests.post(hub.url("/hooks/orders"), json={}, headers={"X-API-Key": "hk_bad"}, timeout=5)
    hub.receiver.wait_for(4)

    page.get_by_label("Admin API key").fill(hub.admin)
    page.get_by_label("Admin API key").press("Enter")
    expect(page).to_have_url(hub.url("/dashboard/"))
    card = page.locator("article.card", has=page.get_by_role("link", name="orders", exact=True))
    expect(card.locator("rect.bar-delivered").first).to_be_visible()
    expect(card.locator("figcaption")).to_contain_text("delivered 4")
    expect(card.locator("figcaption")).to_contain_text("refused 2")
    expect(page.locator(".reasons")).to_contain_text("unauthorized")
    expect(page.locator(".reasons")).to_contain_text("bad_signature")
    billing = page.locator("article.card", has=page.get_by_role("link", name="billing"))
    assert billing.locator("rect").count() >= 12  # an hour of bars
    page.screenshot(path=str(screenshots / "overview.png"), full_page=True)
    # It refreshes on its own: a new delivery shows up without a reload.
    hub.post("orders", {"note": "one more", "order": {"id": 99}})
    expect(card.locator("figcaption")).to_contain_text("delivered 5", timeout=15_000)
    no_violations(console)


def test_events_list_and_its_live_tail(hub, page, console):
    page.goto(hub.url("/dashboard/events"))
    rows = page.locator("#event-rows tr")
    expect(rows.first).to_be_visible()
    before = rows.count()
    fresh = [hub.post("orders", {"note": f"tail {i}", "order": {"id": 100 + i}}) for i in (1, 2)]
    for answer in fresh:
        event_id = answer.json()["id"]
        expect(page.get_by_role("link", name=event_id)).to_be_visible()  # no reload
    assert rows.count() == before + 2
    expect(page.locator("#tail-status")).to_contain_text("new since this page opened")
    # Filters narrow the list the same way the API does.
    page.get_by_label("Route").fill("orders")
    page.get_by_label("Status").select_option("rejected")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"status=rejected"))
    expect(rows).to_have_count(2)
    no_violations(console)


def test_event_detail_replay_shows_the_new_attempt(hub, page, console, screenshots):
    sent = hub.post("orders", {"note": "replay me", "order": {"id": 500}}).json()["id"]
    hub.receiver.wait_for(1)
    page.goto(hub.url("/dashboard/events"))
    page.get_by_role("link", name=sent).click()
    expect(page.get_by_role("heading", name=re.compile(sent))).to_be_visible()
    expect(page.locator(".badge-delivered").first).to_be_visible(timeout=15_000)
    if page.locator("#attempts li").count() < 2:
        page.reload()  # the page refreshed itself while pending; make sure it settled
    attempts = page.locator("#attempts li")
    expect(attempts).to_have_count(2)  # text, then http
    expect(attempts.nth(1)).to_contain_text("HTTP 200")
    expect(page.locator("#body")).to_contain_text('"note": "replay me"')
    page.screenshot(path=str(screenshots / "event.png"), full_page=True)

    page.get_by_role("button", name="Replay").click()
    expect(page.get_by_role("status").first).to_contain_text("queued again")
    # The page refreshes itself while the event is in flight: the second delivery appears.
    expect(attempts).to_have_count(4, timeout=15_000)
    expect(page.locator("#attempts")).to_contain_text("delivery 2")
    no_violations(console)


def test_a_route_with_a_bad_config_shows_the_field_error(hub, page, console, screenshots):
    page.goto(hub.url("/dashboard/routes"))
    page.get_by_role("link", name="New route").click()
    page.get_by_label("Name").fill("refunds")
    page.get_by_label("Steps").fill('[{"connector": "http", "config": {"url": "ftp://x"}}]')
    page.get_by_label("Rate limit").fill("often")
    page.get_by_role("button", name="Save route").click()
    expect(page.locator("#steps-error")).to_contain_text("steps[0] (http): url:")
    expect(page.locator("#rate_limit-error")).to_contain_text("not a rate")
    expect(page.get_by_label("Steps")).to_have_attribute("aria-invalid", "true")
    page.get_by_label("Steps").fill(
        f'[{{"connector": "http", "config": {{"url": "{hub.receiver.url}"}}}}]'
    )
    page.get_by_label("Rate limit").fill("10/minute")
    page.get_by_role("button", name="Save route").click()
    expect(page).to_have_url(hub.url("/dashboard/routes/refunds"))
    expect(page.get_by_role("status").first).to_contain_text("Route refunds saved")

    page.goto(hub.url("/dashboard/routes/orders"))
    expect(page.locator("#pipeline li")).to_have_count(2)
    expect(page.locator("#pipeline")).to_contain_text('"X-Shop-Token": "…"')  # masked
    expect(page.locator("#pipeline")).not_to_contain_text("not-for-screens")
    page.screenshot(path=str(screenshots / "route.png"), full_page=True)
    no_violations(console)


def test_a_key_is_created_copied_and_revoked(hub, page, context, console):
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=hub.base)
    page.goto(hub.url("/dashboard/keys"))
    page.get_by_text("Create a key").click()
    page.get_by_label("Name", exact=True).fill("partner")
    page.get_by_label("Routes it may post to").fill("orders")
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-key").inner_text()
    assert re.fullmatch(r"hk_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", secret)
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("[data-copied-for]")).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == secret
    assert hub.post("orders", {"note": "partner"}, key=secret).status_code == 202

    prefix = secret.split("_")[1]
    page.goto(hub.url("/dashboard/keys"))
    expect(page.locator("#new-key")).to_have_count(0)  # shown once
    row = page.locator(f"#key-{prefix}")
    row.get_by_role("button", name="Revoke").click()  # the confirmation is accepted
    expect(row).to_contain_text("revoked")
    assert hub.post("orders", {"note": "partner"}, key=secret).status_code == 401
    no_violations(console)


def test_a_test_event_is_sent_and_its_curl_command_copied(hub, page, context, console):
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=hub.base)
    page.goto(hub.url("/dashboard/routes/billing"))
    page.get_by_label("JSON body").fill('{"text": "from the form"}')
    page.get_by_role("button", name="Send test event").click()
    expect(page.locator("#test-event")).to_have_text("test")  # the event's page, marked
    command = page.locator("#curl").inner_text()
    assert "/hooks/billing" in command and "from the form" in command
    page.get_by_role("button", name="Copy").click()
    expect(page.locator('[data-copied-for="curl"]')).to_have_text("Copied.")
    assert page.evaluate("navigator.clipboard.readText()") == command
    no_violations(console)


def alert_state_started(database_url: str) -> bool:
    """The evaluator has taken its first look since the first channel (what happened
    before that look is not news to it)."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(AlertState)).scalar() > 0
    finally:
        engine.dispose()


def test_the_alerts_page_shows_what_fires_and_who_was_told_and_sends_a_test(
    hub, page, console, screenshots
):
    """A webhook channel to a real receiver, the default rules, a circuit that opened (its
    message arrived) and one that opened and closed: the page lists the firing alert first
    with the sentence sent, and "Send a test alert" shows the test arriving."""
    admin = {"X-API-Key": hub.admin}

    def api(path: str, body: dict | None = None) -> dict:
        answer = requests.post(hub.url(path), json=body, headers=admin, timeout=5)
        assert answer.status_code in (200, 201), answer.text
        return answer.json()

    started = time.monotonic()
    with Receiver() as pager:
        breaker = {"failures": 5, "cool_down": 600, "max_cool_down": 600}
        api(
            "/admin/api/routes",
            {
                "name": "payments",
                "destinations": [
                    {
                        "name": name,
                        "steps": [{"connector": "http", "config": {"url": hub.receiver.url}}],
                        "breaker": breaker,
                    }
                    for name in ("ledger", "crm")
                ],
            },
        )
        api("/admin/api/alert-channels", {"name": "ops", "kind": "webhook", "url": pager.url})
        wait_until(lambda: alert_state_started(hub.database_url), 5, what="the first evaluation")
        api("/admin/api/routes/payments/destinations/crm/open", {"reason": "probe failed"})
        api("/admin/api/routes/payments/destinations/ledger/open", {"reason": "503 five times"})
        pager.wait_for(2)
        api("/admin/api/routes/payments/destinations/crm/close", {"reason": "fixed"})
        texts = [r.json()["text"] for r in pager.wait_for(3)]
        assert "[resolved] open-circuits" in texts[2] and "crm" in texts[2]

        page.goto(hub.url("/dashboard/"))
        banner = page.locator("#alerts-firing")
        expect(banner).to_contain_text("1 alert firing")
        banner.get_by_role("link").click()
        expect(page).to_have_url(hub.url("/dashboard/alerts"))
        firing = page.locator("#alert-board article.alert-firing")
        expect(firing).to_have_count(1)
        expect(firing).to_contain_text("the circuit of destination ledger of route payments")
        expect(firing.locator(".badge-sent")).to_have_count(1)
        resolved = page.locator("#alert-board article.alert-resolved")
        expect(resolved).to_have_count(1)
        expect(resolved).to_contain_text("crm")
        expect(page.locator("#rule-dead-deliveries")).to_contain_text("built-in")
        expect(page.locator("#channel-ops")).not_to_contain_text(pager.url)

        page.get_by_role("button", name="Send a test alert").click()
        expect(page.get_by_role("status").first).to_contain_text("A test alert to ops is queued")
        # The page refreshes itself: the test shows as sent without a reload.
        expect(page.locator("#tests tbody tr").first.locator(".badge-sent")).to_be_visible(
            timeout=WAIT_MS
        )
        (test,) = [r for r in pager.wait_for(4) if "[test]" in r.json()["text"]]
        assert "a test alert from the webhook hub to channel ops" in test.json()["text"]
        page.screenshot(path=str(screenshots / "alerts.png"), full_page=True)
        # The circuit stays open for later tests' sake no longer than this one.
        api("/admin/api/routes/payments/destinations/ledger/close", {"reason": "done"})
    assert time.monotonic() - started < 15
    no_violations(console)


def test_keyboard_alone_reaches_every_page(hub, page, console):
    page.goto(hub.url("/dashboard/"))
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent.trim()")
    assert focused == "Skip to content"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") == "solid"
    names = []
    for _ in range(9):
        page.keyboard.press("Tab")
        names.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert names[:8] == [
        "Webhook hub",
        "Overview",
        "Events",
        "Routes",
        "Alerts",
        "Keys",
        "Connectors",
        "Audit log",
    ]
    assert names[8] == "Sign out"
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Enter")  # on "Connectors"
    expect(page).to_have_url(hub.url("/dashboard/connectors"))
    expect(page.get_by_role("heading", name="Connectors", exact=True)).to_be_visible()
    no_violations(console)


def test_pages_fit_a_phone(hub, browser, console):
    ctx = browser.new_context(viewport=PHONE, storage_state=None)
    phone = ctx.new_page()
    watch(phone, console)
    phone.goto(hub.url("/dashboard/sign-in"))
    phone.get_by_label("Admin API key").fill(hub.plain_admin)
    phone.get_by_role("button", name="Sign in").click()
    expect(phone).to_have_url(hub.url("/dashboard/"))
    for path in (
        "/dashboard/",
        "/dashboard/events",
        "/dashboard/routes/orders",
        "/dashboard/routes/new",
        "/dashboard/keys",
        "/dashboard/alerts",
        "/dashboard/audit",
    ):
        phone.goto(hub.url(path))
        width = phone.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], (path, width)
    ctx.close()
    no_violations(console)


def test_signing_out_ends_the_session(hub, page, console):
    page.goto(hub.url("/dashboard/"))
    kept = page.context.cookies()  # a copy of the session cookie, taken while signed in
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(hub.url("/dashboard/sign-in"))
    expect(page.get_by_role("status").first).to_contain_text("signed out")
    page.goto(hub.url("/dashboard/events"))
    expect(page).to_have_url(re.compile(r"/dashboard/sign-in\?next="))
    # Put back, the copy opens nothing: the session ended on the server, not only here.
    page.context.add_cookies(kept)
    page.goto(hub.url("/dashboard/events"))
    expect(page).to_have_url(re.compile(r"/dashboard/sign-in\?next="))
    expect(page.get_by_role("status").first).to_contain_text("session has ended")
    no_violations(console)
