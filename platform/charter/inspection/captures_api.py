"""Investigation captures under /api/v1/captures: admins ask, auditors decide and read
(every read audited), either ends a running one (charter.inspection.captures)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.db import utcnow
from charter.inspection import captures
from charter.inspection.models import Capture

bp = ApiBlueprint("captures", __name__, url_prefix="/api/v1")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class CaptureCreate(_Strict):
    """Ask to record a team's requests and answers (admins; an auditor approves)."""

    team_id: Annotated[str, StringConstraints(min_length=1, max_length=36)]
    reason: Annotated[str, StringConstraints(min_length=1, max_length=10_000)]
    hours: Annotated[int, Field(ge=1, le=10_000)]
    retain_days: Annotated[int, Field(ge=1, le=10_000)]


class CaptureDecision(_Strict):
    note: Annotated[str, StringConstraints(max_length=10_000)] = ""
    row_version: Annotated[int, Field(ge=1)]


class CaptureOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    team_id: str
    reason: str
    hours: int
    retain_days: int
    state: str
    running: bool = False
    records: int = 0
    requested_by: str
    requested_at: datetime
    decided_by: str | None
    decided_at: datetime | None
    decision_note: str | None
    starts_at: datetime | None
    ends_at: datetime | None
    purge_after: datetime | None
    revoked_by: str | None
    revoked_at: datetime | None
    purged_at: datetime | None
    key_id: str | None
    row_version: int


class CaptureQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    team_id: Annotated[str, Field(max_length=36)] | None = None


class RecordQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: Annotated[int, Field(ge=1, le=captures.READ_LIMIT)] = 100
    before: AwareDatetime | None = None


class RecordOut(BaseModel):
    id: str
    created_at: datetime
    serving_name: str
    decision_id: str
    request_id: str | None
    content: dict[str, Any] | None
    error: str | None = None


def out(rows: list[Capture]) -> list[CaptureOut]:
    """The captures as the API shows them: whether each is recording now, how many records
    it holds; never its wrapped key."""
    counts = captures.record_counts([r.id for r in rows])
    now = utcnow()
    return [CaptureOut.model_validate(r).model_copy(update={
        "running": r.state == "approved" and r.starts_at is not None
        and r.ends_at is not None and r.starts_at <= now < r.ends_at,
        "records": counts.get(r.id, 0)}) for r in rows]


@bp.operation("GET", "/captures", summary="List investigation captures (admins, auditors)",
              query=CaptureQuery, response=list[CaptureOut], errors=(403,))
def list_captures(actor: Actor, query: CaptureQuery) -> object:
    return out(captures.list_captures(actor, query.team_id))


@bp.operation("POST", "/captures", summary="Ask to capture a team's requests (admins)",
              body=CaptureCreate, response=CaptureOut, status=201, errors=(403, 404, 409, 422))
def request_capture(actor: Actor, body: CaptureCreate) -> object:
    return out([captures.request_capture(actor, team_id=body.team_id, reason=body.reason,
                                         hours=body.hours, retain_days=body.retain_days)])[0]


@bp.operation("GET", "/captures/<capture_id>", summary="Get an investigation capture",
              response=CaptureOut, errors=(403, 404))
def get_capture(actor: Actor, capture_id: str) -> object:
    return out([captures.get_capture(actor, capture_id)])[0]


@bp.operation("POST", "/captures/<capture_id>/approve",
              summary="Approve a capture: it records from now (auditors, not the asker)",
              body=CaptureDecision, response=CaptureOut, errors=(403, 404, 409, 503))
def approve_capture(actor: Actor, capture_id: str, body: CaptureDecision) -> object:
    return out([captures.decide_capture(actor, capture_id, approve=True, note=body.note,
                                        row_version=body.row_version)])[0]


@bp.operation("POST", "/captures/<capture_id>/reject",
              summary="Reject a capture (auditors, not the asker)",
              body=CaptureDecision, response=CaptureOut, errors=(403, 404, 409))
def reject_capture(actor: Actor, capture_id: str, body: CaptureDecision) -> object:
    return out([captures.decide_capture(actor, capture_id, approve=False, note=body.note,
                                        row_version=body.row_version)])[0]


@bp.operation("POST", "/captures/<capture_id>/revoke",
              summary="End a running capture now (admins, auditors)",
              body=CaptureDecision, response=CaptureOut, errors=(403, 404, 409))
def revoke_capture(actor: Actor, capture_id: str, body: CaptureDecision) -> object:
    return out([captures.revoke_capture(actor, capture_id, note=body.note,
                                        row_version=body.row_version)])[0]


@bp.operation("GET", "/captures/<capture_id>/records",
              summary="Read a capture's records, newest first (auditors; every read audited)",
              query=RecordQuery, response=list[RecordOut], errors=(403, 404, 409, 503))
def read_records(actor: Actor, capture_id: str, query: RecordQuery) -> object:
    return [RecordOut(**r) for r in captures.read_records(actor, capture_id,
                                                          limit=query.limit,
                                                          before=query.before)]
