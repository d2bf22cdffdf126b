"""Differential check: the in-process engine (regorus) and OPA (its own Go evaluator, served
over OPA's REST Data API by tests/opa_server.py, through Charter's remote backend) decide
the same on random inputs: the shared cases mutated (types, missing and extra keys, unicode
look-alikes, numbers, malformed and out-of-range times, lists), each first held to the
input contract as every path does. The whole decision is compared: allow, the violation
codes, the warning codes, or the error code when an engine fails.

Deterministic (a fixed seed); CHARTER_TEST_DIFFERENTIAL_N sets how many inputs a document
(2,000 by default; a longer local run: 10,000 or more)."""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
VALUES: list[Any] = [
    None, True, False, 0, -1, 7, 2**40, 1.5, "", "x", "\u0130", "\u03c2", "\u03a3",
    "APACHE-2.0", "apache-2.0", "Apache-2.0", "eu-west", "EU-WEST", "internal", "*", [],
    ["x"], ["*"], {}, {"a": 1}, "2026-13-40T00:00:00Z", "9999-12-31T23:59:59Z",
    "2026-06-01T00:00:00+24:00", "2026-06-30T23:59:60Z", "2026-02-31T00:00:00Z",
    "2027-01-01T00:00:00Z", "2020-01-01T00:00:00Z", "2026-06-01T00:00:00.123456789+02:00",
]


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


def mutate(rng: random.Random, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = rng.random()
        if op < 0.2 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.3 and isinstance(parent, list):
            parent.append(copy.deepcopy(rng.choice(VALUES)))
        elif op < 0.35 and isinstance(parent, dict):
            parent[f"extra_{rng.randint(0, 9)}"] = copy.deepcopy(rng.choice(VALUES))
        else:
            parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
    return doc


def _decide(engine: PolicyEngine, policy: str, doc: Any) -> tuple[Any, ...]:
    try:
        v = engine.evaluate(policy, doc)
    except PolicyUnavailableError as exc:
        return ("error", exc.code)
    return (v.allow, tuple(sorted(f.code for f in v.violations)),
            tuple(sorted(f.code for f in v.warnings)))


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Contracts, PolicyEngine, PolicyEngine]]:
    bundle = PolicyBundle.load(default_policy_dir())
    with OpaTestServer() as server:
        yield (Contracts(bundle), InProcessEngine(bundle),
               RemoteEngine(bundle, server.url, timeout_s=10.0))


@pytest.mark.parametrize("policy", ["admission", "dispatch"])
def test_regorus_and_opa_decide_alike_on_random_inputs(engines, policy: str) -> None:  # type: ignore[no-untyped-def]
    contracts, inproc, remote = engines
    cases = json.loads((CASES / f"{policy}.json").read_text())
    bases = [apply_patch(cases["base"], c["patch"]) for c in cases["cases"]]
    rng = random.Random(f"charter-differential-{policy}")
    held = 0
    for _ in range(N):
        doc = mutate(rng, rng.choice(bases))
        if contracts.check(policy, doc) is not None:
            continue  # decided by Charter before any engine: the same on all of them
        held += 1
        here, there = _decide(inproc, policy, doc), _decide(remote, policy, doc)
        assert here == there, (f"regorus {here} != OPA {there} on\n"
                               f"{json.dumps(doc, ensure_ascii=False, indent=1)}")
    assert held >= N // 10  # enough of them reach the engines to mean something
