"""Registry rules: models, versions, and the lifecycle with its four-eyes approval."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, lazyload

from charter import identifiers
from charter.actor import SYSTEM, Actor
from charter.db import utcnow
from charter.errors import (
    AdmissionDeniedError,
    CharterError,
    ConflictError,
    IllegalTransitionError,
    NotFoundError,
    SelfApprovalError,
    StaleVersionError,
    ValidationFailedError,
)
from charter.policy import service as policy
from charter.policy.engine import Decision
from charter.registry import evaluations
from charter.registry.models import (
    UNSAFE_FORMATS,
    ApprovalDecision,
    Evaluation,
    Model,
    ModelFile,
    ModelVersion,
    PolicyException,
    task_of,
)
from charter.registry.rules import (
    EXPIRABLE,
    allowed_actions,
    four_eyes_ok,
    next_state,
)
from charter.registry.schemas import (
    ApprovalConditions,
    EvaluationIn,
    ExceptionCreate,
    ModelCreate,
    RequiredReason,
    Transition,
    VersionSpec,
    VersionUpdate,
)
from charter.uow import record, record_decision, unit_of_work

STEWARDS = ("admin", "steward")
PPM_LIMIT = 2**53 - 1  # a metric's value in ppm, held where every engine is exact
MAX_EXCEPTION = timedelta(days=180)
APPROVERS = ("admin", "approver")

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

log = structlog.get_logger("charter.registry")


def create_model(actor: Actor, spec: ModelCreate) -> Model:
    actor.require(*STEWARDS, action="model.create", target_type="model", target_id=spec.name)
    with unit_of_work() as session:
        if session.scalar(select(Model.id).where(Model.name == spec.name)):
            raise ConflictError(f"a model named {spec.name!r} exists", code="model_exists")
        model = Model(id=str(uuid.uuid4()), created_by=actor.ref, **spec.model_dump())
        session.add(model)
        session.flush()
        record(
            session, actor=actor.ref, action="model.create",
            target_type="model", target_id=model.id,
            details=spec.model_dump(),
        )
        return model


def list_models() -> list[Model]:
    with unit_of_work() as session:
        return list(session.scalars(select(Model).order_by(Model.name)))


def get_model(model_id: str) -> Model:
    with unit_of_work() as session:
        return _model(session, model_id)


def find_model(name: str) -> Model | None:
    with unit_of_work() as session:
        return session.scalar(select(Model).where(Model.name == name))


def _model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise NotFoundError(f"no model {model_id}", code="model_not_found")
    return model


def _version(session: Session, version_id: str) -> ModelVersion:
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise NotFoundError(f"no model version {version_id}", code="version_not_found")
    return version


def unsafe_weights(weight_format: str, paths: list[str]) -> bool:
    """Pickle-based weights run code when loaded: flag them whatever the submitter says."""
    return weight_format in UNSAFE_FORMATS or any(
        p.lower().endswith(PICKLE_SUFFIXES) for p in paths
    )


DERIVED = ("fine_tune", "adapter", "quantized", "merge")


def _linked_base(session: Session, spec: VersionSpec) -> str:
    """The base a derived version links to: registered, and named as its base_model (the
    base's repository, or its model's name). Returns the base_model to store."""
    base = session.get(ModelVersion, spec.base_version_id)
    if base is None:
        raise NotFoundError(f"no model version {spec.base_version_id} to derive from",
                            code="base_version_not_found")
    if spec.derivation not in DERIVED:
        raise ValidationFailedError(
            f"only a derived version ({', '.join(DERIVED)}) links to a base version; this "
            f"one is {spec.derivation}", code="base_version_not_derived",
            details={"derivation": spec.derivation})
    names = (base.model.source_repo, base.model.name)
    if spec.base_model is not None and spec.base_model not in names:
        raise ValidationFailedError(
            f"base_model {spec.base_model!r} is not the linked version's model "
            f"({' or '.join(names)})", code="base_version_mismatch",
            details={"base_model": spec.base_model, "base_version_id": base.id})
    return spec.base_model or base.model.source_repo


def custom_code(paths: Sequence[str]) -> bool:
    """Python files beside the weights are code a loader runs with trust_remote_code."""
    return any(p.lower().endswith(".py") for p in paths)


def create_version(
    actor: Actor, model_id: str, spec: VersionSpec, *, pickle_files: Sequence[str] = (),
    code_reasons: Sequence[str] = (),
) -> ModelVersion:
    """`pickle_files`: paths an inspection found to be pickles by content, whatever their
    name; `code_reasons`: what else an inspection found asks to run code (`auto_map`)."""
    actor.require(*STEWARDS, action="version.create", target_type="model", target_id=model_id)
    paths = [f.path for f in spec.files]
    if len(set(paths)) != len(paths):
        raise ValidationFailedError(
            "a file is listed twice",
            details={"errors": [{"field": "files", "code": "duplicate", "message":
                                 "each path may appear once"}]},
        )
    with unit_of_work() as session:
        model = _model(session, model_id)
        if session.scalar(
            select(ModelVersion.id).where(
                ModelVersion.model_id == model.id, ModelVersion.label == spec.label
            )
        ):
            raise ConflictError(
                f"{model.name} already has a version {spec.label!r}", code="version_exists"
            )
        fields = spec.model_dump(exclude={"files"})
        fields["task"] = spec.task or task_of(spec.card)
        if spec.base_version_id is not None:
            fields["base_model"] = _linked_base(session, spec)
        version = ModelVersion(
            id=str(uuid.uuid4()),
            model_id=model.id,
            model=model,
            state="draft",
            unsafe_weights=unsafe_weights(spec.weight_format, paths) or bool(pickle_files),
            custom_code=custom_code(paths) or bool(code_reasons),
            total_bytes=sum(f.size for f in spec.files),
            files=[
                ModelFile(path=f.path, size=f.size, sha256=f.sha256, kind=_file_kind(f.path))
                for f in spec.files
            ],
            decisions=[],
            exceptions=[],
            created_by=actor.ref,
            created_by_user_id=actor.user_id,
            editor_user_ids=[actor.user_id],
            **fields,
        )
        session.add(version)
        session.flush()
        record(session, actor=actor.ref, action="version.create", target_type="model_version",
            target_id=version.id,
            details={
                "model": model.name, "label": spec.label,
                "source_revision": spec.source_revision, "weight_format": spec.weight_format,
                "unsafe_weights": version.unsafe_weights, "custom_code": version.custom_code,
                "files": len(paths),
                "total_bytes": version.total_bytes,
                "license_declared": spec.license_declared, "license_card": spec.license_card,
            },
        )
        return version


def _file_kind(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".safetensors", ".gguf")) or lower.endswith(PICKLE_SUFFIXES):
        return "weights"
    if lower.endswith(("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return "tokenizer"
    if lower.endswith(".json"):
        return "config"
    if lower.endswith(".md"):
        return "card"
    return "other"


def list_versions(model_id: str | None = None, state: str | None = None) -> list[ModelVersion]:
    stmt = select(ModelVersion).order_by(ModelVersion.created_at)
    if model_id is not None:
        stmt = stmt.where(ModelVersion.model_id == model_id)
    if state is not None:
        stmt = stmt.where(ModelVersion.state == state)
    with unit_of_work() as session:
        if model_id is not None:
            _model(session, model_id)
        return list(session.scalars(stmt))


def get_version(version_id: str) -> ModelVersion:
    with unit_of_work() as session:
        return _version(session, version_id)


def _check_row_version(version: ModelVersion, expected: int | None) -> None:
    if expected is not None and expected != version.row_version:
        raise StaleVersionError(
            "the version was changed by someone else; reload it and try again",
            details={"current_row_version": version.row_version},
        )


def update_draft(actor: Actor, version_id: str, change: VersionUpdate) -> ModelVersion:
    actor.require(*STEWARDS, action="version.update", target_type="model_version",
                  target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, change.row_version)
        if version.state != "draft":
            raise IllegalTransitionError(
                f"only drafts can be edited; this version is {version.state}",
                details={"state": version.state},
            ).audited(actor.ref, "version.update", "model_version", version_id)
        values = change.model_dump(exclude={"row_version"}, exclude_unset=True)
        before = {k: getattr(version, k) for k in values}
        for key, value in values.items():
            setattr(version, key, value)
        _add_editor(version, actor)
        version.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action="version.update", target_type="model_version",
            target_id=version.id, details={"before": before, "after": values},
        )
        return version


def _transition(
    session: Session, actor: Actor, version: ModelVersion, action: str, reason: str,
    extra: dict[str, Any] | None = None,
) -> None:
    target = next_state(version.state, action)
    if target is None:
        allowed = allowed_actions(version.state)
        raise IllegalTransitionError(
            f"cannot {action} a version that is {version.state}",
            details={"state": version.state, "action": action, "allowed_actions": allowed},
        ).audited(actor.ref, f"version.{action}", "model_version", version.id)
    before = version.state
    version.state = target
    version.state_reason = reason
    version.state_changed_at = utcnow()
    version.row_version += 1
    session.flush()
    record(session, actor=actor.ref, action=f"version.{action}", target_type="model_version",
        target_id=version.id,
        details={"model": version.model.name, "label": version.label, "from": before,
                 "to": target, "reason": reason, **(extra or {})},
    )


def admission_input(session: Session, version: ModelVersion,
                    data_classes: Sequence[str] | None = None) -> dict[str, Any]:
    """What the admission policy sees: the version as registered, its lineage, and every
    metric of its attached evaluations (values in parts per million: integers, which every
    engine compares alike)."""
    base_approved = False
    base_state = None
    if version.base_version_id:
        base_state = session.scalar(select(ModelVersion.state).where(
            ModelVersion.id == version.base_version_id))
        base_approved = base_state == "approved"
    elif version.base_model:
        base_approved = session.scalar(
            select(ModelVersion.id)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(
                (Model.source_repo == version.base_model) | (Model.name == version.base_model),
                ModelVersion.state == "approved",
            )
            .limit(1)
        ) is not None
    return {
        "version": {
            "id": version.id,
            "model": version.model.name,
            "publisher": version.model.publisher,
            "source_repo": version.model.source_repo,
            "label": version.label,
            "source_revision": version.source_revision,
            "weight_format": version.weight_format,
            "unsafe_weights": version.unsafe_weights,
            "custom_code": version.custom_code,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "kind": f.kind}
                      for f in version.files],
            "license_declared": identifiers.stored(version.license_declared),
            "license_card": identifiers.stored(version.license_card),
            "base_model": version.base_model,
            "derivation": version.derivation,
            "datasets": list(version.datasets),
            "intended_use": version.intended_use,
            "risk_tier": version.risk_tier,
            "storage_region": identifiers.stored(version.storage_region),
            "hosting_regions": identifiers.stored(list(version.hosting_regions)),
        },
        "lineage": {"base_model_approved": base_approved,
                    **({"base_version_state": base_state} if base_state else {})},
        "now": int(utcnow().timestamp()),
        "evaluations": [
            {"task": m["task"], "metric": m["metric"], "filter": m["filter"],
             "value_ppm": max(-PPM_LIMIT, min(PPM_LIMIT, round(m["value"] * 1_000_000))),
             "format": e.format,
             "sha256": e.sha256, "attached_at": int(e.attached_at.timestamp()),
             "evaluated_at": int(e.evaluated_at.timestamp()) if e.evaluated_at else None}
            for e in session.scalars(select(Evaluation).where(
                Evaluation.version_id == version.id).order_by(Evaluation.attached_at))
            for m in e.metrics],
        **({"data_classes": identifiers.stored(list(data_classes))}
           if data_classes is not None else {}),
    }


def _admit(session: Session, actor: Actor, version: ModelVersion, *,
           allowed_states: tuple[str, ...], action: str,
           data_classes: Sequence[str] | None = None) -> Decision:
    """Run the admission policy on the version as it is now and record the decision in the
    caller's unit of work (kept even if the action then fails: charter.uow).
    `data_classes`: what the approval being decided would allow."""
    if version.state not in allowed_states:
        allowed = allowed_actions(version.state)
        raise IllegalTransitionError(
            f"cannot {action} a version that is {version.state}",
            details={"state": version.state, "action": action, "allowed_actions": allowed},
        ).audited(actor.ref, f"version.{action}", "model_version", version.id)
    decision, event = policy.evaluate("admission",
                                      admission_input(session, version, data_classes),
                                      actor=actor.ref, target_type="model_version",
                                      target_id=version.id)
    record_decision(session, event)
    return decision


def _findings(decision: Decision) -> dict[str, Any]:
    return {**decision.as_dict(), "decided_at": utcnow().isoformat()}


def run_admission(actor: Actor, version_id: str) -> ModelVersion:
    """Re-run admission (after a policy or data change) and store the findings."""
    actor.require(*STEWARDS, *APPROVERS, action="version.admission",
                  target_type="model_version", target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        decision = _admit(session, actor, version, allowed_states=("draft", "submitted"),
                          action="admission")
        version.admission = _findings(decision)
        version.row_version += 1
        return version


def submit_version(actor: Actor, version_id: str, req: Transition) -> ModelVersion:
    actor.require(*STEWARDS, action="version.submit", target_type="model_version",
                  target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        decision = _admit(session, actor, version, allowed_states=("draft",), action="submit")
        _check_row_version(version, req.row_version)
        version.submitted_at = utcnow()
        version.submitted_by_user_id = actor.user_id
        _add_editor(version, actor)
        version.admission = _findings(decision)
        _transition(session, actor, version, "submit", req.reason,
                    {"admission": {"decision_id": decision.decision_id,
                                   "allow": decision.allow,
                                   "violations": decision.violation_codes}})
        return version


def grant_exception(actor: Actor, version_id: str, req: ExceptionCreate) -> ModelVersion:
    """An admin waives named admission violations until a date, with a justification."""
    actor.require("admin", action="version.exception", target_type="model_version",
                  target_id=version_id)
    now = utcnow()
    problems = []
    if req.expires_at <= now:
        problems.append({"field": "expires_at", "code": "in_past",
                         "message": "expires_at must be in the future"})
    elif req.expires_at > now + MAX_EXCEPTION:
        problems.append({"field": "expires_at", "code": "too_long",
                         "message": f"exceptions last at most {MAX_EXCEPTION.days} days"})
    with unit_of_work() as session:
        version = _version(session, version_id)
        if version.state != "submitted":
            raise IllegalTransitionError(
                f"exceptions are granted on submitted versions; this one is {version.state}",
                details={"state": version.state},
            ).audited(actor.ref, "version.exception", "model_version", version.id)
        found = {v["code"] for v in (version.admission or {}).get("violations", [])}
        unknown = sorted(set(req.codes) - found)
        if unknown:
            problems.append({"field": "codes", "code": "not_a_finding",
                             "message": f"not among the version's admission violations: "
                                        f"{unknown}"})
        if problems:
            raise ValidationFailedError("the exception is invalid", details={"errors": problems})
        row = PolicyException(
            id=str(uuid.uuid4()), version_id=version.id, codes=sorted(set(req.codes)),
            justification=req.justification, granted_by=actor.ref,
            granted_by_user_id=actor.user_id, expires_at=req.expires_at,
            decision_id=version.admission["decision_id"],  # type: ignore[index]
        )
        session.add(row)
        version.exceptions.append(row)
        version.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action="version.exception", target_type="model_version",
            target_id=version.id,
            details={"exception_id": row.id, "codes": row.codes,
                     "justification": req.justification,
                     "expires_at": req.expires_at.isoformat(),
                     "decision_id": row.decision_id},
        )
        return version


def _add_editor(version: ModelVersion, actor: Actor) -> None:
    if actor.user_id not in version.editor_user_ids:
        version.editor_user_ids = [*version.editor_user_ids, actor.user_id]


def _four_eyes(actor: Actor, version: ModelVersion, action: str) -> None:
    if not four_eyes_ok(actor.user_id, version.created_by_user_id,
                        version.submitted_by_user_id, *version.editor_user_ids):
        raise SelfApprovalError(
            "four-eyes rule: whoever created, edited or submitted a version cannot decide "
            "on it", details={"rule": "four_eyes"},
        ).audited(actor.ref, f"version.{action}", "model_version", version.id)


def approve_version(actor: Actor, version_id: str, cond: ApprovalConditions) -> ModelVersion:
    actor.require(*APPROVERS, action="version.approve", target_type="model_version",
                  target_id=version_id)
    now = utcnow()
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, cond.row_version)  # refuse what needs no decision first
        _four_eyes(actor, version, "approve")
        problems = _condition_problems(version, cond, now)
        if problems:
            raise ValidationFailedError("the approval conditions are invalid",
                                        details={"errors": problems})
        admission = _admit(session, actor, version, allowed_states=("submitted",),
                           action="approve", data_classes=cond.allowed_data_classes)
        version.admission = _findings(admission)
        waived = {c for e in version.exceptions if e.active(now) for c in e.codes}
        blocking = sorted(set(admission.violation_codes) - waived)
        if blocking:
            raise AdmissionDeniedError(
                "admission policy denies this version: "
                + "; ".join(v.msg for v in admission.violations if v.code in blocking),
                details={"violations": blocking, "decision_id": admission.decision_id,
                         "policy_revision": admission.policy_revision},
            ).audited(actor.ref, "version.approve", "model_version", version.id)
        decision = _decide(session, actor, version, "approved", cond.reason, cond)
        _transition(session, actor, version, "approve", cond.reason,
                    {"decision_id": decision.id, "conditions": _conditions(cond),
                     "admission": {"decision_id": admission.decision_id,
                                   "policy_revision": admission.policy_revision,
                                   "waived": sorted(waived & set(admission.violation_codes))}})
        return version


def _condition_problems(
    version: ModelVersion, cond: ApprovalConditions, now: datetime
) -> list[dict[str, str]]:
    problems = []
    if cond.expires_at.tzinfo is None:
        problems.append({"field": "expires_at", "code": "timezone",
                         "message": "expires_at needs a timezone (e.g. Z)"})
    elif cond.expires_at <= now:
        problems.append({"field": "expires_at", "code": "in_past",
                         "message": "expires_at must be in the future"})
    outside = sorted(set(cond.allowed_regions) - set(version.hosting_regions))
    if version.hosting_regions and outside:
        problems.append({"field": "allowed_regions", "code": "not_hosting_region",
                         "message": f"not among the version's hosting regions: {outside}"})
    return problems


def _conditions(cond: ApprovalConditions) -> dict[str, Any]:
    return {
        "allowed_regions": sorted(set(cond.allowed_regions)),
        "allowed_data_classes": sorted(set(cond.allowed_data_classes)),
        "allowed_purposes": sorted(set(cond.allowed_purposes)),
        "expires_at": cond.expires_at.isoformat(),
    }


def _decide(
    session: Session, actor: Actor, version: ModelVersion, decision: str, reason: str,
    cond: ApprovalConditions | None = None,
) -> ApprovalDecision:
    row = ApprovalDecision(
        id=str(uuid.uuid4()),
        version_id=version.id,
        decision=decision,
        decided_by=actor.ref,
        decided_by_user_id=actor.user_id,
        reason=reason,
        allowed_regions=sorted(set(cond.allowed_regions)) if cond else [],
        allowed_data_classes=sorted(set(cond.allowed_data_classes)) if cond else [],
        allowed_purposes=sorted(set(cond.allowed_purposes)) if cond else [],
        expires_at=cond.expires_at if cond else None,
    )
    session.add(row)
    version.decisions.append(row)
    return row


def reject_version(actor: Actor, version_id: str, req: RequiredReason) -> ModelVersion:
    actor.require(*APPROVERS, action="version.reject", target_type="model_version",
                  target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, req.row_version)
        _four_eyes(actor, version, "reject")
        decision = _decide(session, actor, version, "rejected", req.reason)
        _transition(session, actor, version, "reject", req.reason, {"decision_id": decision.id})
        return version


def deprecate_version(actor: Actor, version_id: str, req: RequiredReason) -> ModelVersion:
    return _retire(actor, version_id, req, "deprecate")


def revoke_version(actor: Actor, version_id: str, req: RequiredReason) -> ModelVersion:
    return _retire(actor, version_id, req, "revoke")


def _retire(actor: Actor, version_id: str, req: RequiredReason, action: str) -> ModelVersion:
    actor.require(*APPROVERS, action=f"version.{action}", target_type="model_version",
                  target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, req.row_version)
        suspended = derivatives_of(session, version.id) if action == "revoke" else []
        _transition(session, actor, version, action, req.reason,
                    {"derivatives_suspended": suspended} if suspended else None)
        return version


def expire_approvals(now: datetime | None = None) -> list[str]:
    """Move every approved or deprecated version whose latest approval has run out (its
    expires_at <= now) to expired, as the system; returns the ids it expired.

    One transaction a version, so one failure does not hold up the rest. A person who
    changes a version meanwhile wins: the stale write is logged and the version skipped.
    """
    now = utcnow() if now is None else now
    if now.tzinfo is None:
        raise ValueError("expire_approvals needs a timezone-aware now")
    with unit_of_work() as session:
        candidates = list(session.scalars(
            select(ModelVersion.id)
            .where(
                ModelVersion.state.in_(EXPIRABLE),
                ModelVersion.id.in_(
                    select(ApprovalDecision.version_id).where(
                        ApprovalDecision.decision == "approved",
                        ApprovalDecision.expires_at <= now,
                    )
                ),
            )
            .order_by(ModelVersion.created_at, ModelVersion.id)
        ))
    expired = []
    for version_id in candidates:
        try:
            if _expire_version(version_id, now):
                expired.append(version_id)
        except StaleVersionError:
            log.warning("approval expiry skipped: the version changed meanwhile",
                        version_id=version_id)
        except CharterError as exc:
            log.exception("approval expiry failed", version_id=version_id, code=exc.code)
    return expired


def _latest_approval(version: ModelVersion) -> ApprovalDecision | None:
    approvals = [d for d in version.decisions if d.decision == "approved"]
    return approvals[-1] if approvals else None  # decisions are ordered by decided_at


def _expire_version(version_id: str, now: datetime) -> bool:
    with unit_of_work() as session:
        version = _version(session, version_id)
        approval = _latest_approval(version)
        # Read again in this transaction: the candidate list may be out of date.
        if (version.state not in EXPIRABLE or approval is None
                or approval.expires_at is None or approval.expires_at > now):
            return False
        expires_at = approval.expires_at.isoformat()
        _transition(session, SYSTEM, version, "expire", f"the approval expired at {expires_at}",
                    {"decision_id": approval.id, "expires_at": expires_at})
        return True


# --- what other domains read of the registry (plain values, never its rows) ----------------

SERVABLE = ("approved", "deprecated")


@dataclass(frozen=True, slots=True)
class VersionRef:
    id: str
    model_name: str
    state: str
    label: str = ""


@dataclass(frozen=True, slots=True)
class DispatchView:
    """A version as the dispatch policy sees it (`doc` is its `input.version`)."""

    id: str
    model_name: str
    doc: dict[str, Any]
    deprecated_at: int | None = None  # epoch seconds, for callers' Deprecation header


def version_refs(version_ids: Sequence[str]) -> dict[str, VersionRef]:
    """The versions' model names and states, by id (the ones that exist)."""
    with unit_of_work() as session:
        rows = session.execute(
            select(ModelVersion.id, Model.name, ModelVersion.state, ModelVersion.label)
            .join(Model, Model.id == ModelVersion.model_id)
            .where(ModelVersion.id.in_(list(version_ids)))).all()
        return {i: VersionRef(i, name, state, label) for i, name, state, label in rows}


def dispatch_view(version_id: str) -> DispatchView | None:
    """State, license and latest approval's conditions: what a dispatch is decided on."""
    with unit_of_work() as session:
        # Only the approval decisions are needed: the files and exceptions are never loaded.
        version = session.get(ModelVersion, version_id, options=[
            lazyload(ModelVersion.files), lazyload(ModelVersion.exceptions)])
        if version is None:
            return None
        return DispatchView(version.id, version.model.name, {
            "id": version.id, "model": version.model.name, "state": version.state,
            "task": version.task, "license": identifiers.stored(version.license_declared),
            "approval": _approval_doc(version), "lineage": _ancestors(session, version)},
            identifiers.epoch(version.state_changed_at) if version.state == "deprecated"
            else None)


MAX_LINEAGE = 16  # a derivation chain longer than this is cut (and the cut one refused)


def _ancestors(session: Session, version: ModelVersion) -> list[dict[str, Any]]:
    """The versions a version derives from, nearest first, each with its state and its
    latest approval's end: a derived version serves only while every one of them does
    (the dispatch policy's base_version_revoked, base_version_not_approved,
    base_approval_expired, which holds from the moment it ends, before the sweep moves the
    base to expired)."""
    out: list[dict[str, Any]] = []
    base_id = version.base_version_id
    while base_id is not None:
        if len(out) == MAX_LINEAGE:
            out.append({"id": base_id, "state": "draft"})  # too deep to trust: not servable
            break
        base = session.get(ModelVersion, base_id, options=[
            lazyload(ModelVersion.files), lazyload(ModelVersion.exceptions)])
        assert base is not None  # a foreign key: never deleted
        approval = _approval_doc(base) or {}
        out.append({"id": base_id, "state": base.state,
                    "expires_at": approval.get("expires_at"),
                    "expires_at_utc": approval.get("expires_at_utc")})
        base_id = base.base_version_id
    return out


@dataclass(frozen=True, slots=True)
class Relative:
    """A version in another's lineage, as the console and the exports show it."""

    id: str
    model: str
    label: str
    state: str
    derivation: str
    source_repo: str
    source_revision: str | None
    weights: tuple[str, ...]  # the SHA-256 of its weight files


@dataclass(frozen=True, slots=True)
class Lineage:
    ancestors: tuple[Relative, ...]  # what it derives from, nearest first
    derivatives: tuple[Relative, ...]  # what derives from it, directly or not, any state


def lineage(version_id: str) -> Lineage:
    """A version's registered ancestors and derivatives (an adapter's base, a base's
    adapters and builds)."""
    with unit_of_work() as session:
        version = _version(session, version_id)
        up = [a["id"] for a in _ancestors(session, version)]
        down = _descendants(session, version.id)
        rows = {v.id: v for v in session.scalars(select(ModelVersion).where(
            ModelVersion.id.in_(up + down)).options(lazyload(ModelVersion.exceptions)))}

        def relative(vid: str) -> Relative:
            v = rows[vid]
            return Relative(v.id, v.model.name, v.label, v.state, v.derivation,
                            v.model.source_repo, v.source_revision,
                            tuple(sorted({f.sha256 for f in v.files
                                          if f.kind == "weights" and f.sha256})))

        return Lineage(tuple(relative(i) for i in up if i in rows),
                       tuple(relative(i) for i in down))


def _descendants(session: Session, version_id: str, limit: int = 1000) -> list[str]:
    """The versions derived from this one, directly or through others, nearest first."""
    found: list[str] = []
    frontier = [version_id]
    while frontier and len(found) < limit:
        frontier = list(session.scalars(select(ModelVersion.id).where(
            ModelVersion.base_version_id.in_(frontier)).order_by(ModelVersion.id)))
        found.extend(frontier)
    return found


def derivatives_of(session: Session, version_id: str) -> list[str]:
    """The servable versions derived from this one, directly or through others: what its
    revocation suspends at dispatch."""
    found = _descendants(session, version_id)
    states = dict(session.execute(select(ModelVersion.id, ModelVersion.state).where(
        ModelVersion.id.in_(found))).all()) if found else {}
    return [v for v in found if states.get(v) in SERVABLE]


def _approval_doc(version: ModelVersion) -> dict[str, Any] | None:
    approvals = [d for d in version.decisions if d.decision == "approved"]
    if not approvals:
        return None
    last = approvals[-1]
    return {
        "allowed_regions": identifiers.stored(last.allowed_regions),
        "allowed_data_classes": identifiers.stored(last.allowed_data_classes),
        "allowed_purposes": identifiers.stored(last.allowed_purposes),
        "expires_at": identifiers.epoch(last.expires_at) if last.expires_at else None,
        "expires_at_utc": identifiers.utc_text(last.expires_at) if last.expires_at else None,
    }


@dataclass(frozen=True, slots=True)
class PinnedVersion:
    """What an approved version pins: its revision and each file's size and digest."""

    revision: str | None
    files: tuple[tuple[str, int, str], ...]  # (path, size, sha256)
    adapter_of: str | None = None  # the version it is a LoRA adapter of, if it is one


def pinned_files_of_servable() -> dict[str, PinnedVersion]:
    """The servable versions that pin at least one file digest, by id (what a node
    agent's statement is compared with)."""
    with unit_of_work() as session:
        found = list(session.scalars(
            select(ModelVersion).where(ModelVersion.state.in_(SERVABLE)).options(
                lazyload(ModelVersion.files), lazyload(ModelVersion.exceptions))))
        versions = {v.id: v.source_revision for v in found}
        adapter_of = {v.id: v.base_version_id for v in found if v.derivation == "adapter"}
        files: dict[str, list[tuple[str, int, str]]] = {}
        for f in session.scalars(select(ModelFile).where(
                ModelFile.version_id.in_(list(versions)), ModelFile.sha256.is_not(None))):
            assert f.sha256 is not None
            files.setdefault(f.version_id, []).append((f.path, f.size, f.sha256))
    return {vid: PinnedVersion(versions[vid], tuple(sorted(fs)), adapter_of.get(vid))
            for vid, fs in files.items()}


def attach_evaluation(actor: Actor, version_id: str, given: EvaluationIn, *,
                      served_as: tuple[str, ...] = ()) -> Evaluation:
    """Attach an evaluation's results to a version as evidence (stewards and admins):
    read (lm-eval-harness's JSON, OpenCompass's summary), held to the version (a file
    about another model, or another revision of it, is refused), kept with its digest,
    audited. `served_as`: serving names the evaluation ran under (Charter's own runs).
    Refusals: 422 `evaluation_malformed`, 422 `evaluation_model_mismatch`, 409
    `evaluation_exists`; each audited."""
    action = "version.evaluation_attach"
    actor.require(*STEWARDS, action=action, target_type="model_version",
                  target_id=version_id)
    raw = given.content.encode("utf-8")  # NULs and lone surrogates are refused with the body
    digest = hashlib.sha256(raw).hexdigest()
    with unit_of_work() as session:
        version = _version(session, version_id)
        try:
            results = evaluations.parse(given.content, given.format, column=given.column)
        except evaluations.MalformedResults as exc:
            raise ValidationFailedError(
                f"the evaluation results cannot be read: {exc}", code="evaluation_malformed",
                details={"sha256": digest, "format": given.format},
            ).audited(actor.ref, action, "model_version", version_id) from None
        known = [version.model.name, version.model.source_repo, *served_as]
        wrong_revision = (results.revision is not None and version.source_revision is not None
                          and results.revision != version.source_revision)
        if not results.names or not evaluations.matches(results.names, known) \
                or wrong_revision:
            raise ValidationFailedError(
                "the results are of another model: they name "
                f"{', '.join(results.names) or 'no model'}"
                + (f" at revision {results.revision}" if wrong_revision else "")
                + f", and this version is {version.model.name} ({version.model.source_repo}"
                + (f" at {version.source_revision}" if version.source_revision else "") + ")",
                code="evaluation_model_mismatch",
                details={"named": list(results.names), "revision": results.revision,
                         "expected": [k for k in known if k],
                         "expected_revision": version.source_revision, "sha256": digest},
            ).audited(actor.ref, action, "model_version", version_id)
        if session.scalar(select(Evaluation.id).where(
                Evaluation.version_id == version_id, Evaluation.sha256 == digest)):
            raise ConflictError(
                "these results are already attached to this version",
                code="evaluation_exists", details={"sha256": digest},
            ).audited(actor.ref, action, "model_version", version_id)
        evaluation = Evaluation(
            id=str(uuid.uuid4()), version_id=version_id, format=results.format,
            file_name=given.file_name, sha256=digest, size=len(raw), content=given.content,
            model_named=list(results.names), revision=results.revision,
            evaluated_at=results.evaluated_at,
            metrics=[m.as_dict() for m in results.metrics], task_hashes=results.task_hashes,
            attached_by=actor.ref, attached_by_user_id=actor.user_id)
        session.add(evaluation)
        session.flush()
        record(session, actor=actor.ref, action=action, target_type="model_version",
               target_id=version_id, details={
                   "evaluation_id": evaluation.id, "format": results.format,
                   "sha256": digest, "size": len(raw), "file_name": given.file_name,
                   "model_named": list(results.names), "revision": results.revision,
                   "tasks": sorted({m.task for m in results.metrics}),
                   "metrics": len(results.metrics)})
        return evaluation


def list_evaluations(version_id: str) -> list[Evaluation]:
    """A version's evaluations, the newest first."""
    with unit_of_work() as session:
        _version(session, version_id)
        return list(session.scalars(select(Evaluation).where(
            Evaluation.version_id == version_id).order_by(Evaluation.attached_at.desc())))


def card_text(version_id: str) -> str:
    """The version's model card text (Markdown), as registered."""
    with unit_of_work() as session:
        found = session.scalar(select(ModelVersion.card_text).where(
            ModelVersion.id == version_id))
    return found or ""


def tokenizer_pin(version_id: str) -> tuple[str, str, str | None] | None:
    """Where the version's tokenizer is looked for (its model's name and its label) and the
    digest its `tokenizer.json` must have, where the registry pinned one."""
    with unit_of_work() as session:
        row = session.execute(
            select(Model.name, ModelVersion.label).join(Model, Model.id == ModelVersion.model_id)
            .where(ModelVersion.id == version_id)).first()
        if row is None:
            return None
        digest = session.scalar(select(ModelFile.sha256).where(
            ModelFile.version_id == version_id,
            (ModelFile.path == "tokenizer.json") | ModelFile.path.endswith("/tokenizer.json")))
    return row.name, row.label, digest


def servable_version_for(source_repo: str | None, revision: str | None) -> str | None:
    """The newest servable version pinned to this repository and revision (what a node
    that reports them may be attested as), or None."""
    if not source_repo or not revision:
        return None
    with unit_of_work() as session:
        return session.scalar(
            select(ModelVersion.id).join(Model, Model.id == ModelVersion.model_id)
            .where(Model.source_repo == source_repo, ModelVersion.source_revision == revision,
                   ModelVersion.state.in_(SERVABLE))
            .order_by(ModelVersion.created_at.desc()).limit(1))

