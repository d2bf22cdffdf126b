"""values.yaml and values.schema.json describe each other; the README is generated from them."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.helm.conftest import CHART, ROOT, load_script

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
readme = load_script(ROOT / "scripts" / "helm-readme")


def walk(node: dict[str, Any], path: str = ""):  # type: ignore[no-untyped-def]
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{key}" if path else key)


def test_every_schema_key_is_typed_and_described() -> None:
    for path, node in walk(SCHEMA):
        if not path:
            continue
        assert node.get("type") or node.get("enum"), path
        assert len(node.get("description", "")) >= 8, path
        if node.get("properties"):
            assert node.get("additionalProperties") is False, path
    assert SCHEMA["additionalProperties"] is False


def test_values_and_schema_have_the_same_keys() -> None:
    def keys(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> None:
        props = schema.get("properties", {})
        if not props:
            return
        assert set(values) == set(props), prefix or "(top)"
        for key, value in values.items():
            if isinstance(value, dict):
                keys(value, props[key], f"{prefix}{key}.")
    keys(VALUES, SCHEMA)


def test_readme_is_generated() -> None:
    assert (CHART / "README.md").read_text() == readme.render(), (
        "helm/charter/README.md is stale: run scripts/helm-readme")
    assert "| `networkPolicy.egress.database.cidrs` |" in readme.render()
