"""Liveness and readiness: /health answers while the process runs, /ready when it can work."""

from __future__ import annotations

import logging

from flask import Blueprint, current_app, jsonify
from sqlalchemy.exc import SQLAlchemyError

from hub.db import current_revision, get_db, head_revision, is_unavailable
from hub.errors import database_unavailable, error_response

bp = Blueprint("system", __name__)
log = logging.getLogger("hub.system")


@bp.get("/health")
def health():
    return jsonify({"status": "healthy"}), 200


@bp.get("/ready")
def ready():
    db = get_db()
    head = current_app.extensions.get("hub.schema_head")
    if head is None:
        head = current_app.extensions["hub.schema_head"] = head_revision(db)
    try:
        current = current_revision(db)
    except SQLAlchemyError as exc:
        if not is_unavailable(exc):
            raise
        log.warning("readiness: database unreachable (%s)", type(exc).__name__)
        return database_unavailable()
    if current != head:
        return error_response(
            503,
            f"Database schema is at {current or 'nothing'}, the hub needs {head}: "
            "run `flask --app hub db upgrade`",
            "schema_outdated",
        )
    return jsonify({"status": "ready", "database": db.dialect, "schema": current}), 200
