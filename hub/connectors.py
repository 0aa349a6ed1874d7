"""The public contract between the hub and its connectors.

A connector is a class with a ``name``, a one-line ``description``, a pydantic ``Config``
and ``run(payload, ctx)``. It signals failure with ``RetryableError`` (worth trying again)
or ``PermanentError`` (it will not get better by itself), whose ``InputError`` says the input
doesn't fit the step; anything else it raises is a bug and is treated as permanent.
Connectors import this module and ``hub.http``, nothing else from the hub.

A config field that holds a credential says so with ``Secret`` (a string) or
``CredentialHeaders`` (a dict of headers, whose credential-named entries are secret): the
hub then keeps its value encrypted at rest, shows it masked in every face (API, CLI,
dashboard), and cuts it from attempt copies; ``run`` gets the real value. A config value
containing ``{{`` or ``{%`` is a template (``is_template``), rendered when the step runs.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import entry_points
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub.ops.redact import is_credential_header

ENTRY_POINT_GROUP = "hub.connectors"
DEFAULT_MAX_RESPONSE_BYTES = 10 * 1024 * 1024  # HUB_MAX_RESPONSE_BYTES

#: Built-in connectors, loaded through the same path as third-party entry points.
BUILTIN_CONNECTORS = {
    "text": "hub.builtin.text:TextConnector",
    "openai": "hub.builtin.openai_chat:OpenAIChatConnector",
    "http": "hub.builtin.http_forward:HttpForwardConnector",
}


class ConnectorError(Exception):
    """Base of the two failures a connector may raise.

    ``code`` is a machine-readable cause (``upstream_error``, ``not_configured`` ...),
    ``status`` the HTTP status of the far side where there was one.
    """

    code = "step_failed"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status = status

    def __str__(self) -> str:
        return self.message


class RetryableError(ConnectorError):
    """A transient failure: a timeout, a refused connection, a 429 or 5xx answer."""

    code = "upstream_error"

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
    ):
        super().__init__(message, code=code, status=status)
        self.retry_after = retry_after


class PermanentError(ConnectorError):
    """A failure that retrying will not fix: a 4xx answer, bad config, a bad response shape."""


class InputError(PermanentError):
    """This input doesn't fit this step: a missing field, text where a number must be.

    The sender's mistake, not the far side's: a sync route answers 422, an async event fails
    at once (retrying the same input gives the same answer).
    """

    code = "bad_input"


class NotConfiguredError(PermanentError):
    """The connector lacks something the operator must provide, such as an API key."""

    code = "not_configured"


class BadResponseError(PermanentError):
    """The far side answered, but not in the shape the connector understands."""

    code = "bad_response"


#: A config field holding a credential: ``api_key: Secret = Field(description=...)``.
Secret = Annotated[str, Field(json_schema_extra={"secret": True})]
#: Headers for a call, as a dict: those named like credentials (Authorization, X-Api-Key,
#: anything ``hub.ops.redact.is_credential_header`` says) are secret, the others are not.
CredentialHeaders = Annotated[dict[str, str], Field(json_schema_extra={"secret": "by_name"})]


@cache
def secret_fields(config_cls: type[BaseModel]) -> dict[str, str]:
    """The secret fields of a connector's Config: name -> ``"value"`` (the whole value) or
    ``"by_name"`` (a dict whose credential-named keys are secret). From its JSON Schema, so a
    field declared ``Secret | None`` counts too; computed once per class."""
    found: dict[str, str] = {}
    for name, spec in config_cls.model_json_schema().get("properties", {}).items():
        for part in [spec, *spec.get("anyOf", [])]:
            mark = part.get("secret")
            if mark:
                found[name] = "by_name" if mark == "by_name" else "value"
    return found


def secret_paths(config_cls: type[BaseModel], config: dict[str, Any]) -> list[tuple[str, ...]]:
    """Where ``config`` (a step's config, as stored) holds secret strings: (field,) or
    (field, header)."""
    paths: list[tuple[str, ...]] = []
    for name, kind in secret_fields(config_cls).items():
        value = config.get(name)
        if kind == "value" and isinstance(value, str):
            paths.append((name,))
        elif kind == "by_name" and isinstance(value, dict):
            paths += [
                (name, k)
                for k, v in value.items()
                if isinstance(v, str) and is_credential_header(k)
            ]
    return paths


class EmptyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Exchange:
    """What a connector sent and received on its last call, for the attempt log."""

    request: Any = None
    response: Any = None
    status: int | None = None
    # (name, value) pairs, in order and with repeats; None: not known (no call, or a
    # connector that does not say).
    request_headers: list[tuple[str, str]] | None = None
    response_headers: list[tuple[str, str]] | None = None


@dataclass
class StepContext:
    """Everything a step may know about the event it is running for."""

    event_id: str
    route: str
    step_index: int
    payload: Any
    outputs: list[Any]
    logger: logging.Logger
    attempt: int = 1
    # X-Request-ID of the request that brought the event (None for events older than it).
    request_id: str | None = None
    deadline: float | None = None  # time.monotonic() by which the step must be done
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # hub.http reads no more of an answer
    exchange: Exchange = field(default_factory=Exchange)

    def time_left(self, default: float) -> float:
        """Seconds a call may take: ``default``, or less when the deadline is nearer."""
        if self.deadline is None:
            return default
        return max(0.05, min(default, self.deadline - time.monotonic()))

    def record(
        self,
        *,
        request: Any = None,
        response: Any = None,
        status: int | None = None,
        request_headers: Iterable[tuple[str, str]] | None = None,
        response_headers: Iterable[tuple[str, str]] | None = None,
    ):
        """Keep a copy of the call for the attempt row (the hub truncates and redacts it,
        headers included: HUB_ATTEMPT_HEADERS, HUB_ATTEMPT_HEADER_BYTES)."""
        self.exchange = Exchange(
            request=request,
            response=response,
            status=status,
            request_headers=None if request_headers is None else list(request_headers),
            response_headers=None if response_headers is None else list(response_headers),
        )


class Connector:
    """Subclass this, set ``name``, ``description`` and ``Config``, and implement ``run``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = EmptyConfig
    # True for a connector that only computes (no network, no file, no sleep, no lock):
    # its ``run`` is called in the delivery thread itself, stopped at the deadline while
    # in its own code, instead of being handed to a helper thread that the caller can
    # stop waiting for (a hand-off that cost a sixth of a quick delivery's CPU). A call
    # that can block outside Python must leave it False.
    computes_only: ClassVar[bool] = False

    def __init__(self, config: BaseModel):
        self.config = config

    def run(self, payload: Any, ctx: StepContext) -> Any:  # pragma: no cover - contract
        raise NotImplementedError


def require_env(name: str, message: str | None = None) -> str:
    """A credential from the environment variable ``name``, or NotConfiguredError.

    Configs name the variable (configs are shown in lists); the value is read when the step
    runs, so a key set or rotated in the environment needs no route change.
    """
    value = os.environ.get(name)
    if not value:
        raise NotConfiguredError(message or f"environment variable {name} is not set")
    return value


def lookup_path(payload: Any, path: str) -> Any:
    """``a.b.0.c`` into nested dicts and lists; KeyError when a part is missing."""
    value = payload
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(path)
    return value


def is_template(value: Any) -> bool:
    """Whether a step config value is a Jinja template (rendered when the step runs)."""
    return isinstance(value, str) and ("{{" in value or "{%" in value)


class UnknownConnectorError(LookupError):
    pass


class StepConfigError(ValueError):
    """A step's config does not fit its connector; ``errors`` lists field and reason."""

    def __init__(self, connector: str, errors: list[str]):
        self.connector = connector
        self.errors = errors
        super().__init__(f"{connector}: " + "; ".join(errors))


def describe_validation_error(exc: ValidationError, *, present: Iterable[str] = ()) -> list[str]:
    """Turn pydantic's errors into 'field: reason' sentences without echoing values.

    A "missing" error for a field named in ``present`` is left out: the field is there, as a
    template whose value is known only when the step runs.
    """
    present = set(present)
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        if err["type"] == "missing" and err["loc"][:1] and err["loc"][0] in present:
            continue
        where = ".".join(str(p) for p in err["loc"]) or "config"
        out.append(f"{where}: {err['msg']}")
    return out


@dataclass(frozen=True)
class ConfigField:
    """One field of a connector's config as an admin reads it (CLI list, dashboard)."""

    name: str
    kind: str
    required: bool
    default: str | None  # as JSON, when the field has one
    description: str
    secret: bool = False  # encrypted at rest and shown masked (Secret, CredentialHeaders)


def config_fields(cls: type[Connector]) -> list[ConfigField]:
    """The fields of ``cls.Config``, from its JSON Schema, in declaration order."""
    schema = cls.Config.model_json_schema()
    required = set(schema.get("required", []))
    fields = []
    for name, spec in schema.get("properties", {}).items():
        kind = spec.get("type") or "/".join(a.get("type", "?") for a in spec.get("anyOf", []))
        default = json.dumps(spec["default"]) if "default" in spec else None
        fields.append(
            ConfigField(
                name,
                kind,
                name in required,
                default,
                spec.get("description", ""),
                secret=name in secret_fields(cls.Config),
            )
        )
    return fields


class Registry:
    """The connectors known to one hub, by name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Connector]] = {}

    def register(self, cls: type[Connector]) -> type[Connector]:
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise TypeError(f"{cls!r} is not a Connector subclass")
        if not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(
                f"connector {cls.__qualname__} needs a name of letters, digits, _ or -"
            )
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel)):
            raise TypeError(f"connector {cls.name}: Config must be a pydantic model")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        self._classes.pop(name, None)

    def get(self, name: str) -> type[Connector]:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise UnknownConnectorError(f"unknown connector {name!r} (known: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[type[Connector]]:
        return iter(sorted(self._classes.values(), key=lambda c: c.name))

    def validate(self, name: str, config: dict[str, Any] | None) -> BaseModel:
        """Check a step's config against its connector; raise StepConfigError with reasons."""
        cls = self.get(name)
        try:
            return cls.Config.model_validate(config or {})
        except ValidationError as exc:
            raise StepConfigError(name, describe_validation_error(exc)) from None

    def validate_unrendered(self, name: str, config: dict[str, Any] | None) -> None:
        """Check a step's config as a route saves it, before its templates are rendered.

        A templated value is checked when the step runs, once it has a value; until then it
        only says that a value will be there, so a required field given as a template passes.
        A field declared with ``json_schema_extra={"template": False}`` may not be a template.
        """
        cls = self.get(name)
        config = config or {}
        templated = {k for k, v in config.items() if is_template(v)}
        errors = []
        for key in sorted(templated):
            field = cls.Config.model_fields.get(key)
            extra = field.json_schema_extra if field is not None else None
            if isinstance(extra, dict) and extra.get("template") is False:
                errors.append(f"{key}: may not be a template")
        try:
            cls.Config.model_validate({k: v for k, v in config.items() if k not in templated})
        except ValidationError as exc:
            errors += describe_validation_error(exc, present=templated)
        if errors:
            raise StepConfigError(name, errors)

    def build(self, name: str, config: dict[str, Any] | None) -> Connector:
        cls = self.get(name)
        return cls(self.validate(name, config))


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def load_connectors(only: Iterable[str] | None = None, logger: logging.Logger | None = None):
    """Build a Registry from the built-ins and the ``hub.connectors`` entry points.

    ``only`` (from HUB_CONNECTORS) limits what loads by name. A third-party connector that
    fails to import is logged and skipped: one broken plugin must not stop the hub.
    """
    log = logger or logging.getLogger("hub.connectors")
    wanted = {n.strip() for n in only if n.strip()} if only else None
    sources: list[tuple[str, str]] = list(BUILTIN_CONNECTORS.items())
    sources += [(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    registry = Registry()
    for name, spec in sources:
        if wanted is not None and name not in wanted:
            continue
        try:
            obj = _load_object(spec)
            classes = (
                [obj]
                if isinstance(obj, type)
                else [
                    v
                    for v in vars(obj).values()
                    if isinstance(v, type) and issubclass(v, Connector) and v.name
                ]
            )
            for cls in classes:
                registry.register(cls)
        except Exception as exc:  # a broken plugin is reported, not fatal
            log.error("connector %s (%s) failed to load: %s", name, spec, exc)
    if wanted:
        missing = wanted - {c.name for c in registry}
        for name in sorted(missing):
            log.warning("HUB_CONNECTORS names %r, but no such connector is installed", name)
    return registry
