"""What a route's JSON Schema costs a payload (docs/schemas.md): the compiled validator of
hub.services.payload_schema over bodies up to HUB_MAX_BODY_BYTES (1 MiB), each case beside
what parsing the same body costs (the intake's strict JSON parse). No database and no HTTP:
the figures are the schema's own, CPU time per body.

    python -m bench.route_schema
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from hub.services import payload_schema, pipeline
from hub.store.models import Route

MIB = 1024 * 1024


def nested(depth: int, leaf: Any) -> Any:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


# Each level an anyOf whose branches both fail: the first error's report carries every
# level's (the slowest answer found).
RECURSIVE = {
    "$defs": {
        "node": {
            "anyOf": [
                {"type": "integer"},
                {
                    "type": "object",
                    "required": ["a"],
                    "properties": {"a": {"$ref": "#/$defs/node"}},
                },
            ]
        }
    },
    "$ref": "#/$defs/node",
}
ITEM = {"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}

# (what, schema, payload): each payload about 1 MiB as JSON.
CASES: list[tuple[str, dict[str, Any], Any]] = [
    (
        "pattern [a-z]+@x on a 1 MiB string, no match",
        {"properties": {"to": {"pattern": "[a-z]+@x"}}},
        {"to": "a" * (MIB - 20)},
    ),
    (
        "pattern [a-z]+@x on a 1 MiB string, a match at its end",
        {"properties": {"to": {"pattern": "[a-z]+@x"}}},
        {"to": "a" * (MIB - 20) + "@x"},
    ),
    (
        "65,000 objects, each checked, all match",
        {"items": ITEM},
        [{"id": i} for i in range(65_000)],
    ),
    (
        "65,000 objects, the last one wrong",
        {"items": ITEM},
        [{"id": i} for i in range(64_999)] + [{"id": "x"}],
    ),
    ("200,000 items, every one wrong", {"items": {"type": "integer"}}, ["x"] * 200_000),
    (
        "uniqueItems over 130,000 numbers",
        {"uniqueItems": True},
        list(range(130_000)),
    ),
    (
        "format date-time on 35,000 strings",
        {"items": {"format": "date-time"}},
        ["2026-12-07T10:00:00Z"] * 35_000,
    ),
    (
        "anyOf at each of 99 levels, a 1 MiB leaf that fails",
        RECURSIVE,
        nested(99, "z" * (MIB - 800)),
    ),
]


def cpu_ms(call: Callable[[], Any], least: float = 0.3) -> float:
    """CPU milliseconds of one ``call``, the mean over enough calls to take ``least`` s."""
    runs, spent = 0, 0.0
    while spent < least or runs < 3:
        started = time.process_time()
        call()
        spent += time.process_time() - started
        runs += 1
    return spent * 1000 / runs


def main() -> None:
    print("| payload (about 1 MiB of JSON) | parse ms | match? | schema check ms |")
    print("| --- | ---: | --- | ---: |")
    for what, schema, payload in CASES:
        body = json.dumps(payload).encode()
        assert len(body) <= MIB, (what, len(body))
        parse = cpu_ms(lambda body=body: pipeline.decode_payload(body, "application/json"))
        route = Route(name="bench", payload_schema=schema)
        payload_schema.validator_of(route)  # compiled once, as a route's first request does
        found = payload_schema.mismatch(route, payload)
        check = cpu_ms(lambda route=route, payload=payload: payload_schema.mismatch(route, payload))
        outcome = "yes" if found is None else f"no, {found.path or '/'} {found.rule}"
        print(f"| {what} | {parse:.1f} | {outcome[:60]} | {check:.1f} |")


if __name__ == "__main__":
    main()
