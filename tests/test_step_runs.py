"""One step's run as the pipeline makes it: the retry policy around its tries, and a step
config checked once while its route stays the same."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
from pydantic import BaseModel, field_validator

from hub import http
from hub.connectors import Connector
from hub.services import pipeline
from hub.services import routes as route_store
from hub.store.models import Event, fresh
from tests.test_delivery import scripted  # noqa: F401 - the fixture: the scripted connector

CHECKS: list[str] = []


class Counted(BaseModel):
    label: str = "plain"

    @field_validator("label")
    @classmethod
    def _count(cls, value: str) -> str:
        CHECKS.append(value)
        return value


class CountedConnector(Connector):
    """Answers its config's label; every check of its config is counted in CHECKS."""

    name = "counted"
    description = "test connector"
    Config = Counted
    computes_only = True

    def run(self, payload, ctx):
        return {"label": self.config.label}


@pytest.fixture
def counted(app):
    CHECKS.clear()
    app.extensions["hub.connectors"].register(CountedConnector)
    yield CHECKS
    app.extensions["hub.connectors"].unregister("counted")


def read_route(db, name):
    with db.session() as session:
        route = route_store.get(session, name)
        session.expunge(route)
        return route


def an_event(route: str, body: bytes = b"{}") -> Event:
    return fresh(
        Event,
        id="evt_steprun",
        route=route,
        body=body,
        content_type="application/json",
        request_id="req_steprun",
        attempts=1,
    )


def run(app, route, event, deadline_in=600.0, sleeps=None):
    options = pipeline.RunOptions.of_app(app)
    if sleeps is not None:
        options = dataclasses.replace(options, sleep=sleeps.append)
    rows = []
    outcome = pipeline.run(
        event, route, options, record=rows.append, deadline=time.monotonic() + deadline_in
    )
    return outcome, [(row.outcome, row.try_number) for row in rows]


@pytest.mark.usefixtures("scripted")
def test_a_first_try_that_fails_is_the_retry_policys_first(app, db, add_route, caplog):
    """The first try is made before the policy is built; its retryable failure is still
    the policy's first try: the wait it asked for, the log line naming it, try 2 next."""
    app.config["STEP_TRIES"] = 3
    add_route("later", [{"connector": "scripted", "config": {"fail": ["retry-after"]}}])
    sleeps: list[float] = []
    with caplog.at_level(logging.WARNING, logger="hub.http"):
        outcome, tries = run(app, read_route(db, "later"), an_event("later"), sleeps=sleeps)
    assert outcome.status == "delivered"
    assert tries == [("retryable", 1), ("ok", 2)]
    # The Retry-After the first try's error carried (120 s), within the policy's cap.
    assert sleeps == [http.MAX_RETRY_AFTER]
    assert "scripted: attempt 1/3 failed (status=429 code=upstream_error); retrying in" in (
        caplog.text
    )


@pytest.mark.usefixtures("scripted")
def test_a_first_try_whose_wait_passes_the_deadline_is_the_last(app, db, add_route):
    app.config["STEP_TRIES"] = 3
    add_route("later", [{"connector": "scripted", "config": {"fail": ["retry-after"]}}])
    sleeps: list[float] = []
    outcome, tries = run(
        app, read_route(db, "later"), an_event("later"), deadline_in=30, sleeps=sleeps
    )
    assert (outcome.status, outcome.retry_after) == ("retryable", 120)
    assert (tries, sleeps) == ([("retryable", 1)], [])


@pytest.mark.usefixtures("scripted")
@pytest.mark.parametrize("tries", [1, 2])
def test_retries_end_with_the_last_tries_error(app, db, add_route, tries):
    app.config["STEP_TRIES"] = tries
    add_route("later", [{"connector": "scripted", "config": {"fail": ["retry", "retry"]}}])
    sleeps: list[float] = []
    outcome, rows = run(app, read_route(db, "later"), an_event("later"), sleeps=sleeps)
    assert outcome.status == "retryable" and "503" in outcome.error
    assert rows == [("retryable", n + 1) for n in range(tries)]
    assert len(sleeps) == tries - 1


def test_a_plain_step_config_is_checked_once_while_its_route_stays(app, db, add_route, counted):
    add_route("plain", [{"connector": "counted", "config": {"label": "fixed"}}])
    route = read_route(db, "plain")
    counted.clear()  # the checks of the route's save
    for _ in range(3):
        outcome, _rows = run(app, route, an_event("plain"))
        assert outcome.result == {"label": "fixed"}
    assert counted == ["fixed"]
    # The route read again (the route cache expired, or the route was saved again) is
    # checked again: a change to it is never hidden by the last read's check.
    add_route("plain", [{"connector": "counted", "config": {"label": "changed"}}])
    del counted[1:]
    outcome, _rows = run(app, read_route(db, "plain"), an_event("plain"))
    assert outcome.result == {"label": "changed"}
    assert counted == ["fixed", "changed"]


def test_a_templated_step_config_is_rendered_and_checked_on_every_run(app, db, add_route, counted):
    add_route("templated", [{"connector": "counted", "config": {"label": "n={{ payload.n }}"}}])
    route = read_route(db, "templated")
    counted.clear()  # the checks of the route's save
    for n in (1, 2):
        outcome, _rows = run(app, route, an_event("templated", b'{"n": %d}' % n))
        assert outcome.result == {"label": f"n={n}"}
    assert counted == ["n=1", "n=2"]
