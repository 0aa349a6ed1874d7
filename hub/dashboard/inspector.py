"""What the event page shows a developer: each attempt's request and response as HTTP is
read (method, URL, status, headers, body), and the original webhook as a curl command.

Nothing here reads a secret: attempts and events are stored redacted (hub.ops.redact), and
a redacted value becomes a shell variable the developer fills (``"$HUB_API_KEY"``), never a
guess. Bodies are shown as text (Jinja escapes them), pretty-printed when they are JSON,
within SHOW_CHARS; a body longer than COLLAPSE_CHARS starts folded, with its size said.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from hub.ops.redact import HEADERS_CUT, REDACTED

SHOW_CHARS = 256 * 1024  # of one body on the page
COLLAPSE_CHARS = 2_000  # a longer body starts folded
CURL_INLINE_BYTES = 64 * 1024  # a longer body is sent from a file, not written in the command
# Headers curl writes itself, or that a proxy in front of the hub added: a copy of them
# would be wrong (Content-Length of another body) or claim a hop that did not happen.
NOT_COPIED = frozenset(
    {
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "accept-encoding",
        "forwarded",
        "x-real-ip",
        HEADERS_CUT,
    }
)
KEY_VARIABLE = "HUB_API_KEY"
# How a header value cut short by hub.ops.redact.header_pairs ends.
VALUE_CUT = re.compile(r"\.\.\.\[\d+ more bytes\]$")
# A hub key cut by the redaction (``hk_<prefix>_[redacted]``), or a whole value replaced.
REDACTED_PARTS = re.compile(f"(hk_[0-9a-f]{{8}}_{re.escape(REDACTED)}|{re.escape(REDACTED)})")


@dataclass
class Body:
    """A body as the page shows it."""

    text: str
    size: int  # characters (or bytes) it had
    pretty: bool = False  # JSON, indented
    cut: bool = False  # longer than SHOW_CHARS: the start is shown

    @property
    def folded(self) -> bool:
        return len(self.text) > COLLAPSE_CHARS or self.text.count("\n") > 40


def body_of(value: Any) -> Body | None:
    """A stored body (bytes, text, or an already parsed value) for the page."""
    if value is None:
        return None
    if isinstance(value, bytes):
        text = value[:SHOW_CHARS].decode("utf-8", "replace")
        size = len(value)
    elif isinstance(value, str):
        text, size = value[:SHOW_CHARS], len(value)
    else:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        return Body(text[:SHOW_CHARS], len(text), pretty=True, cut=len(text) > SHOW_CHARS)
    if size > SHOW_CHARS:
        return Body(text, size, cut=True)
    try:
        parsed = json.loads(text)
    except ValueError:
        return Body(text, size)
    if not isinstance(parsed, dict | list):  # a bare string or number reads best as sent
        return Body(text, size)
    return Body(json.dumps(parsed, indent=2, ensure_ascii=False), size, pretty=True)


@dataclass
class Header:
    """One header as the page shows it, with what the hub did to its value, if anything."""

    name: str
    value: str
    redacted: bool = False  # a credential: never stored
    cut: bool = False  # longer than the bound: the start is shown


@dataclass
class Headers:
    """A request's or an answer's headers as recorded; ``cut`` is the hub's sentence when
    some were not kept (HUB_ATTEMPT_HEADERS, HUB_ATTEMPT_HEADER_BYTES)."""

    rows: list[Header] = field(default_factory=list)
    cut: str | None = None

    @property
    def redacted(self) -> int:
        return sum(1 for h in self.rows if h.redacted)

    @property
    def shortened(self) -> int:
        return sum(1 for h in self.rows if h.cut)


def headers_of(pairs: Any) -> Headers | None:
    """Stored headers ([name, value] pairs, or an older copy's name -> value object) for the
    page; None when none were recorded."""
    if pairs is None:
        return None
    items = pairs.items() if isinstance(pairs, dict) else pairs
    shown = Headers()
    for item in items:
        if not isinstance(item, list | tuple) or len(item) != 2:
            continue
        name, value = str(item[0]), str(item[1])
        if name == HEADERS_CUT:
            shown.cut = value
            continue
        shown.rows.append(
            Header(name, value, redacted=value == REDACTED, cut=bool(VALUE_CUT.search(value)))
        )
    return shown


@dataclass
class Exchange:
    """One attempt's call: what was sent and what came back, as far as it was recorded."""

    method: str | None = None
    url: str | None = None
    headers: Headers | None = None  # None: not recorded
    body: Body | None = None
    # The request as stored, when it is not the structured record hub.http writes (another
    # connector's, or one cut short by HUB_ATTEMPT_COPY_BYTES).
    raw: Body | None = None
    status: int | None = None
    response: Body | None = None
    response_headers: Headers | None = None  # None: not recorded


def exchange_of(attempt: Any) -> Exchange:
    """An attempt row's request and response, read for the page."""
    shown = Exchange(
        status=attempt.http_status,
        response=body_of(attempt.response),
        headers=headers_of(attempt.request_headers),
        response_headers=headers_of(attempt.response_headers),
    )
    if not attempt.request:
        return shown
    try:
        request = json.loads(attempt.request)
    except ValueError:
        request = None
    if isinstance(request, dict) and isinstance(request.get("method"), str):
        shown.method = request["method"]
        shown.url = str(request.get("url") or "")
        if shown.headers is None and isinstance(request.get("headers"), dict):
            shown.headers = headers_of(request["headers"])  # kept in the copy, before 0016
        shown.body = body_of(request.get("body"))
    else:
        shown.raw = body_of(attempt.request)
    return shown


# --- copy as curl ---


def variable_for(name: str) -> str:
    """The shell variable a redacted value of header (or query field) ``name`` becomes."""
    lowered = name.lower()
    if lowered in ("x-api-key", "api_key"):
        return KEY_VARIABLE
    return re.sub(r"[^A-Z0-9]", "_", name.upper()).strip("_") or "SECRET"


class Word:
    """One shell word made of literal text and variables: literals single-quoted, each
    variable double-quoted, so the shell expands ``$NAME`` and nothing else."""

    def __init__(self) -> None:
        self.parts: list[tuple[bool, str]] = []  # (is a variable, text)

    def text(self, value: str) -> Word:
        if value and self.parts and not self.parts[-1][0]:
            self.parts[-1] = (False, self.parts[-1][1] + value)
        elif value:
            self.parts.append((False, value))
        return self

    def variable(self, name: str) -> Word:
        self.parts.append((True, name))
        return self

    def redacted(self, value: str, name: str) -> Word:
        """``value`` with each redacted part as the variable it needs."""
        for piece in REDACTED_PARTS.split(value):
            if piece == REDACTED:
                self.variable(variable_for(name))
            elif REDACTED_PARTS.fullmatch(piece):
                self.variable(KEY_VARIABLE)
            else:
                self.text(piece)
        return self

    def shell(self) -> str:
        if not self.parts:
            return "''"
        return "".join(f'"${v}"' if var else shlex.quote(v) for var, v in self.parts)


@dataclass
class Curl:
    command: str
    variables: list[str]  # to set before running it
    dropped: list[str]  # stored headers left out (curl writes them, or a proxy added them)
    body_file: bool = False  # the body is read from a file the page links to
    partial: bool = False  # the hub kept only the start of this (refused) request's body


def curl_for(event: Any, url: str) -> Curl:
    """A curl command that sends ``event``'s request again to ``url`` (this hub's URL for its
    route): its method, query, headers as stored and body byte for byte."""
    variables: list[str] = []

    def used(word: Word) -> str:
        for is_var, name in word.parts:
            if is_var and name not in variables:
                variables.append(name)
        return word.shell()

    target = Word().redacted(url, "url")  # a key typed as the route's name is cut
    if event.query:
        target.text("?")
        pairs = parse_qsl(event.query, keep_blank_values=True)
        for i, (name, value) in enumerate(pairs):
            target.text(("&" if i else "") + urlencode([(name, "")]))
            if REDACTED in value:
                target.redacted(value, name)
            else:
                target.text(urlencode([("", value)])[1:])
    words = ["curl", "-X", shlex.quote(event.method or "POST"), used(target)]
    dropped = []
    stored = event.headers or {}
    # A verified key that came in no X-API-Key header came as ``Authorization: Bearer``.
    bearer = bool(event.key_prefix) and "x-api-key" not in stored
    for name, value in stored.items():
        lowered = name.lower()
        if lowered in NOT_COPIED or lowered.startswith("x-forwarded-"):
            dropped.append(name)
            continue
        header = Word().text(f"{name}: ")
        if lowered == "authorization" and value == REDACTED and bearer:
            header.text("Bearer ").variable(KEY_VARIABLE)  # how the hub reads a key there
        else:
            header.redacted(str(value), name)
        words += ["-H", used(header)]
    body: bytes = event.body or b""
    partial = event.body_size is not None and event.body_size > len(body)
    pipe = ""
    body_file = False
    text = as_text(body)
    if len(body) > CURL_INLINE_BYTES:
        words += ["--data-binary", shlex.quote(f"@{event.id}.body")]
        body_file = True
    elif text is not None:
        words += ["--data-raw", shlex.quote(text)]  # --data-raw: a leading @ is no file name
    else:  # bytes a shell word cannot hold (NUL) or that are not UTF-8: through base64
        encoded = base64.b64encode(body).decode()
        pipe = f"printf %s {shlex.quote(encoded)} | base64 -d | "
        words += ["--data-binary", "@-"]
    return Curl(pipe + " ".join(words), variables, dropped, body_file, partial)


def as_text(body: bytes) -> str | None:
    """``body`` as a shell word can carry it: UTF-8 without NUL; else None."""
    if b"\x00" in body:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None
