"""The daily request quota: one rule, pure.

The gateway's group commit applies it under the audit chain's lock, so quotas are exact
across processes: in Python (`admits`, through charter.audit.writer.plan_batch, on SQLite)
and in PostgreSQL (charter_audit_append, migration 0010, the same comparison; a test runs
both on the same batches).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta


def admits(used: int, asked: int, limit: int | None) -> bool:
    """Whether `asked` more requests fit a team that used `used` today under `limit`
    (None: the team has no quota)."""
    return limit is None or used + asked <= limit


def seconds_until_reset(now: datetime) -> int:
    """Seconds until the quota day (UTC) turns, rounded up: the Retry-After of a refusal."""
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(1)
    return int((midnight - now).total_seconds()) + 1


def quota_day(now: datetime) -> date:
    """The UTC day a request counts against."""
    return now.astimezone(UTC).date()
