"""Overview: what needs attention now, and what the last 24 hours looked like."""

from __future__ import annotations

from datetime import timedelta

from flask import g
from werkzeug.wrappers import Response

from charter.audit.activity import dispatch_activity, integrity_alarms, recent_denials
from charter.console.blueprint import bp
from charter.console.ui import can, render
from charter.db import utcnow
from charter.nodes.service import list_nodes
from charter.registry.service import list_versions, version_refs

EXPIRY_WINDOW = timedelta(days=14)
ALARM_WINDOW = timedelta(days=30)  # how long an integrity alarm stays on the overview


@bp.get("/")
def home() -> Response:
    now = utcnow()
    pending = list_versions(state="submitted")
    expiring = []
    for version in list_versions(state="approved"):
        approvals = [d for d in version.decisions if d.decision == "approved"]
        latest = max(approvals, key=lambda d: d.decided_at) if approvals else None
        if latest and latest.expires_at and latest.expires_at - now <= EXPIRY_WINDOW:
            expiring.append((version, latest.expires_at))
    expiring.sort(key=lambda item: item[1])
    regions: dict[str, dict[str, int]] = {}
    if can("admin", "operator", "auditor"):
        for node in list_nodes():
            tally = regions.setdefault(node.region, {"ready": 0, "draining": 0,
                                                     "quarantined": 0, "down": 0})
            if node.attestation == "quarantined":
                tally["quarantined"] += 1
            elif node.admin_state != "active":
                tally["draining"] += 1
            elif node.healthy and node.attestation == "attested":
                tally["ready"] += 1
            else:
                tally["down"] += 1
    activity = dispatch_activity(now - timedelta(hours=24))
    denials = recent_denials() if can("admin", "auditor", "approver", "steward",
                                      "operator") else []
    refs = version_refs([d["target_id"] for d in denials
                         if d["target_type"] == "model_version"])
    for d in denials:  # people read names: "TinyLlama 1.0", not a version's id
        ref = refs.get(d["target_id"]) if d["target_type"] == "model_version" else None
        d["version_name"] = f"{ref.model_name} {ref.label}" if ref else None
    alarms = integrity_alarms(now - ALARM_WINDOW) if can("admin", "auditor") else []
    return render("console/pages/overview.html", section="overview", title="Overview",
                  roles=sorted(g.actor.roles), pending=pending, expiring=expiring,
                  regions=dict(sorted(regions.items())), activity=activity, denials=denials,
                  alarms=alarms, now=now)
