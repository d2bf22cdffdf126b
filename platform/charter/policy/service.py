"""Policy decisions: evaluate, give each an id, record it in the audit log, fail closed."""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785

from charter import scope
from charter.actor import Actor
from charter.audit.chain import canonical_json
from charter.audit.journal import Event
from charter.errors import ConfigurationError, ValidationFailedError
from charter.policy.bundle import POLICIES, PolicyBundle, default_policy_dir
from charter.policy.cache import VerdictCache
from charter.policy.contracts import Contracts
from charter.policy.engine import (
    Decision,
    Finding,
    InProcessEngine,
    PolicyEngine,
    PolicyUnavailableError,
    RemoteEngine,
    Verdict,
)
from charter.settings import Settings
from charter.tracing import set_attributes
from charter.uow import record_decision, unit_of_work


class Policies:
    """A Runtime's policy engine and its verdict cache."""

    def __init__(self, engine: PolicyEngine, verdicts: VerdictCache | None = None) -> None:
        self.engine = engine
        self.verdicts = verdicts or VerdictCache()
        self.contracts = Contracts(engine.bundle)
        # Dispatch violations that rule out only the node's region (policy data:
        # data.charter.dispatch.regional_violations); none without that file.
        found = engine.bundle.data["charter"].get("dispatch", {}).get("regional_violations")
        self.regional_violations = frozenset(
            c for c in (found if isinstance(found, list) else []) if isinstance(c, str))
        self.inspection = InspectionScope.of(engine.bundle.data["charter"].get("inspection"))


@dataclass(frozen=True, slots=True)
class InspectionScope:
    """Whose requests have their content inspected (data.charter.inspection.inspect): any
    request of a listed team, to a listed model or serving name, or labelled with a listed
    data class; "*" lists everything. Empty: nothing is inspected."""

    data_classes: frozenset[str] = frozenset()
    teams: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()

    @classmethod
    def of(cls, data: Any) -> InspectionScope:
        scope = data.get("inspect", {}) if isinstance(data, dict) else {}
        return cls(*(frozenset(scope.get(k, [])) for k in ("data_classes", "teams", "models")))

    def __bool__(self) -> bool:
        """Whether anything at all is inspected."""
        return bool(self.data_classes or self.teams or self.models)

    def applies(self, team: str | None, models: tuple[str, ...], data_class: str) -> bool:
        return bool(
            {"*", data_class} & self.data_classes
            or (team is not None and {"*", team} & self.teams)
            or {"*", *models} & self.models)


def build_engine(settings: Settings) -> PolicyEngine:
    """The settings' engine, loaded with the policy bundle (a broken policy fails here)."""
    root = Path(settings.policy_dir) if settings.policy_dir else default_policy_dir()
    bundle = PolicyBundle.load(root)
    if settings.policy_backend == "inprocess":
        return InProcessEngine(bundle)
    if settings.policy_backend == "remote":
        return RemoteEngine(bundle, settings.opa_url, timeout_s=settings.opa_timeout_s,
                            load_timeout_s=settings.opa_load_timeout_s,
                            push=settings.opa_push_policies)
    raise ConfigurationError(f"unknown policy backend {settings.policy_backend!r}")


def build_policies(settings: Settings) -> Policies:
    return Policies(build_engine(settings))


def input_digest(input_doc: dict[str, Any]) -> str:
    try:
        return "sha256:" + hashlib.sha256(canonical_json(input_doc)).hexdigest()
    except rfc8785.CanonicalizationError as exc:  # e.g. an integer beyond 2**53
        raise ValidationFailedError(
            "the input cannot be recorded exactly: it holds a number JSON cannot carry "
            "exactly (integers are limited to +-2**53 - 1) or a non-finite number",
            details={"errors": [{"field": "input", "code": "not_canonical",
                                 "message": str(exc)[:200]}]}) from None


def _decisions() -> Any:
    return scope.current().counter(
        "charter_policy_decisions_total", "Policy decisions by policy, result (allow, deny, "
        "error) and first violation or error code", ("policy", "result", "code"))


def evaluate(
    policy: str, input_doc: dict[str, Any], *, actor: str, target_type: str, target_id: str,
    context: dict[str, Any] | None = None,
) -> tuple[Decision, Event]:
    """Evaluate without writing: the decision and the audit event that must record it
    (traced as `charter.policy.decide`, with the policy, the result and the decision id)."""
    with scope.current().tracing.span("charter.policy.decide",
                                      **{"charter.policy": policy}) as span:
        decision, event = _evaluate(policy, input_doc, actor=actor, target_type=target_type,
                                    target_id=target_id, context=context)
        set_attributes(span, **{"charter.policy.allow": decision.allow,
                                "charter.decision_id": decision.decision_id})
        return decision, event


def _evaluate(
    policy: str, input_doc: dict[str, Any], *, actor: str, target_type: str, target_id: str,
    context: dict[str, Any] | None = None,
) -> tuple[Decision, Event]:
    """Evaluate without writing: the decision and the audit event that must record it.

    An engine failure raises PolicyUnavailableError whose `events` hold the event that
    records the failure (charter.uow writes them after the caller's rollback; the gateway
    commits them with its refusal). The caller records the decision's event in the same
    transaction as the action it decides (charter.uow.record_decision).
    """
    policies = scope.current().policies
    engine, cache = policies.engine, policies.verdicts
    digest = input_digest(input_doc)
    decision_id = str(uuid.uuid4())
    base = {"policy": policy, "decision_id": decision_id, "input_digest": digest,
            "engine": engine.name, "policy_revision": engine.revision, **(context or {})}
    cache_key = VerdictCache.key(engine.revision, policy, input_doc)
    verdict = cache.get(cache_key, input_doc) if cache_key else None
    started = time.perf_counter()
    breach = policies.contracts.check(policy, input_doc) if verdict is None else None
    if breach is not None:  # decided here, the same on every engine: none sees it
        found = breach.violation
        verdict = Verdict(False, (Finding(found["code"], found["msg"]),), (),
                          (time.perf_counter() - started) * 1000)
        base["contract"] = breach.path or "/"
    try:
        if verdict is None:
            verdict = engine.evaluate(policy, input_doc)
            if cache_key:
                cache.put(cache_key, input_doc, verdict)
        elif breach is None:
            base["cached"] = True
    except PolicyUnavailableError as exc:
        _decisions().labels(policy, "error", exc.code).inc()
        exc.details = {**exc.details, "decision_id": decision_id}
        exc.recording(Event.of(
            actor=actor, action="policy.decide", target_type=target_type,
            target_id=target_id, outcome="failure",
            details={**base, "error": exc.code, "message": exc.message}))
        raise
    decision = Decision(
        policy=policy, allow=verdict.allow, violations=verdict.violations,
        warnings=verdict.warnings, decision_id=decision_id, policy_revision=engine.revision,
        engine=engine.name, duration_ms=verdict.duration_ms, input_digest=digest,
        obligations=verdict.obligations,
    )
    _decisions().labels(policy, "allow" if decision.allow else "deny",
                        (decision.violation_codes or [""])[0][:64]).inc()
    event = Event.of(
        actor=actor, action="policy.decide", target_type=target_type, target_id=target_id,
        outcome="success" if decision.allow else "denied",
        details={**base, "allow": decision.allow, "violations": decision.violation_codes,
                 "warnings": sorted({w.code for w in decision.warnings}),
                 "duration_ms": decision.duration_ms,
                 **({"obligations": decision.obligations.as_dict()}
                    if decision.allow and decision.obligations.as_dict() else {})},
    )
    return decision, event


def playground(actor: Actor, policy: str, input_doc: dict[str, Any]) -> Decision:
    """Evaluate an input that someone typed (API and console playgrounds) and record the
    decision: the action here is the decision itself. An engine failure is recorded too
    (outcome `failure`) and raised."""
    actor.require("admin", "steward", "approver", action="policy.evaluate",
                  target_type="policy", target_id=policy if policy in POLICIES else "-")
    with unit_of_work() as session:
        decision, event = evaluate(policy, input_doc, actor=actor.ref, target_type="policy",
                                   target_id=policy, context={"playground": True})
        record_decision(session, event)
        return decision


def describe() -> dict[str, Any]:
    """The active revision, backend, packages and data, for GET /api/v1/policy."""
    engine = scope.current().policies.engine
    bundle: PolicyBundle = engine.bundle
    return {
        "revision": engine.revision,
        "engine": engine.name,
        "packages": sorted({f.package for f in bundle.policies}),
        "files": [f.path for f in bundle.policies],
        "data": bundle.data["charter"],
    }
