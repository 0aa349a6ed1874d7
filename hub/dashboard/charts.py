"""The overview's small charts: stacked bars laid out and drawn here as inline SVG (classes
for colours, no style attributes, so the page needs no inline style).

The markup is built here rather than in a template because a page may hold thousands of
bars, and every value in it is a number or one of the SERIES names: nothing to escape.
"""

from __future__ import annotations

from dataclasses import dataclass

from markupsafe import Markup, escape

from hub.store.models import EventStatus

# What the chart stacks, bottom up, and the event statuses each series counts.
SERIES = (
    ("delivered", (EventStatus.DELIVERED,)),
    ("failed", (EventStatus.FAILED,)),
    ("dead", (EventStatus.DEAD,)),
    ("refused", (EventStatus.REJECTED,)),
)
WIDTH, HEIGHT = 240, 60


@dataclass(frozen=True)
class Bar:
    series: str
    x: float
    y: float
    width: float
    height: float
    count: int
    slot: int


@dataclass(frozen=True)
class Chart:
    bars: list[Bar]
    peak: int
    totals: dict[str, int]
    buckets: int

    @property
    def label(self) -> str:
        shown = ", ".join(f"{n} {name}" for name, n in self.totals.items())
        return f"Last hour in {self.buckets} slices: {shown}"

    def svg(self) -> Markup:
        minutes = 60 / self.buckets
        rects = "".join(
            f'<rect x="{b.x}" y="{b.y}" width="{b.width}" height="{b.height}" '
            f'class="bar bar-{b.series}"><title>{b.count} {b.series}, '
            f"{60 - b.slot * minutes:g}–{60 - (b.slot + 1) * minutes:g} min ago</title></rect>"
            for b in self.bars
        )
        return Markup(
            f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
            f'role="img" aria-label="{escape(self.label)}" class="bars">'
            f'<line x1="0" y1="{HEIGHT - 0.5}" x2="{WIDTH}" y2="{HEIGHT - 0.5}" class="axis"/>'
            f"{rects}</svg>"
        )


def stacked(by_status: dict[str, list[int]], buckets: int) -> Chart:
    """Bars for one route: per slice, each series stacked on the one before it."""
    series = {
        name: [sum(by_status.get(s, [0] * buckets)[i] for s in statuses) for i in range(buckets)]
        for name, statuses in SERIES
    }
    peak = max([sum(series[name][i] for name in series) for i in range(buckets)] + [0])
    slot = WIDTH / buckets
    bars = []
    for i in range(buckets):
        base = HEIGHT
        for name, _ in SERIES:
            count = series[name][i]
            if not count:
                continue
            height = max(1.0, HEIGHT * count / peak)
            base -= height
            bars.append(
                Bar(
                    name,
                    round(i * slot + 1, 1),
                    round(base, 1),
                    round(slot - 2, 1),
                    round(height, 1),
                    count,
                    i,
                )
            )
    totals = {name: sum(values) for name, values in series.items()}
    return Chart(bars, peak, totals, buckets)
