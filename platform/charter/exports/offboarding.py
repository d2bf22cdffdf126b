"""Offboarding evidence: what an auditor asks first when someone leaves, answered from the
log. One person's pack: the account and its keys; every event about the person and about
each of their keys (provisioning, role and team syncs, key creations and revocations,
deprovisioning, reactivation), each with its seq and hash to check against the log and
its checkpoints; and, for each deprovisioning, how long access took to end: from the
identity provider's call (when it came over SCIM) to the commit that revoked the last
credential, which is the deprovisioning event itself (one transaction revokes them all).
"""

from __future__ import annotations

import heapq
from datetime import UTC, datetime
from typing import Any

from charter.exports.evidence import _event, events_about

FORMAT = "charter.offboarding-pack/1"


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def build(person: dict[str, Any], *, head_seq: int, head_hash: str, generated_by: str,
          generated_at: datetime) -> dict[str, Any]:
    """The pack as plain JSON data; `person`: charter.identity.service.person_record."""
    streams = [events_about("user", person["id"], head_seq),
               *(events_about("api_key", k["id"], head_seq) for k in person["keys"])]
    trail = list(heapq.merge(*streams, key=lambda e: e.seq))
    ended = []
    for e in trail:
        if e.action != "user.deprovision" or e.outcome != "success":
            continue
        requested = e.details.get("requested_at")
        ended.append({
            "seq": e.seq, "hash": e.hash, "committed_at": _iso(e.ts), "by": e.actor,
            "via": e.details.get("via"), "reason": e.details.get("reason"),
            "provider_call_at": requested,
            "seconds_from_call_to_last_credential_revoked":
                e.details.get("seconds_since_request"),
            "keys_revoked": e.details.get("keys_revoked", []),
            "sessions_ended": e.details.get("sessions_ended", 0),
            "roles_removed": e.details.get("roles_removed", []),
            "teams_left": e.details.get("teams_left", []),
            "unmanaged_teams": e.details.get("unmanaged_teams", [])})
    keys = [{**{k: _iso(v) if isinstance(v, datetime) else v for k, v in key.items()},
             "revoked_by_deprovisioning": any(key["id"] in d["keys_revoked"] for d in ended)}
            for key in person["keys"]]
    account = {k: _iso(v) if isinstance(v, datetime) else v
               for k, v in person.items() if k != "keys"}
    return {
        "format": FORMAT, "generated_at": _iso(generated_at), "generated_by": generated_by,
        "audit_head": {"seq": head_seq, "hash": head_hash},
        "person": account, "keys": keys,
        "access_ended": ended,
        "open_credentials": [k["id"] for k in keys if k["revoked_at"] is None],
        "audit_trail": [_event(e) for e in trail],
    }
