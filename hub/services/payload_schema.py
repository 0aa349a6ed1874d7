"""A route's JSON Schema (``schema``): checked whole when the route is saved, compiled once
per schema in each process, and run against each payload in bounded time.

The validator is jsonschema-rs, not the pure-Python jsonschema: a schema's ``pattern`` runs
on its linear-time regular expressions, so matching costs time in proportion to the string.
Python's backtracking ``re`` (what jsonschema uses) took 6 s to search a 100 KB string for the
ordinary ``[a-z]+@x``, minutes at HUB_MAX_BODY_BYTES, holding the GIL while every other
thread of the process waited. Patterns that need backtracking (lookaround, backreferences)
are refused when the route is saved, with a sentence saying so.

Nothing here reaches the network: a ``$ref`` resolves within the schema (or to a draft's
own metaschema, which the validator carries); one that points anywhere else is refused
when the route is saved, never fetched.

Errors: ``problems`` lists what is wrong with a schema as sentences (``schema at
/properties/id/type: ...``); ``mismatch`` gives None or the first way a payload breaks its
route's schema, its words bounded and never quoting the payload's values (they read "the
value"); ``SchemaBroken`` is a stored schema this release can't compile (the hub's fault).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flask import current_app, has_app_context

from hub.store import storable
from hub.store.models import Route

# Levels of objects and arrays a schema may nest: a payload nested 30 deep still has room.
MAX_DEPTH = 64
# HUB_ROUTE_SCHEMA_MAX_BYTES when no app is at hand (a script validating routes).
DEFAULT_MAX_BYTES = 65536
# What a message says in place of a payload's value: never echoed, however large or secret.
MASK = "the value"
# Characters of a path, rule or message in an answer or on the refused event.
TEXT_MOST = 200
# Compiled validators kept per process, by schema (most recently used).
COMPILED_MOST = 256
DRAFTS = (
    "drafts 4, 6, 7, 2019-09 and 2020-12 (such as https://json-schema.org/draft/2020-12/schema"
    " or http://json-schema.org/draft-07/schema#)"
)
LINEAR_PATTERNS = (
    "patterns run on a linear-time engine, which has no lookaround ((?=, (?!, (?<=, (?<!) "
    "nor backreferences (\\1)"
)


def engine() -> Any:
    """jsonschema_rs, imported when a schema is first checked or compiled: loaded, it is 7 MB
    of every process's memory, and most processes (the workers, a hub whose routes have no
    schema) never see a schema."""
    import jsonschema_rs

    return jsonschema_rs


def options() -> dict[str, Any]:
    """Every format is checked (date-time, email, uri, ipv4, uuid, ...); an unknown one is
    an annotation, as the drafts say. No remote $ref is ever fetched (offline)."""
    return {
        "validate_formats": True,
        "offline": True,
        "pattern_options": engine().RegexOptions(),
    }


_REMOTE = re.compile(r"cannot fetch (\S+)")
_UNKNOWN_DRAFT = re.compile(r"^Unknown meta-schema")


class SchemaBroken(Exception):
    """A stored schema that does not compile (saved by another release, or written in SQL)."""


@dataclass(frozen=True)
class Mismatch:
    """The first way a payload breaks its route's schema: where in the payload (a JSON
    Pointer, "" for the whole), which rule (a JSON Pointer into the schema, ending in the
    keyword) and what, each at most TEXT_MOST characters."""

    path: str
    rule: str
    message: str

    @property
    def sentence(self) -> str:
        where = f"at {self.path}" if self.path else "at the top level"
        rule = f" (rule {self.rule})" if self.rule else ""
        return f"The payload does not match the route's schema {where}: {self.message}{rule}"


def max_bytes() -> int:
    """HUB_ROUTE_SCHEMA_MAX_BYTES of the app at hand, else the default."""
    if has_app_context():
        return int(current_app.config.get("ROUTE_SCHEMA_MAX_BYTES") or DEFAULT_MAX_BYTES)
    return DEFAULT_MAX_BYTES


def problems(schema: Any) -> list[str]:
    """What is wrong with ``schema`` as a route's, one sentence each (none: it may be
    saved): not an object, too deep, too large, unstorable, or not a JSON Schema the hub can
    run (its draft, a keyword's value, a pattern, a ``$ref`` that leaves it)."""
    if not isinstance(schema, dict):
        return ["schema: must be a JSON object (a JSON Schema), or null for none"]
    if storable.depth(schema, MAX_DEPTH) > MAX_DEPTH:
        return [f"schema: nests objects and arrays deeper than {MAX_DEPTH} levels"]
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return ["schema: holds a value JSON can't carry (NaN, Infinity, or a YAML date)"]
    if json.loads(text) != schema:
        return ["schema: every key must be text (YAML read one as a number or a boolean)"]
    size, most = len(text.encode("utf-8", "surrogatepass")), max_bytes()
    if size > most:
        return [
            f"schema: is {size} bytes as compact JSON, more than {most} "
            "(HUB_ROUTE_SCHEMA_MAX_BYTES)"
        ]
    if not storable.is_storable(schema):
        return ["schema: holds a character no database keeps (NUL, or a lone surrogate)"]
    try:
        engine().validator_for(schema, **options())  # its messages quote the schema
    except ValueError as exc:  # jsonschema_rs.ValidationError is one
        return [_problem(schema, exc)]
    return []


def _problem(schema: dict[str, Any], exc: ValueError) -> str:
    """The validator's refusal of ``schema`` as one sentence, cut short."""
    message = getattr(exc, "message", None) or (str(exc).splitlines() or [""])[0]
    remote = _REMOTE.search(message)
    if remote:
        sentence = (
            f"schema: $ref {remote.group(1)} points outside the schema, and the hub never "
            'fetches one: copy what it names under "$defs" and refer to it as "#/$defs/NAME"'
        )
    elif _UNKNOWN_DRAFT.search(message):
        sentence = f"schema: $schema {schema.get('$schema')!r} is not one of {DRAFTS}"
    else:
        if message.endswith('is not a "regex"'):
            message = f"{message}: {LINEAR_PATTERNS}"
        elif type(getattr(exc, "kind", None)).__name__ == "Referencing":
            message = f"a $ref does not resolve within the schema ({message})"
        where = pointer(getattr(exc, "instance_path", None) or ())
        sentence = f"schema at {where}: {message}" if where else f"schema: {message}"
    return _cut(sentence, 2 * TEXT_MOST)


def mismatch(route: Route, payload: Any) -> Mismatch | None:
    """None when ``payload`` matches ``route``'s schema, else its first mismatch.

    A payload that matches costs one pass of the compiled validator; one that doesn't, a
    second pass that stops at its first error. SchemaBroken if the stored schema does not
    compile."""
    validator = validator_of(route)
    try:
        if validator.is_valid(payload):
            return None
        validator.validate(payload)
    except engine().ValidationError as exc:
        return Mismatch(
            _cut(pointer(exc.instance_path)), _cut(pointer(exc.schema_path)), _cut(exc.message)
        )
    except ValueError:  # the validator's own limit on how deep $ref may recurse
        return Mismatch("", "", "the payload nests too deeply for the schema to be checked")
    return None


# The compiled validator of a route object, with the schema it was compiled from.
_MEMO = "_payload_validator"


def validator_of(route: Route) -> Any:
    """The compiled validator of ``route``'s schema. Kept on the route object (a route read
    from the per-process cache is shared by the threads of a process: one dictionary read
    per request) and by schema in this process (a route read again from the database, each
    HUB_ROUTE_CACHE_SECONDS, finds it there: each schema compiled once)."""
    schema = route.payload_schema
    memo = route.__dict__.get(_MEMO)
    if memo is not None and memo[0] is schema:
        return memo[1]
    validator = compiled(schema)
    route.__dict__[_MEMO] = (schema, validator)
    return validator


_COMPILED: OrderedDict[str, Any] = OrderedDict()
_COMPILED_LOCK = threading.Lock()


def compiled(schema: dict[str, Any]) -> Any:
    """``schema`` compiled for payloads (their values masked in messages), from this
    process's COMPILED_MOST most recently used; SchemaBroken if it does not compile."""
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    with _COMPILED_LOCK:
        validator = _COMPILED.get(key)
        if validator is not None:
            _COMPILED.move_to_end(key)
            return validator
    try:
        validator = engine().validator_for(schema, mask=MASK, **options())
    except ValueError as exc:
        raise SchemaBroken(_problem(schema, exc)) from None
    with _COMPILED_LOCK:
        _COMPILED[key] = validator
        while len(_COMPILED) > COMPILED_MOST:
            _COMPILED.popitem(last=False)
    return validator


def pointer(parts: Sequence[str | int]) -> str:
    """A JSON Pointer (RFC 6901) of path ``parts``: "/order/items/0"; "" for the whole."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _cut(text: str, most: int = TEXT_MOST) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"
