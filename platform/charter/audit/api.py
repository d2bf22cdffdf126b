"""Audit events for auditors, under /api/v1/audit."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from charter.apikit import ApiBlueprint
from charter.audit import service
from charter.identity.actor import Actor

bp = ApiBlueprint("audit", __name__, url_prefix="/api/v1")
READERS = ("admin", "auditor")


class EventQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: Annotated[str, Field(max_length=200)] | None = None
    action: Annotated[str, Field(max_length=100)] | None = None
    target_type: Annotated[str, Field(max_length=50)] | None = None
    target_id: Annotated[str, Field(max_length=200)] | None = None
    outcome: Literal["success", "denied", "failure"] | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    after_seq: Annotated[int, Field(ge=0)] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    seq: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    outcome: str
    details: dict[str, Any]
    request_id: str | None
    prev_hash: str
    hash: str


class EventPage(BaseModel):
    events: list[EventOut]
    next_after_seq: int | None = Field(
        description="Pass as after_seq to get the next page; null on the last page."
    )


class VerifyOut(BaseModel):
    ok: bool
    count: int
    head_hash: str
    first_bad_seq: int | None
    reason: str | None
    message: str | None


@bp.operation("GET", "/audit/events", summary="Search audit events (keyset paging by seq)",
              query=EventQuery, response=EventPage, errors=(403,))
def list_events(actor: Actor, query: EventQuery) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="events")
    from flask import current_app

    cap = current_app.extensions["charter.settings"].audit_page_limit
    limit = min(query.limit, cap)
    events = service.list_events(service.EventFilter(
        actor=query.actor, action=query.action, target_type=query.target_type,
        target_id=query.target_id, outcome=query.outcome, since=query.since,
        until=query.until, after_seq=query.after_seq, limit=limit,
    ))
    next_after = events[-1].seq if len(events) == limit else None
    return EventPage(events=[EventOut.model_validate(e) for e in events],
                     next_after_seq=next_after)


@bp.operation("POST", "/audit/verify", summary="Verify the whole hash chain now",
              response=VerifyOut, errors=(403,))
def verify(actor: Actor) -> object:
    actor.require(*READERS, action="audit.verify", target_type="audit", target_id="chain")
    return service.verify_chain()
