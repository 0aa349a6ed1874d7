"""`hub listen ROUTE --forward URL`: a running hub's new events of one route, sent on to a
local app as their senders sent them (hub.web.listen is the other end).

It builds no app and opens no database: it speaks HTTP to the hub (``--hub`` or HUB_URL)
with an admin key or a key whose scopes include the route (``--key`` or HUB_API_KEY). It
long-polls ``GET /listen/routes/ROUTE?after=<cursor>``; the cursor is the id of the last
event it forwarded, so when the connection drops it asks again from there, after a pause
that doubles up to MAX_BACKOFF seconds: no event is skipped, none is sent twice. Each event
goes to the local URL (plus the request's path suffix and query) with its method, body byte
for byte and the sender's headers, signature headers included; one line is printed per
event (time, event id, local status, milliseconds), and the local answer is reported back
to the hub, where the event shows it as a ``listen`` attempt.

``hub listen --replay EVT_ID --forward URL`` sends one stored event and exits: 0 when the
local app answered 2xx, 1 otherwise.
"""

from __future__ import annotations

import base64
import sys
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import quote

import click
import requests

# Seconds of the first pause after a failed poll, and the longest pause.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# Seconds each poll asks the hub to wait for an event (the hub holds at most HUB_LISTEN_WAIT).
POLL_WAIT = 20.0
# Seconds to connect to the hub, and to read its answer beyond the poll's wait.
CONNECT_TIMEOUT = 5.0
READ_MARGIN = 15.0
# Local answers kept to report once the hub is back (the oldest go first when it is full).
PENDING_REPORTS = 1000


class HubRefused(Exception):
    """The hub refused what was asked (a bad key, a route out of scope, no such event)."""


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _refusal(response: requests.Response) -> str:
    try:
        return str(response.json().get("error") or response.reason)
    except ValueError:
        return f"HTTP {response.status_code}"


class Listener:
    """One `hub listen` run: its hub, key, local URL and cursor."""

    def __init__(
        self,
        hub: str,
        key: str,
        forward: str,
        timeout: float,
        echo: Callable[[str], None],
    ):
        self.hub = hub.rstrip("/")
        self.forward_url = forward.rstrip("/")
        self.timeout = timeout
        self.echo = echo
        self.http = requests.Session()
        # The hub's key goes to the hub only; the local calls use a session of their own.
        self.http.headers["X-API-Key"] = key
        self.local = requests.Session()
        # The local app is called directly: never through a proxy of the environment's.
        self.local.trust_env = False
        self.reports: deque[tuple[str, dict[str, Any]]] = deque(maxlen=PENDING_REPORTS)

    def poll(self, route: str, after: str | None, wait: float = POLL_WAIT) -> dict[str, Any]:
        """One long poll; HubRefused for a 4xx but 429, requests' errors for the rest."""
        params: dict[str, Any] = {"wait": wait}
        if after:
            params["after"] = after
        response = self.http.get(
            f"{self.hub}/listen/routes/{quote(route, safe='')}",
            params=params,
            timeout=(CONNECT_TIMEOUT, wait + READ_MARGIN),
        )
        if response.status_code == 429 or response.status_code >= 500:
            raise requests.ConnectionError(f"the hub answered {response.status_code}")
        if response.status_code >= 400:
            raise HubRefused(_refusal(response))
        return response.json()

    def fetch(self, event_id: str) -> dict[str, Any]:
        response = self.http.get(
            f"{self.hub}/listen/events/{quote(event_id, safe='')}",
            timeout=(CONNECT_TIMEOUT, READ_MARGIN),
        )
        if response.status_code >= 400:
            raise HubRefused(_refusal(response))
        return response.json()

    def forward(self, event: dict[str, Any]) -> tuple[int | None, int, str | None]:
        """Send one event to the local app: (its status or None, milliseconds, error)."""
        url = self.forward_url + event.get("path", "")
        if event.get("query"):
            url += "?" + event["query"]
        started = time.monotonic()
        try:
            answer = self.local.request(
                event["method"],
                url,
                data=base64.b64decode(event["body_base64"]),
                headers=event["headers"],
                timeout=self.timeout,
                allow_redirects=False,
            )
            status, error = answer.status_code, None
        except requests.RequestException as exc:
            status, error = None, f"local app unreachable ({type(exc).__name__})"
        return status, int((time.monotonic() - started) * 1000), error

    def report(self, event_id: str, status: int | None, ms: int, error: str | None) -> None:
        """Tell the hub what the local app answered; kept and sent again later if the hub
        cannot be reached now."""
        self.reports.append((event_id, {"status": status, "duration_ms": ms, "error": error}))
        self.flush_reports()

    def flush_reports(self) -> None:
        while self.reports:
            event_id, answer = self.reports[0]
            try:
                response = self.http.post(
                    f"{self.hub}/listen/events/{quote(event_id, safe='')}/answers",
                    json=answer,
                    timeout=(CONNECT_TIMEOUT, READ_MARGIN),
                )
            except requests.RequestException:
                return  # the hub is away: the next poll's success sends them
            if response.status_code >= 500 or response.status_code == 429:
                return
            self.reports.popleft()  # recorded, or refused for good (the event is gone)

    def handle(self, event: dict[str, Any]) -> int | None:
        status, ms, error = self.forward(event)
        shown = str(status) if status is not None else "ERR"
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        path = event.get("path") or "/"
        line = f"{when}  {event['id']}  {event['method']} {path}  {shown}  {ms} ms"
        if error:
            line += f"  {error}"
        self.echo(line)
        self.report(event["id"], status, ms, error)
        return status

    def run(self, route: str, after: str | None, sleep: Callable[[float], None]) -> NoReturn:
        cursor = after
        backoff = FIRST_BACKOFF
        connected = False
        while True:
            try:
                # The first poll of a connection answers at once: the key is checked and
                # the start cursor known before the listener says it is listening.
                page = self.poll(route, cursor, POLL_WAIT if connected else 0)
            except requests.RequestException as exc:
                why = str(exc) if "answered" in str(exc) else type(exc).__name__
                click.echo(
                    f"connection to the hub lost ({why}); trying again in {backoff:g} s"
                    + (f" from {cursor}" if cursor else ""),
                    err=True,
                )
                connected = False
                sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if not connected:
                click.echo(
                    f"listening to route {route} on {self.hub}, forwarding to "
                    f"{self.forward_url}" + (f" (after {cursor})" if cursor else ""),
                    err=True,
                )
                connected = True
            backoff = FIRST_BACKOFF
            self.flush_reports()
            for event in page["events"]:
                self.handle(event)
                cursor = event["id"]  # forwarded: never sent again
            cursor = page["cursor"]


def _echo(line: str) -> None:
    click.echo(line)
    sys.stdout.flush()


@click.command("listen")
@click.argument("route", required=False)
@click.option(
    "--forward",
    required=True,
    metavar="URL",
    help="The local URL each event is sent to, e.g. http://localhost:3000/webhooks.",
)
@click.option(
    "--hub", "hub_url", envvar="HUB_URL", metavar="URL", help="The hub's URL (or HUB_URL)."
)
@click.option(
    "--key",
    envvar="HUB_API_KEY",
    help="An admin key, or a key whose scopes include the route (or HUB_API_KEY).",
)
@click.option(
    "--replay", "replay_id", metavar="EVT_ID", help="Send this one stored event, then exit."
)
@click.option("--after", metavar="EVT_ID", help="Start after this event instead of now.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds the local app may take to answer.",
)
def listen_command(
    route: str | None,
    forward: str,
    hub_url: str | None,
    key: str | None,
    replay_id: str | None,
    after: str | None,
    timeout: float,
) -> None:
    """Forward a route's new events from a running hub to a local URL, as their senders
    sent them (signature headers included), one line per event."""
    if not hub_url:
        _fail("give the hub's URL with --hub or HUB_URL")
    if not key:
        _fail("give an API key with --key or HUB_API_KEY (an admin key, or one scoped to it)")
    if not forward.startswith(("http://", "https://")):
        _fail("--forward must be an http:// or https:// URL")
    listener = Listener(hub_url, key, forward, timeout, _echo)
    try:
        if replay_id:
            try:
                event = listener.fetch(replay_id)
            except HubRefused as exc:
                _fail(str(exc))
            except requests.RequestException as exc:
                _fail(f"the hub could not be reached ({type(exc).__name__})")
            status = listener.handle(event)
            sys.exit(0 if status is not None and 200 <= status < 300 else 1)
        if not route:
            _fail("name the ROUTE to listen to (or give --replay EVT_ID)")
        try:
            listener.run(route, after, time.sleep)
        except HubRefused as exc:
            _fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(0)
