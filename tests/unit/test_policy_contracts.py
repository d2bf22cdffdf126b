"""The input contracts: what Charter builds meets them, and a malformed input is refused
before any engine, naming the JSON path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.contracts import Contracts
from tests.policy_cases import apply_patch

CASES = Path(__file__).resolve().parents[1] / "policy_cases"


@pytest.fixture(scope="module")
def contracts() -> Contracts:
    bundle = PolicyBundle.load(default_policy_dir())
    assert set(bundle.schemas) == {"admission", "dispatch"}
    return Contracts(bundle)


@pytest.mark.parametrize("policy", ["admission", "dispatch"])
def test_the_shared_cases_meet_the_contract_unless_they_are_malformed(
        contracts: Contracts, policy: str) -> None:
    cases = json.loads((CASES / f"{policy}.json").read_text())
    assert contracts.check(policy, cases["base"]) is None
    for case in cases["cases"]:
        breach = contracts.check(policy, apply_patch(cases["base"], case["patch"]))
        if breach is not None:  # only inputs the policy itself calls malformed, or
            assert case["violations"] in (["input_invalid"], ["revision_not_pinned"]), case
        elif case["violations"] == ["input_invalid"]:
            pytest.fail(f"{policy}: {case['name']} is malformed but meets the contract")


@pytest.mark.parametrize(("policy", "patch", "path"), [
    ("dispatch", {"caller": "bob"}, "/caller"),
    ("dispatch", {"caller": {"team": 5, "entitlements": {}}}, "/caller/team"),
    ("dispatch", {"node": {"id": "n1", "region": ["eu"]}}, "/node/region"),
    ("admission", {"version": {"id": "v", "model": "m", "files": [{"path": "w", "size": -1}]}},
     "/version/files/0/size"),
    ("admission", {"version": {"id": "v", "model": "m", "files": [],
                               "unsafe_weights": "no"}}, "/version/unsafe_weights"),
])
def test_a_breach_names_the_json_path(contracts: Contracts, policy: str,
                                      patch: dict[str, object], path: str) -> None:
    base = json.loads((CASES / f"{policy}.json").read_text())["base"]
    breach = contracts.check(policy, {**base, **patch})
    assert breach is not None and breach.path == path, breach
    assert breach.violation["code"] == "input_invalid" and path in breach.violation["msg"]


def test_a_bundle_without_contracts_checks_nothing(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(default_policy_dir(), tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "schemas")
    bundle = PolicyBundle.load(tmp_path / "p")
    assert bundle.schemas == {} and Contracts(bundle).check("dispatch", {}) is None
