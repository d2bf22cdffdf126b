"""Policy backends: same decisions in-process and on OPA, Rego tests, fail closed, threads."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.engine import (
    InProcessEngine,
    Obligations,
    PolicyUnavailableError,
    RemoteEngine,
)
from tests.opa_server import OpaTestServer
from tests.policy_cases import apply_patch

CASES_DIR = Path(__file__).resolve().parents[1] / "policy_cases"


def load_cases() -> list[tuple[str, str, dict[str, Any], bool, list[str]]]:
    out = []
    for path in sorted(CASES_DIR.glob("*.json")):
        spec = json.loads(path.read_text())
        for case in spec["cases"]:
            out.append((spec["policy"], case["name"], apply_patch(spec["base"], case["patch"]),
                        case["allow"], sorted(case["violations"])))
    return out


def load_obligations() -> dict[str, dict[str, list[str]]]:
    """The obligations a case expects (where it states them), by case name."""
    out = {}
    for path in sorted(CASES_DIR.glob("*.json")):
        for case in json.loads(path.read_text())["cases"]:
            if "obligations" in case:
                out[case["name"]] = case["obligations"]
    return out


OBLIGATIONS = load_obligations()


CASES = load_cases()


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return PolicyBundle.load(default_policy_dir())


@pytest.fixture(scope="module")
def opa(bundle):  # type: ignore[no-untyped-def]
    with OpaTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def engines(bundle, opa):  # type: ignore[no-untyped-def]
    return {"regorus": InProcessEngine(bundle),
            "opa": RemoteEngine(bundle, opa.url, timeout_s=2.0)}


@pytest.mark.parametrize("policy,name,input_doc,allow,codes", CASES,
                         ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_both_backends_decide_each_case_alike(engines, policy, name, input_doc, allow,  # type: ignore[no-untyped-def]
                                              codes) -> None:
    verdicts = {n: e.evaluate(policy, input_doc) for n, e in engines.items()}
    for engine_name, v in verdicts.items():
        got = sorted({f.code for f in v.violations})
        assert (v.allow, got) == (allow, codes), f"{engine_name} on {name!r}"
    assert verdicts["regorus"].violations == verdicts["opa"].violations
    assert verdicts["regorus"].warnings == verdicts["opa"].warnings
    assert verdicts["regorus"].obligations == verdicts["opa"].obligations
    if name in OBLIGATIONS:
        want = OBLIGATIONS[name]
        assert verdicts["opa"].obligations == Obligations(
            tuple(want["redact"]), tuple(want["redact_response"])), name


def test_case_files_cover_every_violation_code(bundle) -> None:  # type: ignore[no-untyped-def]
    import re

    declared = set()
    for f in bundle.policies:
        declared |= set(re.findall(r'violations contains \{\s*"code": "(\w+)"', f.source))
    exercised = {c for case in CASES for c in case[4]}
    # These depend on the organisation's data, which the shared engines hold fixed; the
    # Rego tests cover them with `with data.charter.organisation... as ...`.
    data_dependent = {"license_user_threshold", "license_use_restrictions"}
    assert declared and declared - data_dependent <= exercised, sorted(declared - exercised)


def test_rego_tests_pass_with_regorus_and_report_coverage(bundle) -> None:  # type: ignore[no-untyped-def]
    from charter.policy.testing import run_rego_tests

    report = run_rego_tests(bundle)
    assert report.failed == 0, [r for r in report.results if not r.passed]
    assert report.passed >= 30
    assert set(report.coverage) == {f.path for f in bundle.policies}
    assert all(p >= 90 for p in report.coverage.values()), report.coverage


def test_rego_tests_pass_with_real_opa(bundle) -> None:  # type: ignore[no-untyped-def]
    from opa_bindings import OpaEngine

    with OpaEngine() as engine:
        engine.add_data(bundle.data)
        for f in bundle.files:
            engine.add_policy(f.path, f.source)
        failed = []
        total = 0
        for f in bundle.tests:
            for name in f.test_rules():
                total += 1
                if engine.eval_query(f"data.{f.package}.{name} == true") == []:
                    failed.append(name)
    assert total >= 30 and failed == []


def test_a_failing_rego_test_fails_the_run(tmp_path, bundle) -> None:  # type: ignore[no-untyped-def]
    import shutil

    from charter.policy.testing import run_rego_tests

    shutil.copytree(bundle.root, tmp_path / "p")
    test_file = tmp_path / "p" / "charter" / "admission" / "admission_test.rego"
    wrong = "\ntest_wrong if {\n\tadmission.allow with input as {}\n}\n"
    test_file.write_text(test_file.read_text() + wrong)
    report = run_rego_tests(PolicyBundle.load(tmp_path / "p"))
    assert [r.name for r in report.results if not r.passed] == ["test_wrong"]


def test_revision_names_policies_and_data(tmp_path, bundle) -> None:  # type: ignore[no-untyped-def]
    import shutil

    shutil.copytree(bundle.root, tmp_path / "p")
    assert PolicyBundle.load(tmp_path / "p").revision == bundle.revision
    data = tmp_path / "p" / "data" / "organisation.json"
    doc = json.loads(data.read_text())
    doc["monthly_active_users"] += 1
    data.write_text(json.dumps(doc))
    assert PolicyBundle.load(tmp_path / "p").revision != bundle.revision


# --- fail closed -----------------------------------------------------------------------------
@pytest.fixture
def flaky(bundle):  # type: ignore[no-untyped-def]
    with OpaTestServer() as server:
        server.hang_s = 2.0
        yield server, RemoteEngine(bundle, server.url, timeout_s=0.3)


ALLOWED = next(c[2] for c in CASES if c[0] == "dispatch" and c[3])


@pytest.mark.parametrize("mode,code", [
    ("hang", "policy_timeout"),
    ("garbage", "policy_engine_error"),
    ("error", "policy_engine_error"),
    ("undefined", "policy_undefined"),
    ("not_json_object", "policy_result_malformed"),
])
def test_remote_misbehaviour_is_a_refusal(flaky, mode, code) -> None:  # type: ignore[no-untyped-def]
    server, engine = flaky
    assert engine.evaluate("dispatch", ALLOWED).allow  # healthy first
    server.mode = mode
    started = time.monotonic()
    with pytest.raises(PolicyUnavailableError) as info:
        engine.evaluate("dispatch", ALLOWED)
    assert info.value.code == code
    assert time.monotonic() - started < 1.5
    server.mode = "ok"  # recovers without a restart of Charter
    assert engine.evaluate("dispatch", ALLOWED).allow


def test_a_load_that_times_out_is_a_timeout(bundle) -> None:  # type: ignore[no-untyped-def]
    """A PUT of the policies that times out is `policy_timeout` (requests reports it as a
    ConnectionError wrapping urllib3's MaxRetryError, not as a Timeout)."""
    with OpaTestServer() as server:
        server.put_hang_s = 2.0
        engine = RemoteEngine(bundle, server.url, timeout_s=0.3, load_timeout_s=0.3)
        with pytest.raises(PolicyUnavailableError) as info:
            engine.evaluate("dispatch", ALLOWED)
        assert info.value.code == "policy_timeout"
        assert ("PUT", "/v1/policies/" + bundle.policies[0].path.removesuffix(".rego")) \
            in server.requests


def test_timeouts_are_recognised_however_they_are_wrapped() -> None:
    import requests
    import urllib3.exceptions as u3

    from charter.policy.engine import is_timeout

    read = u3.ReadTimeoutError(None, "/v1/policies/x", "read timed out")  # type: ignore[arg-type]
    wrapped = requests.ConnectionError(u3.MaxRetryError(None, "/v1/policies/x", read))  # type: ignore[arg-type]
    assert is_timeout(wrapped)
    assert is_timeout(requests.ReadTimeout())
    refused = requests.ConnectionError(u3.MaxRetryError(
        None, "/", u3.NewConnectionError(None, "refused")))  # type: ignore[arg-type]
    assert not is_timeout(refused)
    assert not is_timeout(ValueError("not json"))


def test_remote_down_is_a_refusal_and_recovery_reloads(bundle) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as free:  # a port nobody listens on: the connection is refused
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    refused = RemoteEngine(bundle, f"http://127.0.0.1:{port}", timeout_s=0.3)
    with pytest.raises(PolicyUnavailableError) as info:
        refused.evaluate("dispatch", ALLOWED)
    assert info.value.code == "policy_engine_error"
    server = OpaTestServer()
    engine = RemoteEngine(bundle, server.url, timeout_s=0.3, load_timeout_s=0.5)
    with pytest.raises(PolicyUnavailableError) as info:  # it listens, but nobody answers
        engine.evaluate("dispatch", ALLOWED)
    assert info.value.code == "policy_timeout"
    with server:
        assert engine.evaluate("dispatch", ALLOWED).allow  # loads policies, then decides
        assert ("PUT", "/v1/data/charter") in server.requests


def test_remote_refuses_a_server_with_another_revision(bundle, opa) -> None:  # type: ignore[no-untyped-def]
    with OpaTestServer() as other:
        other.policies = {f.path.removesuffix(".rego"): f.source for f in bundle.policies}
        other.data = {"charter": {**bundle.data["charter"], "revision": "sha256:old"}}
        other.rebuild()
        engine = RemoteEngine(bundle, other.url, timeout_s=1.0, push=False)
        with pytest.raises(PolicyUnavailableError) as info:
            engine.evaluate("dispatch", ALLOWED)
        assert info.value.code == "policy_revision_mismatch"
        assert info.value.details["opa"] == "sha256:old"


def test_engine_errors_are_refusals(bundle) -> None:  # type: ignore[no-untyped-def]
    engine = InProcessEngine(bundle)
    with pytest.raises(PolicyUnavailableError) as info:
        engine.evaluate("nonsense", {})
    assert info.value.code == "policy_unknown"


def test_malformed_results_are_refusals() -> None:
    from charter.policy.engine import parse_result

    for value, code in [
        (None, "policy_undefined"),
        (True, "policy_result_malformed"),
        ({"allow": "yes", "violations": []}, "policy_result_malformed"),
        ({"allow": True, "violations": [{"code": "x", "msg": "y"}]}, "policy_result_malformed"),
        ({"allow": False, "violations": "x"}, "policy_result_malformed"),
        ({"allow": False, "violations": [{"code": 1}]}, "policy_result_malformed"),
        # an obligation Charter does not know, or cannot read, is not one it can carry out
        ({"allow": True, "violations": [], "obligations": {"encrypt": []}},
         "policy_result_malformed"),
        ({"allow": True, "violations": [], "obligations": {"redact": "EMAIL_ADDRESS"}},
         "policy_result_malformed"),
        ({"allow": True, "violations": [], "obligations": {"redact": [1]}},
         "policy_result_malformed"),
        ({"allow": True, "violations": [], "obligations": []}, "policy_result_malformed"),
    ]:
        with pytest.raises(PolicyUnavailableError) as info:
            parse_result(value, time.perf_counter())
        assert info.value.code == code, value
    verdict = parse_result({"allow": True, "violations": [], "obligations": {
        "redact": ["IP_ADDRESS", "EMAIL_ADDRESS", "IP_ADDRESS"]}}, time.perf_counter())
    assert verdict.obligations == Obligations(("EMAIL_ADDRESS", "IP_ADDRESS"), ())
    assert parse_result({"allow": False, "violations": []},
                        time.perf_counter()).obligations == Obligations()


def test_in_process_engine_is_stable_under_threads(bundle) -> None:  # type: ignore[no-untyped-def]
    engine = InProcessEngine(bundle)
    expected = {i: engine.evaluate(c[0], c[2]) for i, c in enumerate(CASES)}
    errors: list[str] = []

    def work() -> None:
        for _ in range(3):
            for i, c in enumerate(CASES):
                v = engine.evaluate(c[0], c[2])
                if (v.allow, v.violations) != (expected[i].allow, expected[i].violations):
                    errors.append(c[1])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []


def test_verdict_cache_agrees_with_the_engine_at_every_time(bundle) -> None:  # type: ignore[no-untyped-def]
    """Cached verdicts equal fresh ones for every dispatch case, at times before, at and
    after the approval's expiry, whichever time filled the cache first."""
    from charter.policy.cache import VerdictCache

    engine = InProcessEngine(bundle)
    # 2020-01-01, around a base's expiry in the shared cases (2026-05-28), a second before
    # the approval's (2027-01-01), at it, a second after, 2031.
    times = [1577836800, 1779999999, 1780000000, 1798761599, 1798761600, 1798761601,
             1935717905]
    checked = 0
    for policy, name, doc, _allow, _codes in CASES:
        if policy != "dispatch":
            continue
        for first in times:
            cache = VerdictCache()
            seeded = {**doc, "now": first} if "now" in doc else doc
            key = VerdictCache.key(engine.revision, policy, seeded)
            if key is None:
                continue
            cache.put(key, seeded, engine.evaluate(policy, seeded))
            for t in times:
                probe = {**doc, "now": t}
                hit = cache.get(key, probe)
                if hit is not None:
                    fresh = engine.evaluate(policy, probe)
                    assert (hit.allow, hit.violations) == (fresh.allow, fresh.violations), \
                        (name, first, t)
                    checked += 1
    assert checked > 100


def test_cached_decisions_are_still_audited(configured) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from charter.audit.service import EventFilter, list_events
    from charter.policy import service
    from charter.uow import record_decision, unit_of_work

    def decide(doc: dict) -> Any:  # type: ignore[type-arg]
        with unit_of_work() as session:  # as a service records the decision it acts on
            decision, event = service.evaluate("dispatch", doc, actor="user:t",
                                               target_type="t", target_id="x")
            record_decision(session, event)
            return decision

    doc = next(c[2] for c in CASES if c[0] == "dispatch" and c[3])
    doc = {**doc, "caller": {**doc["caller"], "team": uuid.uuid4().hex}}  # never seen before
    first = decide(doc)
    second = decide({**doc, "now": doc["now"] + 30 * 86400})
    assert first.decision_id != second.decision_id and first.allow and second.allow
    events = list_events(EventFilter(action="policy.decide"))
    assert [e.details.get("cached", False) for e in events][-2:] == [False, True]


def test_readiness_follows_the_remote_engine(configured) -> None:  # type: ignore[no-untyped-def]
    """/readyz says not ready while the OPA sidecar is away or holds other policies, and
    ready again once it answers: Kubernetes then routes nothing to a pod that would refuse
    every decision."""
    import dataclasses

    from tests.runtimes import app_for

    server = OpaTestServer()
    app = app_for(dataclasses.replace(configured, policy_backend="remote",
                                         opa_url=server.url, opa_timeout_s=0.5))
    client = app.test_client()
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"]["policy"] == "unavailable: policy_engine_error"
    with server:
        r = client.get("/readyz")
        assert r.status_code == 200 and r.get_json()["checks"]["policy"] == "ok"
        server.data["charter"] = {**server.data["charter"], "revision": "sha256:other"}
        server.rebuild()  # as if the sidecar restarted with other policies
        r = client.get("/readyz")
        assert r.status_code == 503  # pushed again on the next check, then ready
        assert r.get_json()["checks"]["policy"] == "unavailable: policy_revision_mismatch"
        assert client.get("/readyz").status_code == 200
