"""Audit: search events (follow a request or a model through time), verify the chain, see
checkpoints, and download signed export bundles, the ML-BOM and evidence packs."""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime

from flask import g, request, send_file
from pydantic import ValidationError
from werkzeug.wrappers import Response

from charter import scope
from charter.audit import checkpoints, service
from charter.audit.bundle import Selection
from charter.audit.models import AuditEvent
from charter.console.blueprint import bp
from charter.console.ui import problems, render
from charter.errors import CharterError, ValidationFailedError
from charter.exports import service as exports
from charter.identity.teams import list_teams
from charter.nodes.service import list_nodes
from charter.registry.service import version_refs

READERS = ("admin", "auditor")
FIELDS = ("actor", "action", "target_type", "target_id", "outcome", "request_id")


def _require(action: str) -> None:
    g.actor.require(*READERS, action=action, target_type="audit", target_id="console")


def _moment(name: str) -> datetime | None:
    raw = (request.values.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ValidationFailedError(f"`{name}` is not a date and time", details={"errors": [
            {"field": name, "code": "format", "message": "YYYY-MM-DD or YYYY-MM-DDTHH:MM"}]}
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _filters() -> dict[str, str]:
    return {f: v.strip() for f in FIELDS if (v := request.values.get(f) or "").strip()}


@bp.get("/audit")
def audit() -> Response:
    _require("audit.read")
    given = _filters()
    errors: list[str] = []
    events: list[AuditEvent] = []
    after = request.args.get("after_seq", "0")
    limit = request.args.get("limit", "50")
    try:
        flt = service.EventFilter(
            actor=given.get("actor"), action=given.get("action"),
            target_type=given.get("target_type"), target_id=given.get("target_id"),
            outcome=given.get("outcome"), request_id=given.get("request_id"),
            since=_moment("since"), until=_moment("until"),
            after_seq=int(after) if after.isdigit() else 0,
            limit=min(int(limit), 200) if limit.isdigit() and int(limit) > 0 else 50)
        events = service.list_events(flt)
    except CharterError as exc:
        errors = problems(exc)
    newest = checkpoints.newest()
    recent = checkpoints.list_checkpoints(after_id=max(0, (newest.id if newest else 0) - 10),
                                          limit=10)
    return render("console/pages/audit.html", section="audit", title="Audit", events=events,
                  names=_names(events), given=given, since=request.args.get("since", ""),
                  until=request.args.get("until", ""), errors=errors,
                  checkpoints=list(reversed(recent)), verdict=None,
                  next_after=events[-1].seq if len(events) >= 50 else None)


def _names(events: list[AuditEvent]) -> dict[tuple[str, str], str]:
    """What people call the events' targets (a version's model and label, a team's or a
    node's name), by (target type, id); the id stays in the link and its title."""
    ids: dict[str, set[str]] = {}
    for e in events:
        ids.setdefault(e.target_type, set()).add(e.target_id)
    names: dict[tuple[str, str], str] = {}
    if ids.get("model_version"):
        for vid, ref in version_refs(sorted(ids["model_version"])).items():
            names[("model_version", vid)] = f"{ref.model_name} {ref.label}"
    if ids.get("team"):
        names.update({("team", t.id): t.name for t in list_teams(g.actor)
                      if t.id in ids["team"]})
    if ids.get("node"):
        names.update({("node", n.id): n.name for n in list_nodes() if n.id in ids["node"]})
    return names


@bp.post("/audit/verify")
def audit_verify() -> Response:
    _require("audit.verify")
    verdict = service.verify_chain()
    newest = checkpoints.newest()
    recent = checkpoints.list_checkpoints(after_id=max(0, (newest.id if newest else 0) - 10),
                                          limit=10)
    return render("console/pages/audit.html", section="audit", title="Audit",
                  events=[], names={}, given={}, since="", until="", errors=[],
                  checkpoints=list(reversed(recent)), verdict=verdict, next_after=None)


@bp.post("/audit/export")
def audit_export() -> Response:
    """A signed bundle of the filtered events, as a download."""
    _require("audit.export")
    given = _filters()
    try:
        selection = Selection(
            actor=given.get("actor"), action=given.get("action"),
            target_type=given.get("target_type"), target_id=given.get("target_id"),
            team=(request.form.get("team") or "").strip() or None,
            since=_moment("since"), until=_moment("until"))
        out = tempfile.TemporaryFile()
        result = service.export_bundle(scope.current().settings, selection,
                                       out, actor_ref=g.actor.ref)
    except (CharterError, ValidationError) as exc:
        code = exc.code if isinstance(exc, CharterError) else "validation_failed"
        status = exc.status if isinstance(exc, CharterError) else 422
        return render("console/pages/audit.html", section="audit", title="Audit",
                      events=[], names={}, given=given, since="", until="", status=status,
                      errors=[f"{line} ({code})" for line in problems(exc)],
                      checkpoints=[], verdict=None, next_after=None)
    out.seek(0)
    response = send_file(out, mimetype="application/zip", as_attachment=True,
                         download_name=f"charter-audit-{result.tree_size}.zip")
    response.headers["X-Charter-Manifest-Sha256"] = result.manifest_sha256
    return response


@bp.get("/audit/ml-bom")
def audit_ml_bom() -> Response:
    text = exports.export_ml_bom(g.actor, include_retired=request.args.get("retired") == "1")
    return Response(text, content_type="application/vnd.cyclonedx+json", headers={
        "Content-Disposition": 'attachment; filename="charter-ml-bom.cdx.json"'})


@bp.get("/versions/<version_id>/evidence")
def version_evidence(version_id: str) -> Response:
    fmt = "html" if request.args.get("format") == "html" else "json"
    pack = exports.export_evidence(g.actor, version_id, fmt=fmt)
    if fmt == "html":
        return Response(exports.evidence_html(pack), content_type="text/html; charset=utf-8")
    return Response(json.dumps(pack, indent=2), mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="evidence-{version_id}.json"'})


@bp.get("/access/users/<user_id>/offboarding")
def user_offboarding(user_id: str) -> Response:
    """A person's offboarding evidence, for an auditor's or admin's download."""
    pack = exports.export_offboarding(g.actor, user_id)
    return Response(json.dumps(pack, indent=2), mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="offboarding-{user_id}.json"'})
