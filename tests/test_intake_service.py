"""The intake service takes a request as a value (``Incoming``), with no Flask request behind
it, and gives back what the HTTP face would answer; the services, the store and ops read
nothing from Flask's request globals."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import pytest

from hub.ops import logs
from hub.services import intake
from tests.rows import event_row, events

ROOT = Path(__file__).resolve().parent.parent
# Modules that must not read a request from Flask: what they need is handed to them.
NO_REQUEST_GLOBALS = ("hub/services", "hub/store", "hub/ops")
FLASK_GLOBALS = {"request", "g", "session"}
# (module, function or None for module level, name): uses that are not a request's values.
ALLOWED = {
    # The database session of each app context is kept on ``g`` and closed at its teardown.
    ("hub/store/db.py", None, "g"),
}


def incoming(body: dict, headers: dict[str, str], route: str = "orders") -> intake.Incoming:
    raw = json.dumps(body).encode()
    return intake.Incoming(
        method="POST",
        route_name=route,
        path=f"/hooks/{route}",
        headers={"Content-Type": "application/json", **headers},
        remote_addr="192.0.2.7",
        request_id="svc-1",
        content_type="application/json",
        content_length=len(raw),
        read=io.BytesIO(raw).read,
    )


def test_a_valid_event_is_accepted_and_stored_pending(app, db, key, add_route):
    add_route("orders", mode="async")
    with app.app_context(), logs.bound():
        accepted = intake.accept(incoming({"n": 1}, {"X-API-Key": key}))
        assert isinstance(accepted, intake.Accepted)
        intake.enqueue(accepted)
        event_id = accepted.event.id
    row = event_row(db, event_id)
    assert row is not None
    assert (row.status, row.route, row.response_status) == ("pending", "orders", 202)
    assert row.key_prefix == key.split("_")[1]
    assert (row.request_id, row.remote_addr, row.method) == ("svc-1", "192.0.2.7", "POST")
    assert json.loads(row.body) == {"n": 1}
    assert "X-API-Key" not in row.headers or row.headers["X-API-Key"] != key


def test_a_bad_key_is_refused_with_the_code_the_http_answer_carries(app, client, db, add_route):
    add_route("orders", mode="async")
    bad = {"X-API-Key": "hk_nothere_" + "x" * 43}
    with app.app_context(), logs.bound():
        told = intake.accept(incoming({"n": 1}, bad))
    assert isinstance(told, intake.Answer)
    http = client.post("/hooks/orders", json={"n": 1}, headers=bad)
    assert (told.status, told.code, told.message) == (
        http.status_code,
        http.get_json()["code"],
        http.get_json()["error"],
    )
    assert (told.status, told.code) == (401, "unauthorized")
    refused = [e for e in events(db) if e.request_id == "svc-1"]
    assert [(e.status, e.reason, e.response_status) for e in refused] == [
        ("rejected", "unauthorized", 401)
    ]


def flask_globals_used(path: Path) -> set[tuple[str | None, str]]:
    """(enclosing function or None, name) for each ``from flask import request/g/session``
    and each ``flask.request`` / ``flask.g`` / ``flask.session`` in the module."""
    found: set[tuple[str | None, str]] = set()

    def visit(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if isinstance(node, ast.ImportFrom) and node.module in ("flask", "flask.globals"):
            found.update((function, a.name) for a in node.names if a.name in FLASK_GLOBALS)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "flask"
            and node.attr in FLASK_GLOBALS
        ):
            found.add((function, node.attr))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text(), str(path)), None)
    return found


def test_services_store_and_ops_read_no_request_from_flask():
    modules = [p for d in NO_REQUEST_GLOBALS for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(modules) > 10
    wrong = []
    for path in modules:
        name = path.relative_to(ROOT).as_posix()
        for function, used in sorted(flask_globals_used(path), key=str):
            if (name, function, used) not in ALLOWED:
                wrong.append(f"{name}: flask.{used} in {function or 'the module'}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("source", "used"),
    [
        ("from flask import g, request\n", {(None, "g"), (None, "request")}),
        ("import flask\ndef f():\n    return flask.session\n", {("f", "session")}),
        ("from flask import current_app\n", set()),
    ],
)
def test_the_check_sees_each_way_of_reaching_a_request(tmp_path, source, used):
    module = tmp_path / "m.py"
    module.write_text(source)
    assert flask_globals_used(module) == used
