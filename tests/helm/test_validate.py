"""The chart lints strictly and every rendered object validates against Kubernetes 1.28-1.33."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

from tests.helm.conftest import CHART, NAMESPACE, VALUE_SETS, Rendered, value_set

KUBERNETES = ["1.28", "1.29", "1.30", "1.31", "1.32", "1.33"]
YAMLLINT = YamlLintConfig(file=str(CHART.parent / ".yamllint"))
SERVICE_MONITOR = json.loads((Path(__file__).parent / "servicemonitor.schema.json").read_text())


def test_validator_ships_every_version() -> None:
    # kubernetes-validate falls back to an older schema for a version it lacks; insist on each.
    shipped = {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES) <= shipped


@pytest.mark.parametrize("name", VALUE_SETS)
@pytest.mark.parametrize("kube", [KUBERNETES[0], KUBERNETES[-1]])
def test_lint_strict(name: str, kube: str) -> None:
    report = helm.lint(CHART, value_set(name), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{kube}.0")
    assert report["errors"] == []
    # Severity 2 is a warning, 3 an error; 1 (info) is only "icon is recommended".
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_schema_errors() -> None:
    report = helm.lint(CHART, {**value_set("minimal"), "replicas": 3}, strict=True)
    assert any("additional properties 'replicas' not allowed" in e for e in report["errors"])


@pytest.mark.parametrize("name", VALUE_SETS)
def test_manifests_validate_strict(rendered: dict[str, Rendered], name: str) -> None:
    problems = []
    for obj in rendered[name].objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["apiVersion"] == "monitoring.coreos.com/v1":
            # A CRD: kubernetes-validate has no schema for it; check the subset we render.
            jsonschema.validate(obj, SERVICE_MONITOR)
            continue
        for kube in KUBERNETES:
            try:
                kubernetes_validate.validate(obj, f"{kube}.0", strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{kube} {where}: {exc.message} at {list(exc.path)}")
    assert problems == []


def test_service_monitor_schema_can_fail(rendered: dict[str, Rendered]) -> None:
    monitor = rendered["production"].one("ServiceMonitor")
    monitor = {**monitor, "spec": {**monitor["spec"], "endpoint": []}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_yamllint_rendered(rendered: dict[str, Rendered], name: str) -> None:
    problems = [f"{template}:{p.line}: {p.message}"
                for template, text in rendered[name].text.items()
                for p in linter.run(text, YAMLLINT)]
    assert problems == []


@pytest.mark.parametrize("path", [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml")),
                                  CHART / "Chart.yaml"], ids=lambda p: p.name)
def test_yamllint_values(path: Path) -> None:
    problems = [f"{p.line}: {p.message}" for p in linter.run(path.read_text(), YAMLLINT)]
    assert problems == []


def test_yamllint_catches_trailing_spaces() -> None:
    assert list(linter.run("a: 1   \n", YAMLLINT))


def test_values_parse_as_yaml() -> None:
    assert yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
