"""Differential check: the in-process engine (regorus) and OPA (its own Go evaluator, served
over OPA's REST Data API by tests/opa_server.py, through Charter's remote backend, as the
sidecar is asked: built-in errors strict) decide every input alike.

Inputs are property-based (hypothesis, so a disagreement is reported shrunk to its
smallest form): documents generated from the input contracts themselves, and the shared
cases mutated (types, missing and extra keys, unicode, numbers, times, sizes, duplicates).
Every input goes to both engines, inside its contract or not, so the Rego's own guards are
held too. The whole decision is compared: allow, every violation and warning with its
message, and the obligations. And on every input:

- no engine fails: a built-in that errors is an error on regorus and on a strict OPA, but
  undefined on an OPA server left at its default, so an input that made one fail would be
  decided differently by a sidecar someone configured otherwise;
- an input that meets its contract is never `input_invalid` to the policy (the Rego's
  guards accept what the contract accepts).

Deterministic (hypothesis derandomized, no example database). CHARTER_TEST_DIFFERENTIAL_N
sets the inputs a document and a source (2,000 by default: 4,000 a document in CI; a
longer local run: 10,000 or more).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.contracts import Contracts
from charter.policy.engine import (
    InProcessEngine,
    PolicyEngine,
    PolicyUnavailableError,
    RemoteEngine,
)
from tests.opa_server import OpaTestServer
from tests.policy_cases import apply_patch

CASES = Path(__file__).resolve().parents[1] / "policy_cases"
N = int(os.environ.get("CHARTER_TEST_DIFFERENTIAL_N", "2000"))
POLICIES = ("admission", "dispatch")
BUNDLE = PolicyBundle.load(default_policy_dir())

# Values that engines have read differently: case mapping outside ASCII, look-alikes,
# times as text, fractions, huge and negative numbers, the edges of the epoch range.
TRICKY: list[Any] = [
    None, True, False, 0, -1, 1, 7, 2**53, 2**64, -(2**63), 1.5, 0.1, 1e300, -0.0, "",
    "x", "*", "\u0130", "\u0131", "\u03c2", "\u03a3", "\u00df", "\ufb01", "K\u212a",
    "APACHE-2.0", "apache-2.0", "Apache-2.0", "eu-west", "EU-WEST", "internal",
    "\u0130nternal", "assistant", "approved", "revoked", "deprecated", "weights",
    "2026-06-01T00:00:00+24:00", "2026-06-30T23:59:60Z", "9999-12-31T23:59:59Z", "main",
    1780272000, 1798761600, 1798761599, 253402300799, 253402300800, 1798761600.5,
    [], ["x"], ["*"], ["eu-central"], ["internal", "internal"], {}, {"a": 1},
    {"path": "w"}, {"path": "w", "kind": "weights", "sha256": "ab" * 32},
]


def _bases(policy: str) -> list[Any]:
    cases = json.loads((CASES / f"{policy}.json").read_text())
    return [cases["base"], *(apply_patch(cases["base"], c["patch"]) for c in cases["cases"])]


# --- inputs from the contract ----------------------------------------------------------

def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Documents that meet `schema`, for the subset of JSON Schema the contracts use; a
    string with a pattern is drawn from the pattern, any other mostly from TRICKY."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    options: list[st.SearchStrategy[Any]] = []
    for kind in kinds:
        if kind == "null":
            options.append(st.none())
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind == "integer":
            low, high = schema.get("minimum", -(2**53) + 1), schema.get("maximum", 2**53 - 1)
            options.append(st.one_of(st.integers(low, high),
                                     st.sampled_from([low, high, min(high, 1798761600)])))
        elif kind == "string":
            options.append(_string(schema))
        elif kind == "array":
            options.append(st.lists(from_schema(schema["items"]),
                                    max_size=min(schema.get("maxItems", 4), 4)))
        elif kind == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", ()))
            options.append(st.fixed_dictionaries(
                {k: from_schema(v) for k, v in props.items() if k in required},
                optional={k: from_schema(v) for k, v in props.items() if k not in required}))
    return st.one_of(options)


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    limit = schema.get("maxLength", 100)
    known = [v for v in TRICKY if isinstance(v, str) and len(v) <= limit]
    pattern = schema.get("pattern")
    if pattern is not None:
        compiled = re.compile(pattern)
        known = [v for v in known if compiled.fullmatch(v)]
        drawn: st.SearchStrategy[str] = st.from_regex(pattern, fullmatch=True).filter(
            lambda s: len(s) <= limit)
    else:
        drawn = st.text(max_size=min(limit, 12))
    return st.one_of(st.sampled_from(known), drawn) if known else drawn


# --- inputs from the shared cases, mutated --------------------------------------------

def _values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.sampled_from(TRICKY), st.text(max_size=8),
                        st.integers(-(2**64), 2**64),
                        st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=6)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated(draw: st.DrawFn, policy: str) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(_bases(policy))))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = draw(st.sampled_from(["replace", "remove", "extra", "duplicate", "grow"]))
        if op == "remove":
            del parent[path[-1]]
        elif op == "extra" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = copy.deepcopy(draw(_values()))
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[path[-1]]))
        elif op == "grow" and isinstance(parent[path[-1]], str):
            parent[path[-1]] = parent[path[-1]] * draw(st.integers(2, 40))
        else:  # a copy: a later mutation must not change TRICKY's own lists
            parent[path[-1]] = copy.deepcopy(draw(_values()))
    return doc


# --- the comparison -------------------------------------------------------------------

def _decide(engine: PolicyEngine, policy: str, doc: Any) -> tuple[Any, ...]:
    try:
        v = engine.evaluate(policy, doc)
    except PolicyUnavailableError as exc:
        return ("error", exc.code, str(exc.details.get("error", ""))[:300])
    return (v.allow, sorted((f.code, f.msg) for f in v.violations),
            sorted((f.code, f.msg) for f in v.warnings), v.obligations)


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Contracts, PolicyEngine, PolicyEngine]]:
    with OpaTestServer() as server:
        remote = RemoteEngine(BUNDLE, server.url, timeout_s=10.0)
        yield Contracts(BUNDLE), InProcessEngine(BUNDLE), remote
        posts = [path for method, path in server.requests if method == "POST"]
        assert posts and all("strict-builtin-errors=True" in p for p in posts), posts[:3]


def _compare(engines: tuple[Contracts, PolicyEngine, PolicyEngine], policy: str,
             doc: Any, seen: dict[str, int]) -> None:
    contracts, inproc, remote = engines
    here, there = _decide(inproc, policy, doc), _decide(remote, policy, doc)
    shown = json.dumps(doc, ensure_ascii=False)[:2000]
    assert here == there, f"regorus {here}\n!= OPA {there}\non {shown}"
    assert here[0] != "error", f"both engines failed ({here}) on {shown}"
    if contracts.check(policy, doc) is None:
        seen["valid"] += 1
        assert "input_invalid" not in {code for code, _ in here[1]}, (
            f"meets the contract, but the policy calls it malformed: {shown}")
    seen["all"] += 1


def _run(engines: Any, policy: str, source: st.SearchStrategy[Any]) -> dict[str, int]:
    seen = {"all": 0, "valid": 0}

    @settings(max_examples=N, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(source)
    def check(doc: Any) -> None:
        _compare(engines, policy, doc, seen)

    check()
    print(f"differential {policy}: {seen}")  # the figures in docs/policy.md (pytest -s)
    return seen


@pytest.mark.parametrize("policy", POLICIES)
def test_engines_decide_alike_on_inputs_from_the_contract(engines, policy: str) -> None:  # type: ignore[no-untyped-def]
    seen = _run(engines, policy, from_schema(BUNDLE.schemas[policy]))
    assert seen["all"] >= N and seen["valid"] == seen["all"], seen


@pytest.mark.parametrize("policy", POLICIES)
def test_engines_decide_alike_on_mutated_cases(engines, policy: str) -> None:  # type: ignore[no-untyped-def]
    seen = _run(engines, policy, mutated(policy))
    # Most mutations break the contract; enough of them keep it to mean something.
    assert seen["all"] >= N and seen["valid"] >= N // 20, seen


def test_a_disagreement_fails_with_the_input() -> None:
    """The comparison is not vacuous: an engine that decides otherwise is caught."""

    class Lenient:
        name = "lenient"

        def evaluate(self, policy: str, input_doc: dict[str, Any]) -> Any:
            from charter.policy.engine import Verdict
            return Verdict(True, (), (), 0.0)

    doc = _bases("dispatch")[0]
    contracts, inproc = Contracts(BUNDLE), InProcessEngine(BUNDLE)
    broken = {**doc, "node": {**doc["node"], "attested_version_id": "other"}}
    with pytest.raises(AssertionError, match="node_not_attested"):
        _compare((contracts, inproc, Lenient()), "dispatch", broken,  # type: ignore[arg-type]
                 {"all": 0, "valid": 0})
