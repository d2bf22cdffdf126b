"""Models, their pinned versions, weight files and approval decisions."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from charter.db import Base, UTCDateTime, utcnow

STATES = ("draft", "submitted", "approved", "rejected", "deprecated", "revoked", "expired")
WEIGHT_FORMATS = ("safetensors", "gguf", "pytorch_pickle", "none")
# Formats whose loading runs pickle, i.e. arbitrary code from the file.
UNSAFE_FORMATS = frozenset({"pytorch_pickle"})
RISK_TIERS = ("minimal", "limited", "high")
DERIVATIONS = ("unknown", "original", "fine_tune", "adapter", "quantized", "merge")
# What a version does, which decides the endpoints that may serve it (charter.dispatch).
TASKS = ("generation", "embedding")
# Hugging Face pipeline tags of embedding models; any other tag (or none) is generation.
EMBEDDING_PIPELINE_TAGS = frozenset({"feature-extraction", "sentence-similarity"})


def task_of(card: dict[str, Any]) -> str:
    """A version's task as its model card's `pipeline_tag` states it."""
    return "embedding" if card.get("pipeline_tag") in EMBEDDING_PIPELINE_TAGS else "generation"
_VERSIONED = {"version_id_generator": False}


class Model(Base):
    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    publisher: Mapped[str] = mapped_column(String(200), nullable=False)
    source_repo: Mapped[str] = mapped_column(String(300), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    __mapper_args__ = {"version_id_col": row_version, **_VERSIONED}


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), nullable=False, index=True)
    label: Mapped[str] = mapped_column(String(100), nullable=False)
    state: Mapped[str] = mapped_column(String(20), nullable=False, default="draft", index=True)
    source_revision: Mapped[str | None] = mapped_column(String(100))
    weight_format: Mapped[str] = mapped_column(String(30), nullable=False, default="none")
    unsafe_weights: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # Code a loader would run with trust_remote_code: *.py files, auto_map in config.json.
    custom_code: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    architecture: Mapped[str | None] = mapped_column(String(200))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    context_length: Mapped[int | None] = mapped_column(Integer)
    license_declared: Mapped[str | None] = mapped_column(String(100))
    license_card: Mapped[str | None] = mapped_column(String(100))
    base_model: Mapped[str | None] = mapped_column(String(300))
    # The registered version it derives from (an adapter's, a quantization's base), if any.
    base_version_id: Mapped[str | None] = mapped_column(
        ForeignKey("model_versions.id", name="fk_model_versions_base"), index=True)
    derivation: Mapped[str] = mapped_column(String(20), nullable=False, default="unknown")
    task: Mapped[str] = mapped_column(String(20), nullable=False, default="generation")
    datasets: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    intended_use: Mapped[str] = mapped_column(Text, nullable=False, default="")
    risk_tier: Mapped[str] = mapped_column(String(20), nullable=False, default="limited")
    storage_region: Mapped[str | None] = mapped_column(String(50))
    hosting_regions: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    # The card's Markdown (its README without the front matter); read when asked for.
    card_text: Mapped[str] = mapped_column(Text, nullable=False, default="", deferred=True)
    total_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    created_by_user_id: Mapped[str] = mapped_column(String(36), nullable=False)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    submitted_by_user_id: Mapped[str | None] = mapped_column(String(36))
    # Everyone who changed its content: the creator, each editor, the submitter (migration
    # 0013). None of them may approve or reject it (separation of duties).
    editor_user_ids: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list,
                                                       server_default="[]")
    state_changed_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), nullable=False, default=utcnow
    )
    state_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    # The latest admission decision: allow, violations, warnings, decision id, revision.
    admission: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    model: Mapped[Model] = relationship(lazy="joined")
    files: Mapped[list[ModelFile]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="ModelFile.path"
    )
    decisions: Mapped[list[ApprovalDecision]] = relationship(
        lazy="selectin", order_by="ApprovalDecision.decided_at"
    )
    exceptions: Mapped[list[PolicyException]] = relationship(
        lazy="selectin", order_by="PolicyException.granted_at"
    )
    # Their metrics, not their files (Evaluation.content is deferred: read when asked).
    evaluations: Mapped[list[Evaluation]] = relationship(
        lazy="selectin", order_by="Evaluation.attached_at"
    )

    __table_args__ = (UniqueConstraint("model_id", "label", name="uq_model_versions_label"),)
    __mapper_args__ = {"version_id_col": row_version, **_VERSIONED}

    @property
    def model_name(self) -> str:
        return self.model.name


class ModelFile(Base):
    __tablename__ = "model_files"

    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(500), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    sha256: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(20), nullable=False, default="other")


class ApprovalDecision(Base):
    """One approve or reject decision, with the conditions an approval carries."""

    __tablename__ = "approval_decisions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id"), nullable=False, index=True
    )
    decision: Mapped[str] = mapped_column(String(20), nullable=False)  # approved | rejected
    decided_by: Mapped[str] = mapped_column(String(200), nullable=False)
    decided_by_user_id: Mapped[str] = mapped_column(String(36), nullable=False)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    allowed_regions: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    allowed_data_classes: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    allowed_purposes: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class PolicyException(Base):
    """An admin's justified, time-limited waiver of named admission violations."""

    __tablename__ = "policy_exceptions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id"), nullable=False, index=True
    )
    codes: Mapped[list[str]] = mapped_column(JSON, nullable=False)
    justification: Mapped[str] = mapped_column(Text, nullable=False)
    granted_by: Mapped[str] = mapped_column(String(200), nullable=False)
    granted_by_user_id: Mapped[str] = mapped_column(String(36), nullable=False)
    granted_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    decision_id: Mapped[str] = mapped_column(String(36), nullable=False)

    def active(self, now: datetime) -> bool:
        return self.expires_at > now


class Evaluation(Base):
    """Evaluation results attached to a version as evidence (charter.registry.evaluations):
    the file as it was given (and its digest), and its metrics as read."""

    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("version_id", "sha256", name="uq_evaluations_file"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version_id: Mapped[str] = mapped_column(
        ForeignKey("model_versions.id"), nullable=False, index=True
    )
    format: Mapped[str] = mapped_column(String(20), nullable=False)  # lm-eval | opencompass
    file_name: Mapped[str] = mapped_column(String(300), nullable=False, default="")
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False, deferred=True)
    model_named: Mapped[list[str]] = mapped_column(JSON, nullable=False, default=list)
    revision: Mapped[str | None] = mapped_column(String(100))
    evaluated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False, default=list)
    task_hashes: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False, default=dict)
    attached_by: Mapped[str] = mapped_column(String(200), nullable=False)
    attached_by_user_id: Mapped[str] = mapped_column(String(36), nullable=False)
    attached_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
