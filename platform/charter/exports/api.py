"""Compliance exports under /api/v1/exports, for auditors and admins."""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated, Literal

from flask import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints

from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.exports import service
from charter.exports import usage as usage_service
from charter.exports.mlbom import MEDIA_TYPE

bp = ApiBlueprint("exports", __name__, url_prefix="/api/v1")
MEDIA = {"csv": "text/csv; charset=utf-8", "jsonl": "application/jsonl; charset=utf-8"}
# The evidence page needs nothing but its own inline CSS: no script may ever run in it.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"


class MlBomQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_retired: bool = False


class EvidenceQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["json", "html"] = "json"


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    since: date | None = None
    until: date | None = None
    team: str | None = None
    key: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")] | None = None
    model: str | None = None
    format: Literal["json", "csv"] = "json"


class RecordsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # Optional here so that a caller without the role gets 403, not a 422 first; the
    # service requires both.
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    format: Literal["csv", "jsonl"] = "csv"


@bp.operation("GET", "/exports/ml-bom",
              summary="The model inventory as a CycloneDX 1.6 ML-BOM (validated)",
              query=MlBomQuery, errors=(403,))
def ml_bom(actor: Actor, query: MlBomQuery) -> Response:
    text = service.export_ml_bom(actor, include_retired=query.include_retired)
    return Response(text, content_type=MEDIA_TYPE, headers={
        "Content-Disposition": 'attachment; filename="charter-ml-bom.cdx.json"'})


@bp.operation("GET", "/exports/versions/<version_id>/evidence",
              summary="A version's approval evidence pack (JSON, or ?format=html)",
              query=EvidenceQuery, errors=(403,))
def evidence(actor: Actor, version_id: str, query: EvidenceQuery) -> Response:
    pack = service.export_evidence(actor, version_id, fmt=query.format)
    if query.format == "html":
        return Response(service.evidence_html(pack), content_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": PAGE_CSP})
    return Response(json.dumps(pack, indent=2), mimetype="application/json")


@bp.operation("GET", "/exports/records",
              summary="Dispatch records of a period, streamed as CSV or JSONL (Art. 12)",
              query=RecordsQuery, errors=(403,))
def records(actor: Actor, query: RecordsQuery) -> Response:
    export = service.export_records(actor, since=query.since, until=query.until,
                                    fmt=query.format)
    name = f"charter-records-{export.since:%Y%m%dT%H%M%S}-{export.until:%Y%m%dT%H%M%S}"
    return Response(export.chunks, content_type=MEDIA[export.fmt], headers={
        "Content-Disposition": f'attachment; filename="{name}.{export.fmt}"',
        "X-Charter-Through-Seq": str(export.through_seq)})


@bp.operation("GET", "/usage",
              summary="Metered requests and tokens per team, API key, model and day (JSON "
              "or CSV)",
              query=UsageQuery, errors=(404, 422))
def usage(actor: Actor, query: UsageQuery) -> Response:
    report = usage_service.usage_report(actor, since=query.since, until=query.until,
                                        team=query.team, model=query.model, key=query.key)
    if query.format == "csv":
        name = f"charter-usage-{report['since']}-{report['until']}.csv"
        return Response(usage_service.as_csv(report), content_type=MEDIA["csv"],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    return Response(json.dumps(report), mimetype="application/json")
