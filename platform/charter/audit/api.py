"""Audit events for auditors, under /api/v1/audit."""

from __future__ import annotations

import tempfile
from datetime import datetime
from typing import Annotated, Any, Literal

from flask import send_file
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from charter import scope
from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.audit import checkpoints, service
from charter.audit.bundle import Selection
from charter.errors import NotFoundError, ValidationFailedError
from charter.settings import Settings

bp = ApiBlueprint("audit", __name__, url_prefix="/api/v1")
MAX_SEQ = 2**53 - 1  # sequence numbers and sizes stay exact in JSON
READERS = ("admin", "auditor")


class EventQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    actor: Annotated[str, Field(max_length=200)] | None = None
    action: Annotated[str, Field(max_length=100)] | None = None
    target_type: Annotated[str, Field(max_length=50)] | None = None
    target_id: Annotated[str, Field(max_length=200)] | None = None
    outcome: Literal["success", "denied", "failure"] | None = None
    request_id: Annotated[str, Field(max_length=64)] | None = None
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    after_seq: Annotated[int, Field(ge=0, le=MAX_SEQ)] = 0
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
    checkpoint: int | None


@bp.operation("GET", "/audit/events", summary="Search audit events (keyset paging by seq)",
              query=EventQuery, response=EventPage, errors=(403,))
def list_events(actor: Actor, query: EventQuery) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="events")

    cap = scope.current().settings.audit_page_limit
    limit = min(query.limit, cap)
    events = service.list_events(service.EventFilter(
        actor=query.actor, action=query.action, target_type=query.target_type,
        target_id=query.target_id, outcome=query.outcome, request_id=query.request_id,
        since=query.since,
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


# --- checkpoints, keys, proofs, exports -----------------------------------------------------

class KeyOut(BaseModel):
    verifier: str = Field(description="The signed-note verifier key: name+keyid+base64key.")
    name: str
    key_id: str
    first_used_at: datetime | None
    last_used_at: datetime | None
    signing: bool = Field(description="Configured to sign now (false: retired).")


class KeysOut(BaseModel):
    origin: str
    keys: list[KeyOut]


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    size: int
    root_hash: str
    issued_at: datetime
    note: str = Field(description="The signed checkpoint (C2SP tlog-checkpoint note).")


class CheckpointPage(BaseModel):
    checkpoints: list[CheckpointOut]
    next_after_id: int | None


class CheckpointQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after_id: Annotated[int, Field(ge=0, le=MAX_SEQ)] = 0
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class InclusionQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # required: checked after authorization (a caller without the role gets 403 first)
    seq: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = None
    size: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = Field(
        None, description="A checkpointed tree size; default: the event's covering checkpoint.")


class InclusionOut(BaseModel):
    seq: int
    leaf_index: int
    event_hash: str
    tree_size: int
    path: list[str] = Field(description="RFC 9162 audit path, leaf to root, hex.")
    checkpoint: CheckpointOut


class ConsistencyQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # required: checked after authorization
    first: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = None
    second: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = None


class ConsistencyOut(BaseModel):
    first: CheckpointOut
    second: CheckpointOut
    path: list[str] = Field(description="RFC 9162 consistency proof, hex.")


class ExportIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    actor: Annotated[str, Field(max_length=200)] | None = None
    action: Annotated[str, Field(max_length=100)] | None = None
    target_type: Annotated[str, Field(max_length=50)] | None = None
    target_id: Annotated[str, Field(max_length=200)] | None = None
    team: Annotated[str, Field(max_length=100)] | None = None
    first_seq: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = None
    last_seq: Annotated[int, Field(ge=1, le=MAX_SEQ)] | None = None


def _required(**values: int | None) -> None:
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValidationFailedError("missing query parameters", details={"errors": [
            {"field": name, "code": "missing", "message": "required"} for name in missing]})


def _settings() -> Settings:
    return scope.current().settings


@bp.operation("GET", "/audit/keys", summary="The log's verifier keys (public)",
              response=KeysOut, public=True)
def keys() -> object:
    settings = _settings()
    return KeysOut(origin=settings.audit_log_origin,
                   keys=[KeyOut(**vars(k)) for k in checkpoints.published_keys(settings)])


@bp.operation("GET", "/audit/checkpoints", summary="Signed checkpoints, oldest first",
              query=CheckpointQuery, response=CheckpointPage, errors=(403,))
def list_checkpoints(actor: Actor, query: CheckpointQuery) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="checkpoints")
    found = checkpoints.list_checkpoints(after_id=query.after_id, limit=query.limit)
    return CheckpointPage(checkpoints=[CheckpointOut.model_validate(c) for c in found],
                          next_after_id=found[-1].id if len(found) == query.limit else None)


@bp.operation("GET", "/audit/checkpoints/latest", summary="The newest signed checkpoint",
              response=CheckpointOut, errors=(403, 404))
def latest_checkpoint(actor: Actor) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="checkpoints")
    found = checkpoints.newest()
    if found is None:
        raise NotFoundError("no checkpoint has been signed yet", code="no_checkpoint")
    return CheckpointOut.model_validate(found)


@bp.operation("GET", "/audit/proofs/inclusion", summary="Prove an event is in a signed tree",
              query=InclusionQuery, response=InclusionOut, errors=(403, 404))
def inclusion_proof(actor: Actor, query: InclusionQuery) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="proofs")
    _required(seq=query.seq)
    assert query.seq is not None
    cp, event_hash, path = checkpoints.inclusion(query.seq, query.size)
    return InclusionOut(seq=query.seq, leaf_index=query.seq - 1, event_hash=event_hash,
                        tree_size=cp.size, path=[h.hex() for h in path],
                        checkpoint=CheckpointOut.model_validate(cp))


@bp.operation("GET", "/audit/proofs/consistency",
              summary="Prove one signed tree extends another", query=ConsistencyQuery,
              response=ConsistencyOut, errors=(403, 404))
def consistency_proof(actor: Actor, query: ConsistencyQuery) -> object:
    actor.require(*READERS, action="audit.read", target_type="audit", target_id="proofs")
    _required(first=query.first, second=query.second)
    assert query.first is not None and query.second is not None
    first, second, path = checkpoints.consistency(query.first, query.second)
    return ConsistencyOut(first=CheckpointOut.model_validate(first),
                          second=CheckpointOut.model_validate(second),
                          path=[h.hex() for h in path])


@bp.operation("POST", "/audit/exports",
              summary="Export selected events with their proofs (a zip charter-verify checks)",
              body=ExportIn, errors=(403, 409))
def export(actor: Actor, body: ExportIn) -> object:
    actor.require(*READERS, action="audit.export", target_type="audit", target_id="bundle")
    if body.since and body.until and body.since >= body.until:
        raise ValidationFailedError("`since` must be before `until`", details={"errors": [
            {"field": "since", "code": "range", "message": "not before until"}]})
    selection = Selection(**body.model_dump())
    out = tempfile.TemporaryFile()
    try:
        result = service.export_bundle(_settings(), selection, out, actor_ref=actor.ref)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    name = f"charter-audit-{result.tree_size}.zip"
    response = send_file(out, mimetype="application/zip", as_attachment=True,
                         download_name=name)
    response.headers["X-Charter-Manifest-Sha256"] = result.manifest_sha256
    return response
