"""Models and versions: the list with filters, a version's page, and its lifecycle actions
(submit, approve with conditions, reject, deprecate, revoke)."""

from __future__ import annotations

from datetime import UTC, datetime, time

from flask import g, request, url_for
from werkzeug.wrappers import Response

from charter.audit.service import EventFilter, list_events
from charter.console.blueprint import bp
from charter.console.ui import action, form_list, markdown, render
from charter.errors import ValidationFailedError
from charter.policy import service as policy
from charter.registry import service as registry
from charter.registry.models import STATES
from charter.registry.rules import four_eyes_ok
from charter.registry.schemas import ApprovalConditions, RequiredReason, Transition


@bp.get("/models")
def models() -> Response:
    state = request.args.get("state") or None
    if state not in (None, *STATES):
        state = None
    query = (request.args.get("q") or "").strip().lower()
    versions = [v for v in registry.list_versions(state=state)
                if not query or query in v.model.name.lower() or query in v.model.publisher.lower()
                or query in (v.license_card or "").lower()]
    return render("console/pages/models.html", section="models", title="Models",
                  versions=versions, states=STATES, state=state, q=query,
                  model_count=len(registry.list_models()))


@bp.get("/versions/<version_id>")
def version(version_id: str) -> Response:
    v = registry.get_version(version_id)
    trail = list_events(EventFilter(target_type="model_version", target_id=v.id, limit=200))
    authored = not four_eyes_ok(g.actor.user_id, v.created_by_user_id, v.submitted_by_user_id,
                                *v.editor_user_ids)
    data = policy.describe()["data"]
    zones = sorted(data.get("residency", {}).get("zones", {}))
    data_classes = sorted(data.get("residency", {}).get("data_classes", {}))
    purposes = sorted(data.get("organisation", {}).get("license_purposes", {}) or [])
    return render("console/pages/version.html", section="models",
                  title=f"{v.model.name} {v.label}", v=v, trail=trail, authored=authored,
                  license=data.get("licenses", {}).get(v.license_card or ""), zones=zones,
                  data_classes=data_classes,
                  purposes=purposes,
                  decisions=sorted(v.decisions, key=lambda d: d.decided_at),
                  card_html=markdown(registry.card_text(v.id)),
                  lineage=registry.lineage(v.id))


def _back(version_id: str) -> str:
    return url_for("console.version", version_id=version_id)


def _row_version() -> int | None:
    raw = request.form.get("row_version", "")
    return int(raw) if raw.isdigit() else None


def _reason() -> RequiredReason:
    return RequiredReason(row_version=_row_version(), reason=request.form.get("reason", ""))


@bp.post("/versions/<version_id>/submit")
@action(_back)
def submit(version_id: str) -> str:
    v = registry.submit_version(g.actor, version_id, Transition(
        row_version=_row_version(), reason=request.form.get("reason", "")))
    return f"Submitted {v.model.name} {v.label} for approval."


def _expiry(raw: str) -> datetime:
    try:
        day = datetime.strptime(raw, "%Y-%m-%d").date()
    except ValueError:
        raise ValidationFailedError("the approval needs an end date", details={"errors": [
            {"field": "expires_at", "code": "required", "message": "a date (YYYY-MM-DD)"}]}
        ) from None
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC)


@bp.post("/versions/<version_id>/approve")
@action(_back)
def approve(version_id: str) -> str:
    conditions = ApprovalConditions(
        row_version=_row_version(), reason=request.form.get("reason", ""),
        allowed_regions=request.form.getlist("allowed_regions"),
        allowed_data_classes=request.form.getlist("allowed_data_classes"),
        allowed_purposes=form_list("allowed_purposes"),
        expires_at=_expiry(request.form.get("expires_at", "")))
    v = registry.approve_version(g.actor, version_id, conditions)
    return f"Approved {v.model.name} {v.label} until {conditions.expires_at:%Y-%m-%d}."


@bp.post("/versions/<version_id>/reject")
@action(_back)
def reject(version_id: str) -> str:
    v = registry.reject_version(g.actor, version_id, _reason())
    return f"Rejected {v.model.name} {v.label}."


@bp.post("/versions/<version_id>/deprecate")
@action(_back)
def deprecate(version_id: str) -> str:
    v = registry.deprecate_version(g.actor, version_id, _reason())
    return f"Deprecated {v.model.name} {v.label}: no new deployments."


@bp.post("/versions/<version_id>/revoke")
@action(_back)
def revoke(version_id: str) -> str:
    if request.form.get("confirm") != "revoke":
        raise ValidationFailedError("confirm the revocation: it stops all traffic at once and "
                                    "cannot be undone", code="confirmation_required")
    v = registry.revoke_version(g.actor, version_id, _reason())
    return f"Revoked {v.model.name} {v.label}: its traffic stopped."
