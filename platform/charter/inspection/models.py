"""Inspection's tables: investigation captures (requested, approved by a second person,
for a bounded time, their records encrypted under a key the database never sees), and the
findings counted by day, team and type from the audit log (counts only)."""

from __future__ import annotations

import builtins
from datetime import date, datetime

from sqlalchemy import BigInteger, Date, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from charter.db import Base, UTCDateTime, utcnow

# requested -> approved | rejected; approved -> revoked (ended early); approved or revoked
# -> purged (records deleted and the data key destroyed, after retention). Whether an
# approved capture is running is its window's: starts_at <= now < ends_at.
CAPTURE_STATES = ("requested", "approved", "rejected", "revoked", "purged")


class Capture(Base):
    __tablename__ = "captures"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), nullable=False, index=True)
    reason: Mapped[str] = mapped_column(Text, nullable=False)
    hours: Mapped[int] = mapped_column(Integer, nullable=False)  # the window asked for
    retain_days: Mapped[int] = mapped_column(Integer, nullable=False)  # after the window
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    requested_by: Mapped[str] = mapped_column(String(200), nullable=False)
    requested_by_user_id: Mapped[str] = mapped_column(String(36), nullable=False)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False,
                                                   default=utcnow)
    decided_by: Mapped[str | None] = mapped_column(String(200))
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decision_note: Mapped[str | None] = mapped_column(Text)
    starts_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    ends_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purge_after: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The capture's data key, wrapped (AES key wrap, RFC 3394) by the key-encryption key of
    # CHARTER_CAPTURE_KEY_FILE, and that key's fingerprint; None before approval and once
    # purged (destroying it makes any copy of the records unreadable).
    key_id: Mapped[str | None] = mapped_column(String(40))
    wrapped_key: Mapped[builtins.bytes | None] = mapped_column(LargeBinary)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)


class CaptureRecord(Base):
    """One captured request and its answer, encrypted (AES-256-GCM under the capture's
    data key; the capture's and the record's ids are the associated data). Only what is
    needed to find a record is in the clear."""

    __tablename__ = "capture_records"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    capture_id: Mapped[str] = mapped_column(ForeignKey("captures.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    serving_name: Mapped[str] = mapped_column(String(200), nullable=False)
    decision_id: Mapped[str] = mapped_column(String(64), nullable=False)
    request_id: Mapped[str | None] = mapped_column(String(64))
    nonce: Mapped[builtins.bytes] = mapped_column(LargeBinary, nullable=False)
    ciphertext: Mapped[builtins.bytes] = mapped_column(LargeBinary, nullable=False)

    __table_args__ = (Index("ix_capture_records_capture_created", "capture_id", "created_at"),)


class InspectionCount(Base):
    """Findings of inspected requests by UTC day, team and type, counted from the audit
    log's `policy.decide` events (charter.inspection.counts); "" for no team."""

    __tablename__ = "inspection_counts"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    team: Mapped[str] = mapped_column(String(200), primary_key=True)
    type: Mapped[str] = mapped_column(String(64), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    findings: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class InspectionRollup(Base):
    """How far inspection_counts has read the audit log (the last event's seq)."""

    __tablename__ = "inspection_rollup"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
