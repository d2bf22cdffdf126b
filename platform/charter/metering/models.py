"""The usage counters: requests and tokens per team, API key, serving name and UTC day."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import BigInteger, Date, Integer, Numeric, String
from sqlalchemy.orm import Mapped, mapped_column

from charter.db import Base, UTCDateTime


class Usage(Base):
    __tablename__ = "usage_counters"

    team_id: Mapped[str] = mapped_column(String(36), primary_key=True)  # "" for no team
    key_id: Mapped[str] = mapped_column(String(16), primary_key=True, default="")  # "": SSO
    serving_name: Mapped[str] = mapped_column(String(200), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    requests: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    tokens_in: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    tokens_out: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # Of tokens_in + tokens_out, those a node did not report (counted by Charter instead).
    tokens_estimated: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class Price(Base):
    """What a model version's tokens cost, per million, for chargeback (optional)."""

    __tablename__ = "prices"

    version_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)  # ISO 4217
    input_per_million: Mapped[Decimal] = mapped_column(Numeric(18, 6), nullable=False)
    output_per_million: Mapped[Decimal] = mapped_column(Numeric(18, 6), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    updated_by: Mapped[str] = mapped_column(String(200), nullable=False)
