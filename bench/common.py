"""What the benchmarks share: a fresh PostgreSQL database, a process's memory, and the
section of bench/RESULTS.md each one writes."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import create_engine, make_url, text

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def fresh_postgres(url: str) -> str:
    """Drop and create the database ``url`` names; the URL, password kept."""
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()
    return parsed.render_as_string(hide_password=False)


def rss_kb(pid: int) -> int | None:
    """Resident memory of a process in KiB, or None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    """Direct children of a process (gunicorn's workers of its master)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def write_section(report: str) -> None:
    """Replace the report's own ``## `` section of RESULTS.md; other sections stay."""
    heading = report.splitlines()[0]
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: report.rstrip() + "\n\n", old)
    else:
        new = old.rstrip() + "\n\n" + report.rstrip() + "\n"
    RESULTS.write_text(new.rstrip() + "\n")
