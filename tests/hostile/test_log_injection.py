"""Log injection: CRLF, ANSI escapes and JSON-breaking strings in user-controlled fields are
stored as given, come out of the API and an export bundle exactly, never break a line of
the log, the bundle or a CSV record, and the bundle still verifies."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from charter.audit import checkpoints
from charter.audit.bundle import Selection
from charter.audit.service import EventFilter, export_bundle, list_events
from charter.audit.verify import verify_bundle
from tests.audit_support import signing

KEY_EVENT = "api_key.create"
HOSTILE = [
    "line1\r\nFAKE 200 OK user=admin action=approve",
    "\x1b[31mred\x1b[0m \x1b]0;title\x07 \x1b[2J",
    '"}, {"actor": "user:root", "action": "version.approve"',
    "\\u0000 \\\" </script><script>alert(1)</script>",
    "\u2028\u2029 \ufeff \u202e reversed",
    "tab\tand\vvertical\fform",
]


def test_hostile_text_is_kept_exactly_and_breaks_nothing(configured, make_person,
                                                          tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    settings = signing(configured, tmp_path)
    client = app_for(settings).test_client()
    admin = make_person("admin")
    for i, text in enumerate(HOSTILE):
        r = client.post("/api/v1/teams", headers=admin.headers,
                        json={"name": f"team-{i}", "description": text})
        assert r.status_code == 201, r.get_json()
        r = client.post(f"/api/v1/users/{admin.actor.user_id}/api-keys",
                        headers=admin.headers, json={"name": text[:100]})
        assert r.status_code == 201, r.get_json()
    named = [text[:100] for text in HOSTILE]
    created = list_events(EventFilter(action=KEY_EVENT, limit=100))
    assert [e.details["name"] for e in created][-len(HOSTILE):] == named
    api = client.get(f"/api/v1/audit/events?action={KEY_EVENT}", headers=admin.headers)
    assert [e["details"]["name"] for e in api.get_json()["events"]][-len(HOSTILE):] == named

    out = io.BytesIO()
    export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    bundle = out.getvalue()
    key = checkpoints.load_signers(settings)[0].verifier
    report = verify_bundle(bundle, [key])
    assert report.ok, report.findings
    lines = zipfile.ZipFile(io.BytesIO(bundle)).read("events.jsonl").split(b"\n")[:-1]
    assert len(lines) == report.events  # no value split a line
    events = [json.loads(line) for line in lines]
    described = [e["details"]["name"] for e in events if e["action"] == KEY_EVENT]
    assert described[-len(HOSTILE):] == named
    assert all(b"\r" not in line and b"\x1b" not in line for line in lines)
