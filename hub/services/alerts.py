"""Alerts: channels (where), rules (when), the evaluator that turns what happened into alerts,
and the sender that delivers them. The admin API and the CLI call the functions below; the
evaluator and the sender run as two threads of each worker process (``AlertRunner``).

- Channels: ``webhook`` (a JSON POST to a URL), ``slack`` (an incoming webhook) and
  ``email`` (SMTP). The secret parts of a channel's config (its URL, which may carry a
  token; an SMTP password) are sealed at rest and masked whenever shown.
- Rules: ``circuit_open``, ``delivery_dead``, ``failure_ratio``, ``oldest_due`` and
  ``refusal_rate`` (``RULE_KINDS`` says what each watches). Two built-in rules,
  ``dead-deliveries`` and ``open-circuits``, apply to every channel until a row of the same
  name replaces them (or turns them off): a hub with one channel alerts on dead deliveries
  and open circuits with nothing else configured.
- Alerts: one row per rule and subject (route/destination, or a route) while its condition
  lasts. It fires once, counts what it saw meanwhile (10,000 dead deliveries are one alert
  that says 10,000), and sends one "resolved" notice when it clears.

Exactly once across processes: each evaluation runs in one transaction that starts by moving
the ``alert_state`` row's ``next_run_at`` forward with a conditional UPDATE (``WHERE
next_run_at <= now``). Another process's UPDATE waits for that row's lock (PostgreSQL; the
write lock on SQLite) and then finds the condition false: it skips its turn. The evaluation
reads what changed since the cursors of that row (the last destination change read, the end
of the window of dead deliveries counted) and moves them in the same transaction, so a
process that dies mid-way leaves nothing half done. Each message is an ``alert_sends`` row,
taken by one sender with a conditional UPDATE (``pending`` -> ``sending``).

Failure isolation: messages are sent by a thread of their own, never in a delivery thread or
an HTTP request; HTTP goes through ``hub.http`` (private-address guard, timeouts, size
limits), SMTP under the same address guard; each try is bounded by HUB_ALERT_SEND_TIMEOUT and
a message gets three tries (tenacity), then ends ``failed`` with the error recorded.

Errors: bad input is ``AlertInvalid`` (sentences per field), an unknown name ``NoSuchAlertThing``.
Log lines name channels, rules and error types, never a URL, a password or a body.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from hub import http
from hub.connectors import PermanentError, RetryableError
from hub.services import audit
from hub.store.crypto import MASK, SecretBox, SecretsUnreadable, is_sealed
from hub.store.db import Database
from hub.store.models import (
    Alert,
    AlertChannel,
    AlertRule,
    AlertSend,
    AlertState,
    Delivery,
    DestinationChange,
    Event,
    EventStatus,
    due,
    iso_time,
    utcnow,
)

log = logging.getLogger("hub.alerts")

CHANNEL_KINDS = ("webhook", "slack", "email")
RULE_KINDS = {
    "circuit_open": "a destination's circuit opened; resolved when it closes",
    "delivery_dead": "deliveries went dead; resolved after `window` seconds without one "
    "(default 300)",
    "failure_ratio": "the share of a destination's deliveries that ended failed or dead "
    "over the last `window` seconds (default 300, at least 5 ended) is above `threshold` "
    "(0 to 1)",
    "oldest_due": "the oldest due delivery has waited more than `threshold` seconds",
    "refusal_rate": "a route refused more than `threshold` requests per minute (over the "
    "last `window` seconds, default 60)",
}
# The rules that apply until a row of the same name replaces them or turns them off.
BUILTIN_RULES = (
    {"name": "dead-deliveries", "kind": "delivery_dead"},
    {"name": "open-circuits", "kind": "circuit_open"},
)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
FIRING, RESOLVED = "firing", "resolved"
PENDING, SENDING, SENT, FAILED = "pending", "sending", "sent", "failed"
TEST = "test"
# The defaults of HUB_ALERT_MAX_CHANNELS and HUB_ALERT_MAX_RULES.
MAX_CHANNELS = 50
MAX_RULES = 100
BODY_MAX = 4000
TEXT_MAX = 1500  # a message's sentence: its JSON stays whole within BODY_MAX
ERROR_MAX = 500
DEAD_QUIET = 300  # seconds without a dead delivery before a delivery_dead alert resolves
RATIO_WINDOW = 300
RATIO_MINIMUM = 5  # ended deliveries in the window before a ratio means anything
REFUSAL_WINDOW = 60
# Deliveries are counted up to this many seconds ago: a delivery's ending is committed a
# moment after its completed_at, and a window read too soon would miss it for good.
COMMIT_LAG = 1.0
CHANGES_PER_PASS = 5000
SEND_TRIES = 3
SENDS_PER_PASS = 20


class AlertInvalid(ValueError):
    """Bad input; ``errors`` are ``field: sentence`` items."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


class NoSuchAlertThing(LookupError):
    """No channel (or rule) of that name; ``args[0]`` says which."""


class AlreadyExists(ValueError):
    """A channel or rule of that name exists; ``args[0]`` says which."""


# --- channels ---


class ChannelSpec(BaseModel):
    """A channel as submitted: a name, a kind and the kind's fields."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="The channel's name")
    kind: Literal["webhook", "slack", "email"] = Field(description="webhook, slack or email")
    url: str | None = Field(
        None,
        max_length=2000,
        description="webhook and slack: where to POST (secret: shown masked)",
    )
    host: str | None = Field(None, max_length=255, description="email: the SMTP server")
    port: int | None = Field(None, ge=1, le=65535, description="email: its port (default 25)")
    username: str | None = Field(None, max_length=255, description="email: SMTP login")
    password: str | None = Field(
        None, max_length=1000, description="email: SMTP password (secret: shown masked)"
    )
    starttls: bool = Field(False, description="email: upgrade the connection with STARTTLS")
    ssl: bool = Field(False, description="email: connect over TLS (port 465)")
    sender: str | None = Field(None, max_length=255, description="email: the From address")
    to: list[str] = Field(
        default_factory=list, max_length=20, description="email: the addresses alerted"
    )


def _http_url(value: str | None, errors: list[str]) -> None:
    if not value:
        errors.append("url: a webhook or slack channel needs a URL")
        return
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        errors.append("url: is not a URL")
        return
    if parts.scheme not in ("http", "https") or not host:
        errors.append("url: must be an http:// or https:// URL with a host")
    elif not http.allow_private_targets() and _is_local(host):
        errors.append(
            "url: points to a loopback, private or link-local address (allowed only with "
            "HUB_ALLOW_PRIVATE_TARGETS=true)"
        )


def _is_local(host: str) -> bool:
    """An obviously local host, refused when saved; hub.http checks every resolved address
    (and the connected socket) again at each send."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return http.is_forbidden_address(host)


def _check_channel(spec: ChannelSpec) -> list[str]:
    errors: list[str] = []
    if spec.kind in ("webhook", "slack"):
        _http_url(spec.url, errors)
        for name in ("host", "username", "password", "sender"):
            if getattr(spec, name):
                errors.append(f"{name}: only an email channel takes it")
        if spec.to:
            errors.append("to: only an email channel takes it")
    else:
        if spec.url:
            errors.append("url: an email channel takes host, port, sender and to instead")
        if not spec.host:
            errors.append("host: an email channel needs its SMTP server")
        if not spec.sender or "@" not in spec.sender:
            errors.append("sender: an email channel needs a From address (name@domain)")
        if not spec.to:
            errors.append("to: an email channel needs at least one address")
        errors += [f"to: {a!r} is not an address" for a in spec.to if "@" not in a]
        if spec.password and not spec.username:
            errors.append("password: given without a username")
    return errors


def _validated(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise AlertInvalid(
            [
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors(include_url=False)
            ]
        ) from None


def _mask_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{MASK}"


def channel_to_dict(row: AlertChannel, box: SecretBox) -> dict[str, Any]:
    """A channel as every face shows it: secrets masked, never opened."""
    config = dict(row.config or {})
    shown: dict[str, Any] = {"name": row.name, "kind": row.kind}
    if "url" in config:
        try:
            shown["url"] = _mask_url(box.open_one(config["url"]))
        except SecretsUnreadable:
            shown["url"] = MASK
    for name in ("host", "port", "username", "starttls", "ssl", "sender", "to"):
        if name in config:
            shown[name] = config[name]
    if config.get("password"):
        shown["password"] = MASK
    shown["created_at"] = iso_time(row.created_at)
    return shown


def add_channel(
    session: Session,
    box: SecretBox,
    data: Any,
    most: int = MAX_CHANNELS,
    actor: audit.Actor | None = None,
) -> AlertChannel:
    """Add a channel; at most ``most`` (HUB_ALERT_MAX_CHANNELS) exist. ``actor``: the
    admin adding it (``alert_channel.add``, shown as listed: URL and password masked)."""
    spec = _validated(ChannelSpec, data)
    assert isinstance(spec, ChannelSpec)
    errors = _check_channel(spec)
    if errors:
        raise AlertInvalid(errors)
    if session.scalar(select(AlertChannel.id).where(AlertChannel.name == spec.name)):
        raise AlreadyExists(f"A channel named {spec.name!r} exists already")
    if (session.scalar(select(func.count()).select_from(AlertChannel)) or 0) >= most:
        raise AlertInvalid([f"name: the hub holds at most {most} alert channels; remove one first"])
    if spec.kind in ("webhook", "slack"):
        config: dict[str, Any] = {"url": box.seal_one(spec.url or "")}
    else:
        config = {
            "host": spec.host,
            "port": spec.port or (465 if spec.ssl else 25),
            "username": spec.username,
            "starttls": spec.starttls,
            "ssl": spec.ssl,
            "sender": spec.sender,
            "to": list(spec.to),
        }
        if spec.password:
            config["password"] = box.seal_one(spec.password)
    if session.scalar(select(func.count()).select_from(AlertChannel)) == 0:
        # The first channel: the evaluator starts reading from now, not from the history
        # it skipped while nothing could be alerted.
        session.execute(delete(AlertState))
    row = AlertChannel(name=spec.name, kind=spec.kind, config=config)
    session.add(row)
    session.flush()
    audit.record(
        session,
        actor,
        "alert_channel.add",
        row.name,
        _shown_channel(row, box),
        secrets=[spec.url or "", spec.password or ""],
    )
    return row


def _shown_channel(row: AlertChannel, box: SecretBox | None) -> dict[str, Any]:
    """A channel as its audit entry shows it: as listed (secrets masked), when made."""
    if box is None:
        return {"kind": row.kind}
    return {k: v for k, v in channel_to_dict(row, box).items() if k != "created_at"}


def list_channels(session: Session) -> list[AlertChannel]:
    return list(session.scalars(select(AlertChannel).order_by(AlertChannel.name)))


def get_channel(session: Session, name: str) -> AlertChannel:
    row = session.scalar(select(AlertChannel).where(AlertChannel.name == name))
    if row is None:
        raise NoSuchAlertThing(f"No alert channel is named {name!r}")
    return row


def remove_channel(
    session: Session, name: str, actor: audit.Actor | None = None, box: SecretBox | None = None
) -> AlertChannel:
    """Remove the channel ``name``. ``actor``: the admin removing it (``alert_channel.remove``,
    the channel as it was listed, masked by ``box``)."""
    row = get_channel(session, name)
    shown = _shown_channel(row, box)
    session.delete(row)
    session.flush()
    audit.record(session, actor, "alert_channel.remove", name, shown)
    return row


# --- rules ---


class RuleSpec(BaseModel):
    """A rule as submitted."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, description="The rule's name")
    kind: Literal["circuit_open", "delivery_dead", "failure_ratio", "oldest_due", "refusal_rate"]
    route: str | None = Field(None, max_length=64, description="Only this route")
    destination: str | None = Field(None, max_length=64, description="Only this destination")
    threshold: float | None = Field(
        None, ge=0, le=1e9, description="failure_ratio (0-1), oldest_due (s), refusal_rate (/min)"
    )
    window: int | None = Field(None, ge=1, le=86400, description="Seconds the rule looks back")
    channels: list[str] = Field(
        default_factory=list, max_length=20, description="Channel names; empty: every channel"
    )
    enabled: bool = Field(True, description="A disabled rule is not evaluated")


@dataclass
class Rule:
    name: str
    kind: str
    route: str | None = None
    destination: str | None = None
    threshold: float | None = None
    window: int | None = None
    channels: list[str] = field(default_factory=list)
    enabled: bool = True
    builtin: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "route": self.route,
            "destination": self.destination,
            "threshold": self.threshold,
            "window": self.window,
            "channels": list(self.channels),
            "enabled": self.enabled,
            "builtin": self.builtin,
        }

    def matches(self, route: str, destination: str | None = None) -> bool:
        if self.route is not None and self.route != route:
            return False
        return self.destination is None or destination is None or self.destination == destination


def _rule_of(row: AlertRule) -> Rule:
    return Rule(
        row.name,
        row.kind,
        row.route,
        row.destination,
        row.threshold,
        row.window,
        list(row.channels or []),
        row.enabled,
    )


def rules(session: Session) -> list[Rule]:
    """Every rule, the built-in ones included (a built-in turned off is still one; a rule
    added under its name replaces it)."""
    found = {r.name: r for r in session.scalars(select(AlertRule))}
    rows = {name: _rule_of(row) for name, row in found.items()}
    for builtin in BUILTIN_RULES:
        row = found.get(builtin["name"])
        if row is None:
            rows[builtin["name"]] = Rule(**builtin, builtin=True)
        elif _turned_off(row, builtin):  # still the built-in rule, only off
            rows[builtin["name"]].builtin = True
    return sorted(rows.values(), key=lambda r: r.name)


def add_rule(
    session: Session, data: Any, most: int = MAX_RULES, actor: audit.Actor | None = None
) -> Rule:
    """Add a rule; at most ``most`` (HUB_ALERT_MAX_RULES) rule rows exist. ``actor``: the
    admin adding it (``alert_rule.add``)."""
    spec = _validated(RuleSpec, data)
    assert isinstance(spec, RuleSpec)
    errors = []
    if spec.kind in ("failure_ratio", "oldest_due", "refusal_rate") and spec.threshold is None:
        errors.append(f"threshold: a {spec.kind} rule needs one")
    if spec.kind == "failure_ratio" and spec.threshold is not None and spec.threshold > 1:
        errors.append("threshold: a failure ratio is between 0 and 1")
    if spec.kind in ("circuit_open", "delivery_dead") and spec.threshold is not None:
        errors.append(f"threshold: a {spec.kind} rule takes none")
    if spec.destination and not spec.route:
        errors.append("destination: given without its route")
    known = set(session.scalars(select(AlertChannel.name)))
    errors += [f"channels: no channel is named {c!r}" for c in spec.channels if c not in known]
    if errors:
        raise AlertInvalid(errors)
    existing = session.scalar(select(AlertRule).where(AlertRule.name == spec.name))
    if existing is not None and not existing.enabled and is_builtin(spec.name):
        session.delete(existing)  # a built-in rule turned off: the new rule takes its place
        session.flush()
    elif existing is not None:
        raise AlreadyExists(f"A rule named {spec.name!r} exists already")
    elif (session.scalar(select(func.count()).select_from(AlertRule)) or 0) >= most:
        raise AlertInvalid([f"name: the hub holds at most {most} alert rules; remove one first"])
    row = AlertRule(**spec.model_dump())
    session.add(row)
    session.flush()
    added = _rule_of(row)
    audit.record(session, actor, "alert_rule.add", added.name, added.to_dict())
    return added


def set_rule_enabled(
    session: Session, name: str, enabled: bool, actor: audit.Actor | None = None
) -> Rule:
    """Turn a rule on or off, thresholds kept. A built-in rule is turned off by a disabled
    row of its name (as ``remove_rule`` does) and on again by removing that row.
    ``actor``: the admin asking (``alert_rule.enable``, ``alert_rule.disable``; nothing for
    a rule that already was so)."""
    row = session.scalar(select(AlertRule).where(AlertRule.name == name))
    builtin = next((b for b in BUILTIN_RULES if b["name"] == name), None)
    if row is None and builtin is None:
        raise NoSuchAlertThing(f"No alert rule is named {name!r}")
    was = next(r for r in rules(session) if r.name == name).enabled
    if builtin is not None and (row is None or _turned_off(row, builtin)):
        if enabled and row is not None:
            session.delete(row)  # the built-in rule applies again
        elif not enabled and row is None:
            row = AlertRule(**builtin, enabled=False)
            session.add(row)
    else:
        row.enabled = enabled
    session.flush()
    now = next(r for r in rules(session) if r.name == name)
    if now.enabled != was:
        action = "alert_rule.enable" if now.enabled else "alert_rule.disable"
        audit.record(session, actor, action, name, {"builtin": now.builtin})
    return now


def _turned_off(row: AlertRule, builtin: dict[str, str]) -> bool:
    """A row that only turns a built-in rule off (not a disabled rule replacing it)."""
    return (
        not row.enabled
        and row.kind == builtin["kind"]
        and row.route is None
        and row.destination is None
        and row.threshold is None
        and row.window is None
        and not row.channels
    )


def is_builtin(name: str) -> bool:
    """A name of a built-in rule (turned off or replaced, it stays one)."""
    return any(b["name"] == name for b in BUILTIN_RULES)


def remove_rule(session: Session, name: str, actor: audit.Actor | None = None) -> None:
    """Delete a rule; a built-in one is turned off (a disabled row of its name). ``actor``:
    the admin asking (``alert_rule.remove``, the rule as it was)."""
    row = session.scalar(select(AlertRule).where(AlertRule.name == name))
    builtin = next((b for b in BUILTIN_RULES if b["name"] == name), None)
    if row is None and builtin is None:
        raise NoSuchAlertThing(f"No alert rule is named {name!r}")
    was = next(r for r in rules(session) if r.name == name).to_dict()
    if row is not None:
        session.delete(row)
    if builtin is not None:
        session.flush()
        session.add(AlertRule(**builtin, enabled=False))
    session.flush()
    audit.record(session, actor, "alert_rule.remove", name, was)


# --- messages ---


def _count(n: int) -> str:
    return f"{n:,}"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "?"


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _printable(text: str) -> str:
    """A name as a message shows it: no control character (a refused request's route is
    whatever its URL said), so it cannot break an email header or a log line."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _where(subject: str) -> str:
    route, _, destination = _printable(subject).partition("/")
    if destination:
        return f"destination {destination} of route {route}"
    return "every route" if route == "*" else f"route {route}"


def link_base(config: Any) -> str | None:
    """Where the dashboard's pages are, seen from outside: HUB_PUBLIC_URL and the
    dashboard's prefix; None when the hub does not know its address or has no dashboard."""
    public_url = config.get("PUBLIC_URL")
    if not public_url or not config.get("DASHBOARD"):
        return None
    return public_url.rstrip("/") + str(config.get("DASHBOARD_PREFIX") or "").rstrip("/")


def _link(base: str | None, subject: str) -> str | None:
    route = subject.partition("/")[0]
    if not base or route == "*":
        return None
    return f"{base}/routes/{quote(route, safe='')}"


def render(alert: Alert, notice: str, public_url: str | None = None) -> dict[str, Any]:
    """What one notice says: a sentence (``text``) and the alert's fields."""
    text = f"[{notice}] {alert.rule}: {alert.message}"[:TEXT_MAX]
    link = _link(public_url, alert.subject)
    if link:
        text += f" {link}"
    return {
        "text": text,
        "subject": f"[{notice}] {alert.rule}: {_where(alert.subject)}",
        "alert": {
            "id": alert.id,
            "rule": alert.rule,
            "kind": alert.kind,
            "subject": alert.subject,
            "state": alert.state,
            "count": alert.count,
            "value": alert.value,
            "opened_at": iso_time(alert.opened_at),
            "resolved_at": iso_time(alert.resolved_at),
            "link": link,
        },
    }


def body_for(kind: str, message: dict[str, Any]) -> str:
    """The body a channel of ``kind`` is sent, as stored in alert_sends (bounded)."""
    if kind == "slack":
        body = json.dumps({"text": message["text"]}, ensure_ascii=False)
    elif kind == "webhook":
        body = json.dumps(message, ensure_ascii=False)
    else:
        body = f"Subject: {message['subject'][:200]}\n\n{message['text']}"
    return body[:BODY_MAX]


# --- evaluation ---


@dataclass
class Notice:
    alert: Alert
    kind: str  # firing | resolved
    rule: Rule


@dataclass
class Evaluation:
    """What one evaluation did: the notices it queued."""

    notices: list[Notice] = field(default_factory=list)


def owner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _take_turn(session: Session, now: datetime, interval: float, me: str) -> AlertState | None:
    """Move the state row's next_run_at forward if it is due: True for one process only."""
    table = AlertState.__table__
    taken = session.execute(
        update(table)
        .where(
            AlertState.id == 1,
            (AlertState.next_run_at.is_(None)) | (AlertState.next_run_at <= now),
        )
        .values(next_run_at=now + timedelta(seconds=interval * 0.9), ran_at=now, ran_by=me)
    ).rowcount
    if taken:
        return session.get(AlertState, 1)
    if session.get(AlertState, 1) is not None:
        return None
    # No row yet (a new database, or a first channel): start reading from now. Two
    # processes may both get here: the second's insert does nothing, and neither evaluates.
    last = session.scalar(select(func.max(DestinationChange.id))) or 0
    dialect = session.get_bind().dialect.name
    make = postgresql_insert if dialect == "postgresql" else sqlite_insert
    session.execute(
        make(AlertState.__table__)
        .values(
            id=1,
            next_run_at=now + timedelta(seconds=interval * 0.9),
            ran_at=now,
            ran_by=me,
            change_cursor=last,
            dead_cursor=now - timedelta(seconds=COMMIT_LAG),
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return None


class _Pass:
    """One evaluation inside its transaction."""

    def __init__(self, session: Session, now: datetime, rules_: list[Rule]):
        self.session = session
        self.now = now
        self.rules = rules_
        self.out = Evaluation()
        self._firing: dict[tuple[str, str], Alert] = {
            (a.rule, a.subject): a
            for a in session.scalars(select(Alert).where(Alert.state == FIRING))
        }

    def firing(self, rule: Rule, subject: str) -> Alert | None:
        return self._firing.get((rule.name, subject))

    def fire(self, rule: Rule, subject: str, count: int, message: str, value=None) -> Alert:
        alert = Alert(
            rule=rule.name,
            kind=rule.kind,
            subject=subject,
            state=FIRING,
            count=count,
            value=value,
            message=message,
            opened_at=self.now,
            last_seen_at=self.now,
        )
        self.session.add(alert)
        self._firing[(rule.name, subject)] = alert
        self.out.notices.append(Notice(alert, FIRING, rule))
        return alert

    def resolve(self, rule: Rule | None, alert: Alert, message: str | None) -> None:
        alert.state = RESOLVED
        alert.resolved_at = self.now
        del self._firing[(alert.rule, alert.subject)]
        if message is not None and rule is not None:
            alert.message = message
            self.out.notices.append(Notice(alert, RESOLVED, rule))

    def level(self, rule: Rule, over: dict[str, tuple[float, str]], resolved: str) -> None:
        """A rule whose condition is a level: ``over`` maps each subject over the
        threshold to its value and sentence; any firing alert not in it resolves."""
        for subject, (value, message) in over.items():
            alert = self.firing(rule, subject)
            if alert is None:
                self.fire(rule, subject, 1, message, value)
            else:
                alert.count += 1
                alert.value = value
                alert.last_seen_at = self.now
        for (name, subject), alert in list(self._firing.items()):
            if name == rule.name and subject not in over:
                self.resolve(rule, alert, resolved.format(where=_where(subject)))


def _circuits(run: _Pass, rules_: list[Rule], state: AlertState) -> None:
    changes = run.session.scalars(
        select(DestinationChange)
        .where(DestinationChange.id > state.change_cursor)
        .order_by(DestinationChange.id)
        .limit(CHANGES_PER_PASS)
    ).all()
    for change in changes:
        subject = f"{change.route}/{change.destination}"
        for rule in rules_:
            if not rule.matches(change.route, change.destination):
                continue
            alert = run.firing(rule, subject)
            if change.state == "open":
                cause = f" ({change.cause})" if change.cause else ""
                if alert is None:
                    run.fire(
                        rule,
                        subject,
                        1,
                        f"the circuit of {_where(subject)} opened at {_when(change.at)}{cause}.",
                    )
                else:
                    alert.count += 1
                    alert.last_seen_at = run.now
            elif change.state != "half_open" and alert is not None:
                openings = f"{_count(alert.count)} {_plural(alert.count, 'opening', 'openings')}"
                run.resolve(
                    rule,
                    alert,
                    f"the circuit of {_where(subject)} is {change.state} again "
                    f"({change.cause or 'no cause given'}); open since "
                    f"{_when(alert.opened_at)}, {openings}.",
                )
    if changes:
        state.change_cursor = changes[-1].id


def _dead(run: _Pass, rules_: list[Rule], state: AlertState) -> None:
    upper = run.now - timedelta(seconds=COMMIT_LAG)
    since = state.dead_cursor or upper
    if upper > since:
        rows = run.session.execute(
            select(
                Delivery.route,
                Delivery.destination,
                func.count(),
                func.min(Delivery.completed_at),
            )
            .where(
                Delivery.completed_at > since,
                Delivery.completed_at <= upper,
                Delivery.status == EventStatus.DEAD,
            )
            .group_by(Delivery.route, Delivery.destination)
        ).all()
        state.dead_cursor = upper
    else:
        rows = []
    for route, destination, count, first in rows:
        subject = f"{route}/{destination}"
        for rule in rules_:
            if not rule.matches(route, destination):
                continue
            alert = run.firing(rule, subject)
            if alert is None:
                run.fire(
                    rule,
                    subject,
                    count,
                    f"{_count(count)} {_plural(count, 'delivery', 'deliveries')} to "
                    f"{_where(subject)} went dead (the first at {_when(first)}).",
                )
            else:
                alert.count += count
                alert.last_seen_at = run.now
    for rule in rules_:
        quiet = timedelta(seconds=rule.window or DEAD_QUIET)
        for (name, subject), alert in list(run._firing.items()):
            if name == rule.name and alert.last_seen_at <= run.now - quiet:
                total = f"{_count(alert.count)} {_plural(alert.count, 'delivery', 'deliveries')}"
                run.resolve(
                    rule,
                    alert,
                    f"no delivery to {_where(subject)} went dead for {int(quiet.total_seconds())}"
                    f" s; {total} went dead while the alert was open (from "
                    f"{_when(alert.opened_at)} to {_when(alert.last_seen_at)}).",
                )


def _failure_ratio(run: _Pass, rule: Rule) -> None:
    window = rule.window or RATIO_WINDOW
    failed = func.sum(
        case((Delivery.status.in_((EventStatus.DEAD, EventStatus.FAILED)), 1), else_=0)
    )
    query = (
        select(Delivery.route, Delivery.destination, func.count(), failed)
        .where(Delivery.completed_at > run.now - timedelta(seconds=window))
        .group_by(Delivery.route, Delivery.destination)
    )
    if rule.route:
        query = query.where(Delivery.route == rule.route)
    if rule.destination:
        query = query.where(Delivery.destination == rule.destination)
    over = {}
    for route, destination, ended, bad in run.session.execute(query).all():
        ratio = (bad or 0) / ended if ended else 0.0
        if ended >= RATIO_MINIMUM and ratio > (rule.threshold or 0):
            subject = f"{route}/{destination}"
            over[subject] = (
                ratio,
                f"{_count(bad)} of the {_count(ended)} deliveries to {_where(subject)} that "
                f"ended in the last {window} s failed ({ratio:.0%}, above {rule.threshold:.0%}).",
            )
    run.level(rule, over, "the failure ratio of {where} is back under its threshold.")


def _oldest_due(run: _Pass, rule: Rule) -> None:
    query = select(Delivery.lane, Delivery.next_attempt_at).where(due(run.now))
    subject = "*"
    if rule.route:
        query = query.where(Delivery.route == rule.route)
        subject = rule.route
    if rule.destination:
        query = query.where(Delivery.destination == rule.destination)
        subject = f"{rule.route}/{rule.destination}"
    row = run.session.execute(query.order_by(Delivery.next_attempt_at).limit(1)).first()
    over = {}
    if row is not None and row.next_attempt_at is not None:
        age = (run.now - row.next_attempt_at).total_seconds()
        if age > (rule.threshold or 0):
            over[subject] = (
                age,
                f"the oldest due delivery ({_where(row.lane)}) has waited {age:,.0f} s, "
                f"more than {rule.threshold:g} s.",
            )
    run.level(rule, over, "due deliveries of {where} wait less than the threshold again.")


def _refusal_rate(run: _Pass, rule: Rule) -> None:
    window = rule.window or REFUSAL_WINDOW
    query = (
        select(Event.route, func.count())
        .where(
            Event.status == EventStatus.REJECTED,
            Event.received_at > run.now - timedelta(seconds=window),
        )
        .group_by(Event.route)
    )
    if rule.route:
        query = query.where(Event.route == rule.route)
    over = {}
    for route, count in run.session.execute(query).all():
        per_minute = count * 60.0 / window
        if per_minute > (rule.threshold or 0):
            over[route[:200]] = (
                per_minute,
                f"route {_printable(route)} refused {_count(count)} "
                f"{_plural(count, 'request', 'requests')} in the last {window} s "
                f"({per_minute:,.1f} a minute, above {rule.threshold:g}).",
            )
    run.level(rule, over, "refusals of {where} are under the threshold again.")


def evaluate(
    db: Database, interval: float, public_url: str | None = None, me: str | None = None
) -> Evaluation | None:
    """One evaluation if it is this process's turn (None when another process had it, or
    no channel exists): alerts fired, counted and resolved, their messages queued."""
    with db.read_session() as session:
        if session.scalar(select(AlertChannel.id).limit(1)) is None:
            return None
    now = utcnow()
    with db.session() as session:
        state = _take_turn(session, now, interval, me or owner_name())
        if state is None:
            return None
        run = _Pass(session, now, [r for r in rules(session) if r.enabled])
        by_kind: dict[str, list[Rule]] = {}
        for rule in run.rules:
            by_kind.setdefault(rule.kind, []).append(rule)
        _circuits(run, by_kind.get("circuit_open", []), state)
        _dead(run, by_kind.get("delivery_dead", []), state)
        for rule in by_kind.get("failure_ratio", []):
            _failure_ratio(run, rule)
        for rule in by_kind.get("oldest_due", []):
            _oldest_due(run, rule)
        for rule in by_kind.get("refusal_rate", []):
            _refusal_rate(run, rule)
        # A rule removed or turned off leaves no alert firing (and sends nothing).
        names = {r.name for r in run.rules}
        for (name, _subject), alert in list(run._firing.items()):
            if name not in names:
                run.resolve(None, alert, None)
        session.flush()  # the new alerts' ids, for their messages
        _queue(session, run.out.notices, public_url)
    for notice in run.out.notices:
        log.warning(
            "alert %s %s (%s): %s",
            notice.alert.rule,
            notice.kind,
            notice.alert.subject,
            notice.alert.message,
        )
    return run.out


def _queue(session: Session, notices: Iterable[Notice], public_url: str | None) -> None:
    channels = {c.name: c.kind for c in session.scalars(select(AlertChannel))}
    rows = []
    for notice in notices:
        message = render(notice.alert, notice.kind, public_url)
        for name in notice.rule.channels or sorted(channels):
            if name not in channels:
                continue
            rows.append(
                {
                    "alert_id": notice.alert.id,
                    "channel": name,
                    "kind": notice.kind,
                    "body": body_for(channels[name], message),
                    "status": PENDING,
                    "attempts": 0,
                    "created_at": utcnow(),
                }
            )
    if rows:
        session.execute(insert(AlertSend.__table__), rows)


def queue_test(
    session: Session, name: str, public_url: str | None = None, actor: audit.Actor | None = None
) -> AlertSend:
    """A test message to channel ``name``, queued like an alert's. ``actor``: the admin
    asking (``alert_channel.test``)."""
    channel = get_channel(session, name)
    text = f"[test] a test alert from the webhook hub to channel {channel.name}."
    message = {"text": text, "subject": f"[test] {channel.name}", "alert": None}
    if public_url:
        message["text"] += f" {public_url.rstrip('/')}/"
    row = AlertSend(
        channel=channel.name,
        kind=TEST,
        body=body_for(channel.kind, message),
        status=PENDING,
        attempts=0,
    )
    session.add(row)
    session.flush()
    audit.record(session, actor, "alert_channel.test", channel.name, {"message": row.id})
    return row


# --- sending ---


def _smtp(config: dict[str, Any], box: SecretBox, body: str, timeout: float) -> None:
    host, port = config["host"], int(config.get("port") or 25)
    if not http.allow_private_targets():
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise RetryableError(f"could not resolve {host}") from None
        if any(http.is_forbidden_address(str(info[4][0])) for info in infos):
            raise PermanentError(
                "the SMTP server's address is private or local (allowed only with "
                "HUB_ALLOW_PRIVATE_TARGETS=true)"
            )
    head, _, text = body.partition("\n\n")
    message = EmailMessage()
    message["Subject"] = head.removeprefix("Subject: ")
    message["From"] = config["sender"]
    message["To"] = ", ".join(config["to"])
    message.set_content(text)
    try:
        factory = smtplib.SMTP_SSL if config.get("ssl") else smtplib.SMTP
        with factory(host, port, timeout=timeout) as smtp:
            if config.get("starttls"):
                smtp.starttls(context=ssl.create_default_context())
            if config.get("username"):
                smtp.login(config["username"], box.open_one(config["password"]))
            smtp.send_message(message)
    except smtplib.SMTPResponseException as exc:
        error = f"the SMTP server answered {exc.smtp_code}"
        if 400 <= exc.smtp_code < 500:
            raise RetryableError(error) from None
        raise PermanentError(error) from None
    except smtplib.SMTPRecipientsRefused:
        raise PermanentError("the SMTP server refused every recipient") from None
    except (OSError, smtplib.SMTPException) as exc:
        raise RetryableError(f"SMTP {host}:{port}: {type(exc).__name__}") from None


def deliver(channel: AlertChannel, box: SecretBox, body: str, timeout: float) -> int:
    """Send ``body`` through ``channel``: at most SEND_TRIES tries (tenacity, retryable
    errors only), each bounded by ``timeout``. The number of tries; raises the last error."""
    tries = 0
    config = channel.config or {}

    def once() -> None:
        nonlocal tries
        tries += 1
        if channel.kind == "email":
            _smtp(config, box, body, timeout)
            return
        url = config.get("url")
        if not is_sealed(url):
            raise PermanentError("the channel has no URL")
        http.request(
            None,
            "POST",
            box.open_one(url),
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )

    deadline = time.monotonic() + SEND_TRIES * (timeout + 8)
    try:
        http.retry_policy(SEND_TRIES, deadline=deadline, connector=f"alert {channel.name}")(once)
    except (RetryableError, PermanentError) as exc:
        exc.tries = tries  # type: ignore[attr-defined]
        raise
    return tries


def _error_sentence(exc: Exception) -> str:
    if isinstance(exc, (RetryableError, PermanentError)):
        return str(exc)[:ERROR_MAX]
    if isinstance(exc, SecretsUnreadable):
        return "the channel's secrets do not open with this HUB_SECRET_KEY"
    return f"{type(exc).__name__} while sending"


def send_one(db: Database, box: SecretBox, send_id: int, timeout: float) -> str | None:
    """Send one queued message if no one else took it; its status after, else None."""
    with db.session() as session:
        taken = session.execute(
            update(AlertSend.__table__)
            .where(AlertSend.id == send_id, AlertSend.status == PENDING)
            .values(status=SENDING, sent_at=utcnow())
        ).rowcount
        if not taken:
            return None
        row = session.get(AlertSend, send_id)
        channel = session.scalar(select(AlertChannel).where(AlertChannel.name == row.channel))
    tries, error = 0, None
    if channel is None:
        error = "the channel was removed before the message went"
    else:
        try:
            tries = deliver(channel, box, row.body, timeout)
        except Exception as exc:  # every failure is recorded; the sender thread lives on
            tries = getattr(exc, "tries", 1)
            error = _error_sentence(exc)
    status = FAILED if error else SENT
    with db.session() as session:
        session.execute(
            update(AlertSend.__table__)
            .where(AlertSend.id == send_id)
            .values(status=status, error=error, attempts=tries, sent_at=utcnow())
        )
    if error:
        log.warning("alert message %s to channel %s failed: %s", send_id, row.channel, error)
    return status


def fail_abandoned(db: Database, timeout: float) -> int:
    """Messages left ``sending`` by a process that stopped mid-send end ``failed``: past
    the longest a send may take (SEND_TRIES tries and their waits), no one is sending them."""
    longest = timedelta(seconds=SEND_TRIES * (timeout + 8) + 60)
    with db.session() as session:
        return session.execute(
            update(AlertSend.__table__)
            .where(AlertSend.status == SENDING, AlertSend.sent_at < utcnow() - longest)
            .values(status=FAILED, error="the process sending it stopped before it finished")
        ).rowcount


def send_pending(db: Database, box: SecretBox, timeout: float) -> int:
    """Send the queued messages, oldest first; how many were taken."""
    with db.read_session() as session:
        ids = list(
            session.scalars(
                select(AlertSend.id)
                .where(AlertSend.status == PENDING)
                .order_by(AlertSend.id)
                .limit(SENDS_PER_PASS)
            )
        )
    return sum(1 for send_id in ids if send_one(db, box, send_id, timeout) is not None)


# --- listing ---


def send_to_dict(row: AlertSend) -> dict[str, Any]:
    return {
        "id": row.id,
        "channel": row.channel,
        "kind": row.kind,
        "status": row.status,
        "attempts": row.attempts,
        "error": row.error,
        "body": row.body,
        "created_at": iso_time(row.created_at),
        "sent_at": iso_time(row.sent_at),
    }


def alert_to_dict(row: Alert, sends: list[AlertSend]) -> dict[str, Any]:
    return {
        "id": row.id,
        "rule": row.rule,
        "kind": row.kind,
        "subject": row.subject,
        "state": row.state,
        "count": row.count,
        "value": row.value,
        "message": row.message,
        "opened_at": iso_time(row.opened_at),
        "last_seen_at": iso_time(row.last_seen_at),
        "resolved_at": iso_time(row.resolved_at),
        "sends": [send_to_dict(s) for s in sends],
    }


def recent(session: Session, limit: int = 50) -> dict[str, list[dict[str, Any]]]:
    """The newest alerts with their messages, and the newest test messages."""
    alerts = list(
        session.scalars(
            select(Alert).order_by(Alert.opened_at.desc(), Alert.id.desc()).limit(limit)
        )
    )
    sends: dict[int, list[AlertSend]] = {}
    if alerts:
        for send in session.scalars(
            select(AlertSend)
            .where(AlertSend.alert_id.in_([a.id for a in alerts]))
            .order_by(AlertSend.id)
        ):
            sends.setdefault(send.alert_id, []).append(send)
    return {
        "alerts": [alert_to_dict(a, sends.get(a.id, [])) for a in alerts],
        "tests": tests_sent(session, limit),
    }


def tests_sent(session: Session, limit: int = 50) -> list[dict[str, Any]]:
    """The newest test messages, newest first, each with whether it arrived."""
    tests = session.scalars(
        select(AlertSend).where(AlertSend.kind == TEST).order_by(AlertSend.id.desc()).limit(limit)
    )
    return [send_to_dict(s) for s in tests]


FIRING_SHOWN = 100  # firing alerts a page lists (one per rule and subject); more are counted
RESOLVED_SHOWN = 20


def firing_count(session: Session) -> int:
    """How many alerts fire now (the partial index of firing alerts answers it)."""
    return session.scalar(select(func.count()).select_from(Alert).where(Alert.state == FIRING))


def board(
    session: Session, firing_limit: int = FIRING_SHOWN, resolved_limit: int = RESOLVED_SHOWN
) -> dict[str, Any]:
    """What is wrong now and who was told: the firing alerts (newest first, at most
    ``firing_limit``, with how many fire in all), then the last resolved ones (among the
    newest opened, most recently resolved first), each with its messages."""
    firing = list(
        session.scalars(
            select(Alert)
            .where(Alert.state == FIRING)
            .order_by(Alert.opened_at.desc(), Alert.id.desc())
            .limit(firing_limit)
        )
    )
    resolved = list(
        session.scalars(
            select(Alert)
            .where(Alert.state == RESOLVED)
            .order_by(Alert.opened_at.desc(), Alert.id.desc())
            .limit(resolved_limit)
        )
    )
    resolved.sort(key=lambda a: (a.resolved_at or a.opened_at, a.id), reverse=True)
    sends: dict[int, list[AlertSend]] = {}
    shown = [a.id for a in firing + resolved]
    if shown:
        for send in session.scalars(
            select(AlertSend).where(AlertSend.alert_id.in_(shown)).order_by(AlertSend.id)
        ):
            sends.setdefault(send.alert_id, []).append(send)
    return {
        "firing": [alert_to_dict(a, sends.get(a.id, [])) for a in firing],
        "firing_total": firing_count(session) if len(firing) >= firing_limit else len(firing),
        "resolved": [alert_to_dict(a, sends.get(a.id, [])) for a in resolved],
    }


# --- the threads ---


class AlertRunner:
    """The evaluator and the sender of one process, each a thread of its own: a failing or
    slow channel holds up neither deliveries nor the next evaluation."""

    def __init__(self, db: Database, box: SecretBox, config: Any):
        self.db = db
        self.box = box
        self.interval = float(config["ALERT_INTERVAL"])
        self.timeout = float(config["ALERT_SEND_TIMEOUT"])
        self.public_url = link_base(config)
        self.me = owner_name()
        self.stopping = threading.Event()
        self.queued = threading.Event()
        self.threads: list[threading.Thread] = []
        self.next_sweep = 0.0  # time.monotonic() of the next look for abandoned messages

    def start(self) -> None:
        for target, name in ((self._evaluate, "hub-alerts"), (self._send, "hub-alert-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self, grace: float = 2.0) -> None:
        self.stopping.set()
        self.queued.set()
        for thread in self.threads:
            thread.join(grace)

    def _evaluate(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                done = evaluate(self.db, self.interval, self.public_url, self.me)
            except Exception as exc:  # the database went away: the next turn tries again
                log.warning("alert evaluation failed (%s); retrying later", type(exc).__name__)
                continue
            if done is not None and done.notices:
                self.queued.set()

    def _send(self) -> None:
        while not self.stopping.is_set():
            self.queued.wait(self.interval)
            self.queued.clear()
            if self.stopping.is_set():
                return
            try:
                if time.monotonic() >= self.next_sweep:
                    self.next_sweep = time.monotonic() + 60
                    fail_abandoned(self.db, self.timeout)
                while send_pending(self.db, self.box, self.timeout) and not self.stopping.is_set():
                    pass
            except Exception as exc:
                log.warning("alert sending failed (%s); retrying later", type(exc).__name__)
