"""The HTTP contract in one place: operations declared with pydantic models, validated and
documented from those same models.

A view declared with ``api.route(...)`` receives its query and body already parsed into
their models (or the client gets a 422 naming each bad field) and returns a model, which is
serialised here. ``document()`` builds the OpenAPI 3.1 document from the declarations, so
the contract is never written twice; public views that predate the registry are declared
with ``api.describe(...)`` beside their response models, and a test holds every one of
them to its schema.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.json_schema import models_json_schema

from hub.services.routes import validation_problems
from hub.web.errors import error_response

OPENAPI_VERSION = "3.1.0"
_PATH_PARAM = re.compile(r"\{([a-z_]+)\}")


class ErrorOut(BaseModel):
    """Every error the hub answers: a sentence, a machine code, and field problems if any."""

    model_config = ConfigDict(extra="allow")

    error: str
    code: str
    errors: list[str] | None = None


class ApiError(Exception):
    """Raised by a view to answer ``{"error", "code"}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str, errors: list[str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.errors = status, message, code, errors


def invalid(errors: list[str], where: str | None = None, status: int = 422) -> ApiError:
    """An ApiError listing field problems as ``path: reason`` (prefixed with ``where.``)."""
    named = [f"{where}.{e}" if where else e for e in errors]
    return ApiError(status, "Invalid request: " + "; ".join(named)[:500], "invalid", named)


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI form: /admin/api/keys/{prefix}
    summary: str
    tag: str
    responses: dict[int, tuple[str, type[BaseModel] | None]]
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_schema: dict[str, Any] | None = None  # a free-form body (webhooks): any JSON
    body_optional: bool = False  # no body at all reads as ``{}``
    secured: bool = True
    description: str | None = None
    path_params: dict[str, str] = field(default_factory=dict)
    # Statuses answered as text/plain (a provider's handshake echoes its challenge).
    text_responses: frozenset[int] = frozenset()

    @property
    def operation_id(self) -> str:
        words = re.sub(r"[{}]", "", self.path).strip("/").replace("/", "_").replace("-", "_")
        return f"{self.method.lower()}_{words}"


class Api:
    """Operations of the hub by (method, path); views register here, the document reads here."""

    def __init__(self, title: str, version: str):
        self.title, self.version = title, version
        self.operations: list[Operation] = []

    def describe(self, method: str, path: str, **fields: Any) -> Operation:
        """Document an operation whose view is written elsewhere (the public endpoints)."""
        op = Operation(method=method.upper(), path=path, **fields)
        self.operations.append(op)
        return op

    def route(self, bp: Blueprint, method: str, path: str, **fields: Any) -> Callable:
        """Declare a view on ``bp``: its query and body are parsed into their models first."""
        op = self.describe(method, path, **fields)
        rule = _PATH_PARAM.sub(r"<\1>", path)
        if bp.url_prefix and rule.startswith(bp.url_prefix):
            rule = rule[len(bp.url_prefix) :] or "/"

        def register(view: Callable) -> Callable:
            @functools.wraps(view)
            def wrapper(**path_args: Any):
                try:
                    if op.query is not None:
                        path_args["query"] = parse(op.query, request.args.to_dict(), "query")
                    if op.body is not None:
                        given = json_body() if request.get_data() or not op.body_optional else {}
                        path_args["body"] = parse(op.body, given, "body")
                    return respond(view(**path_args))
                except ApiError as exc:
                    return api_error_response(exc)

            bp.add_url_rule(rule, view.__name__, wrapper, methods=[op.method])
            return view

        return register

    def document(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document, generated from the operations' models."""
        inputs = {m for op in self.operations for m in (op.body,) if m is not None}
        outputs = {ErrorOut} | {
            m for op in self.operations for _, m in op.responses.values() if m is not None
        }
        keyed = [(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs]
        refs, defs = models_json_schema(
            sorted(keyed, key=lambda km: (km[0].__name__, km[1])),
            ref_template="#/components/schemas/{model}",
        )
        paths: dict[str, dict[str, Any]] = {}
        for op in self.operations:
            paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
        return {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": self.title,
                "version": self.version,
                "description": "Every public and admin endpoint of the hub. Errors are "
                '`{"error": "sentence", "code": "machine_code"}`.',
            },
            "paths": paths,
            "components": {
                "schemas": defs.get("$defs", {}),
                "securitySchemes": {
                    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                    "Bearer": {"type": "http", "scheme": "bearer"},
                },
            },
        }


def _operation(op: Operation, refs: dict) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": [
            {
                "name": name,
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"},
                "description": text,
            }
            for name, text in op.path_params.items()
        ],
        "responses": {},
    }
    if op.description:
        out["description"] = op.description
    if op.query is not None:
        out["parameters"] += _query_parameters(op.query)
    if op.body is not None:
        schema = refs[(op.body, "validation")]
        out["requestBody"] = {
            "required": not op.body_optional,
            "content": {"application/json": {"schema": schema}},
        }
    elif op.body_schema is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": op.body_schema}},
        }
    if op.secured:
        out["security"] = [{"ApiKeyHeader": []}, {"Bearer": []}]
    statuses = dict(op.responses)
    if op.query is not None or op.body is not None:
        statuses.setdefault(422, ("A parameter or field is invalid; each one is named", None))
    if op.body is not None or op.body_schema is not None:
        statuses.setdefault(400, ("The body is not a JSON object", None))
        statuses.setdefault(415, ("The body is not JSON", None))
    if op.secured:
        statuses.setdefault(401, ("No API key, or not a valid one", None))
        statuses.setdefault(403, ("The key is not an admin key", None))
    error_ref = refs[(ErrorOut, "serialization")]
    for status in sorted(statuses):
        text, model = statuses[status]
        schema = refs[(model, "serialization")] if model is not None else error_ref
        media = {"application/json": {"schema": schema}}
        if status in op.text_responses:
            media = {"text/plain": {"schema": {"type": "string"}}}
        out["responses"][str(status)] = {"description": text, "content": media}
    return out


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """Each field of a query model as an OpenAPI parameter (optional ones lose their null)."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options
        if prop.get("default") is None:
            prop.pop("default", None)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def parse(model: type[BaseModel], data: Any, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(validation_problems(exc), where) from None


def json_body() -> Any:
    """The request's JSON body; 415 when it is not JSON, 400 when it does not parse."""
    if not request.is_json:
        raise ApiError(415, "Send the body as application/json", "unsupported_media_type")
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "The body is not valid JSON", "bad_json")
    return data


def respond(result: Any) -> Response | tuple:
    status = 200
    if isinstance(result, tuple):
        result, status = result
    if isinstance(result, BaseModel):
        # Fields by their names in the document: "schema" where pydantic's own is taken.
        return jsonify(result.model_dump(mode="json", by_alias=True)), status
    return result, status


def api_error_response(exc: ApiError):
    extra = {"errors": exc.errors} if exc.errors is not None else {}
    return error_response(exc.status, exc.message, exc.code, **extra)


api = Api("Webhook hub", "1")

# --- the page that renders the document (no CDN, no build step) ---

DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Webhook hub API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem}
details{border:1px solid #ccc;border-radius:4px;margin:.4rem 0;padding:.3rem .6rem}
summary{cursor:pointer}code,pre{font:13px ui-monospace,monospace}
pre{background:#f6f6f6;padding:.5rem;overflow:auto;max-height:24rem}
.m{display:inline-block;width:4.5rem;font-weight:bold}.t{color:#666}
</style></head><body>
<h1>Webhook hub API</h1>
<p>Generated from <a href="openapi.json">/openapi.json</a>. Admin operations need an admin key
in <code>X-API-Key</code> or <code>Authorization: Bearer</code>.</p>
<div id="ops">Loading…</div>
<script>
const ENT={"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"};
function esc(s){return String(s).replace(/[&<>"]/g,c=>ENT[c])}
fetch("openapi.json").then(r=>r.json()).then(doc=>{
  const out=[];
  for(const [path,ops] of Object.entries(doc.paths)){
    for(const [method,op] of Object.entries(ops)){
      const params=(op.parameters||[]).map(p=>`<li><code>${esc(p.name)}</code> (${p.in})`+
        ` ${esc(p.description||"")}</li>`).join("");
      const body=op.requestBody?`<p>Body:</p><pre>${esc(JSON.stringify(
        op.requestBody.content["application/json"].schema,null,1))}</pre>`:"";
      const codes=Object.entries(op.responses).map(([c,r])=>`<li><b>${c}</b> `+
        `${esc(r.description)} <code>${esc(JSON.stringify(Object.values(r.content)[0].schema))}`+
        `</code></li>`).join("");
      out.push(`<details><summary><span class="m">${method.toUpperCase()}</span>`+
        `<code>${esc(path)}</code> <span class="t">${esc(op.summary||"")}</span></summary>`+
        (params?`<ul>${params}</ul>`:"")+body+`<ul>${codes}</ul></details>`);
    }
  }
  out.push(`<h2>Schemas</h2><pre>${esc(JSON.stringify(doc.components.schemas,null,1))}</pre>`);
  document.getElementById("ops").innerHTML=out.join("");
});
</script></body></html>
"""

bp = Blueprint("openapi", __name__)


@bp.get("/openapi.json")
def openapi_json():
    document = current_app.extensions.get("hub.openapi")
    if document is None:  # built on first use: most processes never serve it
        document = current_app.extensions["hub.openapi"] = api.document()
    return jsonify(document)


@bp.get("/docs")
def docs_page():
    return Response(DOCS_PAGE, mimetype="text/html")


def init_app(app: Flask) -> None:
    """Serve the document of the operations every blueprint declared, and its page."""
    from hub.web import public_api  # noqa: F401  (declares the public endpoints)

    app.register_blueprint(bp)
