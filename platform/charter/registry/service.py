"""Registry rules: models, versions, and the lifecycle with its four-eyes approval."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from charter.audit.service import append_event
from charter.db import unit_of_work, utcnow
from charter.errors import (
    ConflictError,
    IllegalTransitionError,
    NotFoundError,
    SelfApprovalError,
    StaleVersionError,
    ValidationFailedError,
)
from charter.identity.actor import Actor
from charter.registry.models import UNSAFE_FORMATS, ApprovalDecision, Model, ModelFile, ModelVersion
from charter.registry.schemas import (
    ApprovalConditions,
    ModelCreate,
    RequiredReason,
    Transition,
    VersionSpec,
    VersionUpdate,
)

STEWARDS = ("admin", "steward")
APPROVERS = ("admin", "approver")

# The whole lifecycle: (from state, action) -> to state. Nothing else is allowed.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("draft", "submit"): "submitted",
    ("submitted", "approve"): "approved",
    ("submitted", "reject"): "rejected",
    ("approved", "deprecate"): "deprecated",
    ("approved", "revoke"): "revoked",
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def create_model(actor: Actor, spec: ModelCreate) -> Model:
    actor.require(*STEWARDS, action="model.create", target_type="model", target_id=spec.name)
    with unit_of_work() as session:
        if session.scalar(select(Model.id).where(Model.name == spec.name)):
            raise ConflictError(f"a model named {spec.name!r} exists", code="model_exists")
        model = Model(id=str(uuid.uuid4()), created_by=actor.ref, **spec.model_dump())
        session.add(model)
        session.flush()
        append_event(
            actor=actor.ref, action="model.create", target_type="model", target_id=model.id,
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


def create_version(
    actor: Actor, model_id: str, spec: VersionSpec, *, pickle_files: Sequence[str] = ()
) -> ModelVersion:
    """`pickle_files`: paths an inspection found to be pickles by content, whatever their name."""
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
        version = ModelVersion(
            id=str(uuid.uuid4()),
            model_id=model.id,
            model=model,
            state="draft",
            unsafe_weights=unsafe_weights(spec.weight_format, paths) or bool(pickle_files),
            total_bytes=sum(f.size for f in spec.files),
            files=[
                ModelFile(path=f.path, size=f.size, sha256=f.sha256, kind=_file_kind(f.path))
                for f in spec.files
            ],
            decisions=[],
            created_by=actor.ref,
            created_by_user_id=actor.user_id,
            **fields,
        )
        session.add(version)
        session.flush()
        append_event(
            actor=actor.ref, action="version.create", target_type="model_version",
            target_id=version.id,
            details={
                "model": model.name, "label": spec.label,
                "source_revision": spec.source_revision, "weight_format": spec.weight_format,
                "unsafe_weights": version.unsafe_weights, "files": len(paths),
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
        version.row_version += 1
        session.flush()
        append_event(
            actor=actor.ref, action="version.update", target_type="model_version",
            target_id=version.id, details={"before": before, "after": values},
        )
        return version


def _transition(
    session: Session, actor: Actor, version: ModelVersion, action: str, reason: str,
    extra: dict[str, Any] | None = None,
) -> None:
    target = TRANSITIONS.get((version.state, action))
    if target is None:
        allowed = sorted(a for (s, a) in TRANSITIONS if s == version.state)
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
    append_event(
        actor=actor.ref, action=f"version.{action}", target_type="model_version",
        target_id=version.id,
        details={"model": version.model.name, "label": version.label, "from": before,
                 "to": target, "reason": reason, **(extra or {})},
    )


def submit_version(actor: Actor, version_id: str, req: Transition) -> ModelVersion:
    actor.require(*STEWARDS, action="version.submit", target_type="model_version",
                  target_id=version_id)
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, req.row_version)
        version.submitted_at = utcnow()
        version.submitted_by_user_id = actor.user_id
        _transition(session, actor, version, "submit", req.reason)
        return version


def _four_eyes(actor: Actor, version: ModelVersion, action: str) -> None:
    authors = {version.created_by_user_id, version.submitted_by_user_id}
    if actor.user_id in authors:
        raise SelfApprovalError(
            "four-eyes rule: the person who created or submitted a version cannot decide on it",
            details={"rule": "four_eyes"},
        ).audited(actor.ref, f"version.{action}", "model_version", version.id)


def approve_version(actor: Actor, version_id: str, cond: ApprovalConditions) -> ModelVersion:
    actor.require(*APPROVERS, action="version.approve", target_type="model_version",
                  target_id=version_id)
    now = utcnow()
    with unit_of_work() as session:
        version = _version(session, version_id)
        _check_row_version(version, cond.row_version)
        _four_eyes(actor, version, "approve")
        problems = _condition_problems(version, cond, now)
        if problems:
            raise ValidationFailedError("the approval conditions are invalid",
                                        details={"errors": problems})
        decision = _decide(session, actor, version, "approved", cond.reason, cond)
        _transition(session, actor, version, "approve", cond.reason,
                    {"decision_id": decision.id, "conditions": _conditions(cond)})
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
        _transition(session, actor, version, action, req.reason)
        return version
