"""What every request binds for its log lines and metrics, from its start to its end.

A request's id is the sender's ``X-Request-ID`` when it is a sane token, a new one otherwise
(``hub.ops.logs.request_id_from``); it is bound for log lines when the request starts,
answered in ``X-Request-ID`` on every response, error or not, and unbound when the request's
app context ends, with whatever the services bound meanwhile (the event being written, the
route found): a thread that answers one request after another starts each with nothing of
the previous one. A /hooks or /api request is counted in hub_http_requests_total.
"""

from __future__ import annotations

from flask import Flask, Request, Response, g, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface

from hub.ops import logs, metrics

# The endpoints whose requests hub_http_requests_total counts.
COUNTED_ENDPOINTS = frozenset({"hooks.hook", "seed.api_process", "seed.api_chat"})


def request_id() -> str:
    """This request's id, bound on first use (before_request does it first)."""
    if "hub_log_token" not in g:
        rid = logs.request_id_from(request.headers.get(logs.REQUEST_ID_HEADER))
        g.hub_log_token = logs.bind(request_id=rid)
    return logs.current_request_id() or ""


class CookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie session, opened without building its signer when the request
    carries no session cookie (every webhook): the same empty session, at a tenth of the
    cost (the signer was 2 % of an accepted webhook's CPU)."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if app.secret_key and not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def init_app(app: Flask) -> None:
    """Register before everything else that runs per request: its id comes first."""
    app.session_interface = CookieSessions()

    @app.before_request
    def take_request_id() -> None:
        request_id()

    @app.after_request
    def answer_request_id(response: Response) -> Response:
        response.headers[logs.REQUEST_ID_HEADER] = request_id()
        if request.endpoint in COUNTED_ENDPOINTS:
            metrics.request_answered(response.status_code)
        return response

    @app.teardown_appcontext
    def unbind_request(_exc: BaseException | None) -> None:
        token = g.pop("hub_log_token", None)
        if token is not None:
            logs.unbind(token)
