"""OpenAI chat completion: one message to any OpenAI-compatible Chat Completions endpoint.

``base_url`` points it at OpenAI, Azure OpenAI, a local vLLM or Ollama (``.../v1``). The key
is read from the environment variable the config names, when the step runs; the config
never holds the key itself.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub import http
from hub.connectors import (
    BadResponseError,
    Connector,
    ConnectorError,
    InputError,
    StepContext,
    require_env,
)

UPSTREAM_MESSAGE_LIMIT = 300  # characters of the provider's error message kept


class OpenAIChatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("gpt-4o-mini", min_length=1, description="Chat model name.")
    base_url: str = Field(
        "https://api.openai.com/v1", description="API root; any compatible server."
    )
    system_prompt: str | None = Field(None, description="Optional system message.")
    user_message: str | None = Field(
        None,
        description="User message, a template such as 'Summarise: {{ payload.text }}'; "
        "default: the input's 'message' field.",
    )
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    timeout: float = Field(
        30.0,
        gt=0,
        le=600,
        description="Seconds the whole request may take: connect, headers and body.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable that holds the API key.",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


class OpenAIChatConnector(Connector):
    name = "openai"
    description = "Sends a message to an OpenAI-compatible chat model and returns its answer."
    Config = OpenAIChatConfig

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: OpenAIChatConfig = self.config
        api_key = require_env(cfg.api_key_env, "API key not configured")
        messages = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": user_message(cfg, payload)})
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
        }
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        try:
            response = http.request(
                ctx,
                "POST",
                cfg.base_url + "/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {api_key}"},
                timeout=cfg.timeout,
            )
        except ConnectorError as exc:
            exc.message = _provider_message(exc, ctx)
            raise
        return parse_completion(response, cfg.model)


def user_message(cfg: OpenAIChatConfig, payload: Any) -> str:
    """The configured (already rendered) message, else the input's ``message`` field.

    The default is not a template because the hub renders only the templates a route's
    config holds, not a Config's defaults.
    """
    if cfg.user_message is not None:
        return cfg.user_message
    message = payload.get("message") if isinstance(payload, dict) else payload
    if not isinstance(message, str) or not message:
        raise InputError(
            "the input has no 'message' text; set user_message to a template such as "
            "'{{ payload.text }}'"
        )
    return message


def parse_completion(response: Any, default_model: str) -> dict[str, Any]:
    """The answer of a Chat Completions response; BadResponseError for any other shape.

    ``usage`` is optional (some compatible servers leave it out): ``tokens_used`` is then None.
    """
    try:
        data = response.json()
        choice = data["choices"][0]
        content = choice["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("content is not text")
        usage = data.get("usage") or {}
        tokens = usage.get("total_tokens")
        if tokens is None and "prompt_tokens" in usage:
            tokens = usage["prompt_tokens"] + usage.get("completion_tokens", 0)
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
            raise TypeError("total_tokens is not a number")
        return {
            "assistant_message": content,
            "model": data.get("model") or default_model,
            "finish_reason": choice.get("finish_reason"),
            "tokens_used": tokens,
        }
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise BadResponseError("Unexpected API response format") from None


def _provider_message(exc: ConnectorError, ctx: StepContext) -> str:
    """``OpenAI API error 429: Rate limit reached ...`` from the provider's error JSON, or
    hub.http's own sentence when the answer had none (timeouts, refused connections)."""
    if exc.status is None or not isinstance(ctx.exchange.response, str):
        return exc.message
    try:
        detail = json.loads(ctx.exchange.response)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return exc.message
    if not isinstance(detail, str) or not detail.strip():
        return exc.message
    detail = " ".join(detail.split())[:UPSTREAM_MESSAGE_LIMIT]
    return f"OpenAI API error {exc.status}: {detail}"
