"""The dashboard's alerts page through Flask's test client, on SQLite and PostgreSQL: what
fires (before what resolved) and who was told, channels added, tested and removed, rules
added, turned off and removed, the service's sentences beside their fields, and no secret
of a channel ever written into a page."""

from __future__ import annotations

import re
import time

import pytest
from markupsafe import escape
from sqlalchemy import select

from hub.services import alerts
from hub.store.models import Alert, AlertChannel, AlertRule, AlertSend
from tests.test_dashboard import sign_in, token

PAGE = "/dashboard/alerts"
TINY = 0.01  # the evaluator's interval here: every call of evaluate() is a turn


@pytest.fixture
def signed_in(client, make_key):
    assert sign_in(client, make_key(admin=True, name="admin")).status_code == 303
    return client


@pytest.fixture
def admin(make_key):
    return {"X-API-Key": make_key(admin=True, name="api")}


def evaluate(app):
    time.sleep(TINY)  # the turn the previous call took is over
    return alerts.evaluate(app.extensions["hub.db"], TINY)


def send(app) -> int:
    return alerts.send_pending(app.extensions["hub.db"], app.extensions["hub.secrets"], 5.0)


def post(client, path: str, **form):
    return client.post(path, data={"csrf_token": token(client, PAGE), **form})


def section(html: str, start: str, end: str) -> str:
    return html[html.index(start) : html.index(end)]


def field(html: str, name: str) -> str:
    """The form field of input ``id`` up to the next field."""
    at = html.index(f'id="{name}"')
    return html[html.rfind('<div class="field', 0, at) : html.index("</div>", at)]


def channels(db) -> list[str]:
    with db.session() as session:
        return list(session.scalars(select(AlertChannel.name).order_by(AlertChannel.name)))


def shop_with_breakers(client, admin, receiver) -> None:
    destinations = [
        {
            "name": name,
            "steps": [{"connector": "http", "config": {"url": receiver.url}}],
            "breaker": {"failures": 3, "cool_down": 60, "max_cool_down": 60},
        }
        for name in ("crm", "ledger")
    ]
    answer = client.post(
        "/admin/api/routes", json={"name": "shop", "destinations": destinations}, headers=admin
    )
    assert answer.status_code == 201, answer.json


def circuit(client, admin, destination: str, action: str) -> None:
    path = f"/admin/api/routes/shop/destinations/{destination}/{action}"
    assert client.post(path, headers=admin).status_code == 200


def test_firing_alerts_come_before_resolved_ones_with_their_message_and_sends(
    app, signed_in, admin, receiver, db
):
    """crm's circuit opens and stays open; ledger's opens later and closes. The page lists
    crm's alert first (firing), though ledger's is newer, each with the sentence sent and
    whether it reached the channel; the overview says one alert fires and links here."""
    assert post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    shop_with_breakers(signed_in, admin, receiver)
    evaluate(app)  # the first look: nothing before it is news
    circuit(signed_in, admin, "crm", "open")
    assert [n.alert.subject for n in evaluate(app).notices] == ["shop/crm"]
    circuit(signed_in, admin, "ledger", "open")
    assert [n.kind for n in evaluate(app).notices] == ["firing"]
    circuit(signed_in, admin, "ledger", "close")
    assert [n.kind for n in evaluate(app).notices] == ["resolved"]
    assert send(app) == 3
    receiver.wait_for(3)
    with db.session() as session:
        crm, ledger = (
            session.scalar(select(Alert).where(Alert.subject == f"shop/{d}"))
            for d in ("crm", "ledger")
        )
        assert (crm.state, ledger.state) == ("firing", "resolved")
        assert ledger.opened_at > crm.opened_at

    html = signed_in.get(PAGE).get_data(as_text=True)
    firing = section(html, 'id="firing-h"', 'id="resolved-h"')
    resolved = section(html, 'id="resolved-h"', 'id="tests-h"')
    assert f'id="alert-{crm.id}"' in firing and f'id="alert-{ledger.id}"' in resolved
    assert html.index(f'id="alert-{crm.id}"') < html.index(f'id="alert-{ledger.id}"')
    assert 'id="firing-count">1<' in firing
    assert "the circuit of destination crm of route shop opened" in crm.message
    card = re.search(rf'id="alert-{crm.id}".*?</article>', html, re.S).group(0)
    ledger_card = re.search(rf'id="alert-{ledger.id}".*?</article>', html, re.S).group(0)
    for shown, alert in ((card, crm), (ledger_card, ledger)):  # the sentence, as sent
        sentence = re.search(r'<p class="alert-message">(.*?)</p>', shown, re.S).group(1)
        assert sentence == str(escape(alert.message))
    assert "<code>open-circuits</code>" in card and "shop/crm" in card
    assert "<code>ops</code>" in card and "badge-sent" in card and "firing" in card
    assert ledger_card.count("badge-sent") == 2  # its firing and its resolved notice
    assert "resolved " in ledger_card  # when

    overview = signed_in.get("/dashboard/").get_data(as_text=True)
    banner = re.search(r'<p[^>]*id="alerts-firing".*?</p>', overview, re.S).group(0)
    assert 'href="/dashboard/alerts"' in banner and "1 alert firing" in banner
    # Once nothing fires, the overview says nothing.
    circuit(signed_in, admin, "crm", "close")
    evaluate(app)
    assert 'id="alerts-firing"' not in signed_in.get("/dashboard/").get_data(as_text=True)
    assert 'id="nothing-firing"' in signed_in.get(PAGE).get_data(as_text=True)


def test_a_failed_send_shows_its_error_sentence(app, signed_in, db):
    """A message that did not arrive says why, beside the channel it was for."""
    assert post(
        signed_in, f"{PAGE}/channels", name="gone", kind="webhook", url="http://127.0.0.1:9/"
    )
    assert post(signed_in, f"{PAGE}/channels/gone/test").status_code == 303
    send(app)
    html = signed_in.get(PAGE).get_data(as_text=True)
    tests = section(html, 'id="tests-h"', 'id="channels-h"')
    assert "badge-failed" in tests
    with db.session() as session:
        error = session.scalar(select(AlertSend.error))
    assert error and str(escape(error)) in tests


def test_a_channel_is_added_tested_and_removed(app, signed_in, receiver, db):
    added = post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    assert added.status_code == 303 and added.location == f"{PAGE}#channels"
    html = signed_in.get(PAGE).get_data(as_text=True)
    assert "Channel ops (webhook) added." in html
    row = re.search(r'<tr id="channel-ops">.*?</tr>', html, re.S).group(0)
    assert "<code>http://127.0.0.1…</code>" in row and "Send a test alert" in row
    assert "data-confirm=" in row  # removing asks first, as revoking a key does

    tested = post(signed_in, f"{PAGE}/channels/ops/test")
    assert tested.status_code == 303 and tested.location == f"{PAGE}#tests"
    html = signed_in.get(PAGE).get_data(as_text=True)
    assert "A test alert to ops is queued" in html
    tests = section(html, 'id="tests-h"', 'id="channels-h"')
    assert "<code>ops</code>" in tests and "badge-pending" in tests and "data-in-flight" in tests
    with db.session() as session:
        (queued,) = session.scalars(select(AlertSend)).all()
        assert (queued.kind, queued.channel, queued.status) == ("test", "ops", "pending")
    assert send(app) == 1  # a worker's sender, as in every process
    (got,) = receiver.wait_for(1)
    assert "a test alert from the webhook hub to channel ops" in got.json()["text"]
    # The page's refreshing part says it arrived.
    part = signed_in.get(f"{PAGE}?fragment=1").get_data(as_text=True)
    tests = part[part.index('id="tests-h"') :]
    assert "badge-sent" in tests and "data-in-flight" not in tests

    missing = post(signed_in, f"{PAGE}/channels/nope/test")
    assert "No alert channel is named" in signed_in.get(missing.location).get_data(as_text=True)
    removed = post(signed_in, f"{PAGE}/channels/ops/remove")
    assert removed.status_code == 303
    html = signed_in.get(PAGE).get_data(as_text=True)
    assert "Channel ops removed." in html and 'id="channel-ops"' not in html
    assert channels(db) == []


def test_a_bad_channel_gets_the_services_sentences_by_its_fields_and_keeps_what_was_typed(
    signed_in, db
):
    answer = post(
        signed_in,
        f"{PAGE}/channels",
        name="oncall",
        kind="email",
        port="587",
        username="hub",
        password="typed-smtp-secret-1",
        sender="nobody",
        to="ops@example.com, nope",
        starttls="true",
    )
    assert answer.status_code == 422
    html = answer.get_data(as_text=True)
    host = field(html, "c-host")
    assert "host: an email channel needs its SMTP server" in host and 'id="host-error"' in host
    assert 'aria-describedby="host-error"' in host
    assert "sender: an email channel needs a From address" in field(html, "c-sender")
    assert "to: &#39;nope&#39; is not an address" in field(html, "c-to")
    assert 'value="nobody"' in field(html, "c-sender")
    assert 'value="ops@example.com, nope"' in field(html, "c-to")
    assert 'value="587"' in field(html, "c-port") and 'value="hub"' in field(html, "c-username")
    assert re.search(r'id="c-starttls"[^>]*checked', html)
    assert re.search(r'<option value="email" selected>', html)
    assert "<details" in html and 'id="add-channel" open' in html
    assert "typed-smtp-secret-1" not in html  # a secret is asked for again, never echoed
    assert "type it again" in field(html, "c-password")

    bad_url = post(signed_in, f"{PAGE}/channels", name="hook", kind="webhook", url="ftp://x")
    assert bad_url.status_code == 422
    url = field(bad_url.get_data(as_text=True), "c-url")
    assert "url: must be an http:// or https:// URL with a host" in url
    assert 'value="ftp://x"' in url
    bad_name = post(signed_in, f"{PAGE}/channels", name="no spaces", kind="slack", url="https://x")
    assert "name: String should match pattern" in field(bad_name.get_data(as_text=True), "c-name")
    assert channels(db) == []


def test_a_channel_name_taken_is_said_beside_the_name(signed_in, receiver, db):
    assert post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    again = post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    assert again.status_code == 409
    assert "A channel named &#39;ops&#39; exists already" in field(
        again.get_data(as_text=True), "c-name"
    )


def test_no_secret_of_a_channel_is_ever_written_into_a_page(app, signed_in, db):
    slack = "https://hooks.slack.com/services/T0SECRET/B0SECRET/xoxSlackToken123"
    password = "smtp-password-never-shown"
    assert (
        post(signed_in, f"{PAGE}/channels", name="ops", kind="slack", url=slack).status_code == 303
    )
    email = post(
        signed_in,
        f"{PAGE}/channels",
        name="oncall",
        kind="email",
        host="smtp.example.com",
        port="587",
        username="hub",
        password=password,
        sender="hub@example.com",
        to="ops@example.com",
    )
    assert email.status_code == 303
    assert channels(db) == ["oncall", "ops"]
    post(signed_in, f"{PAGE}/channels/ops/test")
    post(signed_in, f"{PAGE}/channels/oncall/test")
    for path in (PAGE, f"{PAGE}?fragment=1", "/dashboard/"):
        html = signed_in.get(path).get_data(as_text=True)
        for secret in (slack, "xoxSlackToken123", "T0SECRET", password):
            assert secret not in html, (path, secret)
    html = signed_in.get(PAGE).get_data(as_text=True)
    assert "<code>https://hooks.slack.com…</code>" in html  # masked as the API masks it
    assert "password <code>…</code>" in re.search(r'id="channel-oncall".*?</tr>', html, re.S).group(
        0
    )
    with db.session() as session:  # the API's masking, word for word
        for row in alerts.list_channels(session):
            shown = alerts.channel_to_dict(row, app.extensions["hub.secrets"])
            assert str(escape(shown.get("url", shown.get("password")))) in html


def test_rules_are_added_turned_off_and_on_and_removed(signed_in, receiver, db):
    assert post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    html = signed_in.get(PAGE).get_data(as_text=True)
    for name in ("dead-deliveries", "open-circuits"):  # the built-in rules, listed
        row = re.search(rf'<tr id="rule-{name}">.*?</tr>', html, re.S).group(0)
        assert "built-in" in row and ">on<" in row and "Remove</button>" not in row
        assert "cannot be removed, only turned off" in row

    bad = post(signed_in, f"{PAGE}/rules", name="flaky", kind="failure_ratio", window="600")
    assert bad.status_code == 422
    html = bad.get_data(as_text=True)
    threshold = field(html, "r-threshold")
    assert "threshold: a failure_ratio rule needs one" in threshold
    assert 'value="600"' in field(html, "r-window") and 'value="flaky"' in field(html, "r-name")
    assert '<option value="failure_ratio" selected>' in html
    too_high = post(signed_in, f"{PAGE}/rules", name="flaky", kind="failure_ratio", threshold="1.5")
    assert "threshold: a failure ratio is between 0 and 1" in field(
        too_high.get_data(as_text=True), "r-threshold"
    )

    added = post(
        signed_in,
        f"{PAGE}/rules",
        name="flaky",
        kind="failure_ratio",
        threshold="0.2",
        window="600",
        route="shop",
        channels="ops",
    )
    assert added.status_code == 303 and added.location == f"{PAGE}#rules"
    html = signed_in.get(PAGE).get_data(as_text=True)
    assert "Rule flaky (failure_ratio) added." in html
    row = re.search(r'<tr id="rule-flaky">.*?</tr>', html, re.S).group(0)
    for fact in ("<code>failure_ratio</code>", ">0.2<", "600 s", "route <code>shop</code>"):
        assert fact in row, fact
    assert ">ops<" in row and "Remove</button>" in row and "built-in" not in row

    assert post(signed_in, f"{PAGE}/rules/flaky/enabled", enabled="false").status_code == 303
    with db.session() as session:
        assert session.scalar(select(AlertRule.enabled).where(AlertRule.name == "flaky")) is False
    row = re.search(
        r'<tr id="rule-flaky">.*?</tr>', signed_in.get(PAGE).get_data(as_text=True), re.S
    ).group(0)
    assert ">off<" in row and "Turn on" in row and ">0.2<" in row  # thresholds kept

    assert post(signed_in, f"{PAGE}/rules/flaky/remove").status_code == 303
    assert "Rule flaky removed." in signed_in.get(PAGE).get_data(as_text=True)
    with db.session() as session:
        assert session.scalar(select(AlertRule).where(AlertRule.name == "flaky")) is None


def test_a_built_in_rule_is_not_removed_but_can_be_turned_off_and_on(signed_in, db):
    def rule(name: str) -> alerts.Rule:
        with db.session() as session:
            return next(r for r in alerts.rules(session) if r.name == name)

    refused = post(signed_in, f"{PAGE}/rules/dead-deliveries/remove")
    assert refused.status_code == 303
    html = signed_in.get(refused.location).get_data(as_text=True)
    assert "Rule dead-deliveries is built in: it cannot be removed, only turned off" in html
    assert "flash-error" in html
    assert rule("dead-deliveries").enabled and rule("dead-deliveries").builtin

    post(signed_in, f"{PAGE}/rules/dead-deliveries/enabled", enabled="false")
    assert not rule("dead-deliveries").enabled
    row = re.search(
        r'<tr id="rule-dead-deliveries">.*?</tr>', signed_in.get(PAGE).get_data(as_text=True), re.S
    ).group(0)
    assert "built-in" in row and ">off<" in row and "Turn on" in row
    post(signed_in, f"{PAGE}/rules/dead-deliveries/enabled", enabled="true")
    assert rule("dead-deliveries").enabled and rule("dead-deliveries").builtin
    with db.session() as session:  # back as it came: no row of its name
        assert session.scalar(select(AlertRule)) is None


def test_alert_changes_without_the_csrf_token_are_refused_and_change_nothing(
    signed_in, receiver, db
):
    assert post(signed_in, f"{PAGE}/channels", name="ops", kind="webhook", url=receiver.url)
    for path, form in (
        (f"{PAGE}/channels", {"name": "sneaky", "kind": "webhook", "url": receiver.url}),
        (f"{PAGE}/channels/ops/remove", {}),
        (f"{PAGE}/channels/ops/test", {}),
        (f"{PAGE}/rules", {"name": "sneaky", "kind": "circuit_open"}),
        (f"{PAGE}/rules/open-circuits/enabled", {"enabled": "false"}),
    ):
        for sent in ({}, {"csrf_token": "x" * 43}):
            answer = signed_in.post(path, data={**form, **sent})
            assert answer.status_code == 403, path
            assert "CSRF" in answer.get_data(as_text=True)
    assert channels(db) == ["ops"]
    with db.session() as session:
        assert session.scalar(select(AlertSend)) is None
        assert session.scalar(select(AlertRule)) is None
