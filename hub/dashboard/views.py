"""The dashboard's pages: thin views over the service layer the admin API uses.

Every list is bounded (a page of events, at most so many routes, keys or attempts), every
query walks the indexes the admin API's do, and every change goes through the same
functions (and the same checks, with the same sentences) as ``/admin/api``, which record
it in the audit log with ``actor()``: the signed-in key, the browser's address.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from flask import (
    Blueprint,
    abort,
    current_app,
    g,
    redirect,
    render_template,
    request,
    url_for,
)
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from hub import providers
from hub.connectors import config_fields, describe_validation_error
from hub.dashboard import charts, inspector
from hub.dashboard import session as dash
from hub.services import alerts as alert_store
from hub.services import audit, delivery, paging, pipeline, ratelimit, step_secrets
from hub.services import destinations as destination_store
from hub.services import events as event_store
from hub.services import intake as ingest
from hub.services import keys as key_store
from hub.services import listen as listening
from hub.services import routes as route_store
from hub.store.crypto import get_box
from hub.store.db import get_db, get_read_session, get_session
from hub.store.models import (
    DEFAULT_DESTINATION,
    DUE_STATUSES,
    AttemptOutcome,
    Delivery,
    Event,
    EventStatus,
    utcnow,
)
from hub.web import errors
from hub.web import schemas as m
from hub.web.auth import Refusal, check_admin_key, log_admin_change, request_actor
from hub.web.context import request_id

bp = Blueprint(
    "dashboard",
    __name__,
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)
log = logging.getLogger("hub.dashboard")

PAGE = 50  # events per page
TAIL_MAX = 50  # new events one live-tail poll adds
MAX_ROUTES = 200  # routes listed
MAX_CARDS = 60  # routes charted on the overview, the busiest first
MAX_KEYS = 500  # keys listed, newest first
MADE_FORMS = 10  # key forms a session remembers having sent, against a resend
MAX_ATTEMPTS = 200  # attempts shown on an event's page, newest
SHOW_BYTES = 256 * 1024  # of a body or result shown on an event's page
QUEUE_CAP = 10_000  # queued events counted before the overview says "more than"
# Bodies one page of a body-text search reads: at most HUB_ADMIN_SEARCH_WINDOW, and no more
# than this, so a search page answers quickly; "Older" searches on past them.
SEARCH_WINDOW = 5_000
BUCKETS = 12  # slices of the overview's hour
TOP_REASONS = 5
OPEN_ENDPOINTS = ("dashboard.sign_in", "dashboard.static")
FILTER_FIELDS = ("route", "status", "reason", "key", "since", "until", "request_id", "q")


# --- every request: the session, CSRF, the sign-in wall, the headers ---


@bp.before_request
def guard():
    if request.endpoint == "dashboard.static":
        return None
    dash.load()
    if request.method in dash.CHANGES and not dash.csrf_ok():
        log.warning("dashboard: %s %s refused: no valid CSRF token", request.method, request.path)
        return page(
            "dashboard/error.html",
            403,
            title="Form expired",
            message="This form did not come from this dashboard session (its CSRF token is "
            "missing or stale). Go back, reload the page and try again.",
        )
    if g.admin is None and request.endpoint not in OPEN_ENDPOINTS:
        if request.headers.get("X-Dashboard-Fetch"):
            return "", 401  # a poll from a page whose session ended: the script reloads
        target = request.full_path.rstrip("?") if request.method == "GET" else None
        return redirect(url_for("dashboard.sign_in", next=target))
    if g.admin is not None:
        g.admin_prefix = g.admin.prefix  # the admin API's change log names the key
    return None


@bp.after_request
def finish(response):
    if "admin_prefix" in g:
        # Log the change with the admin key and forget cached keys and routes, as the API does.
        response = log_admin_change(response)
    return dash.save(response, url_for("dashboard.overview"))


@bp.app_template_global()
def csrf_token() -> str:
    return dash.csrf_token()


@bp.app_template_global()
def retention_default(days: int) -> str:
    """How long a route without retention_days keeps its events, in words."""
    if not days:
        return "the default: kept until purged by hand"
    return f"the default: {days} day(s)"


@bp.context_processor
def statuses() -> dict[str, Any]:
    """The event statuses and call outcomes the templates name, from their one definition."""
    return {
        "EventStatus": EventStatus,
        "AttemptOutcome": AttemptOutcome,
        "DUE_STATUSES": DUE_STATUSES,
    }


@bp.app_template_filter("when")
def when(value: Any) -> str:
    """A stored time as ``2026-11-24 10:21:38`` UTC (a listing's ISO string or a datetime)."""
    if not value:
        return "—"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return value
    return value.strftime("%Y-%m-%d %H:%M:%S")


@bp.app_template_filter("age")
def age(value: datetime | timedelta | None) -> str:
    if value is None:
        return "—"
    delta = value if isinstance(value, timedelta) else utcnow() - value
    seconds = max(0, int(delta.total_seconds()))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def page(template: str, status: int = 200, **context: Any):
    """A template rendered with the signed-in key; a whole page (not a ``_fragment``) shows
    and clears the messages waiting for it."""
    whole = not template.split("/")[-1].startswith("_")
    context.setdefault("flashes", dash.take_flashes() if whole else [])
    return render_template(template, admin=g.get("admin"), **context), status


def actor() -> audit.Actor:
    """The signed-in admin, as the audit log records them."""
    return request_actor(audit.DASHBOARD)


def fragment() -> bool:
    return bool(request.args.get("fragment"))


def errors_by_field(errors: list[str]) -> dict[str, list[str]]:
    """Problems as the API words them (``steps[0] (http): url: ...``), by the form field
    each belongs beside; ``""`` holds those of no one field."""
    fields: dict[str, list[str]] = {}
    for error in errors:
        head = error.split(":", 1)[0].split(" ", 1)[0]
        name = head.split("[", 1)[0]
        parts = name.split(".")
        if parts[0] == "verify":
            name = "verify_" + (parts[1] if len(parts) > 1 else "scheme")
            if name == "verify_secrets_env":
                name = "verify_secrets"
        else:
            name = parts[0]
        fields.setdefault(name, []).append(error)
    return fields


# --- signing in and out ---


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a page of this dashboard, never another site."""
    home = url_for("dashboard.overview")
    if target and target.startswith(home) and "//" not in target and "\\" not in target:
        return target
    return home


@bp.route("/sign-in", methods=["GET", "POST"])
def sign_in():
    if request.method == "GET":
        if g.admin is not None:
            return redirect(safe_next(request.args.get("next")))
        return page("dashboard/sign_in.html", next=request.args.get("next", ""))
    session = get_session()
    limiter = current_app.extensions["hub.ratelimit"]
    rate = ingest.refusal_rate(current_app.config)
    target = request.form.get("next", "")

    def refuse(status: int, message: str):
        return page("dashboard/sign_in.html", status, error=message, next=target)

    presented = request.form.get("key", "").strip()
    checked = check_admin_key(presented)
    if isinstance(checked, Refusal):
        log.warning("dashboard: sign-in refused (%s)", checked.reason)
        # A stranger's guess (not a known key that lacks admin rights) counts against this
        # address's refusal budget, as a refused webhook does; once it is spent, every guess
        # is answered 429 until the window ends (a valid key still signs in: an admin is not
        # locked out by a flood beside them).
        if checked.status == 401 and rate is not None:
            decision = limiter.peek(session, ingest.refusal_bucket(request.remote_addr), rate)
            if not decision.allowed:
                session.commit()
                return refuse(
                    429,
                    "Too many refused requests from this address: try again in "
                    f"{decision.retry_after} s.",
                )
            ratelimit.check(limiter, session, [(ingest.refusal_bucket(request.remote_addr), rate)])
        session.commit()
        return refuse(checked.status, checked.sentence)
    info = checked
    key_store.touch(session, info)
    session.commit()
    dash.sign_in(info, presented, request_actor(audit.DASHBOARD, info.prefix))
    log.info("dashboard: admin key %s signed in", info.prefix)
    return redirect(safe_next(target), 303)


@bp.post("/sign-out")
def sign_out():
    who = None
    if g.admin is not None:
        log.info("dashboard: admin key %s signed out", g.admin.prefix)
        who = actor()
    g.pop("admin_prefix", None)
    dash.sign_out("You are signed out.", who)
    return redirect(url_for("dashboard.sign_in"), 303)


@bp.post("/sign-out-everywhere")
def sign_out_everywhere():
    """End every session of the signed-in key (a browser left signed in elsewhere, a copied
    cookie), without revoking the key."""
    prefix = g.admin.prefix
    ended = dash.end_every_session(prefix, actor())
    log.info("dashboard: admin key %s signed out everywhere (%d sessions)", prefix, ended)
    dash.sign_out(f"Every session of key {prefix} has ended ({ended}); sign in again here.")
    return redirect(url_for("dashboard.sign_in"), 303)


# --- overview ---


@bp.get("/")
def overview():
    session = get_read_session()
    now = utcnow()
    hour = event_store.timeline(
        session,
        now - timedelta(hours=1),
        now,
        BUCKETS,
        int(current_app.config["DASHBOARD_OVERVIEW_MAX_ROWS"]),
    )
    queue = event_store.queue(session, now, QUEUE_CAP)
    routes = route_store.list_routes(session)
    known = {r.name for r in routes}
    empty = {"total": 0, "series": {}, "by_status": {}, "by_reason": {}}
    cards = []
    for route in routes:
        figures = hour.routes.get(route.name, empty)
        cards.append(
            {
                "name": route.name,
                "route": route,
                "figures": figures,
                "chart": charts.stacked(figures["series"], BUCKETS),
                "reasons": top(figures["by_reason"]),
                "queued": queue.by_route.get(route.name, 0),
            }
        )
    # The busiest routes first; past MAX_CARDS the rest are counted, not drawn.
    cards.sort(key=lambda c: (-c["figures"]["total"], c["name"]))
    hidden = cards[MAX_CARDS:]
    # Names no route has (a stranger's /hooks/anything) share one card: a scan of made-up
    # names cannot grow the page.
    others = {name: f for name, f in hour.routes.items() if name not in known}
    other = None
    if others:
        merged: dict[str, list[int]] = {}
        for figures in others.values():
            for status, values in figures["series"].items():
                total = merged.setdefault(status, [0] * BUCKETS)
                merged[status] = [a + b for a, b in zip(total, values, strict=True)]
        other = {
            "chart": charts.stacked(merged, BUCKETS),
            "total": sum(f["total"] for f in others.values()),
            "names": top({n: f["total"] for n, f in others.items()}),
            "reasons": top(add_up(f["by_reason"] for f in others.values())),
        }
    context = {
        "cards": cards[:MAX_CARDS],
        "hidden": len(hidden),
        "other": other,
        "queue": queue,
        "oldest_age": now - queue.oldest_due if queue.oldest_due else None,
        "hour": hour,
        "by_status": add_up(f["by_status"] for f in hour.routes.values()),
        "reasons": top(add_up(f["by_reason"] for f in hour.routes.values())),
        "now": now,
        "alerts_firing": alert_store.firing_count(session),
    }
    if fragment():
        return page("dashboard/_overview.html", **context)
    return page("dashboard/overview.html", **context)


def add_up(mappings) -> dict[str, int]:
    total: dict[str, int] = {}
    for mapping in mappings:
        for name, n in mapping.items():
            total[name] = total.get(name, 0) + n
    return total


def top(counts: dict[str, int], n: int = TOP_REASONS) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]


# --- events ---


def event_query(args) -> tuple[m.EventQuery | None, dict[str, str], list[str]]:
    """The list's filters from the query string, read by the API's own model."""
    raw = {f: args.get(f, "").strip() for f in FILTER_FIELDS}
    given = {f: v for f, v in raw.items() if v}
    if args.get("cursor"):
        given["cursor"] = args["cursor"]
    try:
        return m.EventQuery.model_validate({**given, "limit": PAGE}), raw, []
    except ValidationError as exc:
        return None, raw, describe_validation_error(exc)


def search_window() -> int:
    return min(int(current_app.config["ADMIN_SEARCH_WINDOW"]), SEARCH_WINDOW)


def cursor_of(row: dict) -> str:
    return event_store.encode_cursor(datetime.fromisoformat(row["received_at"]), row["id"])


def filter_args(raw: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in raw.items() if v}


@bp.get("/events")
def events():
    session = get_read_session()
    query, raw, errors = event_query(request.args)
    result = None
    if query is not None:
        try:
            listing = event_store.Listing(
                event_store.Filters.of(query),
                limit=PAGE,
                cursor=query.cursor,
                text=query.q,
                window=search_window(),
            )
            result = event_store.search(session, listing)
        except event_store.BadCursor:
            errors = ["cursor: not a cursor from this hub; start again from the newest"]
    rows = result.events if result else []
    for row in rows:
        row["cursor"] = cursor_of(row)
    return page(
        "dashboard/events.html",
        400 if errors else 200,
        rows=rows,
        result=result,
        raw=raw,
        args=filter_args(raw),
        errors=errors_by_field(errors),
        statuses=event_store.STATUSES,
        route_names=[r.name for r in route_store.list_routes(session)[:MAX_ROUTES]],
        first_page=not request.args.get("cursor"),
        # The tail shows what arrives after the newest row (or after now, on an empty list).
        tail_after=rows[0]["cursor"] if rows else event_store.encode_cursor(utcnow(), "evt_"),
    )


@bp.get("/events/tail")
def events_tail():
    """Rows newer than ``after`` (the newest row a page shows), newest first, for the live
    tail; at most TAIL_MAX, with a note when more arrived than that."""
    query, raw, errors = event_query(request.args)
    try:
        after_at, after_id = event_store.decode_cursor(request.args.get("after", ""))
    except event_store.BadCursor:
        after_at = after_id = None
    if query is None or errors or after_at is None:
        return "", 204
    filters = event_store.Filters.of(query)
    since = max(filters.since, after_at) if filters.since else after_at
    listing = event_store.Listing(
        dataclasses.replace(filters, since=since),
        limit=TAIL_MAX,
        text=query.q,
        window=search_window(),
    )
    result = event_store.search(get_read_session(), listing)
    rows = []
    for row in result.events:
        received = datetime.fromisoformat(row["received_at"])
        if (received, row["id"]) > (after_at, after_id):
            row["cursor"] = cursor_of(row)
            rows.append(row)
    if not rows:
        return "", 204
    return page("dashboard/_event_rows.html", rows=rows, fresh=True, more=result.next_cursor)


def get_event_or_404(event_id: str) -> Event:
    event = get_read_session().get(Event, event_id[:32]) if "\x00" not in event_id else None
    if event is None:
        abort(404)
    return event


def shown_text(data: bytes | None) -> tuple[str, bool, bool]:
    """A body as text for a page: (text, pretty-printed JSON?, cut short?)."""
    raw = data or b""
    cut = len(raw) > SHOW_BYTES
    text = raw[:SHOW_BYTES].decode("utf-8", "replace")
    if not cut:
        try:
            return json.dumps(json.loads(text), indent=2, ensure_ascii=False), True, False
        except ValueError:
            pass
    return text, False, cut


def shown_json(value: Any) -> tuple[str, bool]:
    text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    return text[:SHOW_BYTES], len(text) > SHOW_BYTES


@bp.get("/events/<event_id>")
def event_detail(event_id: str):
    session = get_read_session()
    event = get_event_or_404(event_id)
    attempts, older = event_store.latest_attempts(session, event.id, MAX_ATTEMPTS)
    # Each delivery (one destination of the event) with its own attempts, side by side;
    # attempts made before deliveries existed stay in the event's one list.
    rows = event_store.delivery_rows(session, event.id)
    by_delivery: dict[str | None, list] = {}
    for attempt in attempts:
        by_delivery.setdefault(attempt.delivery_id, []).append(attempt)
    known = {row.id for row in rows}
    deliveries = [(row, by_delivery.get(row.id, [])) for row in rows]
    # What local apps behind `hub listen` answered: attempts of no delivery, shown apart.
    listened = [a for a in attempts if listening.is_listener_attempt(a)]
    attempts = [a for a in attempts if not listening.is_listener_attempt(a)]
    loose = [a for a in attempts if a.delivery_id not in known]
    body, pretty, body_cut = shown_text(event.body)
    result, result_cut = shown_json(event.result) if event.result is not None else ("", False)
    replayable = event.status in event_store.REPLAYABLE
    why_not = None if replayable else event_store.why_not_replayed(session, [event.id])[event.id]
    context = {
        "event": event,
        "attempts": attempts,
        "deliveries": deliveries,
        "loose_attempts": loose,
        "listened": listened,
        "older_attempts": older,
        "body": body,
        "pretty": pretty,
        "body_cut": body_cut,
        "size": event.body_size if event.body_size is not None else len(event.body or b""),
        "result": result,
        "result_cut": result_cut,
        "replayable": replayable,
        "why_not": why_not,
        "delivery_ended": event_store.DELIVERY_ENDED,
        "in_flight": event.status
        in (EventStatus.PENDING, EventStatus.PROCESSING, EventStatus.RETRYING),
        **inspected(event, attempts),
    }
    if fragment():
        return page("dashboard/_event.html", **context)
    return page("dashboard/event.html", **context)


@bp.post("/events/<event_id>/replay")
def replay_event(event_id: str):
    session = get_session()
    event = get_event_or_404(event_id)
    if event_store.replay(session, [event.id], actor()):
        session.commit()
        delivery.wake(current_app)
        dash.flash(f"Event {event.id} is queued again.")
    else:
        session.rollback()
        reason = event_store.why_not_replayed(session, [event.id])[event.id]
        dash.flash(f"Not replayed: {reason}.", "error")
    return redirect(url_for("dashboard.event_detail", event_id=event.id), 303)


@bp.post("/deliveries/<delivery_id>/replay")
def replay_delivery(delivery_id: str):
    """Replay one delivery of an event (its destination is called again), as the API's
    POST /admin/api/deliveries/<id>/replay does."""
    session = get_session()
    try:
        row = event_store.replay_delivery(session, delivery_id, actor())
    except event_store.NoSuchDelivery:
        abort(404)
    except event_store.DeliveryNotReplayable as exc:
        session.rollback()
        dash.flash(f"Not replayed: {exc}.", "error")
        row = session.get(Delivery, delivery_id[:32])
    else:
        session.commit()
        delivery.wake(current_app)
        dash.flash(f"The delivery to {row.destination} is queued again.")
    return redirect(url_for("dashboard.event_detail", event_id=row.event_id), 303)


@bp.route("/events/replay", methods=["GET", "POST"])
def replay_events():
    """Bulk replay of a filtered list: a confirmation that says how many, then the replay.
    With a destination (and its route), only that destination's deliveries."""
    source = request.args if request.method == "GET" else request.form
    query, raw, errors = event_query(source)
    args = filter_args(raw)
    destination = (source.get("destination") or "").strip()[:64] or None
    if query is not None and query.q:
        errors = ["q: a bulk replay cannot filter by body text; remove it to replay"]
    if query is not None and not errors:
        errors = event_store.aimed_problems(query.route, query.status, destination)
    shown = {"args": args, "raw": raw, "destination": destination}
    if query is None or errors:
        return page("dashboard/replay.html", 400, errors=errors, count=None, **shown)
    filters = event_store.Filters.of(query)
    cap = int(current_app.config["ADMIN_REPLAY_MAX"])
    if request.method == "GET":
        count = event_store.count_replayable(get_read_session(), filters, cap, destination)
        return page("dashboard/replay.html", count=count, cap=cap, errors=[], **shown)
    replayed, examined, more = event_store.replay_matching(
        get_db(), filters, examine=cap, destination=destination, actor=actor()
    )
    if replayed:
        delivery.wake(current_app)
    message = f"Replayed {replayed} of the {examined} matching events looked at."
    if destination is not None:
        message = (
            f"Replayed {replayed} deliveries to {destination} "
            f"of the {examined} matching events looked at."
        )
    if more:
        message += " More matched: replay again for the next ones."
    dash.flash(message)
    if destination is not None:
        return redirect(url_for("dashboard.route_detail", name=query.route), 303)
    return redirect(url_for("dashboard.events", **args), 303)


# --- routes ---


def retry_text(schedule: list[int] | None) -> str:
    delays = schedule or route_store.DEFAULT_RETRY_SCHEDULE
    return ", ".join(age(timedelta(seconds=s)) for s in delays)


def steps_shown(steps: list[dict]) -> list[dict]:
    registry = current_app.extensions["hub.connectors"]
    shown = []
    for step in step_secrets.shown_steps(steps, get_box(), registry):
        name = step.get("connector", "?")
        described = registry.get(name).description if name in registry else "not loaded"
        config = json.dumps(step.get("config") or {}, indent=2, ensure_ascii=False)
        shown.append({"connector": name, "description": described, "config": config})
    return shown


@bp.get("/routes")
def routes():
    listed = route_store.list_routes(get_read_session())[: MAX_ROUTES + 1]
    shown = listed[:MAX_ROUTES]
    # A route that fans out lists each destination with its own steps (its top-level
    # steps are the first destination's only).
    fanning = {r.name: route_store.destinations_of(r) for r in shown if fans_out(r)}
    return page(
        "dashboard/routes.html",
        routes=shown,
        fanning=fanning,
        more=len(listed) > MAX_ROUTES,
    )


def get_route_or_404(name: str):
    route = route_store.get(get_session(), name)
    if route is None:
        abort(404)
    return route


@bp.get("/routes/<name>")
def route_detail(name: str):
    return route_page(get_route_or_404(name))


def route_page(route, status: int = 200, form: dict[str, Any] | None = None):
    """A route's page; ``form``: the test event form as sent, with its problem."""
    data = route_store.to_dict(route, get_box(), current_app.extensions["hub.connectors"])
    return page(
        "dashboard/route.html",
        status,
        route=route,
        data=data,
        steps=steps_shown(route.steps),
        retries=retry_text(route.retry_schedule),
        default_retries=route.retry_schedule is None,
        destinations=destinations_shown(route),
        figures=destination_figures(route.name),
        **(form or test_form(route)),
    )


def destination_figures(route: str) -> list[dict[str, Any]]:
    """The route's destinations as the API's GET .../destinations answers them: state,
    deliveries in flight and waiting (counted up to a cap), settings."""
    registry = current_app.extensions["hub.connectors"]
    now = utcnow()
    views = destination_store.overview(get_session(), route, get_box(), registry, now=now)
    shown = []
    for view in views:
        figures = view.to_dict(now)
        waited = view.oldest_waiting_seconds(now)
        figures["oldest_age"] = timedelta(seconds=waited) if waited is not None else None
        shown.append(figures)
    return shown


def destinations_shown(route) -> list[dict[str, Any]]:
    """Each destination of the route with its steps, state and held deliveries."""
    held = destination_store.held_counts(get_session(), route.name)
    return [
        {
            "name": destination.name,
            "state": destination.state or "active",
            "state_changed_at": destination.state_changed_at,
            "state_reason": destination.state_reason,
            "held": held.get(destination.name, 0),
            "breaker": bool(destination.breaker),
            "failures": destination.breaker_failures or 0,
            "retry_at": destination.breaker_retry_at,
            "steps": steps_shown(destination.steps or []),
        }
        for destination in route.destinations
    ]


@bp.post("/routes/<name>/destinations/<destination>/<action>")
def destination_state(name: str, destination: str, action: str):
    """Pause or resume one destination, or open or close its circuit, as the API and the
    CLI do."""
    if action not in ("pause", "resume", "open", "close"):
        abort(404)
    session = get_session()
    who = actor()
    reason = (request.form.get("reason") or "").strip() or None
    try:
        if action == "pause":
            state = destination_store.pause(session, name, destination, reason, actor=who)
        elif action == "resume":
            state = destination_store.resume(session, name, destination, current_app, actor=who)
        elif action == "open":
            state = destination_store.open_circuit(session, name, destination, reason, actor=who)
        else:
            state = destination_store.close_circuit(
                session, name, destination, current_app, reason, actor=who
            )
    except destination_store.NoSuchDestination:
        abort(404)
    except destination_store.StateConflict as exc:
        dash.flash(str(exc), "error")
        return redirect(url_for("dashboard.route_detail", name=name), 303)
    dash.flash(f"Destination {destination} is {state.state}; {state.held} held.")
    return redirect(url_for("dashboard.route_detail", name=name), 303)


@bp.post("/routes/<name>/enabled")
def route_enabled(name: str):
    route = get_route_or_404(name)
    enabled = request.form.get("enabled") == "true"
    data = route_store.changed_data(route, get_box(), {"enabled": enabled}, whole=False)
    problems = save_route(data)
    if problems:
        dash.flash("Not changed: " + "; ".join(problems), "error")
    else:
        dash.flash(f"Route {name} is {'enabled' if enabled else 'disabled'}.")
    return redirect(url_for("dashboard.route_detail", name=name), 303)


def save_route(data: dict[str, Any]) -> list[str]:
    """Save through the same function as the API (``None`` problems: saved)."""
    registry = current_app.extensions["hub.connectors"]
    try:
        route_store.save_submitted(get_session(), data, registry, get_box(), actor())
    except route_store.RouteInvalid as exc:
        return exc.errors
    return []


def route_form_values(route=None) -> dict[str, str]:
    if route is None:
        return {
            "name": "",
            "description": "",
            "mode": "async",
            "auth": "",
            "steps": json.dumps([{"connector": "http", "config": {"url": "https://"}}], indent=2),
            "filter": "",
            "dedup_path": "",
            "dedup_window": "86400",
            "retention_days": "",
            "retry_schedule": "",
            "rate_limit": "",
            "enabled": "true",
            "verify_scheme": "",
            "verify_options": "{}",
            "verify_secrets": "",
            "schema": "",
        }
    # Masked as everywhere; a mask sent back unchanged keeps the stored secret (save_routes).
    registry = current_app.extensions["hub.connectors"]
    steps = [
        {"connector": s.get("connector"), "config": s.get("config") or {}}
        for s in step_secrets.shown_steps(route.steps, get_box(), registry)
    ]
    return {
        "name": route.name,
        "description": route.description or "",
        "mode": route.mode,
        "auth": route.auth or "",
        "steps": json.dumps(steps, indent=2, ensure_ascii=False),
        "filter": route.filter or "",
        "dedup_path": route.dedup_path or "",
        "dedup_window": str(route.dedup_window),
        "retention_days": "" if route.retention_days is None else str(route.retention_days),
        "retry_schedule": ", ".join(str(s) for s in route.retry_schedule or []),
        "rate_limit": route.rate_limit or "",
        "enabled": "true" if route.enabled else "",
        "verify_scheme": route.verify_scheme or "",
        "verify_options": json.dumps(route.verify_options or {}),
        "verify_secrets": "",
        "schema": (
            json.dumps(route.payload_schema, indent=2, ensure_ascii=False)
            if route.payload_schema is not None
            else ""
        ),
    }


def route_form_data(form, route) -> tuple[dict[str, Any], list[str]]:
    """The form as the API's route body; problems with the form's own syntax first."""
    problems: list[str] = []
    data: dict[str, Any] = {
        "name": route.name if route else form.get("name", "").strip(),
        "description": form.get("description", "").strip() or None,
        "mode": form.get("mode", ""),
        "filter": form.get("filter", "").strip() or None,
        "dedup_path": form.get("dedup_path", "").strip() or None,
        "rate_limit": form.get("rate_limit", "").strip() or None,
        "enabled": form.get("enabled") == "true",
    }
    if form.get("auth"):
        data["auth"] = form["auth"]
    try:
        data["steps"] = json.loads(form.get("steps", "") or "[]")
    except ValueError as exc:
        problems.append(f"steps: not valid JSON ({exc})")
    window = form.get("dedup_window", "").strip()
    if window:
        if window.isdigit():
            data["dedup_window"] = int(window)
        else:
            problems.append("dedup_window: a whole number of seconds")
    schema = form.get("schema", "").strip()
    data["schema"] = None  # an empty box: no schema
    if schema:
        try:
            data["schema"] = json.loads(schema)
        except ValueError as exc:
            problems.append(f"schema: not valid JSON ({exc})")
    retention = form.get("retention_days", "").strip()
    if retention and not retention.isdigit():
        problems.append("retention_days: a whole number of days (empty: HUB_RETENTION_DAYS)")
    data["retention_days"] = int(retention) if retention.isdigit() else None
    schedule = form.get("retry_schedule", "").replace(",", " ").split()
    if schedule:
        if all(s.isdigit() for s in schedule):
            data["retry_schedule"] = [int(s) for s in schedule]
        else:
            problems.append("retry_schedule: seconds separated by commas, such as 30, 120, 600")
    scheme = form.get("verify_scheme", "")
    if scheme:
        verify: dict[str, Any] = {"scheme": scheme}
        try:
            verify["options"] = json.loads(form.get("verify_options", "") or "{}")
        except ValueError as exc:
            problems.append(f"verify.options: not valid JSON ({exc})")
        secrets = [s.strip() for s in form.get("verify_secrets", "").splitlines() if s.strip()]
        if secrets:
            verify["secrets"] = secrets
        data["verify"] = verify
    else:
        data["verify"] = None
    return data, problems


#: The form edits a route's steps, filter and schedule as one pipeline; a route that fans out
#: is changed where its destinations are written whole, never collapsed into one by a save.
FANS_OUT = (
    "destinations: this route delivers to several destinations, which this form cannot "
    "edit yet; change it with `hub routes apply` or the admin API"
)


def fans_out(route) -> bool:
    destinations = route_store.destinations_of(route)
    return len(destinations) > 1 or destinations[0].name != DEFAULT_DESTINATION


def route_form(route=None):
    registry = current_app.extensions["hub.connectors"]
    values = route_form_values(route)
    errors: list[str] = []
    status = 200
    if route is not None and fans_out(route):
        errors, status = [FANS_OUT], 200 if request.method == "GET" else 422
    elif request.method == "POST":
        values = {k: request.form.get(k, "") for k in values}
        if route is not None:
            values["name"] = route.name
        data, errors = route_form_data(request.form, route)
        if not errors and route is None and route_store.get(get_session(), data["name"]):
            errors = [f"name: a route called {data['name']!r} exists; edit it instead"]
        if not errors:
            if route is not None:
                changes = {k: v for k, v in data.items() if k != "name"}
                data = route_store.changed_data(route, get_box(), changes, whole=True)
            errors = save_route(data)
        if not errors:
            dash.flash(f"Route {data['name']} saved.")
            return redirect(url_for("dashboard.route_detail", name=data["name"]), 303)
        status = 422
    return page(
        "dashboard/route_form.html",
        status,
        route=route,
        values=values,
        errors=errors_by_field(errors),
        all_errors=errors,
        connectors=[(cls, config_fields(cls)) for cls in registry],
        providers=list(providers.registry()),
        auth_modes=route_store.AUTH_MODES,
    )


@bp.route("/routes/new", methods=["GET", "POST"])
def route_new():
    return route_form()


@bp.route("/routes/<name>/edit", methods=["GET", "POST"])
def route_edit(name: str):
    return route_form(get_route_or_404(name))


# --- keys ---


def key_rows() -> tuple[list, bool]:
    listed = key_store.list_keys(get_read_session())
    return list(reversed(listed[-MAX_KEYS:])), len(listed) > MAX_KEYS


@bp.route("/keys", methods=["GET", "POST"])
def keys():
    values = {"name": "", "scopes": "", "expires_in": "", "rate_limit": "", "admin": ""}
    errors: list[str] = []
    created = None
    status = 200
    if request.method == "POST":
        # A form is sent once: a browser's reload (or a double click) sends it again, and
        # would make a second key whose secret nobody copied.
        form_id = request.form.get("form_id", "")[:64]
        made = g.dash.get("made")
        made = made if isinstance(made, list) else []
        for sent, prefix in made:
            if form_id and sent == form_id:
                dash.flash(
                    f"That form was already sent: key {prefix} was made from it, and its "
                    "secret was shown then. Revoke it if the secret was not copied."
                )
                return redirect(url_for("dashboard.keys"), 303)
        values = {k: request.form.get(k, "").strip() for k in values}
        session = get_session()
        try:
            row, secret = key_store.create_from_input(
                session,
                values["name"],
                values["scopes"].replace(",", " ").split(),
                admin=values["admin"] == "true",
                expires_in=values["expires_in"] or None,
                rate_limit=values["rate_limit"] or None,
                actor=actor(),
            )
        except key_store.KeyInvalid as exc:
            session.rollback()
            errors = exc.errors
            status = 422
        else:
            session.commit()
            if form_id:
                g.dash["made"] = [*made, [form_id, row.prefix]][-MADE_FORMS:]
                g.dash_changed = True
            created = {"prefix": row.prefix, "name": row.name, "secret": secret}
            values = {k: "" for k in values}
            status = 201
    rows, more = key_rows()
    return page(
        "dashboard/keys.html",
        status,
        form_id=secrets.token_urlsafe(16),
        sessions=dash.open_sessions(g.admin.prefix),
        keys=rows,
        more=more,
        values=values,
        errors=errors_by_field(errors),
        created=created,
    )


@bp.post("/keys/<prefix>/revoke")
def revoke_key(prefix: str):
    """Revoke a key; the key the admin is signed in with is revoked only once a page has
    said that this signs them out (everywhere) and they confirmed it."""
    session = get_session()
    own = prefix == g.admin.prefix
    if own and request.form.get("sign_out") != "yes":
        row = key_store.get(session, prefix)
        session.commit()
        return page("dashboard/revoke_own.html", key=row)
    row = key_store.revoke(session, prefix[:16], actor())
    if row is None:
        abort(404)
    session.commit()
    dash.flash(f"Key {row.prefix} ({row.name}) is revoked.")
    return redirect(url_for("dashboard.keys"), 303)


# --- alerts: what fires, who was told, channels and rules ---

TESTS_SHOWN = 10  # test messages listed, newest first
CHANNEL_FIELDS = ("name", "kind", "url", "host", "port", "username", "sender", "to")
RULE_FIELDS = ("name", "kind", "route", "destination", "threshold", "window")


def channel_form_data(form) -> dict[str, Any]:
    """The form as the API's channel body: the chosen kind's fields only (the form shows
    both kinds' fields at once)."""
    kind = form.get("kind", "")
    data: dict[str, Any] = {"name": form.get("name", "").strip(), "kind": kind}
    if kind == "email":
        data.update(
            host=form.get("host", "").strip() or None,
            port=form.get("port", "").strip() or None,
            username=form.get("username", "").strip() or None,
            password=form.get("password", "") or None,
            sender=form.get("sender", "").strip() or None,
            to=form.get("to", "").replace(",", " ").split(),
            starttls=form.get("starttls") == "true",
            ssl=form.get("ssl") == "true",
        )
    else:
        data["url"] = form.get("url", "").strip() or None
    return data


def rule_form_data(form) -> dict[str, Any]:
    data: dict[str, Any] = {
        name: form.get(name, "").strip() or None
        for name in ("name", "kind", "route", "destination", "threshold", "window")
    }
    data["name"] = data["name"] or ""
    data["channels"] = form.getlist("channels")
    return data


def alerts_page(
    status: int = 200,
    channel_values: dict[str, str] | None = None,
    channel_errors: list[str] | None = None,
    rule_values: dict[str, Any] | None = None,
    rule_errors: list[str] | None = None,
):
    session = get_read_session()
    box = get_box()
    channels = [alert_store.channel_to_dict(r, box) for r in alert_store.list_channels(session)]
    context = {
        "board": alert_store.board(session),
        "tests": alert_store.tests_sent(session, TESTS_SHOWN),
        "interval": current_app.config["ALERT_INTERVAL"],
        "now": utcnow(),
    }
    if fragment():
        return page("dashboard/_alerts.html", **context)
    rules = alert_store.rules(session)
    return page(
        "dashboard/alerts.html",
        status,
        channels=channels,
        rules=rules,
        builtin={r.name for r in rules if alert_store.is_builtin(r.name)},
        kinds=alert_store.RULE_KINDS,
        channel_kinds=alert_store.CHANNEL_KINDS,
        channel_values=channel_values or {"kind": "webhook"},
        channel_errors=errors_by_field(channel_errors or []),
        rule_values=rule_values or {"kind": "failure_ratio", "channels": []},
        rule_errors=errors_by_field(rule_errors or []),
        **context,
    )


@bp.get("/alerts")
def alerts():
    return alerts_page()


@bp.post("/alerts/channels")
def alert_channel_add():
    # Typed values come back with the form's problems, the SMTP password excepted: a
    # secret is never written into a page, so it is asked for again.
    values = {k: request.form.get(k, "").strip() for k in CHANNEL_FIELDS}
    values.update(starttls=request.form.get("starttls", ""), ssl=request.form.get("ssl", ""))
    session = get_session()
    try:
        row = alert_store.add_channel(
            session,
            get_box(),
            channel_form_data(request.form),
            current_app.config["ALERT_MAX_CHANNELS"],
            actor(),
        )
    except alert_store.AlertInvalid as exc:
        session.rollback()
        return alerts_page(422, channel_values=values, channel_errors=exc.errors)
    except alert_store.AlreadyExists as exc:
        session.rollback()
        return alerts_page(409, channel_values=values, channel_errors=[f"name: {exc}"])
    session.commit()
    log.info("dashboard: admin key %s added alert channel %s", g.admin.prefix, row.name)
    dash.flash(f"Channel {row.name} ({row.kind}) added.")
    return redirect(url_for("dashboard.alerts") + "#channels", 303)


@bp.post("/alerts/channels/<name>/remove")
def alert_channel_remove(name: str):
    session = get_session()
    try:
        row = alert_store.remove_channel(session, name, actor(), get_box())
    except alert_store.NoSuchAlertThing as exc:
        session.rollback()
        dash.flash(f"Not removed: {exc}.", "error")
    else:
        session.commit()
        log.info("dashboard: admin key %s removed alert channel %s", g.admin.prefix, row.name)
        dash.flash(f"Channel {row.name} removed.")
    return redirect(url_for("dashboard.alerts") + "#channels", 303)


@bp.post("/alerts/channels/<name>/test")
def alert_channel_test(name: str):
    """Queue a test message, as the API's test action does: a worker's alert thread sends
    it (never this request), and the page shows whether it arrived."""
    session = get_session()
    try:
        row = alert_store.queue_test(session, name, current_app.config.get("PUBLIC_URL"), actor())
    except alert_store.NoSuchAlertThing as exc:
        session.rollback()
        dash.flash(f"Not sent: {exc}.", "error")
        return redirect(url_for("dashboard.alerts") + "#channels", 303)
    session.commit()
    log.info("dashboard: admin key %s queued a test alert to %s", g.admin.prefix, row.channel)
    dash.flash(
        f"A test alert to {row.channel} is queued: a worker process sends it within "
        f"{current_app.config['ALERT_INTERVAL']:g} s; whether it arrived shows under Test alerts."
    )
    return redirect(url_for("dashboard.alerts") + "#tests", 303)


@bp.post("/alerts/rules")
def alert_rule_add():
    values = {k: request.form.get(k, "").strip() for k in RULE_FIELDS}
    values["channels"] = request.form.getlist("channels")
    session = get_session()
    try:
        rule = alert_store.add_rule(
            session, rule_form_data(request.form), current_app.config["ALERT_MAX_RULES"], actor()
        )
    except alert_store.AlertInvalid as exc:
        session.rollback()
        return alerts_page(422, rule_values=values, rule_errors=exc.errors)
    except alert_store.AlreadyExists as exc:
        session.rollback()
        return alerts_page(409, rule_values=values, rule_errors=[f"name: {exc}"])
    session.commit()
    log.info("dashboard: admin key %s added alert rule %s", g.admin.prefix, rule.name)
    dash.flash(f"Rule {rule.name} ({rule.kind}) added.")
    return redirect(url_for("dashboard.alerts") + "#rules", 303)


@bp.post("/alerts/rules/<name>/remove")
def alert_rule_remove(name: str):
    """Remove an added rule. A built-in rule is not removed here: the API's DELETE turns it
    off, and this page says so and offers that instead."""
    session = get_session()
    if alert_store.is_builtin(name):
        dash.flash(
            f"Rule {name} is built in: it cannot be removed, only turned off "
            "(a disabled rule of its name is kept).",
            "error",
        )
        return redirect(url_for("dashboard.alerts") + "#rules", 303)
    try:
        alert_store.remove_rule(session, name, actor())
    except alert_store.NoSuchAlertThing as exc:
        session.rollback()
        dash.flash(f"Not removed: {exc}.", "error")
    else:
        session.commit()
        log.info("dashboard: admin key %s removed alert rule %s", g.admin.prefix, name)
        dash.flash(f"Rule {name} removed.")
    return redirect(url_for("dashboard.alerts") + "#rules", 303)


@bp.post("/alerts/rules/<name>/enabled")
def alert_rule_enabled(name: str):
    """Turn a rule on or off; a rule turned off leaves no alert firing."""
    enabled = request.form.get("enabled") == "true"
    session = get_session()
    try:
        alert_store.set_rule_enabled(session, name, enabled, actor())
    except alert_store.NoSuchAlertThing as exc:
        session.rollback()
        dash.flash(f"Not changed: {exc}.", "error")
    else:
        session.commit()
        state = "on" if enabled else "off"
        log.info("dashboard: admin key %s turned alert rule %s %s", g.admin.prefix, name, state)
        dash.flash(f"Rule {name} is {state}.")
    return redirect(url_for("dashboard.alerts") + "#rules", 303)


# --- the developer's inspector: attempts read as HTTP, copy as curl, test events ---


def inspected(event: Event, attempts: list) -> dict[str, Any]:
    """The event page's reading of each attempt's call and the curl command for the webhook."""
    # Where the request came in (/hooks/<route>, or the seed's /api/process), on this hub.
    if event.path.startswith("/"):
        url = request.url_root.rstrip("/") + event.path
    else:
        url = url_for("hooks.hook", route_name=event.route, _external=True)
    return {
        "exchanges": {a.id: inspector.exchange_of(a) for a in attempts},
        "curl": inspector.curl_for(event, url),
        "test_sender": (event.remote_addr or "").startswith(ingest.TEST_SENDER),
    }


@bp.get("/events/<event_id>/body")
def event_body(event_id: str):
    """The body as received, to save and send again (``curl --data-binary @file``)."""
    event = get_event_or_404(event_id)
    return (
        event.body or b"",
        200,
        {
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{event.id}.body"',
        },
    )


TEST_BODY_CHARS = 64 * 1024  # of the last payload put in the form; a longer one is left out


def test_form(route, body: str | None = None, headers: str = "", error: str | None = None):
    """The route page's "send a test event" form: prefilled with the route's last payload
    (indented), or ``{}``."""
    if body is None:
        body = "{}"
        last = event_store.last_payload(get_read_session(), route.name)
        shown = inspector.body_of(last) if last and len(last) <= TEST_BODY_CHARS else None
        if shown is not None and shown.pretty:
            body = shown.text
    return {"test_body": body, "test_headers": headers, "test_error": error}


def typed_headers(text: str) -> tuple[list[tuple[str, str]], str | None]:
    """``Name: value`` lines as headers, or the sentence that says which line is not one."""
    headers = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name = name.strip()
        if not colon or not name or not all(c.isalnum() or c in "-_" for c in name):
            return [], f"headers: line {number} is not `Name: value`"
        if name.lower() not in ("content-type", "content-length", "host"):
            headers.append((name, value.strip()))
    return headers, None


@bp.post("/routes/<name>/test")
def route_test(name: str):
    """Send a test event to the route through the same intake as a webhook, as the signed-in
    admin: their key stands for the sender's key or signature, and every other check (the
    route's rate limit, the body's size and depth, dedup) applies. Bad JSON stores nothing."""
    route = get_route_or_404(name)
    body = request.form.get("body", "")
    typed = request.form.get("headers", "")

    def refuse(message: str, status: int = 422):
        return route_page(route, status, test_form(route, body, typed, message))

    if not route.enabled:
        return refuse("This route is disabled (a webhook is answered 404): enable it first.", 409)
    headers, problem = typed_headers(typed)
    if problem:
        return refuse(problem)
    raw = body.encode()
    try:
        pipeline.parse_json(raw or b"{}", pipeline.max_json_depth(current_app.config))
    except pipeline.PayloadError as exc:
        return refuse(f"body: {exc.message}")
    get_session().commit()  # the route's lookup is done; intake starts its own transaction
    incoming = ingest.Incoming(
        method="POST",
        route_name=route.name,
        path=url_for("hooks.hook", route_name=route.name),
        headers=[*headers, ("Content-Type", "application/json")],
        request_id=request_id(),
        content_type="application/json",
        content_length=len(raw),
        read=io.BytesIO(raw).read,
        admin=g.admin,
    )
    accepted = ingest.accept(incoming)
    if isinstance(accepted, ingest.Answer):
        if accepted.body is not None and accepted.body.get("duplicate"):
            original = accepted.body["id"]
            dash.flash(f"A duplicate of {original} (same dedup key): it was not run again.")
            return redirect(url_for("dashboard.event_detail", event_id=original), 303)
        return refuse(f"Refused ({accepted.status}): {accepted.message}", accepted.status)
    event_id = accepted.event.id
    try:
        if ingest.answer_challenge(accepted) is not None:
            pass
        elif accepted.route.mode == "async" or ingest.waits_for_resume(accepted):
            ingest.enqueue(accepted)
        else:
            ingest.run_sync(accepted)
    except ingest.SyncBusy as busy:
        return refuse(busy.message, 503)
    finally:
        ingest.give_sync_slot(accepted)
    log.info("dashboard: admin key %s sent test event %s to %s", g.admin.prefix, event_id, name)
    dash.flash(f"Test event {event_id} sent to {name} as key {g.admin.prefix}.")
    return redirect(url_for("dashboard.event_detail", event_id=event_id), 303)


# --- the audit log ---

AUDIT_PAGE = 50  # entries per page
AUDIT_FILTERS = ("actor", "action", "since")


@bp.get("/audit")
def audit_log():
    """The audit log, newest first, filtered by the API's own query model; read only: the
    page has no form that changes anything."""
    raw = {f: request.args.get(f, "").strip() for f in AUDIT_FILTERS}
    given = {f: v for f, v in raw.items() if v}
    cursor = request.args.get("cursor") or None
    rows, next_cursor, errors = [], None, []
    try:
        query = m.AuditQuery.model_validate({**given, "limit": AUDIT_PAGE, "cursor": cursor})
    except ValidationError as exc:
        errors = describe_validation_error(exc)
    else:
        try:
            found, next_cursor = audit.listing(
                get_read_session(),
                actor=query.actor,
                action=query.action,
                since=query.since,
                cursor=query.cursor,
                limit=AUDIT_PAGE,
            )
            rows = [row.to_dict() for row in found]
        except paging.BadCursor:
            errors = ["cursor: not a cursor from this hub; start again from the newest"]
    for row in rows:
        change = row["change"]
        row["change_text"] = "" if change is None else shown_json(change)[0]
    return page(
        "dashboard/audit.html",
        400 if errors else 200,
        rows=rows,
        raw=raw,
        args=filter_args(raw),
        errors=errors_by_field(errors),
        next_cursor=next_cursor,
        first_page=cursor is None,
        actions=sorted(audit.ACTIONS),
        retention=current_app.config["AUDIT_RETENTION_DAYS"],
    )


# --- connectors ---


@bp.get("/connectors")
def connectors():
    registry = current_app.extensions["hub.connectors"]
    return page(
        "dashboard/connectors.html", connectors=[(cls, config_fields(cls)) for cls in registry]
    )


@bp.route("/<path:rest>", methods=["GET", "POST"])
def unknown(rest: str):
    """Any other path under the prefix: the dashboard's own 404 page, behind the sign-in."""
    abort(404)


@bp.errorhandler(SQLAlchemyError)
def database_error(exc: SQLAlchemyError):
    """The API's answer (503 with what to do when the database is down or not migrated, else
    500), on a page of the dashboard's own; nothing of the signed-in state is read again."""
    response, status = errors.unhandled(exc)
    return (
        render_template(
            "dashboard/error.html",
            admin=None,
            flashes=[],
            title="Unavailable" if status == 503 else "Server error",
            message=response.json["error"],
        ),
        status,
        {k: v for k, v in response.headers.items() if k == "Retry-After"},
    )


@bp.errorhandler(404)
def not_found(_exc):
    return page(
        "dashboard/error.html", 404, title="Not found", message="Nothing here by that name."
    )
