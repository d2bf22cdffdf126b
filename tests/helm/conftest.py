"""Render the chart offline with helm-python-sdk (Helm's Go SDK through its C ABI)."""

from __future__ import annotations

import copy
import importlib.util
import types
from collections.abc import Callable, Iterator
from importlib.machinery import SourceFileLoader
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "charter"
VALUE_SETS = sorted(p.stem.removesuffix("-values") for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "charter"
NAMESPACE = "charter"


def load_script(path: Path) -> types.ModuleType:
    """Import one of scripts/ (they have no .py suffix)."""
    loader = SourceFileLoader(path.name.replace("-", "_"), str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def value_set(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text(encoding="utf-8"))


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


class Rendered:
    """The manifests of one render: text by template, and the parsed objects."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.text = {k: v for k, v in manifests.items() if k.endswith(".yaml") and v.strip()}
        self.notes = manifests.get(f"{CHART.name}/templates/NOTES.txt", "")
        self.objects = [doc for text in self.text.values() for doc in yaml.safe_load_all(text)
                        if doc]

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, suffix: str = "") -> dict[str, Any]:
        found = [o for o in self.kind(kind) if o["metadata"]["name"].endswith(suffix)]
        assert len(found) == 1, f"{kind} *{suffix}: {[o['metadata']['name'] for o in found]}"
        return found[0]

    def pod_specs(self) -> list[tuple[str, dict[str, Any]]]:
        return [(f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"])
                for o in self.objects if o["kind"] in ("Deployment", "Job")]


@pytest.fixture(scope="session")
def render(chart: helm.Chart) -> Callable[..., Rendered]:
    def _render(values: dict[str, Any], *, upgrade: bool = False) -> Rendered:
        return Rendered(chart.render(values=values, name=RELEASE, namespace=NAMESPACE,
                                     is_install=not upgrade, is_upgrade=upgrade))
    return _render


@pytest.fixture(scope="session")
def rendered(render: Callable[..., Rendered]) -> dict[str, Rendered]:
    return {name: render(value_set(name)) for name in VALUE_SETS}
