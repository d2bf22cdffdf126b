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
class Obligations:
    """What the gateway must do to serve an allowed request (the dispatch policy's
    `obligations`): replace the request's findings of `redact`'s types before sending it,
    and those of `redact_response`'s types in the answer (charter.inspection). Types are
    sorted and unique."""

    redact: tuple[str, ...] = ()
    redact_response: tuple[str, ...] = ()

    KEYS = ("redact", "redact_response")

    def as_dict(self) -> dict[str, list[str]]:
        """The non-empty ones (an event carries them only when there are some)."""
        return {k: list(getattr(self, k)) for k in self.KEYS if getattr(self, k)}


@dataclass(frozen=True)
class Verdict:
    """What the policy said, before Charter gives it an id and records it."""

    allow: bool
    violations: tuple[Finding, ...]
    warnings: tuple[Finding, ...]
    duration_ms: float
    obligations: Obligations = Obligations()


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
    obligations: Obligations = Obligations()

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
            **({"obligations": self.obligations.as_dict()}
               if self.obligations.as_dict() else {}),
        }


class PolicyEngine(Protocol):
    name: str
    revision: str
    bundle: PolicyBundle

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
                   round((time.perf_counter() - started) * 1000, 3),
                   _obligations(value.get("obligations")))


def _obligations(value: Any) -> Obligations:
    """The decision's obligations, checked: one Charter does not know, or cannot read, is
    not a decision it can carry out (fail closed)."""
    if value is None:
        return Obligations()
    if not isinstance(value, dict) or set(value) - set(Obligations.KEYS):
        raise PolicyUnavailableError(
            "the policy's obligations are not ones Charter can carry out",
            code="policy_result_malformed", details={"obligations": repr(value)[:200]})
    found: dict[str, tuple[str, ...]] = {}
    for key in Obligations.KEYS:
        types = value.get(key, [])
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise PolicyUnavailableError(f"the policy's obligation {key} is not a list of "
                                         "finding types", code="policy_result_malformed")
        found[key] = tuple(sorted(set(types)))
    return Obligations(**found)


def is_timeout(exc: BaseException) -> bool:
    """A timeout, however the HTTP stack wrapped it: requests raises ConnectionError, not
    Timeout, for a read timeout that urllib3 reports as MaxRetryError (e.g. on a PUT)."""
    import requests
    import urllib3.exceptions as u3

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # urllib3's NewConnectionError subclasses its ConnectTimeoutError (for history's
        # sake): a refused connection is not a timeout, whatever caused it is looked at.
        if (isinstance(e, requests.Timeout | u3.TimeoutError | TimeoutError)
                and not isinstance(e, u3.NewConnectionError)):
            return True
        if isinstance(e, u3.MaxRetryError):
            todo.append(e.reason)
        todo.extend([e.__cause__, e.__context__,
                     *(a for a in e.args if isinstance(a, BaseException))])
    return False


def _rule(policy: str) -> str:
    try:
        return f"data.{POLICIES[policy]}.decision"
    except KeyError:
        raise PolicyUnavailableError(f"no policy named {policy!r}", code="policy_unknown",
                                     status=422) from None


class _ThreadEngines(threading.local):
    """The regorus engines of one thread, by bundle revision (a few, least recent dropped).

    A regorus Engine may only be dropped on the thread that made it (PyO3 leaks it, with a
    warning, otherwise). So engines belong to their thread, not to an InProcessEngine: only
    the owning thread ever evicts one, and a thread's engines go when the thread ends. Two
    runtimes with the same bundle share a thread's engine: it holds the same policies and
    data, and each evaluation sets its own input on the calling thread.
    """

    keep = 4

    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}

    def get(self, revision: str, build: Any) -> Any:
        engine = self.engines.pop(revision, None)
        if engine is None:
            engine = build()
            while len(self.engines) >= self.keep:
                self.engines.pop(next(iter(self.engines)))  # dropped here, on its own thread
        self.engines[revision] = engine  # most recent last
        return engine


_THREAD_ENGINES = _ThreadEngines()


class InProcessEngine:
    """regorus (Microsoft's Rust Rego engine). An Engine is bound to the thread that built
    it, so each thread gets its own, built from the same bundle and kept by that thread."""

    name = "regorus"

    def __init__(self, bundle: PolicyBundle) -> None:
        self.bundle = bundle
        self.revision = bundle.revision
        self._data_json = json.dumps(bundle.data)
        self._key = f"{bundle.revision}:{bundle.root}"
        self.engine()  # fail at start-up, not on the first request, if a policy is broken

    def engine(self) -> Any:
        """This thread's engine for the bundle."""
        return _THREAD_ENGINES.get(self._key, self._build)

    def _build(self) -> Any:
        import regorus

        engine = regorus.Engine()
        engine.add_data_json(self._data_json)
        for f in self.bundle.files:
            if not f.is_test:
                engine.add_policy(f.path, f.source)
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
                 load_timeout_s: float = 5.0, push: bool = True) -> None:
        from opa_client.opa import OpaClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyUnavailableError(f"bad OPA URL {url!r}", code="policy_config_invalid")
        self.bundle = bundle
        self.revision = bundle.revision
        self.url = url

        def client(timeout: float) -> Any:
            made = OpaClient(
                host=parts.hostname,
                port=parts.port or (443 if parts.scheme == "https" else 80),
                ssl=parts.scheme == "https", retries=0, timeout=timeout)
            # No proxies or netrc from the environment: the sidecar is local (and faster).
            made._session.trust_env = False
            return made

        # Decisions wait `timeout_s`; loading the bundle (OPA compiles every policy) and
        # checking the revision OPA holds get a budget of their own, so a re-push after a
        # sidecar restart does not time out on a loaded machine.
        self.client = client(timeout_s)
        self.loader = client(max(load_timeout_s, timeout_s))
        self._loaded = False
        self._lock = threading.Lock()
        self._push = push

    def load(self) -> None:
        """Push the bundle's policies and data to OPA, then check what OPA holds."""
        for f in self.bundle.policies:
            self.loader.update_policy_from_string(f.source, f.path.removesuffix(".rego"),
                                                  rego_compat=False)
        self.loader.update_or_create_data(
            {**self.bundle.data["charter"], "revision": self.revision}, "charter")

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            if self._push:
                self.load()
            held = self.loader.get_data("charter/revision").get("result")
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
            held = self.loader.get_data("charter/revision").get("result")
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
        rule = _rule(policy)
        started = time.perf_counter()
        try:
            self._ensure_loaded()
            # Strict: a built-in that fails is an error (a refusal), as it is in regorus, not
            # OPA's default "undefined", which would let a rule silently not fire.
            answer = self.client.query_rule(input_doc, rule.removeprefix("data."),
                                            query_params={"strict-builtin-errors": True})
        except PolicyUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001 - requests', opa_client's, anything else
            self._loaded = False  # reload (and check the revision) after a sidecar restart
            if is_timeout(exc):
                raise PolicyUnavailableError("the OPA server did not answer in time",
                                             code="policy_timeout") from exc
            raise PolicyUnavailableError(
                "the OPA server is unreachable or failed", code="policy_engine_error",
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
