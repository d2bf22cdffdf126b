"""The usage counters: requests and tokens per team, API key, serving name and UTC day."""

from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Date, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from charter.db import Base


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
