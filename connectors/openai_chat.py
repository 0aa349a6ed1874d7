"""OpenAI chat completion: one message to any OpenAI-compatible Chat Completions endpoint."""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hub import http
from hub.connectors import BadResponseError, Connector, NotConfiguredError, StepContext


class OpenAIChatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("gpt-4o-mini", description="Chat model name.")
    base_url: str = Field(
        "https://api.openai.com/v1", description="API root; any compatible server."
    )
    system_prompt: str | None = Field(None, description="Optional system message.")
    user_message: str = Field(
        "{{ payload.message }}", description="User message; a Jinja template over the payload."
    )
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    timeout: float = Field(30.0, gt=0, le=600, description="Seconds per request.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable that holds the API key."
    )


class OpenAIChatConnector(Connector):
    name = "openai"
    description = "Sends a message to an OpenAI-compatible chat model and returns its answer."
    Config = OpenAIChatConfig

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: OpenAIChatConfig = self.config
        api_key = os.environ.get(cfg.api_key_env)
        if not api_key:
            raise NotConfiguredError("API key not configured")
        messages = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": cfg.user_message})
        body: dict[str, Any] = {
            "model": cfg.model,
            "messages": messages,
            "temperature": cfg.temperature,
        }
        if cfg.max_tokens is not None:
            body["max_tokens"] = cfg.max_tokens
        response = http.request(
            ctx,
            "POST",
            cfg.base_url.rstrip("/") + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=cfg.timeout,
        )
        try:
            data = response.json()
            choice = data["choices"][0]
            return {
                "assistant_message": choice["message"]["content"],
                "model": data.get("model", cfg.model),
                "finish_reason": choice.get("finish_reason"),
                "tokens_used": data["usage"]["total_tokens"],
            }
        except (ValueError, KeyError, IndexError, TypeError):
            raise BadResponseError("Unexpected API response format") from None
