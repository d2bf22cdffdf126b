"""Typed inputs and outputs of the registry, shared by the API, the importer and the CLI."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from charter.identifiers import identifier
from charter.registry.models import DERIVATIONS, RISK_TIERS, STATES, TASKS, WEIGHT_FORMATS


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


def _relative_path(value: str) -> str:
    parts = value.split("/")
    if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
        raise ValueError("must be a relative path without '.', '..' or empty parts")
    return value


Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Label = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")]
Region = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,49}$")]
Token = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
# Compared by policy: one canonical form (charter.identifiers), upper case folded.
LicenseId = Annotated[str, AfterValidator(identifier)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
RelPath = Annotated[
    str, StringConstraints(min_length=1, max_length=500), AfterValidator(_relative_path)
]
Text = Annotated[str, StringConstraints(max_length=10_000)]
CARD_TEXT_MAX = 200_000
WeightFormat = Literal[WEIGHT_FORMATS]  # type: ignore[valid-type]
RiskTier = Literal[RISK_TIERS]  # type: ignore[valid-type]
State = Literal[STATES]  # type: ignore[valid-type]
Derivation = Literal[DERIVATIONS]  # type: ignore[valid-type]
Task = Literal[TASKS]  # type: ignore[valid-type]


class ModelCreate(Strict):
    name: Name
    publisher: Name
    source_repo: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    description: Text = ""


class ModelOut(Out):
    id: str
    name: str
    publisher: str
    source_repo: str
    description: str
    created_at: datetime
    created_by: str
    row_version: int


class FileSpec(Strict):
    path: RelPath
    size: Annotated[int, Field(ge=0, le=2**53 - 1)]
    sha256: Sha256 | None = None


class VersionSpec(Strict):
    """Everything a steward states about a version; the importer fills it from the files."""

    label: Label
    source_revision: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    weight_format: WeightFormat = "none"
    files: Annotated[list[FileSpec], Field(max_length=10_000)] = []
    architecture: Annotated[str, StringConstraints(max_length=200)] | None = None
    parameter_count: Annotated[int, Field(ge=0, le=2**53 - 1)] | None = None
    context_length: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    license_declared: LicenseId | None = None
    # As the model card states it, in canonical form (the card itself, verbatim, is `card`).
    license_card: LicenseId | None = None
    base_model: Annotated[str, StringConstraints(min_length=1, max_length=300)] | None = None
    # The registered version it derives from: its base_model is then that version's model.
    base_version_id: Annotated[str, StringConstraints(min_length=1, max_length=36)] | None = None
    derivation: Derivation = "unknown"
    # generation or embedding: the steward's choice, else what the card's pipeline_tag says
    task: Task | None = None
    datasets: Annotated[list[Annotated[str, StringConstraints(max_length=300)]],
                        Field(max_length=200)] = []
    intended_use: Text = ""
    risk_tier: RiskTier = "limited"
    storage_region: Region | None = None
    hosting_regions: Annotated[list[Region], Field(max_length=50)] = []
    card: dict[str, Any] = {}
    # The card's Markdown, as its README has it after the front matter (shown without HTML).
    card_text: Annotated[str, StringConstraints(max_length=CARD_TEXT_MAX)] = ""


class VersionUpdate(Strict):
    """A change to a draft: the fields given replace the stored ones."""

    row_version: int
    source_revision: Annotated[str, StringConstraints(min_length=1, max_length=100)] | None = None
    license_declared: LicenseId | None = None
    base_model: Annotated[str, StringConstraints(min_length=1, max_length=300)] | None = None
    derivation: Derivation | None = None
    task: Task | None = None
    datasets: Annotated[list[Annotated[str, StringConstraints(max_length=300)]],
                        Field(max_length=200)] | None = None
    intended_use: Text | None = None
    risk_tier: RiskTier | None = None
    storage_region: Region | None = None
    hosting_regions: Annotated[list[Region], Field(max_length=50)] | None = None


class Transition(Strict):
    row_version: int | None = None
    reason: Text = ""


class ApprovalConditions(Strict):
    row_version: int | None = None
    reason: Text = ""
    allowed_regions: Annotated[list[Region], Field(min_length=1, max_length=50)]
    allowed_data_classes: Annotated[list[Token], Field(min_length=1, max_length=50)]
    allowed_purposes: Annotated[list[Token], Field(min_length=1, max_length=50)]
    expires_at: AwareDatetime


class RequiredReason(Strict):
    row_version: int | None = None
    reason: Annotated[str, StringConstraints(min_length=3, max_length=10_000)]


class ExceptionCreate(Strict):
    """Waive named admission violations for a while, with a justification (admins only)."""

    codes: Annotated[list[Token], Field(min_length=1, max_length=50)]
    justification: Annotated[str, StringConstraints(min_length=20, max_length=10_000)]
    expires_at: AwareDatetime


class ExceptionOut(Out):
    id: str
    codes: list[str]
    justification: str
    granted_by: str
    granted_at: datetime
    expires_at: datetime
    decision_id: str


class FileOut(Out):
    path: str
    size: int
    sha256: str | None
    kind: str


class DecisionOut(Out):
    id: str
    decision: str
    decided_by: str
    decided_at: datetime
    reason: str
    allowed_regions: list[str]
    allowed_data_classes: list[str]
    allowed_purposes: list[str]
    expires_at: datetime | None


class ReceiptOut(Out):
    """A signed promise that the log holds the event of this change (charter.audit.receipts):
    keep it, and check exports against it with `charter-verify --receipt`."""

    seq: int
    hash: str
    action: str
    issued_at: str
    note: str


class VersionOut(Out):
    id: str
    model_id: str
    model_name: str
    label: str
    state: State
    source_revision: str | None
    weight_format: str
    unsafe_weights: bool
    custom_code: bool
    architecture: str | None
    parameter_count: int | None
    context_length: int | None
    license_declared: str | None
    license_card: str | None
    base_model: str | None
    base_version_id: str | None
    derivation: str
    task: str
    datasets: list[str]
    intended_use: str
    risk_tier: str
    storage_region: str | None
    hosting_regions: list[str]
    card: dict[str, Any]
    total_bytes: int
    files: list[FileOut]
    decisions: list[DecisionOut]
    admission: dict[str, Any] | None
    exceptions: list[ExceptionOut]
    created_at: datetime
    created_by: str
    submitted_at: datetime | None
    state_changed_at: datetime
    state_reason: str
    row_version: int
    receipt: ReceiptOut | None = None  # on lifecycle changes (approve, revoke, exception...)


class EvaluationIn(Strict):
    """An evaluation's results file, as the harness wrote it (its text: the digest is of
    its UTF-8 bytes). `format`: lm-eval or opencompass (default: told by the content);
    `column`: for an OpenCompass summary of several models, this version's column."""

    content: Annotated[str, StringConstraints(min_length=1, max_length=5_000_000)]
    file_name: Annotated[str, StringConstraints(max_length=300)] = ""
    format: Literal["lm-eval", "opencompass"] | None = None
    column: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None


class EvaluationMetricOut(Out):
    task: str
    metric: str
    filter: str
    value: float
    stderr: float | None
    n_shot: int | None
    higher_is_better: bool | None
    task_version: str | None
    samples: int | None


class EvaluationOut(Out):
    id: str
    version_id: str
    format: str
    file_name: str
    sha256: str
    size: int
    model_named: list[str]
    revision: str | None
    evaluated_at: datetime | None
    metrics: list[EvaluationMetricOut]
    task_hashes: dict[str, str]
    attached_by: str
    attached_at: datetime
