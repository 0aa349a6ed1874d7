"""The hub under real gunicorn: what `make run` serves, seen from the network."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import requests

from tests.procs import gunicorn


def test_gunicorn_serves_the_hub_end_to_end(database_url_for_test, make_key, add_route, tmp_path):
    add_route("shout", [{"connector": "text", "config": {"field": "text"}}])
    key = make_key()
    log = tmp_path / "gunicorn.log"
    with gunicorn(database_url_for_test, log) as (_, base):
        assert requests.get(base + "/ready", timeout=5).json()["status"] == "ready"
        r = requests.post(
            f"{base}/hooks/shout?api_key={key}", json={"text": "over http"}, timeout=5
        )
        assert r.status_code == 200
        assert r.json()["result"]["processed"] == "OVER HTTP"

        # Chunked, exactly the limit (the 1 MiB default) is accepted, one byte more is not.
        limit = 1024 * 1024
        for size, status in ((limit, 200), (limit + 1, 413)):
            body = json.dumps({"text": "x" * (size - 12)}).encode()
            chunks = (body[i : i + 65536] for i in range(0, len(body), 65536))
            answer = requests.post(
                f"{base}/hooks/shout",
                data=chunks,  # a generator: sent chunked, without Content-Length
                headers={"X-API-Key": key, "Content-Type": "application/json"},
                timeout=10,
            )
            assert (len(body), answer.status_code) == (size, status), answer.text[:200]

        # A chunked body (no Content-Length) over the limit is cut off at the limit.
        host = urlsplit(base)
        conn = http.client.HTTPConnection(host.hostname, host.port, timeout=10)
        conn.putrequest("POST", "/hooks/shout")
        conn.putheader("X-API-Key", key)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        chunk = b"x" * 65536
        for _ in range(20):  # 1.25 MiB against the 1 MiB default
            conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        conn.send(b"0\r\n\r\n")
        response = conn.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["code"] == "too_large"
        conn.close()
    text = log.read_text()
    assert key not in text and key.split("_", 2)[2] not in text
    assert "Traceback" not in text
