"""What the benchmarks share: a fresh PostgreSQL database, a process's memory and CPU time,
and the section of bench/RESULTS.md each one writes."""

from __future__ import annotations

import os
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
    """Direct children of a process (gunicorn's workers of its master, and its writer
    process, which the master's watching thread starts again after a crash)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


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


TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds a process has used (all its threads, living and ended),
    from /proc/<pid>/stat; 0.0 once it has gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name is in parentheses and may hold spaces: the fields follow its ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def postgres_backends(url: str) -> list[int]:
    """The pids of the PostgreSQL backends connected to ``url``'s database, but this one."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.scalars(
                    text(
                        "SELECT pid FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
            )
    finally:
        engine.dispose()


class CpuMeter:
    """CPU seconds a server used over a load: gunicorn's master and its workers, and the
    PostgreSQL backends of its database when ``database_url`` is PostgreSQL's (read from
    /proc, so PostgreSQL must run on this machine). ``start()`` before the load, ``stop()``
    after: ``web_s`` and ``db_s`` are what each side used in between. With no ``master``,
    the database side alone."""

    def __init__(self, master: int | None, database_url: str | None = None):
        self.master = master
        self.database_url = (
            database_url if database_url and database_url.startswith("postgresql") else None
        )
        self.web_s = 0.0
        self.db_s: float | None = None

    def _web(self) -> dict[int, float]:
        if self.master is None:
            return {}
        return {pid: cpu_s(pid) for pid in [self.master, *children(self.master)]}

    def _db(self) -> dict[int, float]:
        if self.database_url is None:
            return {}
        return {pid: cpu_s(pid) for pid in postgres_backends(self.database_url)}

    def start(self) -> None:
        self._web_before, self._db_before = self._web(), self._db()

    def stop(self) -> None:
        web, db = self._web(), self._db()
        # A process that started during the load counts from zero; one that ended is lost
        # (gunicorn keeps its workers and the pool its connections through a run).
        self.web_s = sum(used - self._web_before.get(pid, 0.0) for pid, used in web.items())
        if self.database_url is not None:
            self.db_s = sum(used - self._db_before.get(pid, 0.0) for pid, used in db.items())
