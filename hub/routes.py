"""Routes as admins write them: validated whole before anything is saved.

The CLI (`routes add`, `routes apply`) and the admin API both go through ``save_routes``,
so a route is checked the same way wherever it comes from: every step's config against
its connector's pydantic ``Config``, every template parsed, nothing half-saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.connectors import (
    Registry,
    StepConfigError,
    UnknownConnectorError,
    describe_validation_error,
)
from hub.models import Route
from hub.templating import TemplateProblem, check_config, check_filter

ROUTE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
DEFAULT_RETRY_SCHEDULE = [30, 120, 600, 3600, 21600]


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


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ROUTE_NAME_PATTERN)
    description: str | None = None
    mode: Literal["sync", "async"] = "sync"
    steps: list[StepSpec] = Field(default_factory=list)
    filter: str | None = None
    dedup_path: str | None = None
    dedup_window: int = Field(86400, ge=0)
    retry_schedule: list[int] | None = None
    enabled: bool = True

    @field_validator("retry_schedule")
    @classmethod
    def _positive(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(v <= 0 for v in value):
            raise ValueError("every retry delay must be a positive number of seconds")
        return value


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


def validate(data: dict[str, Any], registry: Registry) -> RouteSpec:
    """A RouteSpec, or RouteInvalid listing every problem found."""
    name = str(data.get("name", "?")) if isinstance(data, dict) else "?"
    try:
        spec = RouteSpec.model_validate(data)
    except ValidationError as exc:
        raise RouteInvalid(name, describe_validation_error(exc)) from None
    errors: list[str] = []
    for index, step in enumerate(spec.steps):
        where = f"steps[{index}] ({step.connector})"
        try:
            check_config(step.config)
            registry.validate_unrendered(step.connector, step.config)
        except UnknownConnectorError as exc:
            errors.append(f"steps[{index}]: {str(exc).strip(chr(34))}")
        except StepConfigError as exc:
            errors.extend(f"{where}: {e}" for e in exc.errors)
        except TemplateProblem as exc:
            errors.append(f"{where}: {exc}")
    if spec.filter:
        try:
            check_filter(spec.filter)
        except TemplateProblem as exc:
            errors.append(str(exc))
    if errors:
        raise RouteInvalid(spec.name, errors)
    return spec


def save(session: Session, spec: RouteSpec) -> tuple[Route, bool]:
    """Create or update the route named by ``spec``; returns (route, created)."""
    route = session.scalar(select(Route).where(Route.name == spec.name))
    created = route is None
    if route is None:
        route = Route(name=spec.name)
        session.add(route)
    values = spec.model_dump()
    values["steps"] = [s.model_dump() for s in spec.steps]
    for key, value in values.items():
        setattr(route, key, value)
    session.flush()
    return route, created


def save_routes(
    session: Session, items: list[dict[str, Any]], registry: Registry
) -> list[tuple[str, str]]:
    """Validate every route first, then save them all: (name, created|updated|unchanged)."""
    specs, problems = [], []
    for item in items:
        try:
            specs.append(validate(item, registry))
        except RouteInvalid as exc:
            problems.append(exc)
    if problems:
        raise RouteInvalid(", ".join(p.name for p in problems), [str(p) for p in problems])
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RouteInvalid("file", ["a route name appears twice"])
    results = []
    for spec in specs:
        before = session.scalar(select(Route).where(Route.name == spec.name))
        old = to_dict(before) if before is not None else None
        route, created = save(session, spec)
        if created:
            results.append((spec.name, "created"))
        else:
            results.append((spec.name, "unchanged" if to_dict(route) == old else "updated"))
    return results


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


def to_dict(route: Route) -> dict[str, Any]:
    return {
        "name": route.name,
        "description": route.description,
        "mode": route.mode,
        "steps": route.steps,
        "filter": route.filter,
        "dedup_path": route.dedup_path,
        "dedup_window": route.dedup_window,
        "retry_schedule": route.retry_schedule,
        "enabled": route.enabled,
    }


def get(session: Session, name: str) -> Route | None:
    return session.scalar(select(Route).where(Route.name == name))


def list_routes(session: Session) -> list[Route]:
    return list(session.scalars(select(Route).order_by(Route.name)))


def remove(session: Session, name: str) -> bool:
    route = get(session, name)
    if route is None:
        return False
    session.delete(route)
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


def ensure_demo_routes(session: Session, registry: Registry) -> list[str]:
    """Create the demo routes that are missing (never overwrite an admin's changes)."""
    missing = [r for r in DEMO_ROUTES if get(session, r["name"]) is None]
    usable = [r for r in missing if all(s["connector"] in registry for s in r["steps"])]
    if usable:
        save_routes(session, usable, registry)
    return [r["name"] for r in usable]
