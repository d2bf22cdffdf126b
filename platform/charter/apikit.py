"""The JSON API's plumbing: declared operations, body/query parsing, OpenAPI generation.

Each endpoint is declared once with `operation(...)`; the same declaration registers the
Flask route, parses and bounds its input, and describes it in /api/v1/openapi.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any, Literal

from flask import Blueprint, Response, g, request
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema

from charter.actor import Actor
from charter.errors import (
    InvalidJsonError,
    UnauthenticatedError,
    ValidationFailedError,
    validation_failed,
)


@dataclass
class Operation:
    method: str
    rule: str  # Flask rule, e.g. /models/<model_id>
    summary: str
    tag: str
    operation_id: str
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    response: Any = None  # a BaseModel subclass, list[...] of one, or None
    status: int = 200
    public: bool = False
    errors: tuple[int, ...] = ()
    extra_responses: dict[str, Any] = field(default_factory=dict)


class ApiBlueprint(Blueprint):
    """A blueprint whose routes are declared operations (`operations`, for OpenAPI)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.operations: list[Operation] = []

    def operation(
        self,
        method: str,
        rule: str,
        *,
        summary: str,
        body: type[BaseModel] | None = None,
        query: type[BaseModel] | None = None,
        response: Any = None,
        status: int = 200,
        public: bool = False,
        errors: tuple[int, ...] = (),
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            op = Operation(
                method=method, rule=rule, summary=summary, tag=self.name,
                operation_id=fn.__name__, body=body, query=query, response=response,
                status=status, public=public, errors=errors,
            )
            self.operations.append(op)
            adapter = TypeAdapter(response) if response is not None else None

            @wraps(fn)
            def view(**path: Any) -> Response:
                kwargs: dict[str, Any] = dict(path)
                if not public:
                    kwargs["actor"] = current_actor()
                if body is not None:
                    kwargs["body"] = parse_body(body)
                if query is not None:
                    kwargs["query"] = parse_query(query)
                result = fn(**kwargs)
                if isinstance(result, Response):
                    return result
                if adapter is None:
                    return Response(status=status)
                payload = adapter.dump_json(adapter.validate_python(result, from_attributes=True))
                return Response(payload, status=status, mimetype="application/json")

            view.charter_operation = op  # type: ignore[attr-defined]
            self.add_url_rule(rule, endpoint=fn.__name__, view_func=view, methods=[method])
            return view

        return decorate


def current_actor() -> Actor:
    actor: Actor | None = getattr(g, "actor", None)
    if actor is None:
        raise UnauthenticatedError(
            "authentication required: send `Authorization: Bearer <API key>`",
            code="unauthenticated",
        )
    return actor


def parse_body(model: type[BaseModel]) -> BaseModel:
    """Parse a JSON object body strictly: every field error is reported at once."""
    raw = request.get_data(cache=True)  # bounded by MAX_CONTENT_LENGTH (413 before this)
    if request.mimetype != "application/json":
        raise InvalidJsonError(
            "send the body as JSON with `Content-Type: application/json`",
            code="unsupported_media_type", status=415,
        )
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidJsonError(f"the body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValidationFailedError(
            "the body must be a JSON object",
            details={"errors": [{"field": "body", "code": "object_type",
                                 "message": "expected an object"}]},
        )
    _refuse_unstorable([("body", parsed)])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_failed(exc, "request body") from None


def _unstorable(value: str) -> bool:
    """NUL or a lone surrogate: no text column (and no UTF-8 encoder) takes them."""
    return "\x00" in value or not value.isascii() and any(
        "\ud800" <= c <= "\udfff" for c in value)


def _refuse_unstorable(items: list[tuple[str, Any]]) -> None:
    bad: list[str] = []
    stack = list(items)
    while stack and len(bad) < 20:
        where, value = stack.pop()
        if isinstance(value, str):
            if _unstorable(value):
                bad.append(where)
        elif isinstance(value, dict):
            for k, v in value.items():
                if _unstorable(k):
                    bad.append(f"{where} (a key)")
                else:
                    stack.append((f"{where}.{k}", v))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
    if bad:
        raise ValidationFailedError(
            "text may not hold NUL characters or unpaired surrogates",
            details={"errors": [{"field": f, "code": "unstorable_text",
                                 "message": "NUL or an unpaired surrogate"} for f in sorted(bad)]})


def parse_query(model: type[BaseModel]) -> BaseModel:
    unknown = sorted(set(request.args) - set(model.model_fields))
    data: dict[str, Any] = {}
    for key in model.model_fields:
        values = request.args.getlist(key)
        if len(values) > 1:
            unknown.append(key)
        elif values:
            data[key] = values[0]
    _refuse_unstorable(list(data.items()))
    if unknown:
        raise ValidationFailedError(
            "unknown or repeated query parameters",
            details={"errors": [{"field": k, "code": "extra_forbidden",
                                 "message": "unknown or repeated parameter"} for k in unknown]},
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_failed(exc, "request query") from None


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details", "request_id"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {"type": "object"},
                "request_id": {"type": ["string", "null"]},
            },
        }
    },
}
_STATUS_TEXT = {
    400: "Malformed request", 401: "Not authenticated", 403: "Forbidden", 404: "Not found",
    409: "Conflict", 413: "Body too large", 415: "Unsupported media type",
    422: "Validation failed", 503: "Unavailable",
}


def openapi_document(blueprints: Iterable[ApiBlueprint], title: str,
                     version: str) -> dict[str, Any]:
    """OpenAPI 3.1 for every operation the blueprints declare, schemas from the pydantic
    models."""
    operations = [(bp.url_prefix or "", op) for bp in blueprints for op in bp.operations]
    inputs = {id(m) for _, op in operations for m in (op.body, op.query) if m is not None}

    def is_input(model: type[BaseModel]) -> bool:
        return id(model) in inputs

    models: set[type[BaseModel]] = set()
    for _, op in operations:
        for m in (op.body, op.query, _inner(op.response)):
            if m is not None:
                models.add(m)
    ordered = sorted(models, key=lambda m: m.__name__)
    key_map, defs = models_json_schema(
        [(m, "validation" if is_input(m) else "serialization") for m in ordered],
        ref_template="#/components/schemas/{model}",
    )
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA

    def ref(m: type[BaseModel]) -> dict[str, Any]:
        mode: Literal["validation", "serialization"] = (
            "validation" if is_input(m) else "serialization")
        return key_map[(m, mode)]

    paths: dict[str, dict[str, Any]] = {}
    for prefix, op in operations:
        path, params = _openapi_path(prefix + op.rule)
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "parameters": params,
            "responses": {},
        }
        if op.query is not None:
            qschema = op.query.model_json_schema()
            for name, prop in qschema.get("properties", {}).items():
                entry["parameters"].append({
                    "name": name, "in": "query",
                    "required": name in qschema.get("required", []),
                    "schema": prop,
                })
        if op.body is not None:
            entry["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.body)}},
            }
        ok: dict[str, Any] = {"description": "Success"}
        inner = _inner(op.response)
        if inner is not None:
            schema = ref(inner)
            if op.response is not inner:
                schema = {"type": "array", "items": schema}
            ok["content"] = {"application/json": {"schema": schema}}
        entry["responses"][str(op.status)] = ok
        codes = set(op.errors)
        if not op.public:
            codes |= {401}
        if op.body is not None:
            codes |= {400, 413, 415, 422}
        if op.query is not None:
            codes |= {422}
        if "<" in op.rule:
            codes |= {404}
        for code in sorted(codes):
            entry["responses"][str(code)] = {
                "description": _STATUS_TEXT.get(code, "Error"),
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        if not op.public:
            entry["security"] = [{"apiKey": []}]
        paths.setdefault(path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "An API key: chk_<id>_<secret>"}},
        },
    }


def _inner(response: Any) -> type[BaseModel] | None:
    if response is None:
        return None
    args = getattr(response, "__args__", None)
    found: type[BaseModel] = args[0] if args else response
    return found


def _openapi_path(rule: str) -> tuple[str, list[dict[str, Any]]]:
    params = []
    out = []
    for part in rule.split("/"):
        if part.startswith("<") and part.endswith(">"):
            name = part[1:-1].split(":")[-1]
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string"}})
            out.append("{" + name + "}")
        else:
            out.append(part)
    return "/".join(out), params
