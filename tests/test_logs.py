"""Log lines: a URL or header can't split a record into lines of its own (a forged line)."""

from __future__ import annotations

import logging
import socket
import sys
from urllib.parse import urlsplit

import pytest

from hub.logs import EscapingFormatter, escape_controls
from tests.procs import gunicorn


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("plain route", "plain route"),
        ("x\r\nfake-line", "x\\r\\nfake-line"),
        ("nul\x00here", "nul\\x00here"),
        ("tab\tand\x1b[31mansi", "tab\\tand\\x1b[31mansi"),
        ("del\x7f c1\x85 ls\u2028", "del\\x7f c1\\x85 ls\\x2028"),
        ("ünïcode stays", "ünïcode stays"),
    ],
)
def test_control_characters_are_escaped(raw, escaped):
    assert escape_controls(raw) == escaped


def test_a_record_is_one_line_and_a_traceback_stays_under_it():
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("hub.t", logging.INFO, "", 0, "route %s", ("a\nFAKE",), None)
    assert formatter.format(record) == "INFO route a\\nFAKE"
    try:
        raise ValueError("boom\nFAKE record")
    except ValueError:
        record = logging.LogRecord("hub.t", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    lines = formatter.format(record).splitlines()
    assert lines[0] == "ERROR failed"
    assert all(line.startswith("    | ") for line in lines[1:])
    assert lines[-2:] == ["    | ValueError: boom", "    | FAKE record"]


def raw_request(base: str, request: bytes) -> bytes:
    url = urlsplit(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.slow
@pytest.mark.parametrize("database_url_for_test", ["sqlite"], indirect=True)
def test_gunicorn_and_hub_log_lines_escape_what_the_url_carries(database_url_for_test, tmp_path):
    log_path = tmp_path / "gunicorn.log"
    with gunicorn(database_url_for_test, log_path, workers=1) as (_, base):
        answer = raw_request(
            base,
            b"POST /hooks/x%0D%0Afake-line%00end HTTP/1.1\r\nHost: hub\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        assert answer.startswith(b"HTTP/1.1 404")  # refused, and logged by the hub

        # gunicorn's own limits: what a webhook needs and no more.
        long_line = b"GET /hooks/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: hub\r\n\r\n"
        assert raw_request(base, long_line).startswith(b"HTTP/1.1 414")
        many = b"".join(b"X-Field-%d: v\r\n" % i for i in range(70))
        assert raw_request(base, b"GET /health HTTP/1.1\r\n" + many + b"\r\n").startswith(
            b"HTTP/1.1 431"
        )
        big = b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"
        assert raw_request(base, big).startswith(b"HTTP/1.1 431")
    text = log_path.read_text()
    forged = [line for line in text.splitlines() if line.startswith("fake-line")]
    assert not forged, text[-2000:]
    assert "\x00" not in text and "\r" not in text
    escaped = "x\\r\\nfake-line\\x00end"
    hub_lines = [line for line in text.splitlines() if "hub.ingest" in line and escaped in line]
    access_lines = [line for line in text.splitlines() if f"POST /hooks/{escaped}" in line]
    assert hub_lines and access_lines, text[-2000:]
