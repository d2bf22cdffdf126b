"""Compliance exports under /api/v1/exports, for auditors and admins."""

from __future__ import annotations

import json
from datetime import date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

from flask import Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.errors import NotFoundError
from charter.exports import service
from charter.exports import usage as usage_service
from charter.exports.mlbom import MEDIA_TYPE
from charter.metering import service as metering
from charter.registry import service as registry

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


@bp.operation("GET", "/exports/users/<user_id>/offboarding",
              summary="A person's offboarding evidence: account, keys, how access ended",
              errors=(403, 404))
def offboarding(actor: Actor, user_id: str) -> Response:
    pack = service.export_offboarding(actor, user_id)
    return Response(json.dumps(pack, indent=2), mimetype="application/json")


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


# --- prices and chargeback ------------------------------------------------------------------

PerMillion = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]


class PriceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]  # ISO 4217
    input_per_million: PerMillion
    output_per_million: PerMillion


class PriceOut(BaseModel):
    version_id: str
    version: str | None
    currency: str
    input_per_million: str
    output_per_million: str
    updated_at: datetime
    updated_by: str


class ChargebackQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    month: Annotated[str, StringConstraints(pattern=r"^\d{4}-(0[1-9]|1[0-2])$")] | None = None
    format: Literal["json", "csv"] = "json"


def _price_out(p: Any) -> PriceOut:
    ref = registry.version_refs([p.version_id]).get(p.version_id)
    return PriceOut(version_id=p.version_id,
                    version=f"{ref.model_name} {ref.label}" if ref else None,
                    currency=p.currency,
                    input_per_million=format(p.input_per_million.normalize(), "f"),
                    output_per_million=format(p.output_per_million.normalize(), "f"),
                    updated_at=p.updated_at, updated_by=p.updated_by)


@bp.operation("GET", "/prices", summary="Model versions' prices per million tokens",
              response=list[PriceOut], errors=(403,))
def list_prices(actor: Actor) -> object:
    actor.require("admin", "auditor", action="price.list", target_type="price", target_id="*")
    return [_price_out(p) for p in metering.prices().values()]


@bp.operation("PUT", "/prices/<version_id>",
              summary="Set a model version's price per million tokens in and out (admins)",
              body=PriceIn, response=PriceOut, errors=(403, 404))
def set_price(actor: Actor, version_id: str, body: PriceIn) -> object:
    actor.require("admin", action="price.set", target_type="model_version",
                  target_id=version_id)
    if version_id not in registry.version_refs([version_id]):
        raise NotFoundError(f"no model version {version_id}", code="version_not_found")
    return _price_out(metering.set_price(actor.ref, version_id, currency=body.currency,
                                         input_per_million=body.input_per_million,
                                         output_per_million=body.output_per_million))


@bp.operation("GET", "/chargeback",
              summary="What each team's use of each model cost in a month (JSON or CSV)",
              query=ChargebackQuery, errors=(422,))
def chargeback(actor: Actor, query: ChargebackQuery) -> Response:
    report = usage_service.chargeback_report(actor, month=query.month)
    if query.format == "csv":
        return Response(usage_service.chargeback_csv(report), content_type=MEDIA["csv"],
                        headers={"Content-Disposition": 'attachment; filename='
                                 f'"charter-chargeback-{report["month"]}.csv"'})
    return Response(json.dumps(report), mimetype="application/json")
