"""The audit log's tables: events (chained by prev_hash -> hash), signed checkpoints of its
Merkle tree, the tree's stored nodes, and the keys that signed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from charter.db import Base, UTCDateTime


class AuditEvent(Base):
    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    actor: Mapped[str] = mapped_column(String(200), nullable=False)
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    target_type: Mapped[str] = mapped_column(String(50), nullable=False)
    target_id: Mapped[str] = mapped_column(String(200), nullable=False)
    outcome: Mapped[str] = mapped_column(String(20), nullable=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64))
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    # Set since migration 0011: a unique id (clock first) and the event's seal
    # (charter.audit.seal), made before the database saw the event.
    event_id: Mapped[str | None] = mapped_column(String(32), unique=True)
    seal: Mapped[str | None] = mapped_column(String(84))

    __table_args__ = (
        Index("ix_audit_events_actor_seq", "actor", "seq"),
        Index("ix_audit_events_action_seq", "action", "seq"),
        Index("ix_audit_events_target_seq", "target_type", "target_id", "seq"),
        Index("ix_audit_events_ts", "ts"),
    )


class AuditCheckpoint(Base):
    """A signed statement of the log's Merkle tree: its size and root, as a signed note.
    Append-only (triggers); a checkpoint is never an audit event itself, so an idle log
    stays idle while its checkpoints keep coming."""

    __tablename__ = "audit_checkpoints"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    size: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
    root_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    note: Mapped[str] = mapped_column(Text, nullable=False)
    keys: Mapped[str] = mapped_column(Text, nullable=False)  # verifier keys that signed, "\n"


class AuditCosignature(Base):
    """A witness's cosignature of a checkpoint: a signature line to append to its note.
    Append-only (triggers)."""

    __tablename__ = "audit_cosignatures"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    checkpoint_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("audit_checkpoints.id"), nullable=False, index=True)
    witness: Mapped[str] = mapped_column(String(300), nullable=False)  # its verifier key
    cosigned_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    line: Mapped[str] = mapped_column(Text, nullable=False)


class AuditTreeNode(Base):
    """A perfect subtree of 2**level leaves (level >= charter.audit.tree.TILE_LEVEL) at
    position idx: what proofs are built from, and what verification keeps when old events
    are purged."""

    __tablename__ = "audit_tree_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary(32), nullable=False)


class AuditKey(Base):
    """Every key that has signed a checkpoint, kept for as long as the log: retired keys
    still verify the checkpoints they signed."""

    __tablename__ = "audit_keys"

    verifier: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    key_id: Mapped[str] = mapped_column(String(8), nullable=False)
    first_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_used_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)


class AuditPurged(Base):
    """What stays of an event that retention purged: its place in the chain and the tree.
    An event row can be deleted only once its tombstone, with the same hash, is here
    (trigger), and tombstones are append-only."""

    __tablename__ = "audit_purged"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    action: Mapped[str] = mapped_column(String(100), nullable=False)
    prev_hash: Mapped[str] = mapped_column(String(64), nullable=False)
    hash: Mapped[str] = mapped_column(String(64), nullable=False)
    purged_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    checkpoint_size: Mapped[int] = mapped_column(BigInteger, nullable=False)


class AuditShipment(Base):
    """How far the audit log has been shipped to one SIEM destination (charter.audit.ship):
    the last sequence number the destination confirmed, kept so a shipper that crashed
    resumes there (at least once: it may send the tail it had not confirmed again)."""

    __tablename__ = "audit_shipments"

    destination: Mapped[str] = mapped_column(String(20), primary_key=True)  # syslog | otlp
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(500))
