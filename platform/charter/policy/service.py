"""Policy decisions: evaluate, give each an id, record it in the audit log, fail closed."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import rfc8785

from charter.audit.chain import canonical_json
from charter.audit.service import append_event
from charter.audit.writer import Event
from charter.db import unit_of_work
from charter.errors import ConfigurationError, ValidationFailedError
from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.cache import VerdictCache
from charter.policy.engine import (
    Decision,
    InProcessEngine,
    PolicyEngine,
    PolicyUnavailableError,
    RemoteEngine,
)
from charter.settings import Settings

_engine: PolicyEngine | None = None
_cache = VerdictCache()


def build_engine(settings: Settings) -> PolicyEngine:
    root = Path(settings.policy_dir) if settings.policy_dir else default_policy_dir()
    bundle = PolicyBundle.load(root)
    if settings.policy_backend == "inprocess":
        return InProcessEngine(bundle)
    if settings.policy_backend == "remote":
        return RemoteEngine(bundle, settings.opa_url, timeout_s=settings.opa_timeout_s,
                            push=settings.opa_push_policies)
    raise ConfigurationError(f"unknown policy backend {settings.policy_backend!r}")


def configure(settings: Settings) -> PolicyEngine:
    global _engine
    _engine = build_engine(settings)
    return _engine


def use_engine(engine: PolicyEngine | None) -> None:
    global _engine
    _engine = engine


def get_engine() -> PolicyEngine:
    if _engine is None:
        raise PolicyUnavailableError("no policy engine is configured",
                                     code="policy_not_configured")
    return _engine


def input_digest(input_doc: dict[str, Any]) -> str:
    try:
        return "sha256:" + hashlib.sha256(canonical_json(input_doc)).hexdigest()
    except rfc8785.CanonicalizationError as exc:  # e.g. an integer beyond 2**53
        raise ValidationFailedError(
            "the input cannot be recorded exactly: it holds a number JSON cannot carry "
            "exactly (integers are limited to +-2**53 - 1) or a non-finite number",
            details={"errors": [{"field": "input", "code": "not_canonical",
                                 "message": str(exc)[:200]}]}) from None


def evaluate(
    policy: str, input_doc: dict[str, Any], *, actor: str, target_type: str, target_id: str,
    context: dict[str, Any] | None = None,
) -> tuple[Decision, Event]:
    """Evaluate without writing: the decision and the audit event that must record it.

    An engine failure raises PolicyUnavailableError carrying, as `.event`, the event that
    records the failure. The caller writes the event before acting on the decision.
    """
    engine = get_engine()
    digest = input_digest(input_doc)
    decision_id = str(uuid.uuid4())
    base = {"policy": policy, "decision_id": decision_id, "input_digest": digest,
            "engine": engine.name, "policy_revision": engine.revision, **(context or {})}
    cache_key = VerdictCache.key(engine.revision, policy, input_doc)
    verdict = _cache.get(cache_key, input_doc) if cache_key else None
    try:
        if verdict is None:
            verdict = engine.evaluate(policy, input_doc)
            if cache_key:
                _cache.put(cache_key, input_doc, verdict)
        else:
            base["cached"] = True
    except PolicyUnavailableError as exc:
        exc.details = {**exc.details, "decision_id": decision_id}
        exc.event = Event.of(  # type: ignore[attr-defined]
            actor=actor, action="policy.decide", target_type=target_type,
            target_id=target_id, outcome="failure",
            details={**base, "error": exc.code, "message": exc.message})
        raise
    decision = Decision(
        policy=policy, allow=verdict.allow, violations=verdict.violations,
        warnings=verdict.warnings, decision_id=decision_id, policy_revision=engine.revision,
        engine=engine.name, duration_ms=verdict.duration_ms, input_digest=digest,
    )
    event = Event.of(
        actor=actor, action="policy.decide", target_type=target_type, target_id=target_id,
        outcome="success" if decision.allow else "denied",
        details={**base, "allow": decision.allow, "violations": decision.violation_codes,
                 "warnings": sorted({w.code for w in decision.warnings}),
                 "duration_ms": decision.duration_ms},
    )
    return decision, event


def decide(
    policy: str, input_doc: dict[str, Any], *, actor: str, target_type: str, target_id: str,
    context: dict[str, Any] | None = None,
) -> Decision:
    """Evaluate and record the decision (allow or deny) in its own transaction.

    An engine failure is recorded too (outcome `failure`) and raised: no decision, no
    action. A failure to record is raised as well: an unrecorded decision is not used.
    """
    try:
        decision, event = evaluate(policy, input_doc, actor=actor, target_type=target_type,
                                   target_id=target_id, context=context)
    except PolicyUnavailableError as exc:
        _append(exc.event)  # type: ignore[attr-defined]
        raise
    _append(event)
    return decision


def _append(event: Event) -> None:
    with unit_of_work():
        append_event(actor=event.actor, action=event.action, target_type=event.target_type,
                     target_id=event.target_id, outcome=event.outcome, details=event.details)


def describe() -> dict[str, Any]:
    """The active revision, backend, packages and data, for GET /api/v1/policy."""
    engine = get_engine()
    bundle: PolicyBundle = engine.bundle  # type: ignore[attr-defined]
    return {
        "revision": engine.revision,
        "engine": engine.name,
        "packages": sorted({f.package for f in bundle.policies}),
        "files": [f.path for f in bundle.policies],
        "data": bundle.data["charter"],
    }
