"""The webhook hub: ``create_app()`` builds it; ``flask --app hub`` and gunicorn use it."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from flask import Flask

from hub.config import DEFAULTS, ENV_PREFIX


def create_app(config: dict[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env(ENV_PREFIX)
    if config:
        app.config.from_mapping(config)
    os.makedirs(app.instance_path, exist_ok=True)
    app.json.sort_keys = False
    _configure_logging(app)

    from hub import (
        admin,
        cli,
        crypto,
        db,
        errors,
        ingest,
        keys,
        openapi,
        ratelimit,
        secret_key,
        system,
    )
    from hub.connectors import load_connectors

    secret_key.init_app(app)
    crypto.init_app(app)
    db.init_app(app)
    ratelimit.init_app(app)
    errors.init_app(app)
    app.extensions["hub.keys"] = keys.KeyCache(float(app.config["KEY_CACHE_SECONDS"]))
    # Set when an async event is committed, so an idle worker in this process starts at once.
    app.extensions["hub.wakeup"] = threading.Event()
    only = [n for n in str(app.config.get("CONNECTORS") or "").split(",") if n.strip()]
    app.extensions["hub.connectors"] = load_connectors(only or None, app.logger)
    app.register_blueprint(system.bp)
    app.register_blueprint(ingest.bp)
    app.register_blueprint(admin.bp)
    openapi.init_app(app)
    cli.init_app(app)
    return app


def _configure_logging(app: Flask) -> None:
    if not logging.getLogger("hub").handlers and not app.testing:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger("hub").addHandler(handler)
        logging.getLogger("hub").setLevel(logging.INFO)
