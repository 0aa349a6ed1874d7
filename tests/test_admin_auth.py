"""A refused admin key is told the same thing on every face that takes one: the admin API,
/metrics and the dashboard's sign-in answer each refusal (no key, an unknown key, a revoked
one, an expired one, a key without admin rights) with the same status, code and sentence."""

from __future__ import annotations

import html
import re
from datetime import timedelta

import pytest

from hub.services import keys as key_store
from tests.test_dashboard import other_app, sign_in

UNKNOWN = "hk_0123abcd_" + "k" * 43  # well-formed: only the database can tell
ALERT = re.compile(r'<p class="flash flash-error" role="alert" id="key-error">(.*?)</p>', re.S)

EXPECTED = {
    "no key": (401, "unauthorized", "No API key was given: this needs an admin key"),
    "unknown key": (401, "unauthorized", "Invalid API key"),
    "revoked": (401, "unauthorized", "API key has been revoked"),
    "expired": (401, "unauthorized", "API key has expired"),
    "not admin": (
        403,
        "forbidden",
        "This API key is not an admin key; make one with `hub keys create --admin NAME`",
    ),
}


@pytest.fixture
def presented(make_key, db) -> dict[str, str]:
    """A key for each refusal ("" is no key at all)."""
    revoked = make_key(admin=True, name="gone")
    with db.session() as session:
        key_store.revoke(session, revoked.split("_")[1])
    expired = make_key(admin=True, name="old")
    with db.session() as session:
        row = key_store.get(session, expired.split("_")[1])
        row.expires_at = row.created_at - timedelta(seconds=1)
    return {
        "no key": "",
        "unknown key": UNKNOWN,
        "revoked": revoked,
        "expired": expired,
        "not admin": make_key(name="sender"),
    }


def api_answer(client, path: str, key: str) -> tuple[int, str, str]:
    answer = client.get(path, headers={"X-API-Key": key} if key else {})
    return answer.status_code, answer.json["code"], answer.json["error"]


def sign_in_answer(client, key: str) -> tuple[int, str]:
    answer = sign_in(client, key)
    shown = ALERT.search(answer.get_data(as_text=True))
    return answer.status_code, html.unescape(shown.group(1)) if shown else ""


@pytest.mark.parametrize("refusal", list(EXPECTED))
def test_each_refusal_reads_the_same_on_the_admin_api_metrics_and_the_dashboard(
    app, client, presented, refusal
):
    app.config["REFUSAL_LIMIT"] = None  # the sign-ins below are not a flood
    key = presented[refusal]
    status, code, sentence = EXPECTED[refusal]
    assert api_answer(client, "/admin/api/keys", key) == (status, code, sentence)
    assert api_answer(client, "/admin/api/events", key) == (status, code, sentence)
    assert api_answer(client, "/metrics", key) == (status, code, sentence)
    assert sign_in_answer(app.test_client(), key) == (status, sentence)


def test_with_a_metrics_token_a_refused_key_reads_the_same_and_the_token_still_opens(
    app, presented
):
    token = "t" * 32
    with_token = other_app(app, METRICS_TOKEN=token)
    try:
        client = with_token.test_client()
        for refusal, key in presented.items():
            assert api_answer(client, "/metrics", key) == EXPECTED[refusal], refusal
        opened = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
        assert opened.status_code == 200 and "hub_queue_due_events" in opened.text
    finally:
        with_token.extensions["hub.db"].dispose()


def test_a_refused_key_is_asked_for_again_and_an_admin_key_opens_every_face(app, client, make_key):
    admin = make_key(admin=True, name="admin")
    assert client.get("/metrics").headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/admin/api/keys", headers={"X-API-Key": admin}).status_code == 200
    assert client.get("/metrics", headers={"X-API-Key": admin}).status_code == 200
    signed = sign_in(app.test_client(), admin)
    assert signed.status_code == 303
