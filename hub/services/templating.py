"""Step config templates and route filters, rendered in Jinja's sandbox, within limits.

A config string containing ``{{`` or ``{%`` (``hub.connectors.is_template``, the kit's, as
a connector's config may hold one) is a template over ``payload`` (the event's body),
``steps`` (earlier outputs), ``previous`` (the last output) and ``headers``.
Templates are parsed when a route is saved, so a typo is refused then, not at 3 a.m.

The sender controls what a template loops over and multiplies, so every render has two
limits (``TemplateLimits``): a time (the rendering thread is interrupted at the deadline,
which holds for loops with empty bodies too) and a size. The size is counted on the output
as it is generated, and checked *before* the operations that can build a large value in
one step (``*``, ``**``, ``%``, ``+``, str.format widths, ``center``, ``indent``,
``replace``, ``join``, ``ljust`` ...), so such a value is refused rather than built.
"""

from __future__ import annotations

import inspect
import re
import string
import time
from collections.abc import Callable, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache, wraps
from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from markupsafe import Markup

from hub.connectors import is_template
from hub.deadline import DeadlineExceeded, interrupting


@dataclass(frozen=True)
class TemplateLimits:
    """How long one step's templates (or a route filter) may render, and how large the
    output and any value built on the way may be (characters, or items of a list)."""

    timeout: float = 2.0
    max_output: int = 1024 * 1024

    @classmethod
    def from_config(cls, config: Any) -> TemplateLimits:
        return cls(float(config["TEMPLATE_TIMEOUT"]), int(config["TEMPLATE_MAX_OUTPUT"]))


class TemplateProblem(ValueError):
    """A template that does not parse or does not render; ``where`` is its config path.

    ``code`` is ``template_limit`` when a limit stopped it (the payload made it too big or
    too slow), None for a template that is simply wrong."""

    def __init__(self, where: str, message: str, code: str | None = None):
        self.where = where
        self.code = code
        super().__init__(f"{where}: {message}" if where else message)


class _TooLarge(Exception):
    """A value a template was about to build is larger than the output limit."""


_limits: ContextVar[TemplateLimits | None] = ContextVar("hub_template_limits", default=None)


def _refuse_over(size: int, what: str) -> None:
    limit = (_limits.get() or TemplateLimits()).max_output
    if size > limit:
        raise _TooLarge(
            f"{what} would build a value of about {size} characters, "
            f"over HUB_TEMPLATE_MAX_OUTPUT ({limit})"
        )


def _length(value: Any) -> int:
    return len(value) if isinstance(value, Sized) else 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


# --- sizes of the operations that build a value in one step --------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?")


def _percent_size(fmt: Any, args: Any) -> int:
    """``fmt % args``: the widths and precisions it asks for (a ``*`` takes an argument)."""
    if not isinstance(fmt, str | bytes):
        return 0
    text = fmt if isinstance(fmt, str) else fmt.decode("latin-1")
    values = args if isinstance(args, tuple) else (args,)
    star = max((_int(v) for v in values), default=0)
    size = len(text)
    for match in _PERCENT_SPEC.finditer(text):
        for part in match.groups():
            size += star if part == "*" else int(part or 0)
    return size


def _power_size(base: Any, exponent: Any) -> int:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        return exponent * abs(base).bit_length() // 8
    return 0


def _binop_size(operator: str, left: Any, right: Any) -> int:
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            return (left.bit_length() + right.bit_length()) // 8
        if isinstance(right, int):
            return _length(left) * right
        if isinstance(left, int):
            return _length(right) * left
    elif operator == "**":
        return _power_size(left, right)
    elif operator == "%":
        return _percent_size(left, right)
    elif operator == "+":
        return _length(left) + _length(right)
    return 0


def _replace_size(s: Any, old: Any, new: Any, count: Any = None) -> int:
    s, old, new = str(s), str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _indent_size(s: Any, width: Any = 4, first: Any = False) -> int:
    text = str(s)
    per_line = len(width) if isinstance(width, str) else _int(width)
    return len(text) + (text.count("\n") + (1 if first else 0)) * per_line


def _wordwrap_size(s: Any, width: Any = 79, wrapstring: Any = None) -> int:
    text = str(s)
    return len(text) + (len(text) // max(1, _int(width)) + 1) * len(wrapstring or "\n")


#: Filters that can build a large value from small arguments: their size before they run.
_FILTER_SIZES: dict[str, Callable[[dict[str, Any]], int]] = {
    "center": lambda a: _length(a["value"]) + _int(a["width"]),
    "indent": lambda a: _indent_size(a["s"], a["width"], a["first"]),
    "format": lambda a: _percent_size(a["value"], a["args"] or a["kwargs"]),
    "replace": lambda a: _replace_size(a["s"], a["old"], a["new"], a["count"]),
    "join": lambda a: len(str(a["d"])) * max(0, _length(a["value"]) - 1),
    "wordwrap": lambda a: _wordwrap_size(a["s"], a["width"], a["wrapstring"]),
    "batch": lambda a: _int(a["linecount"]) if a["fill_with"] is not None else 0,
    "slice": lambda a: _int(a["slices"]),
}

#: str and bytes methods that can do the same, by the arguments they are called with.
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *_: len(s) + _int(width),
    "ljust": lambda s, width=0, *_: len(s) + _int(width),
    "rjust": lambda s, width=0, *_: len(s) + _int(width),
    "zfill": lambda s, width=0, *_: len(s) + _int(width),
    "expandtabs": lambda s, tabsize=8, *_: len(s) * max(1, _int(tabsize)),
    "replace": lambda s, old="", new="", count=-1, *_: _replace_size(s, old, new, count),
    "join": lambda s, items=(), *_: len(s) * max(0, _length(items) - 1),
}


def _guarded_filter(name: str, fn: Callable, size: Callable[[dict[str, Any]], int]) -> Callable:
    signature = inspect.signature(fn)

    @wraps(fn)  # keeps Jinja's pass_eval_context / pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # Jinja reports the wrong call itself
        bound.apply_defaults()
        _refuse_over(size(bound.arguments), f"the {name} filter")
        return fn(*args, **kwargs)

    return guarded


class _LimitedFormatterMixin:
    def format_field(self, value: Any, format_spec: str) -> Any:
        match = _FORMAT_SPEC.match(format_spec)
        if match:
            _refuse_over(sum(int(g or 0) for g in match.groups()), "a format width")
        return super().format_field(value, format_spec)


class _LimitedFormatter(_LimitedFormatterMixin, SandboxedFormatter):
    pass


class _LimitedEscapeFormatter(_LimitedFormatterMixin, SandboxedEscapeFormatter):
    pass


class LimitedEnvironment(SandboxedEnvironment):
    """Jinja's sandbox, plus size checks before the operations that build large values."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.globals.pop("lipsum", None)  # makes text of any size; no use in a webhook
        for name, size in _FILTER_SIZES.items():
            self.filters[name] = _guarded_filter(name, self.filters[name], size)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _refuse_over(_binop_size(operator, left, right), f"the {operator} operator")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        owner = getattr(__obj, "__self__", None)
        size = _METHOD_SIZES.get(getattr(__obj, "__name__", ""))
        if size is not None and isinstance(owner, str | bytes):
            try:
                estimate = size(owner, *args, **kwargs)
            except TypeError:
                estimate = 0  # a wrong call: Python reports it
            _refuse_over(estimate, f"{__obj.__name__}()")
        elif isinstance(owner, int) and getattr(__obj, "__name__", "") == "to_bytes":
            _refuse_over(_int(args[0] if args else kwargs.get("length", 1)), "to_bytes()")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if super().wrap_str_format(value) is None:
            return None
        f_self = value.__self__
        formatter: string.Formatter = (
            _LimitedEscapeFormatter(self, escape=f_self.escape)
            if isinstance(f_self, Markup)
            else _LimitedFormatter(self)
        )
        is_format_map = value.__name__ == "format_map"

        @wraps(value)
        def checked(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(f_self)(formatter.vformat(f_self, args, kwargs))

        return checked


_env = LimitedEnvironment(undefined=StrictUndefined, autoescape=False)
# Filters read fields that may be absent: a missing field is simply false there.
_filter_env = LimitedEnvironment(autoescape=False)


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


def has_template(config: Any) -> bool:
    """Whether a string anywhere in ``config`` (its dicts' values, its lists) is a template."""
    if isinstance(config, dict):
        return any(has_template(value) for value in config.values())
    if isinstance(config, list):
        return any(has_template(value) for value in config)
    return is_template(config)


def check_config(config: Any) -> None:
    """Parse every template in a step config; raise TemplateProblem naming the field."""

    def parse(source: str, where: str):
        try:
            _compile(source)
        except TemplateError as exc:
            raise TemplateProblem(where, f"template does not parse: {exc.message}") from None
        return source

    _walk(config, "", parse)


def _stop_at(limits: TemplateLimits, step_deadline: float | None) -> tuple[float, bool]:
    """When rendering must stop, and whether that is the step's deadline (nearer)."""
    own = time.monotonic() + limits.timeout
    if step_deadline is not None and step_deadline < own:
        return step_deadline, True
    return own, False


def _too_slow(where: str, limits: TemplateLimits, at_step_deadline: bool) -> TemplateProblem:
    if at_step_deadline:
        return TemplateProblem(
            where, "template was still rendering at the step's deadline", code="timeout"
        )
    return TemplateProblem(
        where,
        f"template ran longer than HUB_TEMPLATE_TIMEOUT ({limits.timeout:g} s)",
        code="template_limit",
    )


def render_config(
    config: Any,
    context: dict[str, Any],
    limits: TemplateLimits = TemplateLimits(),
    step_deadline: float | None = None,
) -> Any:
    """The config with every template rendered against ``context``; TemplateProblem names
    the field that failed, or that was rendering when a limit was reached (the limits hold
    for the whole config together). A nearer ``step_deadline`` stops it too (code
    ``timeout``)."""
    deadline, at_step_deadline = _stop_at(limits, step_deadline)
    left = [limits.max_output]
    token = _limits.set(limits)
    current = [""]

    def render(source: str, where: str):
        current[0] = where
        pieces = []
        try:
            for piece in _compile(source).generate(context):
                left[0] -= len(piece)
                if left[0] < 0:
                    raise _TooLarge(
                        f"template output is larger than HUB_TEMPLATE_MAX_OUTPUT "
                        f"({limits.max_output} characters)"
                    )
                pieces.append(piece)
        except _TooLarge as exc:
            raise TemplateProblem(where, str(exc), code="template_limit") from None
        except TemplateError as exc:
            raise TemplateProblem(where, f"template failed: {exc.message}") from None
        except Exception as exc:  # a sandboxed template can still divide by zero
            raise TemplateProblem(where, f"template failed: {type(exc).__name__}") from None
        return "".join(pieces)

    try:
        with interrupting(deadline):
            return _walk(config, "", render)
    except DeadlineExceeded:
        raise _too_slow(current[0], limits, at_step_deadline) from None
    finally:
        _limits.reset(token)


def check_filter(expression: str) -> None:
    try:
        _compile_filter(expression)
    except TemplateError as exc:
        raise TemplateProblem("filter", f"expression does not parse: {exc.message}") from None


def evaluate_filter(
    expression: str,
    context: dict[str, Any],
    limits: TemplateLimits = TemplateLimits(),
    step_deadline: float | None = None,
) -> bool:
    deadline, at_step_deadline = _stop_at(limits, step_deadline)
    token = _limits.set(limits)
    try:
        with interrupting(deadline):
            return bool(_compile_filter(expression)(**context))
    except DeadlineExceeded:
        raise _too_slow("filter", limits, at_step_deadline) from None
    except _TooLarge as exc:
        raise TemplateProblem("filter", str(exc), code="template_limit") from None
    except TemplateError as exc:
        raise TemplateProblem("filter", f"expression failed: {exc.message}") from None
    except Exception as exc:
        raise TemplateProblem("filter", f"expression failed: {type(exc).__name__}") from None
    finally:
        _limits.reset(token)
