"""Run the Rego tests beside the policies (`*_test.rego`), with line coverage."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from charter.policy.bundle import PolicyBundle


@dataclass(frozen=True)
class TestResult:
    package: str
    name: str
    passed: bool
    error: str | None
    duration_ms: float


@dataclass
class TestReport:
    results: list[TestResult] = field(default_factory=list)
    coverage: dict[str, float] = field(default_factory=dict)  # policy file -> percent

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.results) - self.passed


def run_rego_tests(bundle: PolicyBundle) -> TestReport:
    """Evaluate every `test_*` rule with regorus; a rule that is not exactly true fails."""
    import regorus

    engine = regorus.Engine()
    engine.set_enable_coverage(True)
    engine.add_data_json(json.dumps(bundle.data))
    for f in bundle.files:
        engine.add_policy(f.path, f.source)
    report = TestReport()
    for f in bundle.tests:
        for name in f.test_rules():
            started = time.perf_counter()
            error = None
            try:
                answer = json.loads(engine.eval_query_as_json(f"data.{f.package}.{name}"))
                values = [e["value"] for r in answer.get("result", [])
                          for e in r.get("expressions", [])]
                passed = values == [True]
                if not passed:
                    error = "undefined" if not values else f"evaluated to {values}"
            except Exception as exc:  # noqa: BLE001 - an engine error fails the test
                passed, error = False, str(exc).split("\nStack backtrace")[0]
            report.results.append(TestResult(f.package, name, passed, error,
                                             round((time.perf_counter() - started) * 1000, 2)))
    coverage = json.loads(engine.get_coverage_report_as_json())
    for item in coverage.get("files", []):
        if item["path"].endswith("_test.rego"):
            continue
        total = len(item["covered"]) + len(item["not_covered"])
        percent = round(100 * len(item["covered"]) / total, 1) if total else 100.0
        report.coverage[item["path"]] = percent
    return report
