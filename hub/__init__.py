"""The webhook hub: ``create_app()`` builds it; ``flask --app hub`` and gunicorn use it."""

from __future__ import annotations

import os
import threading
from typing import Any

from flask import Flask

from hub.cache import TTLCache
from hub.config import DEFAULTS, ENV_PREFIX


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env(ENV_PREFIX)
    if config:
        app.config.from_mapping(config)
    os.makedirs(app.instance_path, exist_ok=True)
    app.json.sort_keys = False

    from hub import (
        admin,
        cli,
        crypto,
        db,
        errors,
        ingest,
        keys,
        logs,
        metrics,
        openapi,
        ratelimit,
        secret_key,
        system,
    )
    from hub.connectors import load_connectors
    from hub.groupcommit import GroupCommitter
    from hub.worker import Notifier

    logs.init_app(app)
    secret_key.init_app(app)
    crypto.init_app(app)
    db.init_app(app)
    ratelimit.init_app(app)
    errors.init_app(app)
    app.extensions["hub.keys"] = keys.KeyCache(float(app.config["KEY_CACHE_SECONDS"]))
    app.extensions["hub.routes"] = TTLCache(float(app.config["ROUTE_CACHE_SECONDS"]))
    # Set when an async event is committed, so an idle worker in this process starts at once.
    app.extensions["hub.wakeup"] = threading.Event()
    app.extensions["hub.notifier"] = Notifier(app.extensions["hub.db"])
    app.extensions["hub.commits"] = GroupCommitter(app.extensions["hub.db"])
    only = [n for n in str(app.config.get("CONNECTORS") or "").split(",") if n.strip()]
    app.extensions["hub.connectors"] = load_connectors(only or None, app.logger)
    metrics.init_app(app)
    _trust_proxies(app)
    app.register_blueprint(system.bp)
    app.register_blueprint(ingest.bp)
    app.register_blueprint(admin.bp)
    openapi.init_app(app)
    cli.init_app(app)
    return app


def _trust_proxies(app: Flask) -> None:
    """With HUB_TRUSTED_PROXIES=N the client address is X-Forwarded-For's Nth entry from the
    right (what the nearest trusted proxy saw); with 0 the header is never believed."""
    from werkzeug.middleware.proxy_fix import ProxyFix

    value = app.config.get("TRUSTED_PROXIES") or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"HUB_TRUSTED_PROXIES: expected how many proxies, 0 or more: {value!r}")
    if value:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=value)
