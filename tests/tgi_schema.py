"""Validate answers against the schemas of TGI's own OpenAPI document (tests/fixtures)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

SPEC = Path(__file__).resolve().parent / "fixtures" / "tgi-openapi.json"


def _json_schema(node: Any, *, names: bool = False) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: `nullable: true` becomes an explicit null type."""
    if isinstance(node, list):
        return [_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    if names:  # a `properties` map: its keys are field names, not keywords
        return {k: _json_schema(v) for k, v in node.items()}
    out = {k: _json_schema(v, names=k == "properties") for k, v in node.items()
           if k not in ("nullable", "example", "discriminator")}
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        else:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


def tgi_validator() -> Callable[[str, Any], None]:
    """check(schema_name, instance) raises jsonschema.ValidationError on a mismatch."""
    components = _json_schema(json.loads(SPEC.read_text())["components"])

    def check(name: str, instance: Any) -> None:
        root = {"$ref": f"#/components/schemas/{name}", "components": components}
        jsonschema.Draft202012Validator(root).validate(instance)

    return check
