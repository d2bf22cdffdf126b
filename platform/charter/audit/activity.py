"""What the console's overview shows of the log: dispatch requests and denials per model and
region over a period, and the newest policy denials with their reasons. Reads only."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from charter.audit.models import AuditEvent
from charter.uow import unit_of_work


@dataclass
class Tally:
    served: int = 0
    failed: int = 0
    denied: int = 0

    @property
    def total(self) -> int:
        return self.served + self.failed + self.denied


@dataclass
class Activity:
    by_model: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))
    by_region: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))


def dispatch_activity(since: datetime) -> Activity:
    """Requests (`dispatch.outcome`: served or failed) and denials (`dispatch.refused`) per
    serving name and per region since `since`, counted in the database."""
    region = AuditEvent.details["region"].as_string()
    stmt = (select(AuditEvent.action, AuditEvent.outcome, AuditEvent.target_id, region,
                   func.count())
            .where(AuditEvent.ts >= since,
                   AuditEvent.action.in_(("dispatch.outcome", "dispatch.refused")))
            .group_by(AuditEvent.action, AuditEvent.outcome, AuditEvent.target_id, region))
    out = Activity()
    with unit_of_work() as session:
        rows = session.execute(stmt).all()
    for action, outcome, target, where, count in rows:
        kind = ("denied" if action == "dispatch.refused"
                else "served" if outcome == "success" else "failed")
        for bucket in (out.by_model[target], out.by_region[where or "not routed"]):
            setattr(bucket, kind, getattr(bucket, kind) + count)
    out.by_model = dict(sorted(out.by_model.items()))
    out.by_region = dict(sorted(out.by_region.items()))
    return out


def recent_denials(limit: int = 10) -> list[dict[str, Any]]:
    """The newest denied policy decisions (admission and dispatch) with their reasons."""
    with unit_of_work() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "policy.decide",
                                     AuditEvent.outcome == "denied")
            .order_by(AuditEvent.seq.desc()).limit(limit)).all()
        return [{"seq": e.seq, "ts": e.ts, "actor": e.actor, "policy": e.details.get("policy"),
                 "target_type": e.target_type, "target_id": e.target_id,
                 "violations": e.details.get("violations", []),
                 "request_id": e.request_id} for e in rows]


def integrity_alarms(since: datetime, limit: int = 5) -> list[dict[str, Any]]:
    """The newest integrity alarms (`audit.integrity_alarm`) since `since`: the console
    shows them to auditors and admins until they are older than that."""
    with unit_of_work() as session:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.action == "audit.integrity_alarm",
                                     AuditEvent.ts >= since)
            .order_by(AuditEvent.seq.desc()).limit(limit)).all()
        return [{"seq": e.seq, "ts": e.ts, "message": e.details.get("message", ""),
                 "reason": e.details.get("reason"), "checkpoint": e.details.get("checkpoint"),
                 "first_bad_seq": e.details.get("first_bad_seq")} for e in rows]
