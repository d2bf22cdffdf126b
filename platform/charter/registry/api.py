"""Registry endpoints under /api/v1: parse -> authorize (in the service) -> call -> serialize."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from charter import scope
from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.audit import receipts
from charter.registry import service
from charter.registry.schemas import (
    ApprovalConditions,
    EvaluationIn,
    EvaluationOut,
    ExceptionCreate,
    ModelCreate,
    ModelOut,
    ReceiptOut,
    RequiredReason,
    State,
    Transition,
    VersionOut,
    VersionSpec,
    VersionUpdate,
)
from charter.uow import Recorded, collecting

bp = ApiBlueprint("registry", __name__, url_prefix="/api/v1")


def _with_receipt(version: object, recorded: list[Recorded], action: str) -> VersionOut:
    """The version, with the signed receipt of the event its change wrote (committed)."""
    out = VersionOut.model_validate(version)
    receipt = receipts.issue(scope.current().settings, recorded, action)
    if receipt is not None:
        out.receipt = ReceiptOut(**receipt)
    return out


class VersionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    state: State | None = None


@bp.operation("GET", "/models", summary="List models", response=list[ModelOut])
def list_models(actor: Actor) -> object:
    return service.list_models()


@bp.operation("POST", "/models", summary="Register a model family", body=ModelCreate,
              response=ModelOut, status=201, errors=(403, 409))
def create_model(actor: Actor, body: ModelCreate) -> object:
    return service.create_model(actor, body)


@bp.operation("GET", "/models/<model_id>", summary="Get a model", response=ModelOut)
def get_model(actor: Actor, model_id: str) -> object:
    return service.get_model(model_id)


@bp.operation("GET", "/models/<model_id>/versions", summary="List a model's versions",
              query=VersionQuery, response=list[VersionOut])
def list_model_versions(actor: Actor, model_id: str, query: VersionQuery) -> object:
    return service.list_versions(model_id, query.state)


@bp.operation("POST", "/models/<model_id>/versions", summary="Create a draft version",
              body=VersionSpec, response=VersionOut, status=201, errors=(403, 409))
def create_version(actor: Actor, model_id: str, body: VersionSpec) -> object:
    return service.create_version(actor, model_id, body)


@bp.operation("GET", "/versions", summary="List versions of all models", query=VersionQuery,
              response=list[VersionOut])
def list_versions(actor: Actor, query: VersionQuery) -> object:
    return service.list_versions(None, query.state)


@bp.operation("GET", "/versions/<version_id>", summary="Get a version", response=VersionOut)
def get_version(actor: Actor, version_id: str) -> object:
    return service.get_version(version_id)


@bp.operation("PATCH", "/versions/<version_id>", summary="Edit a draft version",
              body=VersionUpdate, response=VersionOut, errors=(403, 409))
def update_version(actor: Actor, version_id: str, body: VersionUpdate) -> object:
    return service.update_draft(actor, version_id, body)


@bp.operation("POST", "/versions/<version_id>/submit",
              summary="Submit a draft for approval (runs the admission policy)",
              body=Transition, response=VersionOut, errors=(403, 409, 503))
def submit_version(actor: Actor, version_id: str, body: Transition) -> object:
    with collecting() as recorded:
        version = service.submit_version(actor, version_id, body)
    return _with_receipt(version, recorded, "version.submit")


@bp.operation("POST", "/versions/<version_id>/approve",
              summary="Approve a submitted version with conditions (four-eyes, admission)",
              body=ApprovalConditions, response=VersionOut, errors=(403, 409, 503))
def approve_version(actor: Actor, version_id: str, body: ApprovalConditions) -> object:
    with collecting() as recorded:
        version = service.approve_version(actor, version_id, body)
    return _with_receipt(version, recorded, "version.approve")


@bp.operation("POST", "/versions/<version_id>/reject", summary="Reject a submitted version",
              body=RequiredReason, response=VersionOut, errors=(403, 409))
def reject_version(actor: Actor, version_id: str, body: RequiredReason) -> object:
    with collecting() as recorded:
        version = service.reject_version(actor, version_id, body)
    return _with_receipt(version, recorded, "version.reject")


@bp.operation("POST", "/versions/<version_id>/deprecate",
              summary="Deprecate an approved version", body=RequiredReason,
              response=VersionOut, errors=(403, 409))
def deprecate_version(actor: Actor, version_id: str, body: RequiredReason) -> object:
    with collecting() as recorded:
        version = service.deprecate_version(actor, version_id, body)
    return _with_receipt(version, recorded, "version.deprecate")


@bp.operation("POST", "/versions/<version_id>/revoke", summary="Revoke an approved version",
              body=RequiredReason, response=VersionOut, errors=(403, 409))
def revoke_version(actor: Actor, version_id: str, body: RequiredReason) -> object:
    with collecting() as recorded:
        version = service.revoke_version(actor, version_id, body)
    return _with_receipt(version, recorded, "version.revoke")


@bp.operation("POST", "/versions/<version_id>/admission",
              summary="Run the admission policy again and store its findings",
              response=VersionOut, errors=(403, 409, 503))
def run_admission(actor: Actor, version_id: str) -> object:
    return service.run_admission(actor, version_id)


@bp.operation("POST", "/versions/<version_id>/exceptions",
              summary="Waive named admission violations until a date (admins, justified)",
              body=ExceptionCreate, response=VersionOut, status=201, errors=(403, 409))
def grant_exception(actor: Actor, version_id: str, body: ExceptionCreate) -> object:
    with collecting() as recorded:
        version = service.grant_exception(actor, version_id, body)
    return _with_receipt(version, recorded, "version.exception")


@bp.operation("POST", "/versions/<version_id>/evaluations",
              summary="Attach evaluation results (lm-eval-harness JSON, OpenCompass summary)",
              body=EvaluationIn, response=EvaluationOut, status=201, errors=(403, 409, 422))
def attach_evaluation(actor: Actor, version_id: str, body: EvaluationIn) -> object:
    return service.attach_evaluation(actor, version_id, body)


@bp.operation("GET", "/versions/<version_id>/evaluations",
              summary="A version's evaluation results, the newest first",
              response=list[EvaluationOut])
def list_evaluations(actor: Actor, version_id: str) -> object:
    return service.list_evaluations(version_id)
