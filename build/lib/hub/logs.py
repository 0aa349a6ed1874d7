"""Log lines: one record is one line, whatever a sender puts in a URL or a header.

A route name or path comes from the network; a CR/LF in it (``/hooks/x%0D%0Afake``) would
otherwise start a forged line of its own. The hub's handler and gunicorn's (see
gunicorn.conf.py) both format through ``EscapingFormatter``.
"""

from __future__ import annotations

import logging
import re

from flask import Flask

# C0 controls, DEL, C1 controls and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape_controls(text: str) -> str:
    r"""``text`` with every control character written as an escape (``\r``, ``\x00``)."""
    return _CONTROLS.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


class EscapingFormatter(logging.Formatter):
    """A Formatter whose line can't be split or forged by the values it carries.

    A traceback the hub chose to log keeps its lines, each indented under its record, so
    no line of it can pass for a record of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return escape_controls(super().formatMessage(record))

    def formatException(self, ei) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    | " + escape_controls(line) for line in text.splitlines())


def init_app(app: Flask) -> None:
    """The ``hub`` logger writes to stderr once per process (tests keep pytest's capture)."""
    logger = logging.getLogger("hub")
    if not logger.handlers and not app.testing:
        handler = logging.StreamHandler()
        handler.setFormatter(EscapingFormatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
