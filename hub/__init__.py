"""The webhook hub: ``create_app()`` builds it; ``flask --app hub`` and gunicorn use it.

Importing the package imports nothing else (Flask and the rest load in ``create_app``): the
hub's pytest plugin lives in it, and pytest loads that plugin in every project that has the
hub installed, whether or not its tests use the hub.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """``config`` overrides settings by their ``app.config`` names (``{"SYNC_TIMEOUT": 2}``),
    checked like the environment's; other keys (``TESTING``) go to ``app.config`` as given."""
    # Imported here, not above: `python -m hub.config` must find the module not yet loaded,
    # and the pytest plugin (hub.pytest_plugin) must not load Flask into other projects.
    from flask import Flask

    from hub.config import data_dir, is_setting, load_settings, warn_unknown_variables
    from hub.store.cache import TTLCache

    settings = load_settings(config)  # SettingsError stops the start, one line per bad value
    # The instance folder is the data directory (HUB_DATA_DIR): the SQLite database, the
    # development secret key and the metrics directory live there.
    instance = data_dir(settings.data_dir or "")
    app = Flask(__name__, instance_path=str(instance), instance_relative_config=True)
    app.config.from_mapping(settings.as_config())
    app.config.from_mapping({k: v for k, v in (config or {}).items() if not is_setting(k)})
    app.json.sort_keys = False

    from hub import cli, dashboard, providers, secret_key
    from hub.connectors import load_connectors
    from hub.ops import logs, metrics
    from hub.services import breaker, ratelimit, writer
    from hub.services import events as event_store
    from hub.services import intake as ingest
    from hub.services import listen as listen_service
    from hub.services.delivery import Notifier
    from hub.store import crypto, db
    from hub.store.groupcommit import GroupCommitter
    from hub.web import admin_api as admin
    from hub.web import context, errors, hooks, openapi, seed, system
    from hub.web import listen as listen_api

    logs.init_app(app)
    context.init_app(app)
    warn_unknown_variables()
    secret_key.init_app(app)
    crypto.init_app(app)
    db.init_app(app)
    ratelimit.init_app(app)
    errors.init_app(app)
    tracing = start_tracing(app)
    app.extensions["hub.routes"] = TTLCache(float(app.config["ROUTE_CACHE_SECONDS"]))
    # Set when an async event is committed, so an idle worker in this process starts at once.
    app.extensions["hub.wakeup"] = threading.Event()
    app.extensions["hub.notifier"] = Notifier(app.extensions["hub.db"])
    # Writes that lock rows (a delivery's ending and its event's roll-up, a sync run's end)
    # share one writer; new events and their deliveries, only inserted, two on PostgreSQL.
    # Under gunicorn both new events and a sync run's end (one destination: rows no other
    # writer touches) go to the writer process, these committers only when it can't.
    hub_db = app.extensions["hub.db"]
    app.extensions["hub.commits"] = GroupCommitter.of(hub_db, tracing, "commits")
    inserts = GroupCommitter.of(
        hub_db, tracing, "inserts", writers=2 if hub_db.dialect == "postgresql" else 1
    )
    if tracing is None and writer.socket_path() is not None:
        # gunicorn's master runs a writer process (hub/services/writer.py): new events are
        # committed there, and here only when it can't take them.
        inserts = writer.WriterClient(
            writer.socket_path(), inserts, float(app.config["WRITER_TIMEOUT"])
        )
    app.extensions["hub.inserts"] = inserts
    only = [n for n in str(app.config.get("CONNECTORS") or "").split(",") if n.strip()]
    app.extensions["hub.connectors"] = load_connectors(only or None, app.logger)
    # Providers are what is installed, the same for every app of the process: (re)loaded
    # here so that a name conflict is logged at start, not at a sender's first request.
    providers.reload()
    metrics.init_app(
        app,
        lambda cap: event_store.queue_gauges(app.extensions["hub.db"], cap),
        lambda cap: breaker.state_gauges(app.extensions["hub.db"], cap),
    )
    if tracing is None:  # the webhook lane (hub/web/lane.py), behind ProxyFix if any
        from hub.web.lane import HooksLane

        app.wsgi_app = HooksLane(app, app.wsgi_app)
    if app.config["TRUSTED_PROXIES"]:
        # The client address is X-Forwarded-For's Nth entry from the right: what the nearest
        # trusted proxy saw; the scheme likewise X-Forwarded-Proto's, so a request that reached
        # the proxy over TLS is secure (the dashboard's cookie says Secure). With 0 neither
        # header is believed.
        from werkzeug.middleware.proxy_fix import ProxyFix

        proxies = app.config["TRUSTED_PROXIES"]
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    app.register_blueprint(system.bp)
    ingest.init_app(app)
    app.register_blueprint(hooks.bp)
    app.register_blueprint(seed.bp)
    app.register_blueprint(admin.bp)
    listen_service.init_app(app)
    app.register_blueprint(listen_api.bp)
    openapi.init_app(app)
    cli.init_app(app)
    dashboard.init_app(app)
    return app


def start_tracing(app: Flask) -> Any:
    """OpenTelemetry traces when HUB_OTEL=true (hub.ops.tracing); else None, and no module of
    OpenTelemetry is imported: what the services test before making a span."""
    app.extensions["hub.tracing"] = None
    if not app.config["OTEL"]:
        return None
    try:
        from hub.ops import tracing
    except ImportError as exc:
        from hub.config import SettingsError

        raise SettingsError(
            [
                "HUB_OTEL=true needs OpenTelemetry installed: pip install 'webhook-hub[otel]' "
                f"({exc.name or 'a module'} is missing)"
            ]
        ) from None
    return tracing.init_app(app)
