"""Schemathesis against the hub served on 127.0.0.1: generated requests for every operation
of /openapi.json get no 5xx and no answer that breaks the document.

Bounded: a few examples per operation and no per-example deadline, so the run stays well
under a minute on a shared machine. Marked slow: it serves a real HTTP server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks
from werkzeug.serving import make_server

EXAMPLES_PER_OPERATION = 12
# What the document promises: no server error, and every answer's status, content type,
# headers and body as documented. (Whether a schema-valid body is accepted is not one of
# them: a route's step config is checked against its connector and answered 422.)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


@pytest.fixture
def served(app, add_route, seed_routes, receiver) -> Iterator[str]:
    add_route("orders", [{"connector": "http", "config": {"url": receiver.url}}])
    app.config.update(LISTEN_WAIT=0.2)  # each generated `hub listen` poll answers quickly
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


def explore(operation, base_url: str, headers: dict, failures: list[str]) -> None:
    """Up to EXAMPLES_PER_OPERATION generated cases of one operation; failures collected."""

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case):
        try:
            case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS)
        except Exception as exc:  # schemathesis's failures: report every operation's
            failures.append(f"{operation.method.upper()} {operation.path}: {exc}"[:2000])
            raise

    with contextlib.suppress(Exception):  # collected above, with the operation's name
        run()


@pytest.mark.slow
def test_generated_requests_get_no_5xx_and_answers_that_fit_the_document(served, make_key):
    headers = {"X-API-Key": make_key(admin=True, name="schemathesis")}
    schema = schemathesis.openapi.from_url(f"{served}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:
        explore(operation, served, headers, failures)
    assert not failures, "\n\n".join(failures)
