"""The admin dashboard: server-rendered pages under HUB_DASHBOARD_PREFIX (``/dashboard``).

Jinja templates and a small plain script, every file served by the hub itself; a
Content-Security-Policy without inline script or style on every answer. The pages are thin
views over the service layer the admin API uses (``hub.services.keys``, ``hub.services.routes``,
``hub.services.events``). HUB_DASHBOARD=false leaves it out entirely (its paths answer 404).
"""

from __future__ import annotations

import re

from flask import Flask, redirect, url_for

# Paths the hub itself answers: the dashboard may not sit on or under one of them.
RESERVED = (
    "/hooks",
    "/api",
    "/events",
    "/health",
    "/ready",
    "/admin/api",
    "/openapi.json",
    "/docs",
)
PREFIX_RE = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")


def dashboard_prefix(value: object) -> str:
    """HUB_DASHBOARD_PREFIX checked: a path such as ``/admin/ui``, clear of the hub's own."""
    prefix = str(value or "").rstrip("/")
    if not PREFIX_RE.match(prefix):
        raise ValueError(
            f"HUB_DASHBOARD_PREFIX: expected a path such as /dashboard or /admin/ui: {value!r}"
        )
    for taken in RESERVED:
        if prefix == taken or prefix.startswith(taken + "/"):
            raise ValueError(f"HUB_DASHBOARD_PREFIX: {prefix} is the hub's own path {taken}")
    if prefix == "/admin":  # the admin API answers every path under it; /admin/ui is fine
        raise ValueError("HUB_DASHBOARD_PREFIX: /admin is the admin API's; use /admin/ui")
    return prefix


def init_app(app: Flask) -> None:
    """Register the pages under HUB_DASHBOARD_PREFIX (the settings model has checked the
    types; the prefix is checked here against the hub's own paths)."""
    prefix = dashboard_prefix(app.config.get("DASHBOARD_PREFIX"))
    if not app.config.get("DASHBOARD"):
        return
    from hub.dashboard.views import bp

    app.register_blueprint(bp, url_prefix=prefix)
    # The hub's root opens the dashboard (its sign-in page when nobody is signed in).
    app.add_url_rule("/", "dashboard_home", lambda: redirect(url_for("dashboard.overview")))
