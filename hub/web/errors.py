"""JSON errors everywhere: ``{"error": "sentence", "code": "machine_code"}``, never a traceback."""

from __future__ import annotations

import logging

from flask import Flask, current_app, jsonify
from werkzeug.exceptions import HTTPException

from hub.store.db import (
    SCHEMA_OUTDATED,
    end_request_session,
    get_db,
    is_schema_outdated,
    is_unavailable,
)

log = logging.getLogger("hub.errors")

# The seed's sentences where it has one; plain ones elsewhere.
MESSAGES = {
    400: "Bad request",
    401: "Invalid API key",
    403: "Forbidden",
    404: "Endpoint not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request body too large",
    414: "Request line too long",
    415: "Unsupported media type",
    417: "Unsupported Expect header",
    422: "Unprocessable request",
    429: "Too many requests",
    431: "Request headers too large",
    500: "Server error",
    501: "Not implemented",
    502: "Bad gateway",
    503: "Service unavailable",
    504: "Gateway timeout",
}
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    422: "invalid",
    429: "rate_limited",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
    504: "timeout",
}


def error_response(status: int, message: str | None = None, code: str | None = None, **extra):
    body = {"error": message or MESSAGES.get(status, "Error"), "code": code or CODES.get(status)}
    body.update(extra)
    return jsonify(body), status


def database_unavailable():
    """503 with Retry-After: the request was not taken, and the sender should send it again."""
    response, status = error_response(
        503, "The database is unavailable; try again shortly", "database_unavailable"
    )
    response.headers["Retry-After"] = str(int(current_app.config["DB_RETRY_AFTER"]))
    return response, status


def schema_outdated(message: str = SCHEMA_OUTDATED):
    """503 naming the upgrade command: the hub can't work on this database until an admin
    migrates it; the sender should send again later (Retry-After), nothing was taken."""
    response, status = error_response(503, message, "schema_outdated")
    response.headers["Retry-After"] = str(int(current_app.config["DB_RETRY_AFTER"]))
    return response, status


def init_app(app: Flask) -> None:
    app.errorhandler(HTTPException)(http_error)
    app.errorhandler(Exception)(unhandled)


def http_error(exc: HTTPException):
    response, status = error_response(exc.code or 500)
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response, status


def unhandled(exc: Exception):
    """The answer to an exception no view handled: 503 when the database is unavailable or
    not migrated (with what to do), else 500. Logged by its type only: a message can carry
    SQL or a secret."""
    if is_unavailable(exc):
        log.warning("database unavailable (%s): answered 503", type(exc).__name__)
        return database_unavailable()
    end_request_session()
    if is_schema_outdated(exc, get_db()):
        log.error("database schema not up to date (%s): answered 503", type(exc).__name__)
        return schema_outdated()
    log.error("unhandled %s", type(exc).__name__)
    return error_response(500)
