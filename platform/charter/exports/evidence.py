"""The approval evidence pack of one model version: what was approved, by whom, on what
findings, and every audit event about it (with seq and hash, to check against the log)."""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape

from charter.audit.models import AuditEvent
from charter.audit.service import EventFilter, iter_events
from charter.exports.mlbom import latest_approval, purl_of
from charter.registry.models import ModelVersion
from charter.registry.service import Lineage, Relative

FORMAT = "charter.evidence-pack/1"
PAGE = 500
# Control characters (CR, ESC and the rest of C0/C1 but tab and newline) would reach a
# terminal or a log viewer raw; in the HTML page they are shown as visible escapes.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def events_about(target_type: str, target_id: str, through_seq: int) -> Iterator[AuditEvent]:
    """Every event whose target is this one, in seq order, up to `through_seq` (keyset)."""
    return iter_events(EventFilter(target_type=target_type, target_id=target_id, limit=PAGE),
                       through_seq=through_seq)


def _event(e: AuditEvent) -> dict[str, Any]:
    return {"seq": e.seq, "ts": _iso(e.ts), "actor": e.actor, "action": e.action,
            "target_type": e.target_type, "target_id": e.target_id, "outcome": e.outcome,
            "request_id": e.request_id, "details": e.details, "prev_hash": e.prev_hash,
            "hash": e.hash}


def _relative(r: Relative) -> dict[str, Any]:
    return {"version_id": r.id, "model": r.model, "label": r.label, "state": r.state,
            "derivation": r.derivation, "source_repo": r.source_repo,
            "source_revision": r.source_revision, "weights_sha256": list(r.weights)}


def build_pack(v: ModelVersion, *, head_seq: int, head_hash: str, generated_by: str,
               generated_at: datetime, lineage: Lineage | None = None) -> dict[str, Any]:
    """The pack as plain JSON data. `head_seq`/`head_hash`: the log's head it was read at;
    `lineage`: the registered versions it derives from and that derive from it."""
    trail = list(heapq.merge(events_about("model_version", v.id, head_seq),
                             events_about("model", v.model_id, head_seq),
                             key=lambda e: e.seq))
    about_version = [e for e in trail if e.target_type == "model_version"]
    lifecycle = [e for e in about_version
                 if e.action.startswith("version.") and e.outcome == "success"]
    admissions = [e for e in about_version
                  if e.action == "policy.decide" and e.details.get("policy") == "admission"]
    refusals = [e for e in trail if e.outcome == "denied" and e.action != "policy.decide"]
    submitters = [e.actor for e in lifecycle if e.action == "version.submit"]
    authors = {v.created_by_user_id, v.submitted_by_user_id, *v.editor_user_ids}
    decisions = [{
        "id": d.id, "decision": d.decision, "decided_by": d.decided_by,
        "decided_at": _iso(d.decided_at), "reason": d.reason,
        "allowed_regions": list(d.allowed_regions),
        "allowed_data_classes": list(d.allowed_data_classes),
        "allowed_purposes": list(d.allowed_purposes), "expires_at": _iso(d.expires_at),
        "decider_is_author": d.decided_by_user_id in authors,
    } for d in v.decisions]
    approval = latest_approval(v)
    return {
        "format": FORMAT,
        "generated_at": _iso(generated_at),
        "generated_by": generated_by,
        "audit_head": {"seq": head_seq, "hash": head_hash},
        "model": {"id": v.model.id, "name": v.model.name, "publisher": v.model.publisher,
                  "source_repo": v.model.source_repo, "description": v.model.description,
                  "created_by": v.model.created_by, "created_at": _iso(v.model.created_at)},
        "version": {
            "id": v.id, "label": v.label, "state": v.state, "state_reason": v.state_reason,
            "state_changed_at": _iso(v.state_changed_at),
            "source_revision": v.source_revision, "weight_format": v.weight_format,
            "unsafe_weights": v.unsafe_weights, "custom_code": v.custom_code,
            "architecture": v.architecture,
            "parameter_count": v.parameter_count, "context_length": v.context_length,
            "risk_tier": v.risk_tier, "intended_use": v.intended_use,
            "storage_region": v.storage_region, "hosting_regions": list(v.hosting_regions),
            "total_bytes": v.total_bytes, "created_by": v.created_by,
            "created_at": _iso(v.created_at), "submitted_at": _iso(v.submitted_at),
        },
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "kind": f.kind}
                  for f in v.files],
        "license": {"declared": v.license_declared, "card": v.license_card,
                    "agree": (v.license_declared or "").lower() == (v.license_card or "").lower()
                    if v.license_declared and v.license_card else None},
        "lineage": {"base_model": v.base_model, "base_version_id": v.base_version_id,
                    "derivation": v.derivation,
                    "datasets": list(v.datasets),
                    "ancestors": [_relative(r) for r in lineage.ancestors] if lineage else [],
                    "derivatives": [_relative(r) for r in lineage.derivatives]
                    if lineage else [],
                    "purl": str(p) if (p := purl_of(v.model.source_repo,
                                                     v.source_revision)) else None},
        "evaluations": [{
            "id": e.id, "format": e.format, "file_name": e.file_name, "sha256": e.sha256,
            "size": e.size, "model_named": list(e.model_named), "revision": e.revision,
            "evaluated_at": _iso(e.evaluated_at), "attached_by": e.attached_by,
            "attached_at": _iso(e.attached_at), "metrics": list(e.metrics),
            "task_hashes": dict(e.task_hashes)} for e in v.evaluations],
        "admission": {
            "latest": v.admission,
            "history": [{"seq": e.seq, "ts": _iso(e.ts), "actor": e.actor,
                         "outcome": e.outcome, "decision_id": e.details.get("decision_id"),
                         "allow": e.details.get("allow"),
                         "violations": e.details.get("violations", []),
                         "warnings": e.details.get("warnings", []),
                         "policy_revision": e.details.get("policy_revision"),
                         "hash": e.hash} for e in admissions],
            "exceptions": [{"id": x.id, "codes": list(x.codes),
                            "justification": x.justification, "granted_by": x.granted_by,
                            "granted_at": _iso(x.granted_at), "expires_at": _iso(x.expires_at),
                            "decision_id": x.decision_id} for x in v.exceptions],
        },
        "decisions": decisions,
        "approval": None if approval is None else {
            "decision_id": approval.id, "approved_by": approval.decided_by,
            "approved_at": _iso(approval.decided_at),
            "allowed_regions": list(approval.allowed_regions),
            "allowed_data_classes": list(approval.allowed_data_classes),
            "allowed_purposes": list(approval.allowed_purposes),
            "expires_at": _iso(approval.expires_at)},
        "people": {
            "created_by": v.created_by,
            "submitted_by": submitters[-1] if submitters else None,
            "decided_by": [d.decided_by for d in v.decisions],
            "four_eyes": {
                "rule": "whoever created or submitted a version cannot approve or reject it",
                "held": all(not d["decider_is_author"] for d in decisions),
            },
        },
        "lifecycle": [{"seq": e.seq, "ts": _iso(e.ts), "action": e.action, "actor": e.actor,
                       "from": e.details.get("from"), "to": e.details.get("to"),
                       "reason": e.details.get("reason"),
                       "conditions": e.details.get("conditions"), "hash": e.hash}
                      for e in lifecycle],
        "refusals": [{"seq": e.seq, "ts": _iso(e.ts), "action": e.action, "actor": e.actor,
                      "code": e.details.get("code"), "message": e.details.get("message"),
                      "hash": e.hash} for e in refusals],
        "audit_trail": [_event(e) for e in trail],
    }


def visible(value: object) -> str:
    """Text with control characters shown as escapes (\\r, \\x1b), never passed raw."""
    text = "" if value is None else str(value)

    def esc(m: re.Match[str]) -> str:
        ch = m.group()
        return {"\r": "\\r", "\x1b": "\\x1b"}.get(ch, f"\\x{ord(ch):02x}")

    return _CONTROL.sub(esc, text)


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=True)


_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True, lstrip_blocks=True,
)
_ENV.filters["visible"] = visible
_ENV.filters["pretty"] = _pretty


def render_html(pack: dict[str, Any]) -> str:
    """A self-contained, print-friendly page: inline CSS, no scripts, no external assets."""
    return _ENV.get_template("evidence.html").render(p=pack)
