"""Investigation captures through the API and the gateway, on PostgreSQL: asked for by an
admin, approved by another person who is an auditor, recording one team's requests and
answers for a bounded time, encrypted under a key the database never sees (a DBA's copy
holds no plaintext; an altered or moved record does not open), read by auditors only
with every read audited, ended early, and purged behind the audit trail after its
retention."""

from __future__ import annotations

import base64
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from tests.batch_support import BatchWorld, make_world

MARKER = "capture-marker-5c1d2e"
CARD = "4111 1111 1111 1111"


@pytest.fixture
def kek(tmp_path: Path) -> Path:
    path = tmp_path / "capture.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode())
    return path


@pytest.fixture
def world(configured, make_person, kek) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    w = make_world(configured, make_person, capture_key_file=str(kek))
    yield w
    w.node.stop()


def _client(world: BatchWorld) -> Any:
    from tests.runtimes import app_for

    return app_for(world.settings).test_client()


def _as(person: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {person.token}"}


def _ask(client: Any, admin: Any, world: BatchWorld, **extra: Any) -> Any:
    return client.post("/api/v1/captures", headers=_as(admin), json={
        "team_id": world.team_id, "reason": "suspected exfiltration of customer records",
        "hours": 2, "retain_days": 7, **extra})


def _events(action: str) -> list[Any]:
    from tests.runtimes import flush_outcomes

    assert flush_outcomes()
    return list_events(EventFilter(action=action, limit=1000))


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": text}],
            **extra}


def test_a_capture_is_asked_approved_recorded_read_and_purged(world, make_person,  # type: ignore[no-untyped-def]
                                                              pg_conn) -> None:
    client = _client(world)
    admin, auditor = make_person("admin"), make_person("auditor")

    # Asking: admins only, with a reason, inside the bounds; one at a time a team.
    r = _ask(client, auditor, world)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = _ask(client, admin, world, reason="because", hours=999)
    assert r.status_code == 422
    assert {e["field"] for e in r.get_json()["error"]["details"]["errors"]} == {
        "reason", "hours"}
    r = _ask(client, admin, world)
    assert r.status_code == 201, r.get_json()
    capture = r.get_json()
    assert (capture["state"], capture["running"], capture["key_id"]) == (
        "requested", False, None)
    assert "wrapped_key" not in capture
    assert _ask(client, admin, world).get_json()["error"]["code"] == "capture_exists"

    # Nothing is recorded before approval.
    client.post("/v1/chat/completions", headers=world.headers, json=_chat(f"{MARKER} early"))
    assert pg_conn.execute("SELECT count(*) FROM capture_records").fetchone()[0] == 0

    # Deciding: an auditor who did not ask (an admin-auditor who asked may not).
    both = make_person("admin", "auditor")
    r = _ask(client, both, world)  # refused: the team has one asked for already
    assert r.status_code == 409
    url = f"/api/v1/captures/{capture['id']}"
    r = client.post(f"{url}/approve", headers=_as(admin), json={"row_version": 1})
    assert r.status_code == 403
    r = client.post(f"{url}/approve", headers=_as(auditor),
                    json={"row_version": 1, "note": "approved for the inquiry"})
    assert r.status_code == 200, r.get_json()
    capture = r.get_json()
    assert capture["state"] == "approved" and capture["running"] is True
    assert capture["key_id"].startswith("kek-") and capture["row_version"] == 2

    # Recording: whole and streamed answers, OpenAI's and TGI's shapes.
    r = client.post("/v1/chat/completions", headers=world.headers,
                    json=_chat(f"{MARKER} first {CARD}"))
    assert r.status_code == 200
    r = client.post("/v1/chat/completions", headers=world.headers,
                    json=_chat(f"{MARKER} second", stream=True))
    assert r.status_code == 200 and r.get_data()
    r = client.post("/tgi/m/generate", headers=world.headers,
                    json={"inputs": f"{MARKER} third", "parameters": {}})
    assert r.status_code == 200
    outcomes = [e for e in _events("dispatch.outcome") if e.details.get("capture_id")]
    assert len(outcomes) == 3 and {e.details["capture_id"] for e in outcomes} == {
        capture["id"]}
    assert client.get(url, headers=_as(admin)).get_json()["records"] == 3

    # A DBA sees ciphertext: the marker is in no table, in any form Postgres prints.
    tables = [row[0] for row in pg_conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
    for name in tables:
        hits = pg_conn.execute(
            f'SELECT count(*) FROM "{name}" t WHERE t::text LIKE %s',  # noqa: S608
            (f"%{MARKER}%",)).fetchone()[0]
        assert hits == 0, name
    assert pg_conn.execute("SELECT count(*) FROM capture_records WHERE encode(ciphertext, "
                           "'escape') LIKE %s", (f"%{MARKER}%",)).fetchone()[0] == 0

    # Reading: auditors only, newest first, each read audited (ids, never content).
    r = client.get(f"{url}/records", headers=_as(admin))
    assert r.status_code == 403
    r = client.get(f"{url}/records", headers=_as(auditor))
    assert r.status_code == 200, r.get_json()
    records = r.get_json()
    assert [x["content"]["request"].get("inputs") or
            x["content"]["request"]["messages"][0]["content"] for x in records] == [
        f"{MARKER} third", f"{MARKER} second", f"{MARKER} first {CARD}"]
    assert records[0]["content"]["answer"] == f"echo: {MARKER} third"
    assert records[1]["content"]["answer"] == f"echo: {MARKER} second"  # streamed
    assert records[2]["content"]["protocol"] == "openai"
    assert records[2]["content"]["team"] == "t"
    read = _events("capture.read")[-1]
    assert read.actor == auditor.actor.ref
    assert read.details["records"] == 3 and len(read.details["record_ids"]) == 3
    assert MARKER not in str(read.details)

    # Tampering: an altered record, and one moved to another row's place, do not open.
    ids = [x["id"] for x in records]
    pg_conn.execute("UPDATE capture_records SET ciphertext = overlay(ciphertext placing "
                    "'\\x00'::bytea from 5 for 1) WHERE id = %s", (ids[0],))
    pg_conn.execute("UPDATE capture_records SET nonce = (SELECT nonce FROM capture_records "
                    "WHERE id = %s), ciphertext = (SELECT ciphertext FROM capture_records "
                    "WHERE id = %s) WHERE id = %s", (ids[2], ids[2], ids[1]))
    records = client.get(f"{url}/records", headers=_as(auditor)).get_json()
    assert [x.get("error") for x in records] == [
        "record_does_not_open", "record_does_not_open", None]
    assert _events("capture.read")[-1].details["unopened"] == 2

    # Ending early: nothing more is recorded; the records stay until the purge.
    r = client.post(f"{url}/revoke", headers=_as(admin),
                    json={"row_version": 2, "note": "enough"})
    assert r.status_code == 200 and r.get_json()["state"] == "revoked"
    assert r.get_json()["running"] is False
    client.post("/v1/chat/completions", headers=world.headers, json=_chat(f"{MARKER} late"))
    assert pg_conn.execute("SELECT count(*) FROM capture_records").fetchone()[0] == 3

    # Purging after retention: records deleted, the data key destroyed, the trail kept.
    from charter.db import utcnow
    from charter.inspection.captures import purge_due

    pg_conn.execute("UPDATE captures SET purge_after = now() - interval '1 second'")
    assert purge_due(utcnow()) == 1
    row = pg_conn.execute("SELECT state, wrapped_key, purged_at FROM captures").fetchone()
    assert row[0] == "purged" and row[1] is None and row[2] is not None
    assert pg_conn.execute("SELECT count(*) FROM capture_records").fetchone()[0] == 0
    purged = _events("capture.purged")[-1]
    assert purged.details["records_deleted"] == 3
    r = client.get(f"{url}/records", headers=_as(auditor))
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "capture_purged"
    trail = [(e.action, e.outcome) for e in list_events(EventFilter(target_id=capture["id"]))]
    assert trail == [("capture.requested", "success"),
                     ("capture.approved", "denied"),  # the admin: not an auditor
                     ("capture.approved", "success"),
                     ("capture.read", "denied"),  # the admin again
                     ("capture.read", "success"), ("capture.read", "success"),
                     ("capture.revoked", "success"), ("capture.purged", "success"),
                     ("capture.read", "denied")]  # purged
    assert verify_chain().ok


def test_without_a_key_nothing_is_approved_and_another_key_opens_nothing(  # type: ignore[no-untyped-def]
        world, make_person, tmp_path) -> None:
    from tests.runtimes import app_for

    admin, auditor = make_person("admin"), make_person("auditor")
    keyless = app_for(dataclasses.replace(world.settings, capture_key_file="")).test_client()
    capture = _ask(keyless, admin, world).get_json()
    url = f"/api/v1/captures/{capture['id']}"
    r = keyless.post(f"{url}/approve", headers=_as(auditor), json={"row_version": 1})
    assert r.status_code == 503
    assert r.get_json()["error"]["code"] == "capture_key_unavailable"
    assert "CHARTER_CAPTURE_KEY_FILE" in r.get_json()["error"]["message"]

    client = _client(world)
    r = client.post(f"{url}/approve", headers=_as(auditor), json={"row_version": 1})
    assert r.status_code == 200
    client.post("/v1/chat/completions", headers=world.headers, json=_chat("hello"))
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    rotated = app_for(dataclasses.replace(world.settings, capture_key_file=str(other)))
    r = rotated.test_client().get(f"{url}/records", headers=_as(auditor))
    assert r.status_code == 503
    error = r.get_json()["error"]
    assert error["code"] == "capture_key_unavailable"
    assert capture["id"] not in error["message"] and "wrapped by kek-" in error["message"]
    refused = [e for e in _events("capture.read") if e.outcome == "denied"]
    assert refused and refused[-1].target_id == capture["id"]


def test_only_the_captured_team_is_recorded(world, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team

    other = create_team(SYSTEM, name="other", description="", requests_per_day=None,
                        entitlements={"models": ["*"], "data_classes": ["*"],
                                      "regions": ["*"]}, default_data_class="internal")
    bot = create_service_account(SYSTEM, other.id, username="other-bot")
    key = create_api_key(SYSTEM, bot.id, name="k").token
    client = _client(world)
    admin, auditor = make_person("admin"), make_person("auditor")
    capture = _ask(client, admin, world).get_json()
    client.post(f"/api/v1/captures/{capture['id']}/approve", headers=_as(auditor),
                json={"row_version": 1})
    client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                json=_chat("not ours"))
    client.post("/v1/chat/completions", headers=world.headers, json=_chat("ours"))
    assert pg_conn.execute("SELECT count(*) FROM capture_records").fetchone()[0] == 1


def test_a_capture_keeps_what_the_caller_sent_and_what_was_sent(configured, make_person,  # type: ignore[no-untyped-def]
                                                                kek, tmp_path) -> None:
    """Under redaction the record holds the request as its caller wrote it, the body the
    node read, and the counts of what was replaced."""
    import json
    import shutil

    root = Path(__file__).resolve().parents[2]
    policies = tmp_path / "policies"
    shutil.copytree(root / "policies", policies)
    path = policies / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"]["data_classes"] = ["internal"]
    path.write_text(json.dumps(data))
    world = make_world(configured, make_person, capture_key_file=str(kek),
                       policy_dir=str(policies))
    try:
        client = _client(world)
        admin, auditor = make_person("admin"), make_person("auditor")
        capture = _ask(client, admin, world).get_json()
        client.post(f"/api/v1/captures/{capture['id']}/approve", headers=_as(auditor),
                    json={"row_version": 1})
        r = client.post("/v1/chat/completions", headers=world.headers,
                        json=_chat("write to jane@example.com"))
        assert r.headers["X-Charter-Redacted"] == "EMAIL_ADDRESS=1"
        record = client.get(f"/api/v1/captures/{capture['id']}/records",
                            headers=_as(auditor)).get_json()[0]["content"]
        assert record["request"]["messages"][0]["content"] == "write to jane@example.com"
        assert record["sent"]["messages"][0]["content"] == "write to <EMAIL_ADDRESS>"
        assert record["redacted"] == {"EMAIL_ADDRESS": 1}
        assert record["answer"] == "echo: write to <EMAIL_ADDRESS>"
    finally:
        world.node.stop()


def test_the_console_asks_decides_and_ends_captures(world, make_person) -> None:  # type: ignore[no-untyped-def]
    """The Inspection page lists captures with their approval, window and retention; an
    admin asks (CSRF-checked), an auditor who did not ask approves, and a running capture
    is ended; the asker is not offered the decision."""
    from tests.console_support import Console, notices
    from tests.runtimes import app_for

    app = app_for(world.settings)
    admin = Console(app, make_person("admin").actor.user_id)
    both = make_person("admin", "auditor")
    asker = Console(app, both.actor.user_id)
    auditor = Console(app, make_person("auditor").actor.user_id)
    form = {"team_id": world.team_id, "reason": "records leaving through the assistant",
            "hours": "3", "retain_days": "2"}
    assert asker.post("/console/inspection/captures", form, csrf=False,
                      follow=False).status_code in (400, 403)
    page = asker.post("/console/inspection/captures", form).text
    assert notices(page, "ok") and "an auditor other than you decides" in notices(page, "ok")[0]
    assert "four-eyes: another auditor decides" in page  # the asker is an auditor too
    assert "/approve" not in page
    page = admin.post("/console/inspection/captures", form).text
    assert "(capture_exists)" in notices(page, "error")[0]

    page = auditor.get("/console/inspection").text
    capture_id = page.split('data-capture="')[1].split('"')[0]
    assert "records leaving through the assistant" in page and "3 h once approved" in page
    page = auditor.post(f"/console/inspection/captures/{capture_id}/approve",
                        {"row_version": "1", "note": "go ahead"}).text
    assert "Capture approved: recording until" in notices(page, "ok")[0]
    assert "<strong>recording</strong>" in page and "go ahead" in page
    r = auditor.post(f"/console/inspection/captures/{capture_id}/destroy", {})
    assert r.status_code == 404
    page = admin.post(f"/console/inspection/captures/{capture_id}/revoke",
                      {"row_version": "2", "note": "done"}).text
    assert "Capture ended" in notices(page, "ok")[0]
    assert "<strong>recording</strong>" not in page
    events = [e.action for e in list_events(EventFilter(target_id=capture_id))]
    assert events == ["capture.requested", "capture.approved", "capture.revoked"]


def test_a_capture_stops_recording_when_its_window_ends(world, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """The window is the capture's own: once `ends_at` passes nothing more is recorded,
    whether or not anything else changed (the cached capture is checked at each request)."""
    import time

    client = _client(world)
    admin, auditor = make_person("admin"), make_person("auditor")
    capture = _ask(client, admin, world).get_json()
    client.post(f"/api/v1/captures/{capture['id']}/approve", headers=_as(auditor),
                json={"row_version": 1})
    client.post("/v1/chat/completions", headers=world.headers, json=_chat("inside"))
    # the end moved to one second ahead, as if the window were ending now
    pg_conn.execute("UPDATE captures SET ends_at = now() + interval '1 second'")
    client.post("/v1/chat/completions", headers=world.headers, json=_chat("still inside"))
    time.sleep(1.2)  # no change to any table: the cached capture must see its own end
    client.post("/v1/chat/completions", headers=world.headers, json=_chat("after"))
    got = client.get(f"/api/v1/captures/{capture['id']}", headers=_as(auditor)).get_json()
    assert (got["records"], got["running"], got["state"]) == (2, False, "approved")
    outcomes = [e for e in _events("dispatch.outcome")]
    assert [bool(e.details.get("capture_id")) for e in outcomes[-3:]] == [True, True, False]
