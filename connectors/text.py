"""Text processing: the seed's upper-case/length/word-count result, and a few operations more."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hub.connectors import Connector, InputError, StepContext, lookup_path

Operation = Literal["strip", "lower", "upper", "truncate", "extract"]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field("input", description="Dotted path of the text in the payload.")
    operations: list[Operation] = Field(
        default_factory=lambda: ["upper"], description="Applied in order to the text."
    )
    max_length: int | None = Field(None, ge=0, description="Characters kept by `truncate`.")
    pattern: str | None = Field(None, description="Regular expression used by `extract`.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @model_validator(mode="after")
    def _operations_have_arguments(self) -> TextConfig:
        if "truncate" in self.operations and self.max_length is None:
            raise ValueError("operation 'truncate' needs max_length")
        if "extract" in self.operations and self.pattern is None:
            raise ValueError("operation 'extract' needs pattern")
        return self


class TextConnector(Connector):
    name = "text"
    description = (
        "Transforms a text field: upper/lower/strip/truncate/extract, with length and words."
    )
    Config = TextConfig
    # String operations and ``re``, which holds the interpreter while it matches: a helper
    # thread would not let the caller go on any sooner.
    computes_only = True

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: TextConfig = self.config
        try:
            text = lookup_path(payload, cfg.field)
        except KeyError:
            raise InputError(f"payload has no field {cfg.field!r}") from None
        if not isinstance(text, str):
            raise InputError(f"field {cfg.field!r} is not text")
        result: dict[str, Any] = {"length": len(text), "words": len(text.split())}
        processed = text
        for op in cfg.operations:
            if op == "strip":
                processed = processed.strip()
            elif op == "lower":
                processed = processed.lower()
            elif op == "upper":
                processed = processed.upper()
            elif op == "truncate":
                processed = processed[: cfg.max_length]
            elif op == "extract":
                matches = re.findall(cfg.pattern, processed)
                result["matches"] = matches
                first = matches[0] if matches else ""
                # With several groups findall gives tuples: the first group is the extract.
                processed = first if isinstance(first, str) else first[0]
        result["processed"] = processed
        return {"processed": result.pop("processed"), **result}
