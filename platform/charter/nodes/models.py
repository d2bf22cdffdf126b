"""Inference nodes and the deployments that bind a serving name to an approved version."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from charter.db import Base, UTCDateTime, utcnow

ENGINES = ("tgi", "tei", "vllm", "sglang", "llamacpp", "ollama", "openai")  # nodes.adapters
ADMIN_STATES = ("active", "drained")
ATTESTATIONS = ("unverified", "attested", "quarantined")


class Node(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    base_url: Mapped[str] = mapped_column(String(500), nullable=False)
    region: Mapped[str] = mapped_column(String(50), nullable=False, index=True)
    engine: Mapped[str] = mapped_column(String(20), nullable=False, default="tgi")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    capacity: Mapped[int] = mapped_column(Integer, nullable=False, default=8)
    admin_state: Mapped[str] = mapped_column(String(20), nullable=False, default="active")
    attestation: Mapped[str] = mapped_column(String(20), nullable=False, default="unverified")
    attested_version_id: Mapped[str | None] = mapped_column(ForeignKey("model_versions.id"))
    # Adapters of that version its agent attested too: version id -> the adapter's name on
    # the engine (TGI's adapter_id, vLLM's LoRA module name).
    attested_adapters: Mapped[dict[str, str]] = mapped_column(JSON, nullable=False,
                                                              default=dict)
    reported_model_id: Mapped[str | None] = mapped_column(String(300))
    reported_revision: Mapped[str | None] = mapped_column(String(100))
    quarantine_reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    healthy: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    last_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str] = mapped_column(Text, nullable=False, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    # The attestation agent beside the engine (charter.nodes.agent), and the public key
    # its statements must be signed with (base64, Ed25519): digests, not a Hub revision.
    agent_url: Mapped[str | None] = mapped_column(String(500))
    agent_key: Mapped[str | None] = mapped_column(String(64))

    __mapper_args__ = {"version_id_col": row_version, "version_id_generator": False}

    @property
    def routable(self) -> bool:
        return self.admin_state == "active" and self.attestation == "attested" and self.healthy


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    serving_name: Mapped[str] = mapped_column(String(200), unique=True, nullable=False)
    version_id: Mapped[str] = mapped_column(ForeignKey("model_versions.id"), nullable=False,
                                            index=True)
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    node_links: Mapped[list[DeploymentNode]] = relationship(
        cascade="all, delete-orphan", lazy="selectin")

    __mapper_args__ = {"version_id_col": row_version, "version_id_generator": False}

    @property
    def node_ids(self) -> list[str]:
        return sorted(link.node_id for link in self.node_links)


class DeploymentNode(Base):
    __tablename__ = "deployment_nodes"

    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), primary_key=True)
    node_id: Mapped[str] = mapped_column(ForeignKey("nodes.id"), primary_key=True, index=True)
