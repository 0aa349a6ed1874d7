"""Step config templates and route filters, rendered in Jinja's sandbox.

A config string containing ``{{`` or ``{%`` is a template over ``payload`` (the event's
body), ``steps`` (earlier outputs), ``previous`` (the last output) and ``headers``.
Templates are parsed when a route is saved, so a typo is refused then, not at 3 a.m.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
# Filters read fields that may be absent: a missing field is simply false there.
_filter_env = SandboxedEnvironment(autoescape=False)


class TemplateProblem(ValueError):
    """A template that does not parse or does not render; ``where`` is its config path."""

    def __init__(self, where: str, message: str):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


@lru_cache(maxsize=512)
def _compile(source: str):
    return _env.from_string(source)


@lru_cache(maxsize=256)
def _compile_filter(expression: str):
    return _filter_env.compile_expression(expression)


def _walk(value: Any, path: str, fn):
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, f"{path}[{i}]", fn) for i, v in enumerate(value)]
    if is_template(value):
        return fn(value, path)
    return value


def check_config(config: Any) -> None:
    """Parse every template in a step config; raise TemplateProblem naming the field."""

    def parse(source: str, where: str):
        try:
            _compile(source)
        except TemplateError as exc:
            raise TemplateProblem(where, f"template does not parse: {exc.message}") from None
        return source

    _walk(config, "", parse)


def render_config(config: Any, context: dict[str, Any]) -> Any:
    """The config with every template rendered against ``context``."""

    def render(source: str, where: str):
        try:
            return _compile(source).render(context)
        except TemplateError as exc:
            raise TemplateProblem(where, f"template failed: {exc.message}") from None
        except Exception as exc:  # a sandboxed template can still divide by zero
            raise TemplateProblem(where, f"template failed: {type(exc).__name__}") from None

    return _walk(config, "", render)


def check_filter(expression: str) -> None:
    try:
        _compile_filter(expression)
    except TemplateError as exc:
        raise TemplateProblem("filter", f"expression does not parse: {exc.message}") from None


def evaluate_filter(expression: str, context: dict[str, Any]) -> bool:
    try:
        return bool(_compile_filter(expression)(**context))
    except TemplateError as exc:
        raise TemplateProblem("filter", f"expression failed: {exc.message}") from None
    except Exception as exc:
        raise TemplateProblem("filter", f"expression failed: {type(exc).__name__}") from None
