"""pytest fixtures for testing connectors, installed with the hub.

pytest finds this module through the hub's ``pytest11`` entry point, so a connector's own
package gets these fixtures as soon as the hub is installed beside it
(``-p no:hub.pytest_plugin`` turns them off). The hub's own tests use the same ones.

- ``receiver``: a recording HTTP receiver on 127.0.0.1 (``hub.testing_servers.Receiver``).
  ``receiver.url`` is its address; ``receiver.requests`` what reached it (method, path,
  headers, body, ``.json()``); ``receiver.script(Reply(503), ...)`` scripts the next answers.
- ``fake_openai``: an OpenAI-compatible chat completions API on 127.0.0.1
  (``hub.testing_servers.FakeOpenAI``) that answers ``"echo: <last user message>"``, with
  ``OPENAI_API_KEY`` set to the key it accepts; ``fake_openai.base_url`` goes in a config.

The plugin only declares fixtures: nothing runs unless a test asks for one, and loading it
imports nothing but pytest (each fixture imports its server when it is used).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hub.testing_servers import FakeOpenAI, Receiver

FAKE_OPENAI_KEY = "sk-test-key"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A recording webhook receiver on 127.0.0.1 that answers 200 ``{"ok": true}``."""
    from hub.testing_servers import Receiver

    with Receiver() as server:
        yield server


@pytest.fixture
def fake_openai(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeOpenAI]:
    """A fake OpenAI chat completions API on 127.0.0.1, with OPENAI_API_KEY set for it."""
    from hub.testing_servers import FakeOpenAI

    with FakeOpenAI(api_key=FAKE_OPENAI_KEY) as server:
        monkeypatch.setenv("OPENAI_API_KEY", FAKE_OPENAI_KEY)
        yield server
