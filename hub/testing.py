"""Contract checks a connector author runs on their own connector (in plain pytest).

    from hub.testing import check_connector

    def test_contract():
        output = check_connector(MyConnector, {"text": "hi"}, config={"greeting": "Hello"})
        assert output == {"message": "Hello, hi"}

``check_connector`` checks what the hub relies on (a registrable name, a description, a
pydantic Config whose JSON Schema renders, output that can be stored as JSON, failures
raised as RetryableError or PermanentError) and runs the connector once the way a route
does: templates in the config rendered against the payload first. It raises AssertionError
naming what is wrong, or re-raises the connector's own RetryableError / PermanentError so
a test can ``pytest.raises`` it.

A connector that calls HTTP is tested against real servers on 127.0.0.1: the ``receiver``
and ``fake_openai`` fixtures, which the hub's pytest plugin (``hub.pytest_plugin``) gives
any package installed beside the hub; ``hub.testing_servers`` holds the servers themselves
and ``Reply``, to script their answers.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from pydantic import BaseModel

from hub.connectors import Connector, ConnectorError, Registry, StepConfigError, StepContext
from hub.services.pipeline import template_context
from hub.services.templating import TemplateProblem, check_config, render_config
from hub.store.models import Event

__all__ = ["check_class", "check_connector", "make_context"]


def make_context(
    payload: Any = None,
    *,
    outputs: list[Any] | None = None,
    route: str = "test",
    step_index: int = 0,
    deadline: float | None = None,
) -> StepContext:
    """A StepContext like the one a route gives a step, for calling ``run`` directly."""
    return StepContext(
        event_id="evt_test",
        route=route,
        step_index=step_index,
        payload=payload,
        outputs=list(outputs or []),
        logger=logging.getLogger("hub.connector.test"),
        deadline=deadline,
    )


def check_class(cls: type[Connector]) -> None:
    """The static half of the contract: everything ``load_connectors`` and the admin need."""
    assert isinstance(cls, type) and issubclass(cls, Connector), (
        f"{cls!r} must subclass hub.connectors.Connector"
    )
    assert cls.description and cls.description.strip(), f"{cls.__name__} needs a description"
    assert "\n" not in cls.description.strip(), f"{cls.__name__}.description must be one line"
    assert isinstance(cls.Config, type) and issubclass(cls.Config, BaseModel), (
        f"{cls.__name__}.Config must be a pydantic BaseModel"
    )
    try:
        Registry().register(cls)
    except (TypeError, ValueError) as exc:
        raise AssertionError(str(exc)) from None
    try:
        schema = cls.Config.model_json_schema()
        json.dumps(schema)
    except Exception as exc:  # any failure here breaks `connectors list` and the admin API
        raise AssertionError(
            f"{cls.__name__}.Config has no JSON schema: {type(exc).__name__}: {exc}"
        ) from None
    assert schema.get("type") == "object", f"{cls.__name__}.Config schema is not an object"


def check_connector(
    cls: type[Connector],
    sample_payload: Any,
    config: dict[str, Any] | None = None,
    *,
    outputs: list[Any] | None = None,
) -> Any:
    """Check ``cls`` against the contract and run it once on ``sample_payload``.

    ``config`` is validated as when a route is saved (templates may be used, as in a route).
    ``outputs`` stands in for earlier steps' outputs (``steps`` in templates). Returns the
    output, after checking that it is JSON-serialisable.
    """
    check_class(cls)
    outputs = list(outputs or [])
    registry = Registry()
    registry.register(cls)
    raw = dict(config or {})
    context = template_context(
        Event(id="evt_test", route="test", headers={}), sample_payload, outputs
    )
    try:
        check_config(raw)
        registry.validate_unrendered(cls.name, raw)  # as when a route is saved
        connector = registry.build(cls.name, render_config(raw, context))
    except (TemplateProblem, StepConfigError) as exc:
        raise AssertionError(f"config refused: {exc}") from None
    current = outputs[-1] if outputs else sample_payload
    ctx = make_context(sample_payload, outputs=outputs, step_index=len(outputs))
    try:
        output = connector.run(current, ctx)
    except ConnectorError:
        raise
    except Exception as exc:
        raise AssertionError(
            f"{cls.__name__}.run raised {type(exc).__name__}: {exc}; a connector signals "
            "failure with RetryableError or PermanentError (anything else is treated as a bug)"
        ) from exc
    try:
        json.dumps(output)
    except (TypeError, ValueError) as exc:
        raise AssertionError(
            f"{cls.__name__}.run returned output that is not JSON-serialisable: {exc}"
        ) from None
    return output
