"""Liveness, readiness, metrics: /health answers while the process runs, /ready when it can
work, /metrics (for Prometheus, with HUB_METRICS_TOKEN or an admin key) what it has done."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Response, current_app, jsonify
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError

from hub.ops import metrics
from hub.store.db import (
    UPGRADE_COMMAND,
    current_revision,
    get_db,
    get_session,
    head_revision,
    is_unavailable,
)
from hub.web.auth import Refusal, check_admin_key, presented_key
from hub.web.errors import database_unavailable, schema_outdated

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
        return schema_outdated(
            f"Database schema is at {current or 'nothing'}, the hub needs {head}: "
            f"run `{UPGRADE_COMMAND}`"
        )
    return jsonify({"status": "ready", "database": db.dialect, "schema": current}), 200


@bp.get("/metrics")
def metrics_text():
    refusal = refuse_scraper()
    if refusal is not None:
        return refusal
    return Response(metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


def refuse_scraper():
    """None when the request may read the metrics: HUB_METRICS_TOKEN as a bearer token (what
    Prometheus is given), or an admin API key; otherwise the admin key's refusal (401 with
    a WWW-Authenticate challenge, or 403), worded as on every admin face."""
    token = current_app.extensions["hub.metrics.token"]
    presented = presented_key()
    if token and presented and hmac.compare_digest(presented.encode(), token.encode()):
        return None
    checked = check_admin_key(presented)
    get_session().commit()  # end the lookup's transaction (on SQLite, its lock with it)
    if not isinstance(checked, Refusal):
        return None
    response, status = checked.response()
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="hub metrics"'
    return response, status
