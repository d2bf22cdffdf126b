"""The policy bundle: Rego files and their data, and the revision that names them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charter.errors import ConfigurationError
from charter.identifiers import canonical

_PACKAGE = re.compile(r"^package\s+([\w.]+)", re.MULTILINE)
_TEST_RULE = re.compile(r"^(test_\w+)\s+if\b", re.MULTILINE)
POLICIES = {"admission": "charter.admission", "dispatch": "charter.dispatch"}


def default_policy_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "policies"


@dataclass(frozen=True)
class RegoFile:
    path: str  # relative to the bundle root, e.g. charter/admission/admission.rego
    package: str
    source: str

    @property
    def is_test(self) -> bool:
        return self.path.endswith("_test.rego")

    def test_rules(self) -> list[str]:
        return _TEST_RULE.findall(self.source) if self.is_test else []


@dataclass(frozen=True)
class PolicyBundle:
    root: Path
    files: tuple[RegoFile, ...]
    data: dict[str, Any]  # the whole data document: {"charter": {<file stem>: ...}}
    revision: str
    # The input contract of each decision document (schemas/<policy>.input.json, JSON
    # Schema 2020-12), checked by charter.policy.contracts before any engine sees an input.
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def policies(self) -> tuple[RegoFile, ...]:
        return tuple(f for f in self.files if not f.is_test)

    @property
    def tests(self) -> tuple[RegoFile, ...]:
        return tuple(f for f in self.files if f.is_test)

    @classmethod
    def load(cls, root: Path) -> PolicyBundle:
        """Read policies/ (Rego under charter/, data/*.json as data.charter.<stem>)."""
        root = Path(root)
        if not root.is_dir():
            raise ConfigurationError(f"policy directory {root} does not exist",
                                     code="policy_dir_missing")
        files = []
        for path in sorted(root.rglob("*.rego")):
            source = path.read_text(encoding="utf-8")
            match = _PACKAGE.search(source)
            if match is None:
                raise ConfigurationError(f"{path} has no package line", code="policy_invalid")
            files.append(RegoFile(path.relative_to(root).as_posix(), match.group(1), source))
        data: dict[str, Any] = {}
        for path in sorted((root / "data").glob("*.json")):
            try:
                data[path.stem] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ConfigurationError(f"{path} is not valid JSON: {exc}",
                                         code="policy_data_invalid") from exc
        _check_identifiers(data)
        _check_evidence(data.get("evidence"))
        _check_inspection(data.get("inspection"),
                          (data.get("residency") or {}).get("data_classes"))
        missing = set(POLICIES.values()) - {f.package for f in files}
        if missing:
            raise ConfigurationError(f"policy packages missing: {sorted(missing)}",
                                     code="policy_invalid")
        schemas: dict[str, dict[str, Any]] = {}
        for policy in POLICIES:
            path = root / "schemas" / f"{policy}.input.json"
            if not path.is_file():
                continue
            try:
                schemas[policy] = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ConfigurationError(f"{path} is not valid JSON: {exc}",
                                         code="policy_schema_invalid") from exc
        document = {"charter": data}
        return cls(root, tuple(files), document, _revision(files, document), schemas)


def _check_identifiers(data: dict[str, Any]) -> None:
    """The ids the policies compare input against are canonical (charter.identifiers),
    since the input's are: a license "Apache-2.0" in the catalog would never match."""
    residency = data.get("residency") or {}
    found: list[tuple[str, object]] = [
        *((f"licenses.{k}", k) for k in data.get("licenses") or {}),
        *((f"residency.zones.{k}", k) for k in residency.get("zones") or {}),
        *((f"residency.data_classes.{k}", k) for k in residency.get("data_classes") or {}),
        *((f"residency.data_classes.{k}", r) for k, rs in
          (residency.get("data_classes") or {}).items() for r in (rs or [])),
    ]
    bad = [where for where, value in found if canonical(value) != value]
    if bad:
        raise ConfigurationError(
            f"policy data holds ids that are not canonical (ASCII, lower case): {bad[:5]}",
            code="policy_data_invalid")


def _check_inspection(inspection: Any, classes: Any = None) -> None:
    """data.charter.inspection (charter.inspection): `inspect` names the data classes,
    teams and models whose requests are inspected (lists of strings, "*" for all); `deny`,
    `redact` and `responses` map a data class to finding types (refused; replaced before
    sending; replaced in answers); `residency` maps a finding type to the data class whose
    residency a request carrying it must meet (one of residency.data_classes)."""
    if inspection is None:
        return
    problems: list[str] = []
    if not isinstance(inspection, dict):
        problems.append("inspection is an object")
        inspection = {}
    scope = inspection.get("inspect", {})
    if not isinstance(scope, dict):
        problems.append("inspection.inspect is an object")
        scope = {}
    for key in ("data_classes", "teams", "models"):
        names = scope.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            problems.append(f"inspection.inspect.{key} is a list of names")
    for key in ("deny", "redact", "responses"):
        table = inspection.get(key, {})
        if not isinstance(table, dict) or not all(
                isinstance(k, str) and canonical(k) == k and isinstance(v, list)
                and all(isinstance(t, str) for t in v) for k, v in table.items()):
            problems.append(f"inspection.{key} maps canonical data classes to lists of types")
    residency = inspection.get("residency", {})
    known = classes if isinstance(classes, dict) else {}
    if not isinstance(residency, dict) or not all(
            isinstance(t, str) and isinstance(c, str) and c in known
            for t, c in residency.items()):
        problems.append("inspection.residency maps finding types to data classes defined in "
                        "residency.json")
    if problems:
        raise ConfigurationError(f"policy data inspection.json is malformed: {problems[:5]}",
                                 code="policy_data_invalid")


def _check_evidence(evidence: Any) -> None:
    """data.charter.evidence (the evaluation results versions must have): each requirement
    an `id`, the canonical `risk_tiers` and/or `data_classes` it applies to, a `task` and
    `metric` (and `filter`), exactly one of `min_ppm` and `max_ppm`, and an optional
    `max_age_days`, all integers in range."""
    if evidence is None:
        return
    problems: list[str] = []
    requirements = evidence.get("requirements") if isinstance(evidence, dict) else None
    if not isinstance(requirements, list):
        problems.append("evidence.requirements is a list")
        requirements = []
    limit = 2**53 - 1
    for i, r in enumerate(requirements):
        where = f"evidence.requirements[{i}]"
        if not isinstance(r, dict):
            problems.append(f"{where} is an object")
            continue
        for key in ("id", "task", "metric", "filter"):
            if not isinstance(r.get(key, "none" if key == "filter" else None), str):
                problems.append(f"{where}.{key} is a string")
        scopes = [r.get(k, []) for k in ("risk_tiers", "data_classes")]
        if any(not isinstance(ids, list) or any(
                not isinstance(t, str) or canonical(t) != t for t in ids) for ids in scopes):
            problems.append(f"{where}: risk_tiers and data_classes are lists of canonical ids")
        elif not any(scopes):
            problems.append(f"{where} names the risk_tiers or data_classes it applies to")
        bounds = [k for k in ("min_ppm", "max_ppm") if k in r]
        if len(bounds) != 1:
            problems.append(f"{where} has exactly one of min_ppm and max_ppm")
        for key in (*bounds, *(["max_age_days"] if "max_age_days" in r else [])):
            value = r[key]
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    (0 if key == "max_age_days" else -limit) <= value <= limit):
                problems.append(f"{where}.{key} is a whole number in range")
    if problems:
        raise ConfigurationError(f"policy data evidence.json is malformed: {problems[:5]}",
                                 code="policy_data_invalid")


def _revision(files: list[RegoFile], data: dict[str, Any]) -> str:
    """SHA-256 over every policy file (not the tests) and the canonical data document."""
    digest = hashlib.sha256()
    for f in files:
        if f.is_test:
            continue
        digest.update(f.path.encode() + b"\0" + f.source.encode() + b"\0")
    digest.update(json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()
