"""The grammar of rates: ``100/minute`` (also ``/second``, ``/hour``, ``/s``, ``/m``, ``/h``),
read into a ``Rate`` and written in one canonical spelling.

The settings (HUB_*_RATE_LIMIT) and the rate limiter (``hub.services.ratelimit``) read rates
with it; it imports nothing of the hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

PERIODS = {"second": 1, "minute": 60, "hour": 3600}
_UNITS = {"s": "second", "sec": "second", "m": "minute", "min": "minute", "h": "hour"}
_UNITS.update({u: u for u in PERIODS})
_RATE_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class Rate:
    limit: int
    period: int  # seconds

    def __str__(self) -> str:
        unit = next(u for u, s in PERIODS.items() if s == self.period)
        return f"{self.limit}/{unit}"


@lru_cache(maxsize=1024)
def parse(text: str) -> Rate:
    """``100/minute`` (also ``/second``, ``/hour``, ``/s``, ``/m``, ``/h``) as a Rate."""
    match = _RATE_RE.match((text or "").lower())
    unit = _UNITS.get(match.group(2)) if match else None
    if not match or unit is None:
        raise ValueError(f"not a rate: {text!r} (use a number per second, minute or hour)")
    limit = int(match.group(1))
    if limit < 1:
        raise ValueError(f"not a rate: {text!r} (the number must be at least 1)")
    return Rate(limit, PERIODS[unit])


def normalise(text: str) -> str:
    """The canonical spelling of a rate, so ``100/min`` and ``100/minute`` compare equal."""
    return str(parse(text))
