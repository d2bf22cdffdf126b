"""One interface, two backends: regorus in-process, or an OPA server over its Data API.

Whatever goes wrong (an engine error, a timeout, an undefined or malformed result) is
raised as PolicyUnavailableError: a caller that does not get a Decision must refuse.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

from charter.errors import CharterError
from charter.policy.bundle import POLICIES, PolicyBundle


class PolicyUnavailableError(CharterError):
    """No trustworthy decision: the action is refused (fail closed)."""

    status = 503
    code = "policy_unavailable"


@dataclass(frozen=True)
class Finding:
    code: str
    msg: str


@dataclass(frozen=True)
class Verdict:
    """What the policy said, before Charter gives it an id and records it."""

    allow: bool
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    duration_ms: float


@dataclass(frozen=True)
class Decision:
    policy: str
    allow: bool
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    decision_id: str
    policy_revision: str
    engine: str
    duration_ms: float
    input_digest: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def violation_codes(self) -> list[str]:
        return sorted({v.code for v in self.violations})

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "allow": self.allow,
            "violations": [{"code": v.code, "msg": v.msg} for v in self.violations],
            "warnings": [{"code": w.code, "msg": w.msg} for w in self.warnings],
            "decision_id": self.decision_id,
            "policy_revision": self.policy_revision,
            "engine": self.engine,
            "duration_ms": self.duration_ms,
            "input_digest": self.input_digest,
        }


class PolicyEngine(Protocol):
    name: str
    revision: str

    def evaluate(self, policy: str, input_doc: dict[str, Any]) -> Verdict: ...


def parse_result(value: Any, started: float) -> Verdict:
    """Check the shape of a decision document; anything unexpected is not a decision."""

    def findings(items: Any, what: str) -> tuple[Finding, ...]:
        if not isinstance(items, list):
            raise PolicyUnavailableError(f"the policy's {what} are not a list",
                                         code="policy_result_malformed")
        out = []
        for item in items:
            if not (isinstance(item, dict) and isinstance(item.get("code"), str)
                    and isinstance(item.get("msg"), str)):
                raise PolicyUnavailableError(f"a policy {what[:-1]} is malformed",
                                             code="policy_result_malformed",
                                             details={"item": repr(item)[:200]})
            out.append(Finding(item["code"], item["msg"]))
        return tuple(sorted(out, key=lambda f: (f.code, f.msg)))

    if value is None:
        raise PolicyUnavailableError("the policy gave no decision (undefined)",
                                     code="policy_undefined")
    if not isinstance(value, dict) or not isinstance(value.get("allow"), bool):
        raise PolicyUnavailableError("the policy's answer is not a decision",
                                     code="policy_result_malformed",
                                     details={"answer": repr(value)[:200]})
    violations = findings(value.get("violations"), "violations")
    warnings = findings(value.get("warnings", []), "warnings")
    if value["allow"] and violations:
        raise PolicyUnavailableError("the policy allowed with violations",
                                     code="policy_result_malformed")
    return Verdict(value["allow"], violations, warnings,
                   round((time.perf_counter() - started) * 1000, 3))


def _rule(policy: str) -> str:
    try:
        return f"data.{POLICIES[policy]}.decision"
    except KeyError:
        raise PolicyUnavailableError(f"no policy named {policy!r}", code="policy_unknown",
                                     status=422) from None


class InProcessEngine:
    """regorus (Microsoft's Rust Rego engine). An Engine is bound to the thread that built
    it, so each thread gets its own, built from the same bundle."""

    name = "regorus"

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self.revision = bundle.revision
        self._local = threading.local()
        self._data_json = json.dumps(bundle.data)
        self.engine()  # fail at start-up, not on the first request, if a policy is broken

    def engine(self, *, with_tests: bool = False) -> Any:
        import regorus

        if not with_tests:
            cached = getattr(self._local, "engine", None)
            if cached is not None:
                return cached
        engine = regorus.Engine()
        engine.add_data_json(self._data_json)
        for f in self.bundle.files:
            if with_tests or not f.is_test:
                engine.add_policy(f.path, f.source)
        if not with_tests:
            self._local.engine = engine
        return engine

    def evaluate(self, policy: str, input_doc: dict[str, Any]) -> Verdict:
        rule = _rule(policy)
        started = time.perf_counter()
        try:
            engine = self.engine()
            engine.set_input_json(json.dumps(input_doc))
            raw = engine.eval_rule_as_json(rule)
        except Exception as exc:  # noqa: BLE001 - any engine failure is a refusal
            raise PolicyUnavailableError(
                "the policy engine failed", code="policy_engine_error",
                details={"error": str(exc).split("\nStack backtrace")[0][:500]},
            ) from exc
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            raise PolicyUnavailableError("the engine answered garbage",
                                         code="policy_result_malformed") from None
        return parse_result(value, started)


class RemoteEngine:
    """An OPA server over its REST Data API (the OPA sidecar in Kubernetes)."""

    name = "opa"

    def __init__(self, bundle: PolicyBundle, url: str, *, timeout_s: float,
                 push: bool = True) -> None:
        from opa_client.opa import OpaClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyUnavailableError(f"bad OPA URL {url!r}", code="policy_config_invalid")
        self.bundle = bundle
        self.revision = bundle.revision
        self.url = url
        self.client = OpaClient(
            host=parts.hostname, port=parts.port or (443 if parts.scheme == "https" else 80),
            ssl=parts.scheme == "https", retries=0, timeout=timeout_s,
        )
        # No proxies or netrc from the environment: the sidecar is local (and it is faster).
        self.client._session.trust_env = False
        self._loaded = False
        self._lock = threading.Lock()
        self._push = push

    def load(self) -> None:
        """Push the bundle's policies and data to OPA, then check what OPA holds."""
        for f in self.bundle.policies:
            self.client.update_policy_from_string(f.source, f.path.removesuffix(".rego"),
                                                  rego_compat=False)
        self.client.update_or_create_data(
            {**self.bundle.data["charter"], "revision": self.revision}, "charter")

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            if self._push:
                self.load()
            held = self.client.get_data("charter/revision").get("result")
            if held != self.revision:
                raise PolicyUnavailableError(
                    "the OPA server holds another policy revision",
                    code="policy_revision_mismatch",
                    details={"expected": self.revision, "opa": held},
                )
            self._loaded = True

    def check(self) -> str:
        """For /readyz: the OPA server answers and holds this revision (raises otherwise)."""
        try:
            self._ensure_loaded()  # pushes the bundle first when Charter owns it
            held = self.client.get_data("charter/revision").get("result")
        except PolicyUnavailableError:
            self._loaded = False
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: not ready
            self._loaded = False
            raise PolicyUnavailableError("the OPA server is unreachable",
                                         code="policy_engine_error") from exc
        if held != self.revision:  # e.g. the sidecar restarted with other data
            self._loaded = False
            raise PolicyUnavailableError("the OPA server holds another policy revision",
                                         code="policy_revision_mismatch")
        return "ok"

    def evaluate(self, policy: str, input_doc: dict[str, Any]) -> Verdict:
        import requests

        rule = _rule(policy)
        started = time.perf_counter()
        try:
            self._ensure_loaded()
            answer = self.client.query_rule(input_doc, rule.removeprefix("data."))
        except PolicyUnavailableError:
            raise
        except requests.Timeout as exc:
            self._loaded = False
            raise PolicyUnavailableError("the OPA server did not answer in time",
                                         code="policy_timeout") from exc
        except (requests.RequestException, ValueError, OSError) as exc:
            self._loaded = False  # reload after a restart of the sidecar
            raise PolicyUnavailableError(
                "the OPA server is unreachable or failed", code="policy_engine_error",
                details={"error": f"{type(exc).__name__}: {str(exc)[:300]}"},
            ) from exc
        except Exception as exc:  # noqa: BLE001 - opa_client's own errors, anything else
            self._loaded = False
            raise PolicyUnavailableError(
                "the OPA server failed", code="policy_engine_error",
                details={"error": f"{type(exc).__name__}: {str(exc)[:300]}"},
            ) from exc
        if not isinstance(answer, dict):
            raise PolicyUnavailableError("the OPA server answered garbage",
                                         code="policy_result_malformed")
        try:
            return parse_result(answer.get("result"), started)
        except PolicyUnavailableError:
            # An undefined rule or a malformed answer: e.g. a sidecar that came back without
            # the policies. Check (and push) them again before the next decision.
            self._loaded = False
            raise
