"""Record-keeping export of dispatch events (EU AI Act Art. 12): requests through the real
gateway to a real HTTP node, then the period exported as CSV and JSONL."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from charter import scope
from charter.audit.service import EventFilter, list_events, verify_chain
from charter.db import utcnow
from charter.dispatch.service import DispatchError, record_refusal
from charter.exports import records
from charter.exports import service as exports
from charter.exports.records import COLUMNS, csv_cell
from charter.registry.service import get_version
from tests.batch_support import BatchWorld, make_world
from tests.runtimes import flush_outcomes

DISPATCH = ("policy.decide", "dispatch.outcome", "dispatch.refused")


@pytest.fixture
def world(configured, make_person) -> Iterator[tuple[BatchWorld, Any]]:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    w = make_world(configured, make_person)
    yield w, app_for(w.settings).test_client()
    w.node.stop()


@pytest.fixture
def auditor(make_person):  # type: ignore[no-untyped-def]
    return make_person("auditor")


def _chat(client, w: BatchWorld, content: str, **headers: str) -> Any:  # type: ignore[no-untyped-def]
    return client.post("/v1/chat/completions", headers={**w.headers, **headers}, json={
        "model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": content}]})


def _traffic(client, w: BatchWorld) -> None:  # type: ignore[no-untyped-def]
    assert _chat(client, w, "one").status_code == 200
    assert _chat(client, w, "two", **{"X-Charter-Data-Class": "internal"}).status_code == 200
    assert _chat(client, w, "no", **{"X-Charter-Purpose": "marketing"}).status_code == 403
    r = client.post("/v1/chat/completions", headers=w.headers, json={
        "model": "=HYPERLINK(\"http://evil\")", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert flush_outcomes()  # outcomes are written after the answer


def _export(client, who, since, until, fmt: str = "csv") -> Any:  # type: ignore[no-untyped-def]
    return client.get("/api/v1/exports/records", headers=who.headers, query_string={
        "since": since.isoformat(), "until": until.isoformat(), "format": fmt})


def _csv(text: str) -> list[dict[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader)
    assert tuple(header) == COLUMNS
    return [dict(zip(header, row, strict=True)) for row in reader]


def test_records_match_the_gateways_events(world, auditor) -> None:  # type: ignore[no-untyped-def]
    w, client = world
    start = utcnow()
    _traffic(client, w)
    end = utcnow() + timedelta(seconds=1)
    r = _export(client, auditor, start, end, "jsonl")
    assert r.status_code == 200 and r.mimetype == "application/jsonl"
    rows = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    events = sorted((e for a in DISPATCH for e in list_events(EventFilter(action=a))
                     if e.target_type == "deployment"), key=lambda e: e.seq)
    assert [(x["seq"], x["event_hash"]) for x in rows] == [(e.seq, e.hash) for e in events]
    assert all(list(x) == list(COLUMNS) for x in rows)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for x in rows:
        by_kind.setdefault(x["record"], []).append(x)
    assert sorted(by_kind) == ["decision", "outcome", "refused"]
    allowed = [x for x in by_kind["decision"] if x["decision"] == "allow"]
    denied = [x for x in by_kind["decision"] if x["decision"] == "deny"]
    assert len(allowed) == 2 and len(denied) == 1
    assert denied[0]["violations"] and denied[0]["policy_revision"] == scope.current(
        ).policies.engine.revision
    outcomes = by_kind["outcome"]
    assert len(outcomes) == 2
    version = get_version(w.version_id)  # what the deployment `m` binds
    for out in outcomes:
        decision = next(x for x in allowed if x["decision_id"] == out["decision_id"])
        assert decision["seq"] < out["seq"] and decision["request_id"] == out["request_id"]
        assert out["caller"] == "service:bot" and out["team"] == "t"
        assert (out["node"], out["region"], out["serving_name"]) == ("n1", "eu-central", "m")
        assert (out["outcome"], out["http_status"]) == ("completed", 200)
        assert (out["tokens_in"], out["tokens_out"]) == (3, 2)
        assert out["latency_ms"] > 0 and out["started_at"] < out["ts"]
        assert out["request_digest"].startswith("sha256:")
        assert (out["data_class"], out["purpose"]) == ("internal", "assistant")
        assert out["model_version_id"] == w.version_id
        assert out["weights_sha256"] == [f.sha256 for f in version.files]
        assert out["source_revision"] == version.source_revision
    # Each refusal: the policy denial beside its decision, and the unknown model.
    policy_refusal, refused = by_kind["refused"]
    assert policy_refusal["error_code"] == "policy_denied"
    assert policy_refusal["serving_name"] == "m"
    assert refused["error_code"] == "model_not_found"
    assert refused["serving_name"] == "=HYPERLINK(\"http://evil\")"
    assert refused["model_version_id"] is None

    r = _export(client, auditor, start, end)  # the same period as CSV
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert r.headers["Content-Disposition"].startswith("attachment;")
    text = r.get_data(as_text=True)
    assert text.startswith('"seq","event_hash"') and "\r\n" in text
    table = _csv(text)
    assert [(int(x["seq"]), x["event_hash"]) for x in table] == [
        (x["seq"], x["event_hash"]) for x in rows]
    cell = [x for x in table if x["record"] == "refused"][-1]["serving_name"]
    assert cell == "'=HYPERLINK(\"http://evil\")"  # defused
    out = next(x for x in table if x["record"] == "outcome")
    assert (out["tokens_in"], out["stream"], out["weights_sha256"]) == (
        "3", "false", ";".join(f.sha256 for f in version.files))

    exports = list_events(EventFilter(action="export.records"))
    assert [(e.actor, e.details["format"]) for e in exports] == [
        (auditor.actor.ref, "jsonl"), (auditor.actor.ref, "csv")]
    assert exports[0].details["since"] == start.isoformat()
    assert exports[0].details["through_seq"] < exports[0].seq
    assert verify_chain().ok


def test_hostile_text_stays_inside_quoted_cells(configured, make_person, auditor) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(configured).test_client()
    caller = make_person("user")
    start = utcnow()
    names = ["+cmd|' /C calc'!A0", "@SUM(1)", "-2+3", "\tTAB", "\rCR",
             "line\r\nbreak \x1b[31mred\x1b[0m, \"quoted\""]
    for name in names:
        record_refusal(caller.actor, name, DispatchError("refused for the test",
                                                         code="model_not_found", status=404))
    assert flush_outcomes()
    r = _export(client, auditor, start, utcnow() + timedelta(seconds=1))
    text = r.get_data(as_text=True)
    table = _csv(text)
    assert [x["serving_name"] for x in table] == [
        "'+cmd|' /C calc'!A0", "'@SUM(1)", "'-2+3", "'\tTAB", "'\rCR",
        "line\r\nbreak \x1b[31mred\x1b[0m, \"quoted\""]
    assert '"line\r\nbreak \x1b[31mred\x1b[0m, ""quoted"""' in text
    r = _export(client, auditor, start, utcnow() + timedelta(seconds=1), "jsonl")
    body = r.get_data(as_text=True)
    assert "\x1b" not in body and "\r" not in body
    assert [json.loads(x)["serving_name"] for x in body.splitlines()] == names


@pytest.mark.parametrize("value,cell", [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@a", "'@a"), ("\tx", "'\tx"),
    ("\rx", "'\rx"), ("a=b", "a=b"), (None, ""), (True, "true"), (3, "3"),
    (["a", "b"], "a;b"), (["=x"], "'=x"),
])
def test_csv_cells_are_defused(value, cell) -> None:  # type: ignore[no-untyped-def]
    assert csv_cell(value) == cell


def test_the_period_bounds_the_export_and_pages_are_keyset(
        configured, make_person, auditor, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(configured).test_client()
    caller = make_person("user")

    def refuse(name: str) -> None:
        record_refusal(caller.actor, name, DispatchError("no", code="model_not_found"))

    refuse("before")
    assert flush_outcomes()
    since = utcnow()
    for i in range(7):
        refuse(f"in-{i}")
    assert flush_outcomes()
    until = utcnow()
    refuse("after")
    assert flush_outcomes()
    monkeypatch.setattr(records, "PAGE", 2)  # several keyset pages for 7 rows
    r = _export(client, auditor, since, until, "jsonl")
    names = [json.loads(x)["serving_name"] for x in r.get_data(as_text=True).splitlines()]
    assert names == [f"in-{i}" for i in range(7)]

    # The export covers the log up to its start: what is written while it streams is not
    # in it (the service's generator is lazy; the test client would read it at once).
    export = exports.export_records(auditor.actor, since=since,
                                    until=until + timedelta(hours=1), fmt="jsonl")
    refuse("during")
    assert flush_outcomes()
    through = export.through_seq
    rows = [json.loads(x) for x in "".join(export.chunks).splitlines()]
    assert [x["serving_name"] for x in rows] == [*(f"in-{i}" for i in range(7)), "after"]
    assert rows[-1]["seq"] <= through


def test_bad_periods_are_422_and_other_roles_403(configured, make_person, auditor) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(configured).test_client()
    now = utcnow()

    def errors(query: dict[str, str], who: Any = auditor) -> Any:
        r = client.get("/api/v1/exports/records", headers=who.headers, query_string=query)
        return r.status_code, r.get_json()["error"]

    status, err = errors({"since": now.isoformat(), "until": now.isoformat()})
    assert (status, err["code"]) == (422, "validation_failed")
    assert [(e["field"], e["code"]) for e in err["details"]["errors"]] == [("since", "range")]
    status, err = errors({"since": now.isoformat(),
                          "until": (now - timedelta(days=1)).isoformat()})
    assert (status, err["details"]["errors"][0]["code"]) == (422, "range")
    status, err = errors({})
    assert status == 422
    assert {(e["field"], e["code"]) for e in err["details"]["errors"]} == {
        ("since", "missing"), ("until", "missing")}
    status, err = errors({"since": (now - timedelta(days=400)).isoformat(),
                          "until": now.isoformat()})
    assert (status, err["details"]["errors"][0]["code"]) == (422, "too_long")
    status, err = errors({"since": "2026-01-01T00:00:00", "until": now.isoformat()})
    assert status == 422  # no timezone
    status, err = errors({"since": now.isoformat(), "until": now.isoformat(),
                          "format": "xlsx"})
    assert status == 422
    assert list_events(EventFilter(action="export.records")) == []

    for role in ("user", "steward", "operator", "approver"):
        person = make_person(role)
        status, err = errors({"since": (now - timedelta(hours=1)).isoformat(),
                              "until": now.isoformat()}, person)
        assert (status, err["code"]) == (403, "forbidden")
        status, err = errors({}, person)  # refused before its input is judged
        assert (status, err["code"]) == (403, "forbidden")
    denied = list_events(EventFilter(action="export.records", outcome="denied"))
    assert len(denied) == 8
    assert all(e.details["required_roles"] == ["admin", "auditor"] for e in denied)


def test_usage_for_chargeback_is_the_teams_own(world, make_person, auditor) -> None:  # type: ignore[no-untyped-def]
    """GET /api/v1/usage: the counters of the teams a caller may see, per model and day,
    equal to the outcomes' token counts; JSON and defused CSV; a period is bounded."""
    w, client = world
    for _ in range(3):
        assert _chat(client, w, "x").status_code == 200
    assert flush_outcomes()
    today = utcnow().date().isoformat()
    r = client.get("/api/v1/usage", headers=auditor.headers)
    assert r.status_code == 200, r.get_json()
    report = r.get_json()
    key_id = w.key.split("_")[1]
    assert report["rows"] == [{"team": "t", "key": key_id, "model": "m", "day": today,
                               "requests": 3, "tokens_in": 9, "tokens_out": 6,
                               "tokens_estimated": 0}]
    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert report["totals"]["tokens_out"] == sum(o.details["tokens_out"] for o in outcomes)
    r = client.get("/api/v1/usage", headers=auditor.headers,
                   query_string={"format": "csv", "team": "t", "model": "m"})
    assert r.mimetype == "text/csv" and r.get_data(as_text=True).splitlines() == [
        '"team","key","model","day","requests","tokens_in","tokens_out","tokens_estimated"',
        f'"t","{key_id}","m","{today}","3","9","6","0"']
    r = client.get("/api/v1/usage", headers=auditor.headers, query_string={"key": "0" * 16})
    assert r.status_code == 200 and r.get_json()["rows"] == []  # another key: none of it
    r = client.get("/api/v1/usage", headers=auditor.headers, query_string={"key": "nope"})
    assert r.status_code == 422
    outsider = make_person("user")  # in no team: sees no team's usage
    assert client.get("/api/v1/usage", headers=outsider.headers).get_json()["rows"] == []
    r = client.get("/api/v1/usage", headers=outsider.headers, query_string={"team": "t"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "team_not_found"
    r = client.get("/api/v1/usage", headers=auditor.headers,
                   query_string={"since": "2020-01-01", "until": "2026-01-01"})
    assert r.status_code == 422
    # The calendar's first days: the default period is as much of it as there is.
    for until in ("0001-01-01", "0001-01-02", "0001-01-29"):
        r = client.get("/api/v1/usage", headers=auditor.headers,
                       query_string={"until": until})
        assert r.status_code == 200 and r.get_json()["rows"] == [], until
