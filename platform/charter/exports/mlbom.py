"""The model inventory as a CycloneDX 1.6 ML-BOM, checked against the schema before use.

cyclonedx-python-lib builds the document (components, hashes, licenses, purls, external
references, properties, dependencies); it has no model for `modelCard` yet (11.x), so the
model cards are added to the serialized JSON, and the whole document, cards included, is
then validated with the library's strict 1.6 JSON schema validator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cyclonedx import spdx
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType, Pedigree
from cyclonedx.model.license import DisjunctiveLicense, LicenseAcknowledgement
from cyclonedx.model.tool import ToolRepository
from cyclonedx.output.json import JsonV1Dot6
from cyclonedx.schema import SchemaVersion
from packageurl import PackageURL

from charter import __version__
from charter.errors import CharterError
from charter.registry.models import ModelVersion
from charter.registry.service import Lineage

MEDIA_TYPE = "application/vnd.cyclonedx+json; version=1.6"
NS = "charter"
# Servable today (dispatch serves both), and what was approved once but ended.
CURRENT_STATES = ("approved", "deprecated")
RETIRED_STATES = ("expired", "revoked")
# "owner/name" as the Hugging Face Hub names repositories.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_HUB = "https://huggingface.co"
_MODELSCOPE = re.compile(
    r"^(?:modelscope:|https://(?:www\.)?modelscope\.cn/models/)"
    r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)/?$")
_MODELSCOPE_HUB = "https://modelscope.cn"


class BomInvalidError(CharterError):
    """The generated BOM does not validate: it is never served."""

    status = 500
    code = "mlbom_invalid"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _props(pairs: Iterable[tuple[str, object]]) -> list[Property]:
    """charter:* properties; None and empty values are left out, lists repeat the name."""
    out = []
    for name, value in pairs:
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is None or v == "":
                continue
            text = str(v).lower() if isinstance(v, bool) else str(v)
            out.append(Property(name=f"{NS}:{name}", value=text))
    return out


def _license(value: str, acknowledgement: LicenseAcknowledgement) -> DisjunctiveLicense:
    spdx_id = spdx.fixup_id(value)
    if spdx_id is not None:
        return DisjunctiveLicense(id=spdx_id, acknowledgement=acknowledgement)
    return DisjunctiveLicense(name=value, acknowledgement=acknowledgement)


def _licenses(v: ModelVersion) -> list[DisjunctiveLicense]:
    """The steward's declared license as concluded (it was reviewed at approval); the
    model card's, where it has one, as the publisher declared it."""
    out = []
    if v.license_declared:
        out.append(_license(v.license_declared, LicenseAcknowledgement.CONCLUDED))
    if v.license_card:
        out.append(_license(v.license_card, LicenseAcknowledgement.DECLARED))
    return out


def hub_of(source_repo: str) -> tuple[str, str, str] | None:
    """(purl type, repository id, its page) of a model hub source: a Hugging Face id
    (`org/name`), or ModelScope's (`modelscope:org/name` or its model page URL)."""
    if _HUB_ID.match(source_repo):
        return "huggingface", source_repo, f"{_HUB}/{source_repo}"
    found = _MODELSCOPE.match(source_repo)
    if found:
        repo = found.group("repo")
        return "modelscope", repo, f"{_MODELSCOPE_HUB}/models/{repo}"
    return None


def purl_of(source_repo: str, revision: str | None) -> PackageURL | None:
    """`pkg:huggingface/org/name@rev`, or `pkg:modelscope/...` for ModelScope's models
    (another hub, with its own namespaces: never called a Hugging Face package)."""
    hub = hub_of(source_repo)
    if hub is None:
        return None
    namespace, name = hub[1].split("/")
    return PackageURL(type=hub[0], namespace=namespace, name=name,
                      version=revision.lower() if revision else None)


def _references(v: ModelVersion) -> list[ExternalReference]:
    repo = v.model.source_repo
    hub = hub_of(repo)
    if hub is not None:
        refs = [ExternalReference(type=ExternalReferenceType.WEBSITE, url=XsUri(hub[2]))]
        if hub[0] == "huggingface" and (v.card or any(f.kind == "card" for f in v.files)):
            rev = v.source_revision or "main"
            refs.append(ExternalReference(type=ExternalReferenceType.MODEL_CARD,
                                          url=XsUri(f"{_HUB}/{repo}/blob/{rev}/README.md")))
        return refs
    if repo.startswith(("https://", "http://")):
        return [ExternalReference(type=ExternalReferenceType.VCS, url=XsUri(repo))]
    return []


def latest_approval(v: ModelVersion) -> Any:
    approvals = [d for d in v.decisions if d.decision == "approved"]
    return approvals[-1] if approvals else None  # decisions are ordered by decided_at


def version_ref(v: ModelVersion) -> str:
    return f"model-version/{v.id}"


def dataset_ref(name: str) -> str:
    return f"dataset/{name}"


def base_ref(name: str) -> str:
    return f"base-model/{name}"


def _files(v: ModelVersion) -> list[Component]:
    return [
        Component(
            type=ComponentType.FILE, name=f.path, bom_ref=f"{version_ref(v)}/file/{f.path}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=f.sha256)] if f.sha256 else [],
            properties=_props([("file_kind", f.kind), ("size", f.size)]),
        )
        for f in v.files
    ]


def _pedigree(v: ModelVersion, lineage: Lineage | None) -> Pedigree | None:
    """The registered versions it derives from (CycloneDX pedigree ancestors, nearest
    first), each pinned by its weights' digests, with its state."""
    if lineage is None or not lineage.ancestors:
        return None
    ancestors = [Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, name=a.model, version=a.label,
        bom_ref=f"{version_ref(v)}/ancestor/{a.id}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=h) for h in a.weights],
        purl=purl_of(a.source_repo, a.source_revision),
        properties=_props([("version_id", a.id), ("state", a.state),
                           ("derivation", a.derivation)]))
        for a in lineage.ancestors]
    base = lineage.ancestors[0]
    return Pedigree(ancestors=ancestors, notes=(
        f"{v.derivation} of {base.model} {base.label} (registered version {base.id})"))


def _component(v: ModelVersion, lineage: Lineage | None = None) -> Component:
    approval = latest_approval(v)
    admission = v.admission or {}
    weights = sorted({f.sha256 for f in v.files if f.kind == "weights" and f.sha256})
    props = [
        ("version_id", v.id), ("model_id", v.model_id), ("state", v.state),
        ("state_changed_at", _iso(v.state_changed_at)),
        ("source_repo", v.model.source_repo), ("source_revision", v.source_revision),
        ("weight_format", v.weight_format), ("unsafe_weights", v.unsafe_weights),
        ("custom_code", v.custom_code),
        ("total_bytes", v.total_bytes), ("risk_tier", v.risk_tier),
        ("license_declared", v.license_declared), ("license_card", v.license_card),
        ("storage_region", v.storage_region), ("hosting_region", sorted(v.hosting_regions)),
        ("created_by", v.created_by), ("created_at", _iso(v.created_at)),
        ("admission:decision_id", admission.get("decision_id")),
        ("admission:policy_revision", admission.get("policy_revision")),
        ("admission:allow", admission.get("allow")),
        ("admission:violation", sorted(x["code"] for x in admission.get("violations", []))),
        ("exception:waived", sorted({c for e in v.exceptions for c in e.codes})),
    ]
    if approval is not None:
        props += [
            ("approval:decision_id", approval.id), ("approval:approved_by", approval.decided_by),
            ("approval:approved_at", _iso(approval.decided_at)),
            ("approval:region", sorted(approval.allowed_regions)),
            ("approval:data_class", sorted(approval.allowed_data_classes)),
            ("approval:purpose", sorted(approval.allowed_purposes)),
            ("approval:expires_at", _iso(approval.expires_at)),
        ]
    return Component(
        type=ComponentType.MACHINE_LEARNING_MODEL, bom_ref=version_ref(v), name=v.model.name,
        version=v.label, publisher=v.model.publisher,
        description=v.model.description or None,
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=h) for h in weights],
        licenses=_licenses(v), purl=purl_of(v.model.source_repo, v.source_revision),
        external_references=_references(v), properties=_props(props), components=_files(v),
        pedigree=_pedigree(v, lineage),
    )


def _model_card(v: ModelVersion) -> dict[str, Any]:
    params: dict[str, Any] = {}
    task = v.card.get("pipeline_tag")
    if isinstance(task, str) and task:
        params["task"] = task
    if v.architecture:
        params["modelArchitecture"] = v.architecture
    if v.datasets:
        params["datasets"] = [{"ref": dataset_ref(d)} for d in sorted(set(v.datasets))]
    card: dict[str, Any] = {"bom-ref": f"model-card/{v.id}"}
    if params:
        card["modelParameters"] = params
    metrics = [_performance_metric(e, m) for e in v.evaluations for m in e.metrics]
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    if v.intended_use:
        card["considerations"] = {"useCases": [v.intended_use]}
    props = _props([("base_model", v.base_model), ("base_version_id", v.base_version_id),
                    ("derivation", v.derivation),
                    ("parameter_count", v.parameter_count),
                    ("context_length", v.context_length)])
    if props:
        card["properties"] = [{"name": p.name, "value": p.value} for p in props]
    return card


def _performance_metric(e: Any, m: dict[str, Any]) -> dict[str, Any]:
    """One attached evaluation's metric as CycloneDX states it (text values): the task
    and filter as the slice, and where a standard error was given, the 95% normal
    interval (value -+ 1.96 stderr)."""
    out: dict[str, Any] = {"type": m["metric"], "value": repr(m["value"]),
                           "slice": f"{m['task']} ({m['filter']}, {e.format}, "
                                    f"sha256:{e.sha256[:16]})"}
    if m.get("stderr") is not None:
        half = 1.96 * m["stderr"]
        out["confidenceInterval"] = {"lowerBound": f"{m['value'] - half:.6g}",
                                     "upperBound": f"{m['value'] + half:.6g}"}
    return out


def build_ml_bom(versions: Sequence[ModelVersion], *, include_retired: bool,
                 timestamp: datetime | None = None,
                 lineages: Mapping[str, Lineage] | None = None) -> str:
    """The BOM as JSON text, validated; raises BomInvalidError rather than return a bad one.
    `lineages`: by version id, the registered versions a derived one comes from (its
    pedigree; it depends on its base's component where the base is listed too)."""
    lineages = lineages or {}
    versions = sorted(versions, key=lambda v: (v.model.name, v.label, v.id))
    known = {name for v in versions for name in (v.model.name, v.model.source_repo)
             if v.state == "approved"}
    components = [_component(v, lineages.get(v.id)) for v in versions]
    by_ref = {c.bom_ref.value: c for c in components}
    datasets = {d: Component(type=ComponentType.DATA, name=d, bom_ref=dataset_ref(d))
                for v in versions for d in v.datasets}
    bases: dict[str, Component] = {}
    for v in versions:
        if v.base_model and v.base_model not in bases and (
                f"model-version/{v.base_version_id}" not in by_ref):
            bases[v.base_model] = Component(
                type=ComponentType.MACHINE_LEARNING_MODEL, name=v.base_model,
                bom_ref=base_ref(v.base_model), purl=purl_of(v.base_model, None),
                properties=_props([("lineage", "base-model"),
                                   ("base_model_approved", v.base_model in known)]))
    states = CURRENT_STATES + (RETIRED_STATES if include_retired else ())
    bom = Bom(
        components=[*components, *datasets.values(), *bases.values()],
        metadata=BomMetaData(
            timestamp=timestamp,
            tools=ToolRepository(components=[Component(
                type=ComponentType.APPLICATION, name="charter", version=__version__,
                bom_ref="tool/charter")]),
            properties=_props([("inventory", "model-versions"), ("state", list(states))]),
        ),
    )
    for v in versions:
        listed = by_ref.get(f"model-version/{v.base_version_id}") if v.base_version_id else None
        if listed is not None:
            bom.register_dependency(by_ref[version_ref(v)], [listed])
        elif v.base_model in bases:
            bom.register_dependency(by_ref[version_ref(v)], [bases[v.base_model]])
    document = json.loads(JsonV1Dot6(bom).output_as_string())
    cards = {v.id: _model_card(v) for v in versions}
    for component in document.get("components", []):
        ref = component.get("bom-ref", "")
        if component.get("type") == "machine-learning-model" and ref.startswith(
                "model-version/"):
            component["modelCard"] = cards[ref.removeprefix("model-version/")]
    text = json.dumps(document, indent=2, ensure_ascii=False)
    validate_ml_bom(text)
    return text


def validate_ml_bom(text: str) -> None:
    # Imported here: the validator brings jsonschema's format checkers, ~1 s of
    # start-up that every process (and every `charter` command) would pay.
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise BomInvalidError("the generated ML-BOM does not validate against CycloneDX 1.6",
                              details={"error": str(error)[:2000]})
