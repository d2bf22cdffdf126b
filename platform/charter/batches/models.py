"""Uploaded files, batches and their lines: the state of every batch lives here.

The broker only carries nudges (ids); what a line is, who runs it and what it answered is
in these rows, so a lost message, a killed worker or a restarted broker loses nothing.
"""

from __future__ import annotations

import builtins
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, deferred, mapped_column

from charter.db import Base, UTCDateTime, utcnow

FILE_PURPOSES = ("batch", "batch_output", "batch_error")
BATCH_STATES = ("validating", "failed", "in_progress", "finalizing", "completed", "expired",
                "cancelling", "cancelled")
ACTIVE_BATCH_STATES = ("validating", "in_progress", "cancelling")
LINE_STATES = ("invalid", "pending", "running", "succeeded", "failed", "cancelled", "expired")
OPEN_LINE_STATES = ("pending", "running")


class StoredFile(Base):
    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # file-<24 hex>
    owner_user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), nullable=False,
                                               index=True)
    purpose: Mapped[str] = mapped_column(String(20), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    lines: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    invalid_lines: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    # Set when retention removed the content (the row, its digest and the audit stay).
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    content: Mapped[builtins.bytes | None] = deferred(mapped_column(LargeBinary))


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # batch_<24 hex>
    owner_user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), nullable=False,
                                               index=True)
    actor_ref: Mapped[str] = mapped_column(String(200), nullable=False)
    endpoint: Mapped[str] = mapped_column(String(50), nullable=False)
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id"), nullable=False)
    completion_window: Mapped[str] = mapped_column(String(10), nullable=False)
    status: Mapped[str] = mapped_column(String(20), nullable=False, index=True)
    data_class: Mapped[str | None] = mapped_column(String(50))
    purpose: Mapped[str | None] = mapped_column(String(50))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    # [{"code", "message", "line", "param"}]: why the batch failed or stopped.
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSON, nullable=False, default=list)
    output_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    error_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    in_progress_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finalizing_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelling_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BatchLine(Base):
    __tablename__ = "batch_lines"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), nullable=False)
    line_no: Mapped[int] = mapped_column(Integer, nullable=False)  # 1-based, in the file
    custom_id: Mapped[str | None] = mapped_column(String(200))
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # the body; None if invalid
    status: Mapped[str] = mapped_column(String(20), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    claim: Mapped[str | None] = mapped_column(String(32))  # the running attempt's token
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime())
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    node: Mapped[str | None] = mapped_column(String(100))
    decision_id: Mapped[str | None] = mapped_column(String(64))
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (
        UniqueConstraint("batch_id", "line_no", name="uq_batch_lines_batch_line"),
        Index("ix_batch_lines_batch_status", "batch_id", "status"),
        # What a lane's claim reads: the open lines of a batch in file order, without
        # walking past the finished ones.
        Index("ix_batch_lines_open", "batch_id", "line_no",
              postgresql_where=text("status IN ('pending', 'running')"),
              sqlite_where=text("status IN ('pending', 'running')")),
    )
