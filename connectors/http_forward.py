"""HTTP forward: send the step's input (or a templated body) to a URL, optionally signed.

The receiver can verify a signed request with any Standard Webhooks library: the hub sends
``webhook-id`` (the same on every retry of one event's step, so the receiver can drop
duplicates), ``webhook-timestamp`` and ``webhook-signature: v1,<base64 HMAC-SHA256>``.
The signing secret never sits in the route config: the config names the environment
variable that holds it. A credential header may be given either way: by value in
``headers`` (encrypted at rest, shown masked) or by variable in ``headers_from_env``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hub import http
from hub.connectors import Connector, CredentialHeaders, StepContext, require_env

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
#: Headers the connector sets itself; a config may not override them.
RESERVED_HEADERS = {
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-length",
    "host",
}
OUTPUT_TEXT_LIMIT = 2000  # characters of a non-JSON answer kept in the output
OUTPUT_JSON_LIMIT = 65536  # bytes of a JSON answer parsed into the output; larger is text


class HttpForwardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Not a template: the route, not the sender, decides where the hub connects (and so
    # where credentials and signatures go).
    url: str = Field(
        description="Where to send it: an http(s) URL, fixed per route.",
        json_schema_extra={"template": False},
    )
    method: Literal["POST", "PUT", "PATCH", "DELETE", "GET"] = Field(
        "POST", description="HTTP method; GET sends no body."
    )
    # Credential-named headers (Authorization, X-Api-Key ...) are secret: encrypted at rest,
    # masked when shown, cut from attempt copies.
    headers: CredentialHeaders = Field(
        default_factory=dict,
        description="Extra headers; values may be templates. Credential-named ones are secret.",
    )
    headers_from_env: dict[str, str] = Field(
        default_factory=dict,
        description="Header name -> environment variable holding its value (for credentials).",
    )
    body: str | None = Field(None, description="Body template; default: the step's input as JSON.")
    content_type: str = Field("application/json", description="Content-Type of the body.")
    timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds the whole request may take: connect, headers and body.",
    )
    sign_secret_env: str | None = Field(
        None,
        pattern=ENV_NAME,
        description="Environment variable holding a whsec_ secret; signs with Standard Webhooks.",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if not http.allow_private_targets() and _is_local_literal(parts.hostname):
            raise ValueError(
                "points to a loopback, private or link-local address "
                "(allowed only with HUB_ALLOW_PRIVATE_TARGETS=true)"
            )
        return value

    @field_validator("headers", "headers_from_env")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the connector itself")
        return value

    @field_validator("headers_from_env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name, env in value.items():
            if not re.match(ENV_NAME, env):
                raise ValueError(f"{name}: {env!r} is not an environment variable name")
        return value


def _is_local_literal(host: str) -> bool:
    """Refuse obvious local targets when the route is saved; hub.http checks every resolved
    address (and the connected socket) again on each call."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return http.is_forbidden_address(host)


class HttpForwardConnector(Connector):
    name = "http"
    description = "Sends the step's input (or a templated body) to a URL, optionally signed."
    Config = HttpForwardConfig

    def run(self, payload: Any, ctx: StepContext) -> dict[str, Any]:
        cfg: HttpForwardConfig = self.config
        headers = dict(cfg.headers)
        for header, env in cfg.headers_from_env.items():
            headers[header] = require_env(
                env, f"header {header}: environment variable {env} is not set"
            )
        if ctx.request_id and not any(h.lower() == "x-request-id" for h in headers):
            # The receiver's logs can name the request that started it all (a route's own
            # X-Request-ID header wins).
            headers["X-Request-ID"] = ctx.request_id
        body = b""
        if cfg.method != "GET":
            if cfg.body is not None:
                body = cfg.body.encode("utf-8")
            else:
                body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
            headers.setdefault("Content-Type", cfg.content_type)
        if cfg.sign_secret_env:
            secret = require_env(
                cfg.sign_secret_env,
                f"signing secret: environment variable {cfg.sign_secret_env} is not set",
            )
            msg_id = f"{ctx.event_id}_{ctx.step_index}"  # stable across retries: dedup key
            headers.update(
                http.standard_webhook_headers(
                    body, secret, msg_id=msg_id, timestamp=int(time.time())
                )
            )
        response = http.request(
            ctx,
            cfg.method,
            cfg.url,
            data=body if cfg.method != "GET" else None,
            headers=headers,
            timeout=cfg.timeout,
            secret_headers=cfg.headers_from_env,
        )
        return {"status": response.status_code, "body": _answer(response)}


def _answer(response: Any) -> Any:
    """The receiver's answer: parsed JSON when it is JSON, else text (truncated)."""
    if not response.content:
        return None
    content_type = response.headers.get("Content-Type", "").lower()
    if "json" in content_type and len(response.content) <= OUTPUT_JSON_LIMIT:
        try:
            return response.json()
        except ValueError:
            pass
    text = response.content[: OUTPUT_TEXT_LIMIT * 4].decode(response.encoding or "utf-8", "replace")
    if len(text) > OUTPUT_TEXT_LIMIT or len(response.content) > OUTPUT_TEXT_LIMIT * 4:
        return text[:OUTPUT_TEXT_LIMIT] + "..."
    return text
