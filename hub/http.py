"""Every outbound HTTP call a connector makes goes through this module.

It owns the one shared ``requests.Session``, timeouts, the single classification of HTTP
outcomes into retryable and permanent failures, ``Retry-After`` parsing, the tenacity wait
and stop policy, and the guard that keeps connectors away from private and local addresses.

The classification follows the rules used by well-behaved API clients (openai-python among
them): ``x-should-retry`` from the server wins; 408, 409, 429 and 5xx are worth retrying;
every other non-2xx answer is permanent. A server-requested wait (``retry-after-ms`` or
``Retry-After``) is honoured up to ``MAX_RETRY_AFTER``; otherwise the wait is exponential
backoff with jitter.

The private-address guard works at two levels: ``check_target`` resolves the host and
refuses the URL if any resolved address is forbidden, and the session's adapter checks the
address the socket actually connected to, so a DNS answer that changes between the check
and the connection (DNS rebinding) or a redirect to a private address cannot slip through.
When a proxy is configured through the environment, the socket-level check does not apply
(the peer is the proxy); ``check_target`` still does.

Answers are streamed and cut: a call reads at most ``ctx.max_response_bytes`` of a body
(HUB_MAX_RESPONSE_BYTES) and fails permanently past it, and its timeout holds for the whole
call (connect, headers and body), not for each socket read: at the deadline the watchdog
shuts the call's socket down, so a receiver dripping a byte at a time cannot outlive it.
When the step's deadline (not the call's own timeout) is what cut a call short, the error's
code is ``timeout``: the hub's deadline, which a sync route answers with 504.
"""

from __future__ import annotations

import contextlib
import email.utils
import ipaddress
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import requests
import tenacity
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from hub import config, deadline, signatures
from hub.connectors import (
    DEFAULT_MAX_RESPONSE_BYTES,
    NotConfiguredError,
    PermanentError,
    RetryableError,
    StepContext,
)
from hub.ops.redact import REDACTED, is_credential_header, is_sensitive_query

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRIES",
    "INITIAL_BACKOFF",
    "MAX_BACKOFF",
    "MAX_RETRY_AFTER",
    "USER_AGENT",
    "GuardedAdapter",
    "allow_private_targets",
    "check_target",
    "classify",
    "is_forbidden_address",
    "parse_retry_after",
    "redact_headers",
    "request",
    "retry_policy",
    "session",
    "standard_webhook_headers",
    "wait_retry_after_or_backoff",
]

DEFAULT_TIMEOUT = 30.0
MAX_RETRY_AFTER = 60.0
INITIAL_BACKOFF, MAX_BACKOFF = 0.5, 8.0
DEFAULT_TRIES = 3
USER_AGENT = "webhook-hub/0.1"
POOL_SIZE = 32  # connections kept per host; the worker pool is smaller than this
RECORD_LIMIT = 4096  # bytes of a request or response body kept for the attempt log
MESSAGE_BODY_LIMIT = 200  # characters of a response body allowed into an error message
READ_CHUNK = 64 * 1024  # bytes read from an answer at a time

FORBIDDEN_MESSAGE = "refusing to connect to a private or local address"

log = logging.getLogger("hub.http")

# --------------------------------------------------------------------------------------
# Private-address guard
# --------------------------------------------------------------------------------------

_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def allow_private_targets() -> bool:
    """True when the operator allows connectors to reach private addresses: the setting
    HUB_ALLOW_PRIVATE_TARGETS, read at each call (a connector's test may run without an app)."""
    return config.flag_from_environment("allow_private_targets")


def is_forbidden_address(address: str) -> bool:
    """True for loopback, private, link-local, multicast, reserved, unspecified, shared,
    cloud metadata and anything else not globally routable, including IPv6 forms of them.
    An address that does not parse is forbidden too."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        # IPv6 spellings of an IPv4 address are judged by that address. The deprecated
        # IPv4-compatible form (::a.b.c.d) falls in ::/8, which is reserved, so refused.
        if ip.ipv4_mapped is not None:
            return is_forbidden_address(str(ip.ipv4_mapped))
        if ip in _NAT64:
            return is_forbidden_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if ip.sixtofour is not None and is_forbidden_address(str(ip.sixtofour)):
            return True
    return (
        ip in _METADATA
        or ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or (ip.version == 4 and ip in _SHARED)
        or not ip.is_global
    )


def _forbidden() -> PermanentError:
    return PermanentError(FORBIDDEN_MESSAGE, code="forbidden_target")


def check_target(url: str) -> None:
    """Refuse a URL that is not http(s), has no host, or whose host resolves to any
    forbidden address. A host that does not resolve is retryable (DNS may come back)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise PermanentError("the URL is malformed", code="forbidden_target") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise PermanentError(
            f"only http and https URLs are allowed, not {parts.scheme or 'none'!r}",
            code="forbidden_target",
        )
    host = parts.hostname
    if not host:
        raise PermanentError("the URL has no host", code="forbidden_target")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise PermanentError("the URL has an invalid port", code="forbidden_target") from None
    if allow_private_targets():
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RetryableError(
            f"could not resolve {host}: {exc.strerror or exc}", code="upstream_unreachable"
        ) from None
    except (UnicodeError, ValueError):
        raise PermanentError("the URL has an invalid host", code="forbidden_target") from None
    addresses = {info[4][0] for info in infos}
    if not addresses or any(is_forbidden_address(str(a)) for a in addresses):
        raise _forbidden()


def _check_peer(sock: socket.socket) -> None:
    """Close the socket and refuse if it connected to a forbidden address."""
    if allow_private_targets():
        return
    try:
        peer = sock.getpeername()[0]
    except OSError:
        peer = ""
    if is_forbidden_address(str(peer)):
        sock.close()
        raise _forbidden()


class _Call:
    """The sockets one call is using, so that its deadline can cut them.

    A connection's socket joins once connected (or, from the pool, when a request starts)
    and leaves when the connection goes back to the pool;
    ``expire`` (on the watchdog thread) and ``leave`` take the same lock, so a connection
    that another call may pick up is never shut down. The socket itself is kept because
    a response that closes its connection takes the socket from it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sockets: dict[HTTPConnection, socket.socket] = {}
        self.expired = False

    def join(self, conn: HTTPConnection) -> None:
        with self.lock:
            self.sockets[conn] = conn.sock
            conn.hub_call = self  # type: ignore[attr-defined]
            expired = self.expired
        if expired:  # the deadline passed while it was connecting
            self.expire()

    def leave(self, conn: HTTPConnection) -> None:
        with self.lock:
            self.sockets.pop(conn, None)
            conn.hub_call = None  # type: ignore[attr-defined]

    def expire(self) -> None:
        with self.lock:
            self.expired = True
            for sock in self.sockets.values():
                # The plain socket's shutdown (not TLS's): a blocked read returns at once.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)


_calls = threading.local()  # .current: the _Call this thread is making, if any


class _CallTracking:
    """Mixed into the connections: once connected, a connection joins the call its thread
    is making, so the deadline holds while the request is sent and its answer read."""

    def connect(self):
        super().connect()
        self._join_call()

    def request(self, *args, **kwargs):
        self._join_call()  # a pooled connection is connected already
        return super().request(*args, **kwargs)

    def _join_call(self) -> None:
        call = getattr(_calls, "current", None)
        if call is not None and self.sock is not None:
            call.join(self)


class _GuardedHTTPConnection(_CallTracking, HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _GuardedHTTPSConnection(_CallTracking, HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _check_peer(sock)
        return sock


class _PoolReturn:
    """Mixed into the pools: a connection leaves its call before it is pooled again."""

    def _put_conn(self, conn):
        call = getattr(conn, "hub_call", None)
        if call is not None:
            call.leave(conn)
        return super()._put_conn(conn)


class _GuardedHTTPPool(_PoolReturn, HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(_PoolReturn, HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose sockets are checked against the private-address rule right
    after connecting (unless private targets are allowed at that moment)."""

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


# --------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------

_session: requests.Session | None = None
_session_lock = threading.Lock()


def _new_session() -> requests.Session:
    s = requests.Session()
    # The environment is read once a host (``_environment``), not by requests on each call:
    # scanning os.environ for proxies twice a call was a fifth of ``request``'s CPU.
    # A ~/.netrc is never read: a destination gets the credentials its step gives, no more.
    s.trust_env = False
    s.headers["User-Agent"] = USER_AGENT
    for prefix in ("http://", "https://"):
        s.mount(prefix, GuardedAdapter(pool_connections=POOL_SIZE, pool_maxsize=POOL_SIZE))
    return s


_environments: dict[tuple[str, str], dict[str, Any]] = {}
ENVIRONMENT_HOSTS = 1024  # hosts whose environment settings are kept; then read afresh


def _environment(url: str) -> dict[str, Any]:
    """What the process's environment says of a call to ``url``: its proxy (HTTP_PROXY,
    HTTPS_PROXY, ALL_PROXY, NO_PROXY) and CA bundle (REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE), as
    requests reads them, once a scheme and host."""
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc)
    found = _environments.get(key)
    if found is None:
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        found = {
            "proxies": requests.utils.get_environ_proxies(url),
            "verify": verify or True,
            "stream": True,
            "cert": None,
        }
        if len(_environments) >= ENVIRONMENT_HOSTS:
            _environments.clear()
        _environments[key] = found
    return found


def session() -> requests.Session:
    """The process-wide Session, created on first use."""
    global _session
    if _session is None:
        with _session_lock:
            if _session is None:
                _session = _new_session()
    return _session


# --------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    if value is None and not isinstance(headers, requests.structures.CaseInsensitiveDict):
        lowered = name.lower()
        for key, val in headers.items():
            if key.lower() == lowered:
                return val
    return value


def _finite_nonnegative(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def parse_retry_after(headers: Mapping[str, str] | None, cap: float = MAX_RETRY_AFTER):
    """Seconds the server asks us to wait, or None.

    ``retry-after-ms`` (milliseconds, may be fractional) wins over ``Retry-After``, which is
    either seconds or an HTTP date. Negative, non-finite or unparsable values give None;
    anything above ``cap`` is lowered to ``cap``.
    """
    seconds: float | None = None
    raw_ms = _header(headers, "retry-after-ms")
    if raw_ms is not None:
        try:
            seconds = _finite_nonnegative(float(raw_ms) / 1000.0)
        except ValueError:
            seconds = None
    if seconds is None:
        raw = _header(headers, "retry-after")
        if raw is not None:
            raw = raw.strip()
            try:
                seconds = _finite_nonnegative(float(raw))
            except ValueError:
                try:
                    when = email.utils.parsedate_to_datetime(raw)
                except (TypeError, ValueError, IndexError, OverflowError):
                    when = None
                if when is not None:
                    if when.tzinfo is None:
                        when = when.replace(tzinfo=UTC)
                    seconds = _finite_nonnegative((when - datetime.now(UTC)).total_seconds())
    if seconds is None:
        return None
    return min(seconds, cap)


def _body_snippet(response: requests.Response, limit: int = MESSAGE_BODY_LIMIT) -> str:
    try:
        text = response.content[: limit * 4].decode(response.encoding or "utf-8", "replace")
    except (LookupError, RuntimeError, requests.RequestException):
        return ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(response: requests.Response) -> str:
    method = response.request.method if response.request is not None else None
    host = urlsplit(response.url or "").hostname or "the server"
    who = f"{method} {host}" if method else host
    status_text = f"{response.status_code} {response.reason or ''}".strip()
    message = f"{who} answered {status_text}"
    snippet = _body_snippet(response)
    return f"{message}: {snippet}" if snippet else message


def classify(response: requests.Response) -> None:
    """Return on 2xx; raise RetryableError or PermanentError for anything else."""
    status = response.status_code
    if 200 <= status < 300:
        return None
    should_retry = (_header(response.headers, "x-should-retry") or "").strip().lower()
    if should_retry == "true":
        retryable = True
    elif should_retry == "false":
        retryable = False
    else:
        retryable = status in (408, 409, 429) or status >= 500
    message = _describe(response)
    if retryable:
        raise RetryableError(
            message,
            retry_after=parse_retry_after(response.headers),
            status=status,
            code="upstream_error",
        )
    raise PermanentError(message, status=status, code="upstream_error")


# --------------------------------------------------------------------------------------
# One request
# --------------------------------------------------------------------------------------


def redact_headers(headers: Mapping[str, Any] | None, also: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of ``headers`` with credentials and signatures replaced by ``[redacted]``;
    ``also`` names more headers to hide (compared without regard to case)."""
    extra = {name.lower() for name in also}
    return {
        k: (REDACTED if is_credential_header(k) or k.lower() in extra else v)
        for k, v in (headers or {}).items()
    }


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username}:{REDACTED}@" + netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if is_sensitive_query(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _truncate(data: bytes | str | None, limit: int = RECORD_LIMIT, encoding: str = "utf-8"):
    if data is None:
        return None
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else data
    try:
        text = raw[:limit].decode(encoding, "replace")
    except LookupError:
        text = raw[:limit].decode("utf-8", "replace")
    if len(raw) > limit:
        text += f"...[{len(raw) - limit} more bytes]"
    return text


def request(
    ctx: StepContext | None,
    method: str,
    url: str,
    *,
    json: Any = None,
    data: bytes | str | None = None,
    headers: dict | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    secret_headers: Iterable[str] = (),
) -> requests.Response:
    """Make one call (no retries), record it on ``ctx`` and classify the outcome.

    ``secret_headers`` are redacted in the record like credentials are, for headers whose
    names do not say they are secret.

    Redirects are not followed: a 3xx is a permanent failure, so a redirect cannot take a
    request (and its credentials) somewhere the target check did not approve.
    """
    check_target(url)
    s = session()
    try:
        prepared = s.prepare_request(
            requests.Request(method.upper(), url, json=json, data=data, headers=headers)
        )
    except (requests.RequestException, ValueError) as exc:
        raise PermanentError(f"cannot build the request: {type(exc).__name__}") from None
    # The headers go beside the request, not in it: a long body cut short by
    # HUB_ATTEMPT_COPY_BYTES takes no header with it.
    recorded_request = {
        "method": prepared.method,
        "url": _redact_url(prepared.url or url),
        "body": _truncate(prepared.body),
    }
    sent_headers = list(redact_headers(prepared.headers, secret_headers).items())
    seconds = ctx.time_left(timeout) if ctx is not None else timeout
    # The step's deadline, not this call's own timeout, is what will end it.
    cut_by_step = ctx is not None and ctx.deadline is not None and seconds < timeout
    limit = ctx.max_response_bytes if ctx is not None else DEFAULT_MAX_RESPONSE_BYTES
    settings = _environment(prepared.url or url)
    call = _Call()
    ends_at = time.monotonic() + seconds
    try:
        with deadline.calling_at(ends_at, call.expire):
            _calls.current = call
            try:
                response = s.send(prepared, timeout=seconds, allow_redirects=False, **settings)
                _read_body(response, limit)
                if call.expired:  # the socket was cut: what came before is not the answer
                    raise requests.Timeout("the call's deadline passed")
            finally:
                _calls.current = None
    except _TooLarge as big:
        _record(ctx, recorded_request, sent_headers, _truncate(big.head), big.status, big.headers)
        raise PermanentError(
            f"{prepared.method} {urlsplit(url).hostname} answered more than "
            f"HUB_MAX_RESPONSE_BYTES ({limit} bytes); the rest was not read",
            code="response_too_large",
            status=big.status,
        ) from None
    except (requests.RequestException, PermanentError) as exc:
        _record(ctx, recorded_request, sent_headers, None, None, None)
        if isinstance(exc, PermanentError):  # the connected-peer guard said no
            raise
        timed_out = call.expired or isinstance(exc, requests.Timeout) or time.monotonic() >= ends_at
        raise _call_failed(
            exc, prepared.method, urlsplit(url).hostname, seconds, timed_out, cut_by_step
        ) from exc
    _record(
        ctx,
        recorded_request,
        sent_headers,
        _truncate(response.content, encoding=response.encoding or "utf-8"),
        response.status_code,
        _answer_headers(response),
    )
    classify(response)
    return response


class _TooLarge(Exception):
    def __init__(self, head: bytes, status: int, headers: list[tuple[str, str]]):
        self.head = head
        self.status = status
        self.headers = headers


def _answer_headers(response: requests.Response) -> list[tuple[str, str]]:
    """The answer's headers as (name, value) pairs, a repeated one (Set-Cookie) once per
    value: urllib3's own dict keeps them apart, where ``response.headers`` joins them."""
    raw = getattr(response.raw, "headers", None)
    if raw is not None and hasattr(raw, "iteritems"):
        return list(raw.iteritems())
    return list(response.headers.items())


def _read_body(response: requests.Response, limit: int) -> None:
    """Read the answer into ``response.content``, no further than ``limit`` bytes (then the
    connection is closed and the rest never read). A success past it raises _TooLarge; a
    failure keeps its first ``limit`` bytes, and is classified by its status as ever."""
    declared = response.headers.get("Content-Length", "")
    chunks: list[bytes] = []
    size = int(declared) if declared.isdigit() and int(declared) > limit else 0
    if not size:
        for chunk in response.iter_content(READ_CHUNK):
            size += len(chunk)
            if size > limit:
                chunks.append(chunk[: len(chunk) - (size - limit)])
                break
            chunks.append(chunk)
    if size > limit:
        response.close()
        if 200 <= response.status_code < 300:
            raise _TooLarge(
                b"".join(chunks)[:RECORD_LIMIT], response.status_code, _answer_headers(response)
            )
    response._content = b"".join(chunks)  # what .content, .text and .json() read


def _call_failed(
    exc: requests.RequestException,
    method: str | None,
    host: str | None,
    seconds: float,
    timed_out: bool = False,
    cut_by_step: bool = False,
) -> RetryableError:
    """The retryable error for a call that got no (whole) answer."""
    if timed_out and cut_by_step:
        return RetryableError(
            f"{method} {host} was still running at the step's deadline ({seconds:.2f}s)",
            code="timeout",
        )
    if timed_out:
        return RetryableError(
            f"{method} {host} timed out after {seconds:.2f}s", code="upstream_timeout"
        )
    if isinstance(exc, requests.ConnectionError):
        return RetryableError(
            f"could not connect to {host}: {type(exc).__name__}", code="upstream_unreachable"
        )
    return RetryableError(f"{method} {host} failed: {type(exc).__name__}", code="upstream_error")


def _record(
    ctx: StepContext | None,
    req: dict,
    sent_headers: list[tuple[str, str]],
    response: str | None,
    status: int | None,
    answer_headers: list[tuple[str, str]] | None,
) -> None:
    if ctx is not None:
        ctx.record(
            request=req,
            response=response,
            status=status,
            request_headers=sent_headers,
            response_headers=answer_headers,
        )


# --------------------------------------------------------------------------------------
# Signing what a connector sends
# --------------------------------------------------------------------------------------


def standard_webhook_headers(
    body: bytes, secret: str, *, msg_id: str, timestamp: int | None = None
) -> dict[str, str]:
    """The ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature`` headers that let a
    receiver verify ``body`` with the Standard Webhooks rule (HMAC-SHA256 over
    ``id.timestamp.body`` keyed by a ``whsec_`` secret).

    Connectors reach ``hub.signatures`` through here, so they keep to their two imports.
    A secret that is not ``whsec_`` + base64 is a NotConfiguredError (never echoed).
    """
    try:
        return signatures.sign(
            "standard-webhooks", body=body, secret=secret, timestamp=timestamp, msg_id=msg_id
        )
    except (TypeError, ValueError):
        raise NotConfiguredError(
            "the signing secret is not a Standard Webhooks secret ('whsec_' followed by base64)"
        ) from None


# --------------------------------------------------------------------------------------
# Retry policy
# --------------------------------------------------------------------------------------


class wait_retry_after_or_backoff(tenacity.wait.wait_base):  # noqa: N801 - tenacity style
    """Wait what the server asked for (capped), else exponential backoff with jitter."""

    def __init__(
        self,
        initial: float = INITIAL_BACKOFF,
        maximum: float = MAX_BACKOFF,
        cap: float = MAX_RETRY_AFTER,
    ):
        self.initial = initial
        self.maximum = maximum
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return max(0.0, min(float(retry_after), self.cap))
        base = min(self.initial * 2 ** (retry_state.attempt_number - 1), self.maximum)
        return base * (1 - 0.25 * random.random())


class _stop_at_deadline(tenacity.stop.stop_base):  # noqa: N801 - tenacity style
    """Stop when the next wait would end at or past ``deadline`` (a monotonic time)."""

    def __init__(self, deadline: float, clock: Callable[[], float] = time.monotonic):
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.clock() + retry_state.upcoming_sleep >= self.deadline


def _log_retry(connector: str | None, tries: int) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        name = connector or getattr(retry_state.fn, "__name__", None) or "call"
        log.warning(
            "%s: attempt %d/%d failed (status=%s code=%s); retrying in %.2fs",
            name,
            retry_state.attempt_number,
            tries,
            getattr(exc, "status", None),
            getattr(exc, "code", None),
            retry_state.upcoming_sleep,
        )

    return before_sleep


def retry_policy(
    tries: int = DEFAULT_TRIES,
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    connector: str | None = None,
) -> tenacity.Retrying:
    """A tenacity Retrying that retries RetryableError only, at most ``tries`` attempts,
    never sleeping past ``deadline``; the last error is re-raised as itself."""
    stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(tries)
    if deadline is not None:
        stop = stop | _stop_at_deadline(deadline)
    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(RetryableError),
        stop=stop,
        wait=wait_retry_after_or_backoff(),
        sleep=sleep,
        reraise=True,
        before_sleep=_log_retry(connector, tries),
    )
