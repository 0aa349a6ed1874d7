"""The admin API, /admin/api/...: keys, routes, connectors, events, replay, statistics,
alerts and the audit log.

The same service functions as the CLI (``keys``, ``routes``, ``events``) behind thin views;
each view declares its models with ``api.route`` so that the OpenAPI document, the request
checks and the answers share one description.

Everything under /admin needs an admin key: no key (or a bad one) is 401 and any other key
is 403, on unknown /admin paths too, so the admin surface cannot be mapped without one.
Every call that changes something is logged with the admin key's prefix, and recorded in
the audit log by the service it calls (``actor()``: the key, the client's address).
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, g
from pydantic import BaseModel
from sqlalchemy import select

from hub import providers
from hub.services import alerts as alert_store
from hub.services import audit, delivery, ordering, paging
from hub.services import destinations as destination_store
from hub.services import events as event_store
from hub.services import keys as key_store
from hub.services import routes as route_store
from hub.store.crypto import SecretsUnreadable, get_box
from hub.store.db import get_db, get_read_session, get_session
from hub.store.models import ApiKey, Event, utcnow
from hub.web import schemas as m
from hub.web.auth import (
    Refusal,
    check_admin_key,
    log_admin_change,
    presented_key,
    request_actor,
)
from hub.web.errors import error_response
from hub.web.openapi import ApiError, api, invalid

bp = Blueprint("admin", __name__, url_prefix="/admin")

NAME = {"name": "The route's name"}
PREFIX = {"prefix": "The key's public prefix (hk_PREFIX_...)"}
EVENT_ID = {"event_id": "The event's id (evt_...)"}


@bp.before_request
def require_admin_key():
    checked = check_admin_key(presented_key())
    # End the lookup's transaction: on SQLite it holds the write lock, which the views'
    # own short transactions (bulk replay, waking the workers) must be able to take.
    get_session().commit()
    if isinstance(checked, Refusal):
        return checked.response()
    g.admin_prefix = checked.prefix
    return None


bp.after_request(log_admin_change)


@bp.route("/", defaults={"rest": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
@bp.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def unknown(rest: str):
    """Reached only with an admin key (the check above runs first)."""
    return error_response(404, "No such admin endpoint", "not_found")


def not_found(what: str) -> ApiError:
    return ApiError(404, f"No such {what}", "not_found")


def actor() -> audit.Actor:
    """The admin behind this call, as the audit log records them."""
    return request_actor(audit.API)


# --- keys ---


def key_out(row: ApiKey, model: type[BaseModel] = m.KeyOut, **extra: Any) -> BaseModel:
    return model(**row.to_dict(), **extra)


@api.route(
    bp,
    "GET",
    "/admin/api/keys",
    summary="List the keys, one keyset page at a time (never a secret)",
    tag="keys",
    query=m.PageQuery,
    responses={200: ("A page of keys", m.KeyList), 400: ("The cursor is not one of ours", None)},
)
def list_keys(query: m.PageQuery):
    after = None
    if query.cursor is not None:
        try:
            after = int(paging.decode("keys", query.cursor))
        except ValueError:  # BadCursor, or a position that is not a key's
            raise bad_cursor("query") from None
    rows = key_store.list_keys(get_read_session(), after=after, limit=query.limit + 1)
    rows, next_cursor = paging.one_page("keys", rows, query.limit, lambda k: str(k.id))
    return m.KeyList(keys=[key_out(k) for k in rows], next_cursor=next_cursor)


@api.route(
    bp,
    "POST",
    "/admin/api/keys",
    summary="Create a key; its secret is in this answer and nowhere else",
    tag="keys",
    body=m.KeyIn,
    responses={201: ("The key, with its secret", m.KeyCreated)},
)
def create_key(body: m.KeyIn):
    session = get_session()
    try:
        row, secret = key_store.create_from_input(
            session,
            body.name,
            body.scopes,
            admin=body.admin,
            expires_in=body.expires_in,
            rate_limit=body.rate_limit,
            actor=actor(),
        )
    except key_store.KeyInvalid as exc:
        raise invalid(exc.errors, "body") from None
    session.commit()
    return key_out(row, m.KeyCreated, key=secret), 201


@api.route(
    bp,
    "GET",
    "/admin/api/keys/{prefix}",
    summary="One key",
    tag="keys",
    path_params=PREFIX,
    responses={200: ("The key", m.KeyOut), 404: ("No key has this prefix", None)},
)
def get_key(prefix: str):
    row = key_store.get(get_read_session(), prefix)
    if row is None:
        raise not_found("key")
    return key_out(row)


@api.route(
    bp,
    "DELETE",
    "/admin/api/keys/{prefix}",
    summary="Revoke a key (it stops working at once in this process)",
    tag="keys",
    path_params=PREFIX,
    responses={200: ("The revoked key", m.KeyOut), 404: ("No key has this prefix", None)},
)
def revoke_key(prefix: str):
    session = get_session()
    row = key_store.revoke(session, prefix, actor())
    if row is None:
        raise not_found("key")
    session.commit()
    return key_out(row)


# --- routes ---


def route_out(route) -> m.RouteOut:
    registry = current_app.extensions["hub.connectors"]
    return m.RouteOut.model_validate(route_store.to_dict(route, get_box(), registry))


def save(data: dict[str, Any]):
    """Validate and save one route; 422 with the same sentences `routes add` prints."""
    registry = current_app.extensions["hub.connectors"]
    try:
        return route_store.save_submitted(get_session(), data, registry, get_box(), actor())
    except route_store.RouteInvalid as exc:
        raise invalid(exc.errors, "body") from None


@api.route(
    bp,
    "GET",
    "/admin/api/routes",
    summary="List the routes by name, one keyset page at a time (signing secrets masked)",
    tag="routes",
    query=m.PageQuery,
    responses={
        200: ("A page of routes", m.RouteList),
        400: ("The cursor is not one of ours", None),
    },
)
def list_routes(query: m.PageQuery):
    try:
        after = paging.decode("routes", query.cursor) if query.cursor is not None else None
    except paging.BadCursor:
        raise bad_cursor("query") from None
    rows = route_store.list_routes(get_read_session(), after=after, limit=query.limit + 1)
    rows, next_cursor = paging.one_page("routes", rows, query.limit, lambda r: r.name)
    return m.RouteList(routes=[route_out(r) for r in rows], next_cursor=next_cursor)


@api.route(
    bp,
    "POST",
    "/admin/api/routes",
    summary="Create a route; every step is checked against its connector's config schema",
    tag="routes",
    body=m.RouteIn,
    responses={201: ("The route", m.RouteOut), 409: ("A route has this name", None)},
)
def create_route(body: m.RouteIn):
    if route_store.get(get_session(), body.name) is not None:
        raise ApiError(409, f"Route {body.name!r} exists: PUT or PATCH it", "route_exists")
    route, _ = save(body.model_dump(exclude_unset=True, by_alias=True))
    return route_out(route), 201


@api.route(
    bp,
    "GET",
    "/admin/api/routes/{name}",
    summary="One route (signing secrets masked)",
    tag="routes",
    path_params=NAME,
    responses={200: ("The route", m.RouteOut), 404: ("No route has this name", None)},
)
def get_route(name: str):
    route = route_store.get(get_read_session(), name)
    if route is None:
        raise not_found("route")
    return route_out(route)


@api.route(
    bp,
    "PUT",
    "/admin/api/routes/{name}",
    summary="Create or replace a route (a verifier without secrets keeps its secrets)",
    tag="routes",
    path_params=NAME,
    body=m.RoutePut,
    responses={200: ("Replaced", m.RouteOut), 201: ("Created", m.RouteOut)},
)
def put_route(name: str, body: m.RoutePut):
    if body.name is not None and body.name != name:
        raise invalid(["name: must be the name in the URL"], "body")
    changes = body.model_dump(exclude_unset=True, by_alias=True) | {"name": name}
    route = route_store.get(get_session(), name)
    data = route_store.changed_data(route, get_box(), changes, whole=True) if route else changes
    route, action = save(data)
    return route_out(route), 201 if action == "created" else 200


@api.route(
    bp,
    "PATCH",
    "/admin/api/routes/{name}",
    summary="Change some fields of a route",
    tag="routes",
    path_params=NAME,
    body=m.RoutePatch,
    responses={200: ("The route", m.RouteOut), 404: ("No route has this name", None)},
)
def patch_route(name: str, body: m.RoutePatch):
    route = route_store.get(get_session(), name)
    if route is None:
        raise not_found("route")
    changes = body.model_dump(exclude_unset=True, by_alias=True)
    route, _ = save(route_store.changed_data(route, get_box(), changes, whole=False))
    return route_out(route)


@api.route(
    bp,
    "DELETE",
    "/admin/api/routes/{name}",
    summary="Remove a route (its events stay)",
    tag="routes",
    path_params=NAME,
    responses={200: ("Removed", m.RouteRemoved), 404: ("No route has this name", None)},
)
def delete_route(name: str):
    session = get_session()
    registry = current_app.extensions["hub.connectors"]
    if not route_store.remove(session, name, actor(), get_box(), registry):
        raise not_found("route")
    session.commit()
    return m.RouteRemoved(name=name, removed=True)


DESTINATION = NAME | {"destination": "The destination's name, within the route"}
NO_DESTINATION = {404: ("No route has this name, or it has no such destination", None)}


NOT_NOW = {409: ("The destination has no circuit breaker, or is paused", None)}


def destination_change(change, name: str, destination: str) -> m.DestinationStateOut:
    try:
        state = change(get_session(), name, destination)
    except destination_store.NoSuchDestination as exc:
        raise ApiError(404, str(exc), "not_found") from None
    except destination_store.StateConflict as exc:
        raise ApiError(409, str(exc), "conflict") from None
    return m.DestinationStateOut(**state.to_dict())


@api.route(
    bp,
    "POST",
    "/admin/api/routes/{name}/destinations/{destination}/pause",
    summary="Pause a destination: its deliveries are held, the route still accepts webhooks",
    tag="routes",
    path_params=DESTINATION,
    body=m.PauseIn,
    body_optional=True,
    description="Waiting deliveries (pending, retrying) become held, keeping their order; "
    "new ones are created held. No run is counted while paused. Pausing a paused "
    "destination changes nothing.",
    responses={200: ("The destination", m.DestinationStateOut)} | NO_DESTINATION,
)
def pause_destination(name: str, destination: str, body: m.PauseIn):
    return destination_change(
        lambda session, r, d: destination_store.pause(session, r, d, body.reason, actor=actor()),
        name,
        destination,
    )


@api.route(
    bp,
    "POST",
    "/admin/api/routes/{name}/destinations/{destination}/resume",
    summary="Resume a paused destination: its held deliveries go out, oldest first",
    tag="routes",
    path_params=DESTINATION,
    description="Held deliveries become pending and due now, in the order they were "
    "received. Resuming an active destination changes nothing.",
    responses={200: ("The destination", m.DestinationStateOut)} | NO_DESTINATION,
)
def resume_destination(name: str, destination: str):
    return destination_change(
        lambda session, r, d: destination_store.resume(session, r, d, current_app, actor=actor()),
        name,
        destination,
    )


@api.route(
    bp,
    "POST",
    "/admin/api/routes/{name}/destinations/{destination}/open",
    summary="Open a destination's circuit by hand: its deliveries are held until a probe",
    tag="routes",
    path_params=DESTINATION,
    body=m.PauseIn,
    body_optional=True,
    description="As when its circuit breaker opens it: waiting deliveries become held, and "
    "after the breaker's cool-down one probe delivery is tried (half_open); delivered, the "
    "circuit closes. Needs a breaker on the destination; a paused destination is resumed, "
    "not opened. Opening an open circuit changes nothing.",
    responses={200: ("The destination", m.DestinationStateOut)} | NO_DESTINATION | NOT_NOW,
)
def open_destination(name: str, destination: str, body: m.PauseIn):
    return destination_change(
        lambda session, r, d: destination_store.open_circuit(
            session, r, d, body.reason, actor=actor()
        ),
        name,
        destination,
    )


@api.route(
    bp,
    "POST",
    "/admin/api/routes/{name}/destinations/{destination}/close",
    summary="Close a destination's circuit by hand: its held deliveries go out, oldest first",
    tag="routes",
    path_params=DESTINATION,
    body=m.PauseIn,
    body_optional=True,
    description="The destination is active again with a fresh count of failures, and its "
    "held deliveries become pending and due now, in the order they were received. Needs a "
    "breaker on the destination; closing a closed circuit changes nothing.",
    responses={200: ("The destination", m.DestinationStateOut)} | NO_DESTINATION | NOT_NOW,
)
def close_destination(name: str, destination: str, body: m.PauseIn):
    return destination_change(
        lambda session, r, d: destination_store.close_circuit(
            session, r, d, current_app, body.reason, actor=actor()
        ),
        name,
        destination,
    )


@api.route(
    bp,
    "GET",
    "/admin/api/routes/{name}/destinations",
    summary="The route's destinations: settings, state, deliveries in flight and waiting",
    tag="routes",
    path_params=NAME,
    description="Each count reads at most "
    f"{destination_store.BACKLOG_CAP} deliveries of a destination; past that it says so "
    "(in_flight_capped, backlog_capped) instead of counting on.",
    responses={
        200: ("The destinations, in order", m.DestinationViewList),
        404: ("No route has this name", None),
    },
)
def list_destinations(name: str):
    views = destination_views(name)
    return m.DestinationViewList(route=name, destinations=views)


@api.route(
    bp,
    "GET",
    "/admin/api/routes/{name}/destinations/{destination}/changes",
    summary="The changes of a destination's state (pause, resume, its circuit), newest first",
    tag="routes",
    path_params=DESTINATION,
    query=m.ChangesQuery,
    responses={200: ("Its changes", m.DestinationChangeList)} | NO_DESTINATION,
)
def destination_changes(name: str, destination: str, query: m.ChangesQuery):
    try:
        rows = destination_store.changes(get_read_session(), name, destination, query.limit)
    except destination_store.NoSuchDestination as exc:
        raise ApiError(404, str(exc), "not_found") from None
    return m.DestinationChangeList(
        changes=[m.DestinationChangeOut(**row.to_dict()) for row in rows]
    )


@api.route(
    bp,
    "GET",
    "/admin/api/routes/{name}/destinations/{destination}",
    summary="One destination: settings, state, deliveries in flight and waiting",
    tag="routes",
    path_params=DESTINATION,
    responses={200: ("The destination", m.DestinationView)} | NO_DESTINATION,
)
def get_destination(name: str, destination: str):
    return destination_views(name, destination)[0]


def destination_views(name: str, only: str | None = None) -> list[m.DestinationView]:
    registry = current_app.extensions["hub.connectors"]
    now = utcnow()
    try:
        views = destination_store.overview(
            get_read_session(), name, get_box(), registry, only=only, now=now
        )
    except destination_store.NoSuchDestination as exc:
        raise ApiError(404, str(exc), "not_found") from None
    return [m.DestinationView.model_validate(view.to_dict(now)) for view in views]


ROTATION_ERRORS = {
    404: ("No route has this name", None),
    409: ("The stored secrets do not decrypt with this HUB_SECRET_KEY", None),
    422: ("No verifier, a repeated secret, no such secret, or the last one", None),
}


def rotate(change) -> m.SecretsOut:
    """Run a secret change of ``routes`` and answer its count, or the error it raised."""
    session = get_session()
    try:
        count = change(session)
    except LookupError:
        raise not_found("route") from None
    except SecretsUnreadable:
        raise ApiError(
            409,
            "The route's stored secrets do not decrypt with this HUB_SECRET_KEY; "
            "set them again with PUT",
            "secrets_unreadable",
        ) from None
    except route_store.RouteInvalid as exc:
        session.rollback()
        raise invalid(exc.errors) from None
    session.commit()
    return count


@api.route(
    bp,
    "POST",
    "/admin/api/routes/{name}/secrets",
    summary="Add a signing secret (rotation: old and new both verify)",
    tag="routes",
    path_params=NAME,
    body=m.SecretIn,
    responses={201: ("How many secrets the route has", m.SecretsOut), **ROTATION_ERRORS},
)
def add_secret(name: str, body: m.SecretIn):
    registry = current_app.extensions["hub.connectors"]
    count = rotate(
        lambda s: route_store.add_secret(s, name, body.secret, registry, get_box(), actor())
    )
    return m.SecretsOut(route=name, secrets=count), 201


@api.route(
    bp,
    "DELETE",
    "/admin/api/routes/{name}/secrets/{which}",
    summary="Remove a signing secret named by its number (from 1) or its last characters",
    tag="routes",
    path_params={**NAME, "which": "1, 2 ... as listed, or the last characters shown masked"},
    responses={200: ("How many secrets remain", m.SecretsOut), **ROTATION_ERRORS},
)
def remove_secret(name: str, which: str):
    registry = current_app.extensions["hub.connectors"]
    count = rotate(
        lambda s: route_store.remove_secret(s, name, which, registry, get_box(), actor())
    )
    return m.SecretsOut(route=name, secrets=count)


# --- providers ---


@api.route(
    bp,
    "GET",
    "/admin/api/providers",
    summary="Every loaded signature provider: its headers, secret, dedup id and challenge",
    tag="providers",
    responses={200: ("The providers", m.ProviderList)},
)
def list_providers():
    return m.ProviderList(
        providers=[m.ProviderOut(**providers.describe(p)) for p in providers.registry()]
    )


# --- connectors ---


@api.route(
    bp,
    "GET",
    "/admin/api/connectors",
    summary="Every loaded connector with its config JSON Schema",
    tag="connectors",
    responses={200: ("The connectors", m.ConnectorList)},
)
def list_connectors():
    return m.ConnectorList(
        connectors=[
            m.ConnectorOut(
                name=cls.name,
                description=cls.description,
                config_schema=cls.Config.model_json_schema(),
            )
            for cls in current_app.extensions["hub.connectors"]
        ]
    )


# --- events ---


def bad_cursor(where: str) -> ApiError:
    return ApiError(
        400, f"{where}.cursor: not a cursor from this hub (use next_cursor)", "bad_cursor"
    )


@api.route(
    bp,
    "GET",
    "/admin/api/events",
    summary="Events newest first, filtered, one keyset page at a time",
    tag="events",
    query=m.EventQuery,
    responses={200: ("A page", m.EventPage), 400: ("The cursor is not one of ours", None)},
)
def list_events(query: m.EventQuery):
    try:
        listing = event_store.Listing(
            event_store.Filters.of(query),
            limit=query.limit,
            cursor=query.cursor,
            text=query.q,
            window=int(current_app.config["ADMIN_SEARCH_WINDOW"]),
        )
        page = event_store.search(get_read_session(), listing)
    except event_store.BadCursor:
        raise bad_cursor("query") from None
    return m.EventPage(
        events=[m.EventSummary.model_validate(e) for e in page.events],
        next_cursor=page.next_cursor,
        scanned=page.scanned,
    )


@api.route(
    bp,
    "GET",
    "/admin/api/events/{event_id}",
    summary="One event with its headers, body and every connector call",
    tag="events",
    path_params=EVENT_ID,
    responses={200: ("The event", m.EventDetail), 404: ("No such event", None)},
)
def get_event(event_id: str):
    session = get_read_session()
    event = session.get(Event, event_id[:32])
    if event is None:
        raise not_found("event")
    return m.EventDetail.model_validate(
        event.to_dict(with_attempts=True)
        | {
            "deliveries": event_store.deliveries(session, event.id),
            "method": event.method,
            "path": event.path,
            "query": event.query,
            "content_type": event.content_type,
            "headers": event.headers or {},
            "body": (event.body or b"").decode("utf-8", "replace"),
        }
    )


@api.route(
    bp,
    "POST",
    "/admin/api/events/{event_id}/replay",
    summary="Put one event back in the queue (its attempts keep counting)",
    tag="events",
    path_params=EVENT_ID,
    description="The event's deliveries that did not end delivered or filtered go back to "
    "pending: a destination that was reached is not called again. An event whose every "
    "delivery was reached is delivered again to all of its destinations.",
    responses={
        200: ("Queued again", m.ReplayOut),
        404: ("No such event", None),
        409: ("The event cannot be replayed in its state", None),
    },
)
def replay_event(event_id: str):
    session = get_session()
    event = session.get(Event, event_id[:32])
    if event is None:
        raise not_found("event")
    if not event_store.replay(session, [event.id], actor()):
        raise ApiError(409, f"An event that is {event.status} cannot be replayed", "not_replayable")
    status = session.scalar(select(Event.status).where(Event.id == event.id))
    session.commit()
    delivery.wake(current_app)
    return m.ReplayOut(id=event.id, status=status)


DELIVERY_ID = {"delivery_id": "The delivery's id (dlv_...), as the event shows it"}


@api.route(
    bp,
    "POST",
    "/admin/api/deliveries/{delivery_id}/skip",
    summary="Skip a delivery: it ends failed, and the next of its ordering key goes",
    tag="events",
    path_params=DELIVERY_ID,
    description="A delivery that blocks its ordering key (retrying, held, or waiting its "
    'turn) ends failed, "skipped by an admin", and the next delivery of its key is '
    "started. Any delivery not ended may be skipped, except one being called right now.",
    responses={
        200: ("Skipped", m.SkipOut),
        404: ("No such delivery", None),
        409: ("The delivery ended already, or is being called right now", None),
    },
)
def skip_delivery(delivery_id: str):
    try:
        skipped = ordering.skip(get_db(), delivery_id[:32], actor())
    except ordering.NoSuchDelivery:
        raise not_found("delivery") from None
    except ordering.NotSkippable as exc:
        raise ApiError(409, str(exc), "not_skippable") from None
    delivery.wake(current_app)
    return m.SkipOut(**skipped)


@api.route(
    bp,
    "POST",
    "/admin/api/deliveries/{delivery_id}/replay",
    summary="Put one delivery (one destination of an event) back in the queue",
    tag="events",
    path_params={"delivery_id": "The delivery's id (dlv_..., in the event's deliveries)"},
    description="Only a delivery that ended (delivered, filtered, failed or dead) is "
    "replayed, and a delivered one is called again: it was named. Its runs keep counting; "
    "the event's other deliveries are left as they are and its status is rolled up again.",
    responses={
        200: ("Queued again", m.DeliveryReplayOut),
        404: ("No such delivery", None),
        409: ("The delivery has not ended (in flight, waiting, held or queued)", None),
    },
)
def replay_delivery(delivery_id: str):
    session = get_session()
    try:
        row = event_store.replay_delivery(session, delivery_id, actor())
    except event_store.NoSuchDelivery as exc:
        raise ApiError(404, str(exc), "not_found") from None
    except event_store.DeliveryNotReplayable as exc:
        raise ApiError(409, str(exc), "not_replayable") from None
    event_status = session.scalar(select(Event.status).where(Event.id == row.event_id))
    session.commit()
    delivery.wake(current_app)
    return m.DeliveryReplayOut(
        id=row.id,
        event_id=row.event_id,
        destination=row.destination,
        status=row.status,
        event_status=event_status,
    )


@api.route(
    bp,
    "POST",
    "/admin/api/events/replay",
    summary="Replay every event matching the filters (all=true to replay without one)",
    tag="events",
    body=m.BulkReplayIn,
    description="Looks at most at HUB_ADMIN_REPLAY_MAX matching events per call, newest "
    "first; next_cursor says more matched: send the same body with that cursor. Each "
    "event is replayed as one replay does: only its deliveries that were not reached "
    "(all of them when every one was). With a destination (and its route), only that "
    "destination's deliveries are replayed, those whose own status is the status given "
    "(any that ended when none is); the events' other deliveries are left alone.",
    responses={
        200: ("How many were replayed", m.BulkReplayOut),
        400: ("No filter and no all=true, or a bad cursor", None),
    },
)
def replay_events(body: m.BulkReplayIn):
    if not body.given() and not body.all:
        raise ApiError(
            400,
            "Give a filter (route, status, reason, key, since, until) or all=true",
            "filter_required",
        )
    problems = event_store.aimed_problems(body.route, body.status, body.destination)
    if problems:
        raise invalid(problems, "body")
    try:
        replayed, examined, cursor = event_store.replay_matching(
            get_db(),
            event_store.Filters.of(body),
            cursor=body.cursor,
            examine=int(current_app.config["ADMIN_REPLAY_MAX"]),
            destination=body.destination,
            actor=actor(),
        )
    except event_store.BadCursor:
        raise bad_cursor("body") from None
    if replayed:
        delivery.wake(current_app)
    return m.BulkReplayOut(replayed=replayed, examined=examined, next_cursor=cursor)


# --- statistics ---


@api.route(
    bp,
    "GET",
    "/admin/api/stats",
    summary="Per route: counts by status and reason, p50/p95 processing time",
    tag="stats",
    query=m.StatsQuery,
    responses={200: ("The window's figures", m.StatsOut)},
)
def stats(query: m.StatsQuery):
    until = query.until or utcnow()
    figures = event_store.stats(
        get_read_session(), query.since, until, int(current_app.config["ADMIN_STATS_MAX_ROWS"])
    )
    return m.StatsOut(
        since=query.since.isoformat(),
        until=until.isoformat(),
        events=figures.counted,
        truncated=figures.truncated,
        routes=[m.RouteStats(route=r, **v) for r, v in sorted(figures.routes.items())],
    )


# --- alerts ---

CHANNEL = {"channel": "The alert channel's name"}
RULE = {"rule": "The alert rule's name"}


def channel_out(row) -> m.AlertChannelOut:
    return m.AlertChannelOut(**alert_store.channel_to_dict(row, get_box()))


@api.route(
    bp,
    "GET",
    "/admin/api/alert-channels",
    summary="List the alert channels (their secrets masked)",
    tag="alerts",
    responses={200: ("The channels", m.AlertChannelList)},
)
def list_alert_channels():
    rows = alert_store.list_channels(get_read_session())
    return m.AlertChannelList(channels=[channel_out(r) for r in rows])


@api.route(
    bp,
    "POST",
    "/admin/api/alert-channels",
    summary="Add an alert channel: a webhook URL, a Slack incoming webhook or email (SMTP)",
    tag="alerts",
    body=m.AlertChannelIn,
    description="Its URL (which may carry a token) and its SMTP password are encrypted at "
    "rest and shown masked. With no rule added, the built-in rules (dead deliveries, open "
    "circuits) alert through every channel.",
    responses={
        201: ("The channel", m.AlertChannelOut),
        409: ("A channel of that name exists", None),
    },
)
def add_alert_channel(body: m.AlertChannelIn):
    session = get_session()
    try:
        row = alert_store.add_channel(
            session,
            get_box(),
            body.model_dump(),
            current_app.config["ALERT_MAX_CHANNELS"],
            actor(),
        )
    except alert_store.AlertInvalid as exc:
        raise invalid(exc.errors, "body") from None
    except alert_store.AlreadyExists as exc:
        raise ApiError(409, str(exc), "exists") from None
    session.commit()
    return channel_out(row), 201


@api.route(
    bp,
    "DELETE",
    "/admin/api/alert-channels/{channel}",
    summary="Remove an alert channel",
    tag="alerts",
    path_params=CHANNEL,
    responses={200: ("The removed channel", m.AlertChannelOut), 404: ("No such channel", None)},
)
def remove_alert_channel(channel: str):
    session = get_session()
    try:
        row = alert_store.remove_channel(session, channel, actor(), get_box())
    except alert_store.NoSuchAlertThing as exc:
        raise ApiError(404, str(exc), "not_found") from None
    out = channel_out(row)
    session.commit()
    return out


@api.route(
    bp,
    "POST",
    "/admin/api/alert-channels/{channel}/test",
    summary="Send a test alert through a channel (queued; a worker process sends it)",
    tag="alerts",
    path_params=CHANNEL,
    description="The message is queued and answered at once: a worker's alert thread sends "
    "it within HUB_ALERT_INTERVAL seconds, never this request. GET /admin/api/alerts shows "
    "whether it arrived (its `tests`).",
    responses={202: ("Queued", m.AlertSendOut), 404: ("No such channel", None)},
)
def send_test_alert(channel: str):
    session = get_session()
    try:
        row = alert_store.queue_test(
            session, channel, current_app.config.get("PUBLIC_URL"), actor()
        )
    except alert_store.NoSuchAlertThing as exc:
        raise ApiError(404, str(exc), "not_found") from None
    out = m.AlertSendOut(**alert_store.send_to_dict(row))
    session.commit()
    return out, 202


@api.route(
    bp,
    "GET",
    "/admin/api/alert-rules",
    summary="List the alert rules, the built-in ones included",
    tag="alerts",
    responses={200: ("The rules", m.AlertRuleList)},
)
def list_alert_rules():
    found = alert_store.rules(get_read_session())
    return m.AlertRuleList(
        rules=[m.AlertRuleOut(**r.to_dict()) for r in found], kinds=dict(alert_store.RULE_KINDS)
    )


@api.route(
    bp,
    "POST",
    "/admin/api/alert-rules",
    summary="Add an alert rule",
    tag="alerts",
    body=m.AlertRuleIn,
    description="Kinds: circuit_open, delivery_dead, failure_ratio, oldest_due, "
    "refusal_rate (GET /admin/api/alert-rules says what each watches). A rule named "
    "dead-deliveries or open-circuits replaces that built-in rule.",
    responses={201: ("The rule", m.AlertRuleOut), 409: ("A rule of that name exists", None)},
)
def add_alert_rule(body: m.AlertRuleIn):
    session = get_session()
    try:
        rule = alert_store.add_rule(
            session, body.model_dump(), current_app.config["ALERT_MAX_RULES"], actor()
        )
    except alert_store.AlertInvalid as exc:
        raise invalid(exc.errors, "body") from None
    except alert_store.AlreadyExists as exc:
        raise ApiError(409, str(exc), "exists") from None
    session.commit()
    return m.AlertRuleOut(**rule.to_dict()), 201


@api.route(
    bp,
    "DELETE",
    "/admin/api/alert-rules/{rule}",
    summary="Remove an alert rule (a built-in one is turned off)",
    tag="alerts",
    path_params=RULE,
    responses={200: ("The rules left", m.AlertRuleList), 404: ("No such rule", None)},
)
def remove_alert_rule(rule: str):
    session = get_session()
    try:
        alert_store.remove_rule(session, rule, actor())
    except alert_store.NoSuchAlertThing as exc:
        raise ApiError(404, str(exc), "not_found") from None
    session.commit()
    found = alert_store.rules(session)
    return m.AlertRuleList(
        rules=[m.AlertRuleOut(**r.to_dict()) for r in found], kinds=dict(alert_store.RULE_KINDS)
    )


@api.route(
    bp,
    "PATCH",
    "/admin/api/alert-rules/{rule}",
    summary="Turn an alert rule on or off, its thresholds kept (built-in ones too)",
    tag="alerts",
    path_params=RULE,
    body=m.AlertRulePatch,
    responses={200: ("The rule", m.AlertRuleOut), 404: ("No such rule", None)},
)
def patch_alert_rule(rule: str, body: m.AlertRulePatch):
    session = get_session()
    try:
        changed = alert_store.set_rule_enabled(session, rule, body.enabled, actor())
    except alert_store.NoSuchAlertThing as exc:
        raise ApiError(404, str(exc), "not_found") from None
    session.commit()
    return m.AlertRuleOut(**changed.to_dict())


@api.route(
    bp,
    "GET",
    "/admin/api/alerts",
    summary="The newest alerts with the messages sent for each, and the newest tests",
    tag="alerts",
    query=m.AlertListQuery,
    responses={200: ("Alerts, newest first", m.AlertList)},
)
def list_alerts(query: m.AlertListQuery):
    return m.AlertList(**alert_store.recent(get_read_session(), query.limit))


# --- the audit log ---


@api.route(
    bp,
    "GET",
    "/admin/api/audit",
    summary="The audit log: every admin action, newest first, filtered, one page at a time",
    tag="audit",
    query=m.AuditQuery,
    description="Who (an admin key's prefix, or cli:<os user>), through which face (api, "
    "dashboard, cli), from where, what (key.create, route.update, events.replay ...), on "
    "what, and the change, secrets masked. Entries are only ever added; the log's "
    "retention (HUB_AUDIT_RETENTION_DAYS) alone deletes them.",
    responses={
        200: ("A page of entries", m.AuditPage),
        400: ("The cursor is not one of ours", None),
    },
)
def list_audit(query: m.AuditQuery):
    try:
        rows, next_cursor = audit.listing(
            get_read_session(),
            actor=query.actor,
            action=query.action,
            since=query.since,
            cursor=query.cursor,
            limit=query.limit,
        )
    except paging.BadCursor:
        raise bad_cursor("query") from None
    return m.AuditPage(
        entries=[m.AuditEntryOut(**row.to_dict()) for row in rows], next_cursor=next_cursor
    )
