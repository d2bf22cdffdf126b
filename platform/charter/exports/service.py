"""Exports for auditors: authorize, build, record the export in the audit log, hand it over.

Readers are admins and auditors; every refusal and every export is audited. Builders live
beside this module (mlbom, evidence, records); none of them imports Flask.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from charter.actor import Actor
from charter.audit import service as audit
from charter.db import utcnow
from charter.errors import CharterError, NotFoundError, ValidationFailedError
from charter.exports import evidence, mlbom, offboarding, records
from charter.identity import service as identity
from charter.nodes import service as nodes
from charter.registry import service as registry
from charter.uow import record, unit_of_work

READERS = ("admin", "auditor")
MAX_PERIOD = timedelta(days=366)
FORMATS = ("csv", "jsonl")


def _record(actor: Actor, action: str, target_id: str, details: dict[str, Any],
            outcome: str = "success") -> tuple[int, str]:
    with unit_of_work() as session:
        return record(session, actor=actor.ref, action=action, target_type="export",
                      target_id=target_id, outcome=outcome, details=details)


def export_ml_bom(actor: Actor, *, include_retired: bool = False) -> str:
    """The inventory of approved versions (and, with `include_retired`, of expired and
    revoked ones) as validated CycloneDX 1.6 JSON."""
    actor.require(*READERS, action="export.mlbom", target_type="export", target_id="ml-bom")
    states = mlbom.CURRENT_STATES + (mlbom.RETIRED_STATES if include_retired else ())
    versions = [v for state in states for v in registry.list_versions(None, state)]
    try:
        lineages = {v.id: registry.lineage(v.id) for v in versions if v.base_version_id}
        text = mlbom.build_ml_bom(versions, include_retired=include_retired,
                                  lineages=lineages)
    except CharterError as exc:
        _record(actor, "export.mlbom", "ml-bom",
                {"include_retired": include_retired, "code": exc.code,
                 "message": exc.message}, outcome="failure")
        raise
    bom = json.loads(text)
    _record(actor, "export.mlbom", "ml-bom", {
        "include_retired": include_retired, "states": list(states),
        "components": len(versions), "serial_number": bom["serialNumber"],
        "sha256": hashlib.sha256(text.encode()).hexdigest()})
    return text


def export_evidence(actor: Actor, version_id: str, *, fmt: str = "json") -> dict[str, Any]:
    """The evidence pack of one version as JSON data (render it with `evidence_html`)."""
    actor.require(*READERS, action="export.evidence", target_type="export",
                  target_id="evidence")
    version = registry.get_version(version_id)
    head_seq, head_hash = audit.head()
    pack = evidence.build_pack(version, head_seq=head_seq, head_hash=head_hash,
                               generated_by=actor.ref, generated_at=utcnow(),
                               lineage=registry.lineage(version.id))
    _record(actor, "export.evidence", "evidence", {
        "version_id": version.id, "format": fmt, "audit_head_seq": head_seq,
        "events": len(pack["audit_trail"])})
    return pack


def export_offboarding(actor: Actor, user_id: str) -> dict[str, Any]:
    """One person's offboarding evidence (charter.exports.offboarding), audited."""
    actor.require(*READERS, action="export.offboarding", target_type="export",
                  target_id="offboarding")
    person = identity.person_record(user_id)
    if person is None:
        raise NotFoundError(f"no user {user_id}", code="user_not_found")
    head_seq, head_hash = audit.head()
    pack = offboarding.build(person, head_seq=head_seq, head_hash=head_hash,
                             generated_by=actor.ref, generated_at=utcnow())
    _record(actor, "export.offboarding", "offboarding", {
        "user_id": user_id, "audit_head_seq": head_seq, "events": len(pack["audit_trail"])})
    return pack


def evidence_html(pack: dict[str, Any]) -> str:
    return evidence.render_html(pack)


@dataclass(frozen=True)
class RecordsExport:
    """An export under way: its chunks stream from `chunks`; `through_seq` bounds it."""

    fmt: str
    since: datetime
    until: datetime
    through_seq: int
    chunks: Iterator[str]


def _period_problems(since: datetime | None, until: datetime | None,
                     fmt: str) -> list[dict[str, str]]:
    problems = []
    for field, value in (("since", since), ("until", until)):
        if value is None:
            problems.append({"field": field, "code": "missing",
                             "message": f"`{field}` is required (ISO 8601 with a timezone)"})
        elif value.tzinfo is None:
            problems.append({"field": field, "code": "timezone",
                             "message": f"`{field}` needs a timezone (e.g. Z)"})
    if fmt not in FORMATS:
        problems.append({"field": "format", "code": "unknown_format",
                         "message": f"format is one of {', '.join(FORMATS)}"})
    if problems or since is None or until is None:
        return problems
    if since >= until:
        problems.append({"field": "since", "code": "range",
                         "message": "`since` must be before `until`"})
    elif until - since > MAX_PERIOD:
        problems.append({"field": "until", "code": "too_long",
                         "message": f"a period spans at most {MAX_PERIOD.days} days"})
    return problems


def export_records(actor: Actor, *, since: datetime | None, until: datetime | None,
                   fmt: str = "csv") -> RecordsExport:
    """Dispatch records with since <= ts < until, streamed. The export is audited before
    its first byte, with the filter and the last seq it covers (the head at that moment)."""
    actor.require(*READERS, action="export.records", target_type="export",
                  target_id="records")
    problems = _period_problems(since, until, fmt)
    if problems:
        raise ValidationFailedError("the period is invalid", details={"errors": problems})
    assert since is not None and until is not None
    through_seq, _ = audit.head()
    _record(actor, "export.records", "records", {
        "since": since.isoformat(), "until": until.isoformat(), "format": fmt,
        "through_seq": through_seq})
    rows = _rows(since, until, through_seq)
    chunks = records.as_csv(rows) if fmt == "csv" else records.as_jsonl(rows)
    return RecordsExport(fmt, since, until, through_seq, chunks)


def _rows(since: datetime, until: datetime, through_seq: int) -> Iterator[dict[str, Any]]:
    bound = {d.serving_name: d.version_id for d in nodes.list_deployments()}
    served: dict[str, records.Served] = {}
    for event in records.dispatch_events(since, until, through_seq):
        name = event.details.get("serving_name") or event.target_id
        if name in bound and name not in served:
            v = registry.get_version(bound[name])
            served[name] = records.Served(
                v.model.name, v.label, v.id, v.source_revision,
                tuple(sorted(f.sha256 for f in v.files if f.kind == "weights" and f.sha256)))
        yield records.record_of(event, served)
