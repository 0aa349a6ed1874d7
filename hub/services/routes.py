"""Routes as admins write them: validated whole before anything is saved.

The CLI (`routes add`, `routes apply`) and the admin API both go through ``save_routes``,
so a route is checked the same way wherever it comes from: every step's config against
its connector's pydantic ``Config``, every template parsed, its signature verifier and
rate limit checked, nothing half-saved.

A route fans out to one or more named destinations, each with its own steps, filter and
retry schedule (``"destinations": [...]``). A route given plain ``steps`` (and ``filter``,
``retry_schedule``) and no destinations has one destination named "default"; its JSON
shows both forms, so clients that read ``steps`` keep reading them. The route's own steps,
filter and retry_schedule columns are kept equal to its first destination's.

Signing secrets are plaintext only inside a RouteSpec on its way in: ``save`` seals them
with the app's SecretBox, and ``to_dict`` shows them masked. Secrets in step configs
likewise (hub.services.step_secrets), destination by destination: sealed by
``save_routes``, masked by ``to_dict``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy import select
from sqlalchemy.orm import Session

from hub import providers, rates, signatures
from hub.config import MAX_RETENTION_DAYS
from hub.connectors import (
    Registry,
    StepConfigError,
    UnknownConnectorError,
    describe_validation_error,
)
from hub.services import audit, payload_schema, step_secrets
from hub.services.templating import TemplateProblem, check_config, check_filter
from hub.store.cache import TTLCache
from hub.store.crypto import SecretBox, SecretsUnreadable, looks_masked, mask
from hub.store.models import DEFAULT_DESTINATION, Destination, Route

ROUTE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
# A destination's name: a lower-case slug, unique within its route.
DESTINATION_NAME_PATTERN = ROUTE_NAME_PATTERN
# What a destination holds that a route given plain steps holds itself.
DESTINATION_FIELDS = ("steps", "filter", "retry_schedule")
# A destination's delivery controls: given only inside ``destinations``.
CONTROL_FIELDS = ("max_in_flight", "rate", "ordering_key", "breaker")
# The breaker's defaults (docs/destinations.md).
BREAKER_FAILURES = 5
BREAKER_COOL_DOWN = 30
BREAKER_MAX_COOL_DOWN = 3600
DEFAULT_RETRY_SCHEDULE = [30, 120, 600, 3600, 21600]
# What a sender must show: an API key, a valid signature, both, or either.
AuthMode = Literal["key", "signature", "key+signature", "key|signature"]
AUTH_MODES: tuple[str, ...] = get_args(AuthMode)
ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


class RouteInvalid(ValueError):
    """What is wrong with a route, one sentence per problem."""

    def __init__(self, name: str, errors: list[str]):
        self.name = name
        self.errors = errors
        super().__init__(f"route {name!r}: " + "; ".join(errors))


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    connector: str
    config: dict[str, Any] = Field(default_factory=dict)


class VerifySpec(BaseModel):
    """A signature verifier: scheme, its options, and the secrets (any one verifies).

    ``secrets`` entries may be ``${VAR}`` references and ``secrets_env`` names variables,
    so a routes file in git need not hold a secret; both are resolved when the route is
    validated, and only the values are kept (encrypted).
    """

    model_config = ConfigDict(extra="forbid")

    scheme: str
    options: dict[str, Any] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    secrets_env: list[str] = Field(default_factory=list)


def _positive_delays(value: list[int] | None) -> list[int] | None:
    if value is not None and any(v <= 0 for v in value):
        raise ValueError("every retry delay must be a positive number of seconds")
    if value is not None and any(v > _longest() for v in value):
        raise ValueError("a retry delay can be at most 100 years")
    return value


class BreakerSpec(BaseModel):
    """A destination's circuit breaker: after ``failures`` consecutive retryable failures
    its deliveries are held; after ``cool_down`` seconds one probe is tried, and each probe
    that fails doubles the cool-down, up to ``max_cool_down``."""

    model_config = ConfigDict(extra="forbid")

    failures: int = Field(
        BREAKER_FAILURES, ge=1, le=10_000, description="Consecutive retryable failures that open it"
    )
    cool_down: int = Field(
        BREAKER_COOL_DOWN, ge=1, le=86_400, description="Seconds open before the first probe"
    )
    max_cool_down: int = Field(
        BREAKER_MAX_COOL_DOWN,
        ge=1,
        le=7 * 86_400,
        description="The longest cool-down, in seconds, however many probes failed",
    )

    @model_validator(mode="after")
    def _longest_last(self) -> BreakerSpec:
        if self.max_cool_down < self.cool_down:
            raise ValueError("max_cool_down must be at least cool_down")
        return self


class DestinationSpec(BaseModel):
    """One destination of a route: where its events go, delivered on their own."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=DESTINATION_NAME_PATTERN,
        description="A lower-case slug, unique within the route",
    )
    steps: list[StepSpec] = Field(default_factory=list)
    filter: str | None = None
    retry_schedule: list[int] | None = None
    max_in_flight: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="Deliveries called at once, across every worker process (none: no cap)",
    )
    rate: str | None = Field(
        None, description='Deliveries started per second, minute or hour ("10/second")'
    )
    ordering_key: str | None = Field(
        None,
        max_length=500,
        description=(
            'A template ("{{ payload.customer.id }}"): one key\'s deliveries start one '
            "after another, in the order accepted"
        ),
    )
    breaker: BreakerSpec | None = Field(
        None, description="A circuit breaker ({} for the defaults; none: off)"
    )

    _positive = field_validator("retry_schedule")(_positive_delays)

    @field_validator("rate")
    @classmethod
    def _a_rate(cls, value: str | None) -> str | None:
        return None if value is None else rates.normalise(value)

    def controlled(self) -> bool:
        """Whether any delivery control (cap, rate, ordering, breaker) is set."""
        return any(getattr(self, name) is not None for name in CONTROL_FIELDS)


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ROUTE_NAME_PATTERN)
    description: str | None = None
    mode: Literal["sync", "async"] = "sync"
    steps: list[StepSpec] = Field(default_factory=list)
    filter: str | None = None
    dedup_path: str | None = None
    dedup_window: int = Field(86400, ge=0)
    retention_days: int | None = Field(
        None,
        ge=1,
        le=MAX_RETENTION_DAYS,
        description="Days the route's finished events are kept (null: HUB_RETENTION_DAYS)",
    )
    retry_schedule: list[int] | None = None
    # Where the route's events go, each delivered (retried, ended) on its own. Without it,
    # steps, filter and retry_schedule make one destination, "default".
    destinations: list[DestinationSpec] | None = Field(
        None,
        description=(
            "Where the route's events go, each destination delivered, retried and ended on "
            "its own; without it, the route's steps, filter and retry_schedule are one "
            'destination named "default"'
        ),
    )
    # None means "signature" when a verifier is given, else "key".
    auth: AuthMode | None = None
    verify: VerifySpec | None = None
    rate_limit: str | None = None
    enabled: bool = True
    # Named "schema" wherever a route is written or shown (pydantic's BaseModel has a
    # method of that name, hence the alias); checked whole by hub.services.payload_schema.
    payload_schema: dict[str, Any] | None = Field(
        None,
        alias="schema",
        description=(
            "A JSON Schema (draft 2020-12 unless $schema names another) every payload must "
            "match; one that does not is refused 422 schema_mismatch. Null: any payload"
        ),
    )

    _positive = field_validator("retry_schedule")(_positive_delays)

    @field_validator("steps", mode="before")
    @classmethod
    def _none_is_no_steps(cls, value: Any) -> Any:
        # A route with destinations is shown with "steps": null; sent back as it is shown,
        # that means no top-level steps.
        return [] if value is None else value

    @field_validator("dedup_window")
    @classmethod
    def _not_forever(cls, value: int) -> int:
        # Past this a date computed from it overflows (a 20-digit window was a bare
        # OverflowError from the CLI).
        if value > _longest():
            raise ValueError("a dedup window can be at most 100 years")
        return value


def _longest() -> int:
    """The longest time the hub counts in (keys' lifetimes too): 100 years, in seconds."""
    from hub.services.keys import MAX_DURATION_SECONDS

    return MAX_DURATION_SECONDS


def parse_step(text: str) -> dict[str, Any]:
    """``CONNECTOR`` or ``CONNECTOR:{json config}`` as given to ``routes add --step``."""
    name, sep, raw = text.partition(":")
    name = name.strip()
    if not sep:
        return {"connector": name, "config": {}}
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"step {name!r}: config is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"step {name!r}: config must be a JSON object")
    return {"connector": name, "config": config}


def one_form(data: Any) -> Any:
    """``data`` with its destinations in one form: a route's JSON as shown holds both its
    ``destinations`` and, for a lone "default" one, the same steps, filter and
    retry_schedule at the top; those are dropped when they say the same thing. Otherwise
    a route gives either ``destinations`` or top-level steps (RouteInvalid)."""
    if not isinstance(data, dict) or data.get("destinations") is None:
        return data
    top = {k: data[k] for k in DESTINATION_FIELDS if data.get(k) not in (None, [])}
    data = {k: v for k, v in data.items() if k not in DESTINATION_FIELDS}
    destinations = data["destinations"]
    if top:
        lone = (
            isinstance(destinations, list)
            and len(destinations) == 1
            and isinstance(destinations[0], dict)
            and destinations[0].get("name") == DEFAULT_DESTINATION
        )
        if not lone or any(destinations[0].get(k) != v for k, v in top.items()):
            raise RouteInvalid(
                str(data.get("name", "?")),
                [
                    "destinations: give steps, filter and retry_schedule inside each "
                    "destination, or give no destinations"
                ],
            )
    return data


def validation_problems(exc: ValidationError) -> list[str]:
    """Pydantic's errors as sentences; a place inside a destination is written as a path
    (``destinations[1].steps[0].connector``)."""
    out = []
    for line in describe_validation_error(exc):
        if line.startswith("destinations."):
            where, sep, message = line.partition(": ")
            line = re.sub(r"\.(\d+)", r"[\1]", where) + sep + message
        out.append(line)
    return out


def validate(
    data: dict[str, Any], registry: Registry, environ: Mapping[str, str] | None = None
) -> RouteSpec:
    """A RouteSpec, or RouteInvalid listing every problem found.

    Secrets named by ``${VAR}`` or ``secrets_env`` are read from ``environ`` (default
    os.environ); the returned spec holds their values and an explicit ``auth``. Its
    ``destinations`` are always set (one "default" for a route given plain steps), and its
    steps, filter and retry_schedule are the first destination's.
    """
    name = str(data.get("name", "?")) if isinstance(data, dict) else "?"
    data = one_form(data)
    try:
        spec = RouteSpec.model_validate(data)
    except ValidationError as exc:
        raise RouteInvalid(name, validation_problems(exc)) from None
    errors: list[str] = _check_auth(spec, os.environ if environ is None else environ)
    if spec.payload_schema is not None:
        errors += payload_schema.problems(spec.payload_schema)
    given = spec.destinations is not None
    if spec.destinations is None:
        spec.destinations = [
            DestinationSpec(
                name=DEFAULT_DESTINATION,
                steps=spec.steps,
                filter=spec.filter,
                retry_schedule=spec.retry_schedule,
            )
        ]
    elif not spec.destinations:
        errors.append("destinations: a route needs at least one destination")
    names = [d.name for d in spec.destinations]
    for index, destination in enumerate(spec.destinations):
        where = f"destinations[{index}]." if given else ""
        if names.index(destination.name) != index:
            errors.append(f"{where}name: {destination.name!r} is the name of another destination")
        errors += _step_problems(destination, registry, where)
        errors += _ordering_problems(destination, where, spec.mode == "sync" and index == 0)
    if spec.destinations:
        first = spec.destinations[0]
        spec.steps, spec.filter = first.steps, first.filter
        spec.retry_schedule = first.retry_schedule
    if errors:
        raise RouteInvalid(spec.name, errors)
    return spec


def _step_problems(destination: DestinationSpec, registry: Registry, prefix: str) -> list[str]:
    """What is wrong with a destination's steps and filter; ``prefix`` says where it is."""
    errors = []
    for index, step in enumerate(destination.steps):
        where = f"{prefix}steps[{index}] ({step.connector})"
        try:
            check_config(step.config)
            registry.validate_unrendered(step.connector, step.config)
        except UnknownConnectorError as exc:
            errors.append(f"{prefix}steps[{index}]: {str(exc).strip(chr(34))}")
        except StepConfigError as exc:
            errors.extend(f"{where}: {e}" for e in exc.errors)
        except TemplateProblem as exc:
            errors.append(f"{where}: {exc}")
    if destination.filter:
        try:
            check_filter(destination.filter)
        except TemplateProblem as exc:
            errors.append(f"{prefix}filter: {exc}" if prefix else str(exc))
    return errors


def _ordering_problems(destination: DestinationSpec, prefix: str, runs_in_request: bool):
    """What is wrong with a destination's ordering key: a template that does not parse, or
    a destination that runs inside the request (a sync route's first), which can't wait
    for the delivery before it."""
    if destination.ordering_key is None:
        return []
    if runs_in_request:
        return [
            f"{prefix}ordering_key: a sync route's first destination runs inside the request "
            "and can't wait for the delivery before it; order another destination, or make "
            "the route async"
        ]
    try:
        check_config(destination.ordering_key)
    except TemplateProblem as exc:
        return [f"{prefix}ordering_key: {exc}"]
    return []


def _check_auth(spec: RouteSpec, environ: Mapping[str, str]) -> list[str]:
    """Resolve and check auth, verify and rate_limit in place; the problems found."""
    errors: list[str] = []
    if spec.rate_limit is not None:
        try:
            spec.rate_limit = rates.normalise(spec.rate_limit)
        except ValueError as exc:
            errors.append(f"rate_limit: {exc}")
    verify = spec.verify
    if spec.auth is None:
        spec.auth = "signature" if verify is not None else "key"
    if verify is None:
        if spec.auth != "key":
            errors.append(
                f"auth: {spec.auth!r} needs a signature verifier (verify: scheme and secrets)"
            )
        return errors
    if spec.auth == "key":
        errors.append(
            "auth: 'key' ignores the verifier; use signature, key+signature or key|signature"
        )
    try:
        verify.options = signatures.validate_options(verify.scheme, verify.options)
    except ValueError as exc:
        where = "verify.scheme" if providers.get(verify.scheme) is None else "verify.options"
        errors.append(f"{where}: {exc}")
        return errors
    resolved: list[str] = []
    for index, secret in enumerate(verify.secrets):
        where = f"verify.secrets[{index}]"
        reference = ENV_REFERENCE.match(secret)
        if reference:
            secret = environ.get(reference.group(1), "")
            if not secret:
                errors.append(f"{where}: environment variable {reference.group(1)} is not set")
                continue
        elif looks_masked(secret):
            errors.append(f"{where}: this is a masked secret from `routes show`, not a secret")
            continue
        resolved.append(_checked_secret(verify.scheme, secret, where, errors))
    for index, variable in enumerate(verify.secrets_env):
        where = f"verify.secrets_env[{index}]"
        secret = environ.get(variable, "")
        if not secret:
            errors.append(f"{where}: environment variable {variable} is not set")
            continue
        resolved.append(_checked_secret(verify.scheme, secret, where, errors))
    verify.secrets = list(dict.fromkeys(s for s in resolved if s))  # unique, in order
    verify.secrets_env = []
    keyed_by_url = isinstance(verify.options, dict) and verify.options.get("jwks_url")
    if not verify.secrets and not errors and not keyed_by_url:
        errors.append("verify.secrets: a verifier needs at least one secret (or a jwks_url)")
    return errors


def _checked_secret(scheme: str, secret: str, where: str, errors: list[str]) -> str:
    if isinstance(secret, str) and not secret.strip():
        # Spaces sign like any bytes, but nobody means them: a template or a paste went wrong.
        errors.append(f"{where}: A secret must not be empty or only whitespace.")
        return ""
    try:
        return signatures.validate_secret(scheme, secret)
    except ValueError as exc:
        errors.append(f"{where}: {exc}")  # the messages never contain the secret
        return ""


def save(
    session: Session, spec: RouteSpec, box: SecretBox | None = None, route: Route | None = None
) -> tuple[Route, bool]:
    """Create or update the route named by ``spec`` (``route``, when the caller has it).

    Returns (route, created). A verifier's secrets are sealed with ``box``; unchanged
    secrets keep their stored token.
    """
    route = route or get(session, spec.name)
    created = route is None
    if route is None:
        route = Route(name=spec.name)
        session.add(route)
    values = spec.model_dump(exclude={"verify", "destinations"})
    values["steps"] = [s.model_dump() for s in spec.steps]
    for key, value in values.items():
        setattr(route, key, value)
    kept = {d.name: d for d in route.destinations}
    destinations = []
    for position, given in enumerate(spec.destinations or ()):
        destination = kept.get(given.name) or Destination(name=given.name)
        destination.position = position
        destination.steps = [s.model_dump() for s in given.steps]
        destination.filter = given.filter
        destination.retry_schedule = given.retry_schedule
        destination.max_in_flight = given.max_in_flight
        destination.rate = given.rate
        destination.ordering_key = given.ordering_key
        destination.breaker = None if given.breaker is None else given.breaker.model_dump()
        destinations.append(destination)
    route.destinations = destinations
    if spec.verify is None:
        route.verify_scheme = route.verify_options = route.secrets_encrypted = None
    else:
        if box is None:
            raise RouteInvalid(spec.name, ["verify: secrets cannot be stored without a key"])
        route.verify_scheme = spec.verify.scheme
        route.verify_options = spec.verify.options
        if _stored_secrets(route, box) != spec.verify.secrets:
            route.secrets_encrypted = box.seal(spec.verify.secrets)
    session.flush()
    return route, created


def _stored_secrets(route: Route, box: SecretBox) -> list[str] | None:
    """The route's secrets, or None when they cannot be read (the secret key changed)."""
    try:
        return box.open(route.secrets_encrypted)
    except SecretsUnreadable:
        return None


def save_routes(
    session: Session,
    items: list[dict[str, Any]],
    registry: Registry,
    box: SecretBox | None = None,
    environ: Mapping[str, str] | None = None,
    actor: audit.Actor | None = None,
) -> list[tuple[str, str]]:
    """Validate every route first, then save them all: (name, created|updated|unchanged).

    ``box`` seals signing secrets (routes with a verifier need one); secrets are compared
    decrypted, so re-applying the same file reports "unchanged". ``actor``: the admin
    saving them (``route.create``, ``route.update``; nothing for an unchanged route).
    """
    specs, problems = [], []
    for item in items:
        name = item.get("name") if isinstance(item, dict) else None
        stored = get(session, name) if isinstance(name, str) else None
        if stored is not None:  # masks sent back mean "unchanged"
            item = _one_change(item, to_dict(stored, box, registry))
            item = _masks_restored(item, stored, box)
        try:
            spec = validate(item, registry, environ)
            _seal(spec, stored, registry, box, given="destinations" in item)
            specs.append(spec)
        except RouteInvalid as exc:
            problems.append(exc)
    if problems:
        raise RouteInvalid(", ".join(p.name for p in problems), [str(p) for p in problems])
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RouteInvalid("file", ["a route name appears twice"])
    results = []
    for spec in specs:
        before = get(session, spec.name)
        old = _comparable(before, box) if before is not None else None
        shown = to_dict(before, box, registry) if actor and before is not None else None
        route, created = save(session, spec, box, before)
        new = _comparable(route, box)
        if created:
            results.append((spec.name, "created"))
        else:
            results.append((spec.name, "unchanged" if new == old else "updated"))
        if actor is not None and results[-1][1] != "unchanged":
            _record_save(session, actor, route, spec, (shown, old or {}, new), box, registry)
    return results


def _record_save(session, actor, route, spec, compared, box, registry) -> None:
    """``route.create`` (the route as shown) or ``route.update`` (each field changed, from
    and to, as shown: secrets masked; a field whose masks read alike is named, no value)."""
    shown, old, new = compared
    after = to_dict(route, box, registry)
    change = after if shown is None else audit.changed(shown, after)
    if shown is not None:
        for name in sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)):
            change.setdefault(name, "changed (a secret: no value shown)")
    action = "route.create" if shown is None else "route.update"
    plain = spec.verify.secrets if spec.verify is not None else []
    audit.record(session, actor, action, route.name, change, secrets=plain)


def destinations_of(route: Route) -> list[Destination]:
    """The route's destinations in order; a route saved without any (made outside
    ``save``) has one, "default", of its own steps, filter and retry schedule."""
    if route.destinations:
        return list(route.destinations)
    return [
        Destination(
            name=DEFAULT_DESTINATION,
            position=0,
            steps=route.steps or [],
            filter=route.filter,
            retry_schedule=route.retry_schedule,
        )
    ]


def _lone_default(route: Route) -> bool:
    """Whether the route is plain steps: one "default" destination with no controls."""
    destinations = destinations_of(route)
    return (
        len(destinations) == 1
        and destinations[0].name == DEFAULT_DESTINATION
        and all(getattr(destinations[0], name, None) is None for name in CONTROL_FIELDS)
    )


def _stored_steps(stored: Route | None, name: str) -> list[dict[str, Any]] | None:
    """The steps, as saved, of ``stored``'s destination called ``name``."""
    if stored is None:
        return None
    for destination in destinations_of(stored):
        if destination.name == name:
            return destination.steps
    return None


def _one_change(item: Any, shown: dict[str, Any]) -> Any:
    """A route's JSON as shown (both forms, for a lone "default" destination) sent back with
    one of the two forms edited: a top-level field changed from what is stored wins (a
    client that knows only ``steps`` edits those, and sends back the destinations it was
    shown as they were); else the destination's."""
    destinations = item.get("destinations") if isinstance(item, dict) else None
    if not (
        isinstance(destinations, list)
        and len(destinations) == 1
        and isinstance(destinations[0], dict)
        and destinations[0].get("name") == DEFAULT_DESTINATION
        and shown.get("steps") is not None
    ):
        return item
    item, destination = dict(item), dict(destinations[0])
    for key in DESTINATION_FIELDS:
        if key not in item or item[key] == destination.get(key):
            continue
        if item[key] != shown.get(key):  # the top-level one was edited
            destination[key] = item[key]
        else:
            item[key] = destination.get(key)
    item["destinations"] = [destination]
    return item


def _masks_restored(item: Any, stored: Route, box: SecretBox | None) -> Any:
    """``item`` with the masks it sends back unchanged put back to the stored secrets: in
    its top-level steps (the first destination's) and in each destination's, by name."""
    if not isinstance(item, dict):
        return item
    if "steps" in item:
        item = {**item, "steps": step_secrets.restore_masks(item["steps"], box, stored.steps)}
    if isinstance(item.get("destinations"), list):
        item = {
            **item,
            "destinations": [
                {**d, "steps": step_secrets.restore_masks(d["steps"], box, before)}
                if isinstance(d, dict)
                and "steps" in d
                and (before := _stored_steps(stored, str(d.get("name")))) is not None
                else d
                for d in item["destinations"]
            ],
        }
    return item


def _seal(
    spec: RouteSpec, stored: Route | None, registry: Registry, box: SecretBox | None, given: bool
) -> None:
    """Seal the secrets of every destination's steps in place (RouteInvalid if one can't
    be); an unchanged secret keeps the token stored for it."""
    problems = []
    for index, destination in enumerate(spec.destinations or ()):
        steps, sealing = step_secrets.seal_steps(
            [s.model_dump() for s in destination.steps],
            registry,
            box,
            _stored_steps(stored, destination.name),
        )
        prefix = f"destinations[{index}]." if given else ""
        problems += [prefix + problem for problem in sealing]
        destination.steps = [StepSpec.model_validate(s) for s in steps]
    if problems:
        raise RouteInvalid(spec.name, problems)
    if spec.destinations:
        spec.steps = spec.destinations[0].steps


def _comparable(route: Route, box: SecretBox | None) -> dict[str, Any]:
    return _editable(route, box, with_secrets=False)


def _editable(route: Route, box: SecretBox | None, *, with_secrets: bool) -> dict[str, Any]:
    """The route as validate() reads it, in one form (top-level steps for a lone "default"
    destination, else ``destinations``), with step secrets in clear; the signing secrets
    opened too ``with_secrets`` (SecretsUnreadable if they don't), else as far as they
    open."""
    data = to_dict(route)
    if _lone_default(route):
        del data["destinations"]
        data["steps"] = step_secrets.opened_steps(route.steps, box)
    else:
        for key in DESTINATION_FIELDS:
            data.pop(key, None)
        for shown, destination in zip(data["destinations"], destinations_of(route), strict=True):
            shown["steps"] = step_secrets.opened_steps(destination.steps, box)
    if data["verify"] is not None:
        if with_secrets:
            assert box is not None
            data["verify"]["secrets"] = box.open(route.secrets_encrypted)
        else:
            data["verify"]["secrets"] = _stored_secrets(route, box) if box else None
    return data


def load_file(path: str | Path) -> list[dict[str, Any]]:
    """Routes from a JSON or YAML file: a list, or ``{"routes": [...]}``."""
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid JSON or YAML ({exc.__class__.__name__})") from None
    if isinstance(data, dict) and "routes" in data:
        data = data["routes"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of routes or {{routes: [...]}}")
    return data


def load_schema_file(path: str | Path) -> Any:
    """The JSON Schema in a JSON or YAML file (``routes add --schema``); ValueError with a
    sentence when the file can't be read or parsed. What it holds is checked by validate."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--schema {path}: can't be read ({exc.__class__.__name__})") from None
    try:
        return yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise ValueError(
            f"--schema {path}: not valid JSON or YAML ({exc.__class__.__name__})"
        ) from None


def to_dict(
    route: Route, box: SecretBox | None = None, registry: Registry | None = None
) -> dict[str, Any]:
    """The route as `routes apply` reads it, with signing secrets and the secrets of step
    configs masked (never revealed; ``registry`` names the connectors' secret fields).

    With ``box`` each secret shows as ``whsec_…abcd``; without it only that they exist.
    """
    verify = None
    if route.verify_scheme:
        shown: list[str] | str = "[encrypted]"
        if box is not None:
            stored = _stored_secrets(route, box)
            shown = [mask(s) for s in stored] if stored is not None else "[unreadable]"
        verify = {
            "scheme": route.verify_scheme,
            "options": route.verify_options or {},
            "secrets": shown,
        }
    destinations = [
        {
            "name": d.name,
            "steps": step_secrets.shown_steps(d.steps, box, registry),
            "filter": d.filter,
            "retry_schedule": d.retry_schedule,
            "max_in_flight": d.max_in_flight,
            "rate": d.rate,
            "ordering_key": d.ordering_key,
            "breaker": d.breaker,
        }
        for d in destinations_of(route)
    ]
    # A lone "default" destination shows at the top too, as routes were shown before
    # they had destinations: clients reading steps, filter and retry_schedule still can.
    lone = _lone_default(route)
    return {
        "name": route.name,
        "description": route.description,
        "mode": route.mode,
        "steps": destinations[0]["steps"] if lone else None,
        "filter": route.filter if lone else None,
        "dedup_path": route.dedup_path,
        "dedup_window": route.dedup_window,
        "retention_days": route.retention_days,
        "retry_schedule": route.retry_schedule if lone else None,
        "destinations": destinations,
        "auth": route.auth,
        "verify": verify,
        "rate_limit": route.rate_limit,
        "enabled": route.enabled,
        "schema": route.payload_schema,
    }


def spec_data(route: Route, box: SecretBox) -> dict[str, Any]:
    """The route as validate() reads it, with its real secrets: for changing one field.

    Raises SecretsUnreadable when the stored secrets do not decrypt.
    """
    return _editable(route, box, with_secrets=True)


def _verified(session: Session, name: str, box: SecretBox) -> tuple[Route, dict[str, Any]]:
    """A route with a signature verifier, and its data with real secrets, to change them."""
    route = get(session, name)
    if route is None:
        raise LookupError(f"no route named {name!r}")
    if not route.verify_scheme:
        raise RouteInvalid(name, ["verify: the route has no signature verifier"])
    return route, spec_data(route, box)


def add_secret(
    session: Session,
    name: str,
    secret: str,
    registry: Registry,
    box: SecretBox,
    actor: audit.Actor | None = None,
) -> int:
    """Add a signing secret to a route (rotation: old and new both verify); the new count.
    ``actor``: the admin adding it (``route.secret_add``, the secret masked)."""
    _, data = _verified(session, name, box)
    if secret in data["verify"]["secrets"]:
        raise RouteInvalid(name, ["verify.secrets: the route already has this secret"])
    data["verify"]["secrets"].append(secret)
    save_routes(session, [data], registry, box, environ={})
    count = len(data["verify"]["secrets"])
    change = {"added": mask(secret), "secrets": count}
    audit.record(session, actor, "route.secret_add", name, change, secrets=[secret])
    return count


def remove_secret(
    session: Session,
    name: str,
    which: str,
    registry: Registry,
    box: SecretBox,
    actor: audit.Actor | None = None,
) -> int:
    """Remove one secret, named by its value, 1-based position, or last characters.

    The last secret of a route whose auth needs a signature is refused: the route would
    turn every sender away. Returns how many secrets remain. ``actor``: the admin removing
    it (``route.secret_remove``, the secret masked).
    """
    route, data = _verified(session, name, box)
    stored: list[str] = data["verify"]["secrets"]
    index = _find_secret(stored, which)
    if index is None:
        raise RouteInvalid(name, ["verify.secrets: no secret matches (value, number or suffix)"])
    if len(stored) == 1:
        raise RouteInvalid(
            name,
            [
                f"verify.secrets: it is the last secret and auth is {route.auth!r}; "
                "add the new secret first, or change auth to key"
            ],
        )
    removed = stored.pop(index)
    save_routes(session, [data], registry, box, environ={})
    change = {"removed": mask(removed), "secrets": len(stored)}
    audit.record(session, actor, "route.secret_remove", name, change, secrets=[removed])
    return len(stored)


def _find_secret(stored: list[str], which: str) -> int | None:
    if which in stored:
        return stored.index(which)
    if which.isdigit() and 1 <= int(which) <= len(stored):
        return int(which) - 1
    suffix = which.split("…")[-1]
    matches = [i for i, s in enumerate(stored) if len(suffix) >= 4 and s.endswith(suffix)]
    return matches[0] if len(matches) == 1 else None


def save_route(
    session: Session,
    data: dict[str, Any],
    registry: Registry,
    box: SecretBox | None = None,
    environ: Mapping[str, str] | None = None,
    actor: audit.Actor | None = None,
) -> tuple[Route, str]:
    """One route through ``save_routes``; RouteInvalid names each of its own problems."""
    stored = get(session, data["name"]) if isinstance(data.get("name"), str) else None
    if stored is not None:
        data = _one_change(data, to_dict(stored, box, registry))
    validate(data, registry, environ)  # the field-by-field errors of this one route
    ((name, action),) = save_routes(session, [data], registry, box, environ, actor=actor)
    route = get(session, name)
    assert route is not None
    return route, action


def save_submitted(
    session: Session,
    data: dict[str, Any],
    registry: Registry,
    box: SecretBox,
    actor: audit.Actor | None = None,
) -> tuple[Route, str]:
    """Save one route an admin sent over HTTP (the admin API or the dashboard), committed.

    ``${VAR}`` references are for route files on the server, never for what comes over the
    wire, so none is expanded; a RouteInvalid leaves the session rolled back."""
    try:
        saved = save_route(session, data, registry, box, environ={}, actor=actor)
    except RouteInvalid:
        session.rollback()
        raise
    session.commit()
    return saved


def changed_data(route: Route, box: SecretBox, changes: dict[str, Any], *, whole: bool) -> dict:
    """The route's data with ``changes`` applied: every field when ``whole`` (a
    replacement), else only those given (a patch).

    A verifier given without secrets keeps the secrets the route has, so an admin can
    change a scheme's options without sending (or having) the secrets again.
    """
    try:
        current = spec_data(route, box)
    except SecretsUnreadable:
        current = _editable(route, box, with_secrets=False)
        if current["verify"] is not None:
            current["verify"]["secrets"] = []
    if not whole and changes.get("destinations") is not None:
        # The destinations given replace the route's steps, filter and schedule.
        current = {k: v for k, v in current.items() if k not in DESTINATION_FIELDS}
    elif (
        not whole
        and any(changes.get(k) is not None for k in DESTINATION_FIELDS)
        and "destinations" in current
    ):
        raise RouteInvalid(
            route.name,
            [
                "steps, filter and retry_schedule: the route has several destinations; "
                "change them inside destinations"
            ],
        )
    data = {"name": route.name, **({} if whole else current), **changes}
    verify = changes.get("verify")
    old = current["verify"]
    if verify is not None and old is not None:
        if not whole:
            verify = {**old, **{k: v for k, v in verify.items() if v is not None}}
        if not verify.get("secrets") and not verify.get("secrets_env"):
            verify = {**verify, "secrets": old["secrets"]}
        data["verify"] = verify
    return data


def seal_stored_secrets(
    session: Session, registry: Registry, box: SecretBox, actor: audit.Actor | None = None
) -> list[str]:
    """Seal the step secrets that routes saved by an older release keep in clear (run by
    ``db upgrade`` and ``init``: the app, unlike a migration, knows every connector's
    declared secret fields and holds the key). The names of the routes changed, each
    recorded (``route.secrets_sealed``) for ``actor``."""
    sealed = []
    for route in list_routes(session):
        changed = False
        if not route.destinations:  # made outside save: its own steps are its destination
            steps, problems = step_secrets.seal_steps(route.steps or [], registry, box, route.steps)
            if not problems and steps != route.steps:
                route.steps = steps
                sealed.append(route.name)
            continue
        for position, destination in enumerate(route.destinations):
            steps, problems = step_secrets.seal_steps(
                destination.steps or [], registry, box, destination.steps
            )
            if not problems and steps != destination.steps:
                destination.steps = steps
                if position == 0:
                    route.steps = steps
                changed = True
        if changed:
            sealed.append(route.name)
    session.flush()
    for name in sealed:
        audit.record(session, actor, "route.secrets_sealed", name)
    return sealed


def get(session: Session, name: str) -> Route | None:
    """The route named ``name``; None for a name no route can have (PostgreSQL can't even
    compare one holding NUL, as ``/hooks/a%00b`` gives)."""
    if not re.fullmatch(ROUTE_NAME_PATTERN, name):
        return None
    return session.scalar(select(Route).where(Route.name == name))


def lookup(session: Session, name: str, cache: TTLCache[tuple[Route | None]]) -> Route | None:
    """The route called ``name`` as ingest and workers see it: from ``cache`` when it was
    read in the last HUB_ROUTE_CACHE_SECONDS (a burst costs one query per process, not one
    per request; a name with no route is remembered too). The Route is detached and shared
    between threads: read it, never change it."""
    hit = cache.get(name)
    if hit is not None:
        return hit[0]
    route = get(session, name)
    if route is not None:
        session.expunge(route)
    cache.put(name, (route,))
    return route


def lookup_opening(
    open_session: Callable[[], AbstractContextManager[Session]],
    name: str,
    cache: TTLCache[tuple[Route | None]],
) -> Route | None:
    """``lookup``, opening a session only when the route isn't cached (a worker looks its
    route up for every delivery)."""
    hit = cache.get(name)
    if hit is not None:
        return hit[0]
    with open_session() as session:
        return lookup(session, name, cache)


def list_routes(
    session: Session, *, after: str | None = None, limit: int | None = None
) -> list[Route]:
    """Routes by name; a page of ``limit`` after the route named ``after`` (the name's
    unique index)."""
    query = select(Route).order_by(Route.name)
    if after is not None:
        query = query.where(Route.name > after)
    return list(session.scalars(query.limit(limit)))


def remove(
    session: Session,
    name: str,
    actor: audit.Actor | None = None,
    box: SecretBox | None = None,
    registry: Registry | None = None,
) -> bool:
    """Delete the route ``name`` (its events stay); whether there was one. ``actor``: the
    admin removing it (``route.remove``, with the route as it was shown, secrets masked by
    ``box``)."""
    route = get(session, name)
    if route is None:
        return False
    shown = to_dict(route, box, registry) if actor is not None else None
    session.delete(route)
    audit.record(session, actor, "route.remove", name, shown)
    return True


DEMO_ROUTES = [
    {
        "name": "process",
        "description": "The seed's /api/process: upper-case text with its length and words.",
        "mode": "sync",
        "steps": [{"connector": "text", "config": {}}],
    },
    {
        "name": "chat",
        "description": "The seed's /api/chat: one message to an OpenAI-compatible chat model.",
        "mode": "sync",
        "steps": [{"connector": "openai", "config": {"user_message": "{{ payload.message }}"}}],
    },
]


def ensure_demo_routes(
    session: Session, registry: Registry, actor: audit.Actor | None = None
) -> list[str]:
    """Create the demo routes that are missing (never overwrite an admin's changes)."""
    missing = [r for r in DEMO_ROUTES if get(session, r["name"]) is None]
    usable = [r for r in missing if all(s["connector"] in registry for s in r["steps"])]
    if usable:
        save_routes(session, usable, registry, actor=actor)
    return [r["name"] for r in usable]
