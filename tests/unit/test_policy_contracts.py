"""The input contracts: what Charter builds meets them, and a malformed input is refused
before any engine, naming the JSON path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.contracts import Contracts
from tests.policy_cases import apply_patch

CASES = Path(__file__).resolve().parents[1] / "policy_cases"
ADMISSION = json.loads((CASES / "admission.json").read_text())["base"]["version"]


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
        if breach is not None:  # only inputs the policy itself calls malformed, or that
            # show what the Rego does with values Charter never sends (its own guards)
            assert case["violations"] in (["input_invalid"], ["revision_not_pinned"],
                                          ["license_mismatch"]), case
        elif case["violations"] == ["input_invalid"]:
            pytest.fail(f"{policy}: {case['name']} is malformed but meets the contract")


@pytest.mark.parametrize(("policy", "patch", "path"), [
    ("dispatch", {"caller": "bob"}, "/caller"),
    ("dispatch", {"caller": {"team": 5, "entitlements": {}}}, "/caller/team"),
    ("dispatch", {"node": {"id": "n1", "region": ["eu"]}}, "/node/region"),
    ("admission", {"version": {**ADMISSION, "files": [{"path": "w", "size": -1}]}},
     "/version/files/0/size"),
    ("admission", {"version": {**ADMISSION, "unsafe_weights": "no"}},
     "/version/unsafe_weights"),
    ("admission", {"version": {**ADMISSION, "license_card": "\u0130nternal"}},
     "/version/license_card"),
    ("admission", {"version": {**ADMISSION, "hosting_regions": ["EU-WEST"]}},
     "/version/hosting_regions/0"),
    ("dispatch", {"request": {"purpose": "assistant", "data_class": "Internal"}},
     "/request/data_class"),
    ("dispatch", {"now": "2026-06-01T00:00:00Z"}, "/now"),
    ("dispatch", {"now": 253402300800}, "/now"),
    ("admission", {"data_classes": ["Internal"]}, "/data_classes/0"),
    ("admission", {"evaluations": [{"task": "t", "metric": "m", "filter": "none",
                                    "value_ppm": 0.5, "attached_at": 1}]},
     "/evaluations/0/value_ppm"),
    ("admission", {"now": -1}, "/now"),
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


@pytest.mark.parametrize(("file", "edit", "where"), [
    ("licenses", lambda d: {**d, "Apache-2.0": d["apache-2.0"]}, "licenses.Apache-2.0"),
    ("residency", lambda d: {**d, "zones": {**d["zones"], "EU-West": {"sovereign": True}}},
     "residency.zones.EU-West"),
    ("residency", lambda d: {**d, "data_classes": {"internal": ["eu-central", "\u0130"]}},
     "residency.data_classes.internal"),
    ("evidence", lambda d: {"requirements": [{**d["requirements"][0], "min_ppm": 0.5}]},
     "evidence.requirements[0].min_ppm"),
    ("evidence", lambda d: {"requirements": [{**d["requirements"][0], "max_ppm": 1}]},
     "exactly one of min_ppm and max_ppm"),
    ("evidence", lambda d: {"requirements": [{**d["requirements"][0], "risk_tiers": []}]},
     "names the risk_tiers or data_classes"),
    ("evidence", lambda d: {"requirements": [{**d["requirements"][0],
                                              "data_classes": ["Restricted"]}]},
     "lists of canonical ids"),
])
def test_policy_data_holds_only_canonical_ids(tmp_path: Path, file: str, edit: Any,
                                              where: str) -> None:
    import shutil

    from charter.errors import ConfigurationError

    shutil.copytree(default_policy_dir(), tmp_path / "p")
    path = tmp_path / "p" / "data" / f"{file}.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ConfigurationError) as caught:
        PolicyBundle.load(tmp_path / "p")
    assert caught.value.code == "policy_data_invalid" and where in caught.value.message
