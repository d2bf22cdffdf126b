"""Findings by day, team and type over time: counted from the audit log's decisions of
inspected requests (refused ones too), each event once however often the rollup runs,
shown to admins and auditors in the console and the API, counts only."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import func, select

from charter.audit.models import AuditEvent
from charter.db import utcnow
from charter.inspection import counts
from charter.inspection.models import InspectionRollup
from charter.uow import unit_of_work
from tests.batch_support import BatchWorld, make_world
from tests.console_support import Console
from tests.integration.test_inspection_gateway import _chat, _policies

CARD = "4111 1111 1111 1111"
SENT = [  # (text, status): findings EMAIL_ADDRESS 2 + 1, IP_ADDRESS 1, CREDIT_CARD 1
    ("write to jane.doe@example.com and to john.roe@example.org", 200),
    ("ping 192.168.0.1", 200),
    ("nothing personal here", 200),
    (f"my card is {CARD}", 403),
    ("and a copy to ada@example.net", 200),
]
TODAY = {"EMAIL_ADDRESS": (2, 3), "IP_ADDRESS": (1, 1), "CREDIT_CARD": (1, 1)}


@pytest.fixture
def inspected(configured, make_person, tmp_path) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person,
                       policy_dir=_policies(tmp_path, data_classes=["internal"]))
    yield world
    world.node.stop()


def _send(client: Any, world: BatchWorld) -> None:
    for text, status in SENT:
        r = client.post("/v1/chat/completions", headers=world.headers, json=_chat(text))
        assert r.status_code == status, r.get_data(as_text=True)


def _table(rows: list[counts.CountRow]) -> dict[tuple[str | None, str], tuple[int, int]]:
    today = utcnow().date()
    assert all(r.day == today for r in rows)
    return {(r.team, r.type): (r.requests, r.findings) for r in rows}


def _watermark() -> tuple[int, int]:
    with unit_of_work() as session:
        mark = session.get(InspectionRollup, counts.WATERMARK_ID)
        assert mark is not None
        return mark.seq, session.scalar(select(func.max(AuditEvent.seq))) or 0


def test_findings_are_counted_once_by_day_team_and_type(inspected, runtime) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(inspected.settings).test_client()
    _send(client, inspected)
    runtime.tasks.run("charter.maintenance")  # the periodic rollup
    seq, newest = _watermark()
    assert seq == newest  # read to the end, whatever the last event's action
    expected = {("t", kind): n for kind, n in TODAY.items()}
    assert _table(counts.counts()) == expected
    assert counts.rollup() == 0  # nothing new: nothing read, nothing added again
    assert _table(counts.counts(days=1)) == expected
    assert _table(counts.counts(team="t")) == expected
    assert counts.counts(team="another") == []

    # the next request adds to the same rows, read one event a transaction
    r = client.post("/v1/chat/completions", headers=inspected.headers,
                    json=_chat("ping 10.0.0.8 or 10.0.0.9"))
    assert r.status_code == 200
    assert counts.rollup(limit=1) > 1
    assert _watermark()[0] == _watermark()[1]
    assert _table(counts.counts()) == {**expected, ("t", "IP_ADDRESS"): (2, 3)}
    assert counts.rollup() == 0


def test_the_api_answers_admins_and_auditors(inspected, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(inspected.settings).test_client()
    _send(client, inspected)
    auditor, user = make_person("auditor"), make_person("user")
    # no rollup here: the API brings the counts up to date before it reads
    r = client.get("/api/v1/inspection/counts?days=30&team=t", headers=auditor.headers)
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    today = utcnow().date().isoformat()
    assert body["until"] == today
    assert sorted((x["day"], x["team"], x["type"], x["requests"], x["findings"])
                  for x in body["rows"]) == sorted(
        (today, "t", kind, n, f) for kind, (n, f) in TODAY.items())
    assert body["by_type"] == [
        {"type": "EMAIL_ADDRESS", "requests": 2, "findings": 3},
        {"type": "CREDIT_CARD", "requests": 1, "findings": 1},
        {"type": "IP_ADDRESS", "requests": 1, "findings": 1}]
    assert body["by_team"] == [{"team": "t", "findings": 5}]
    assert client.get("/api/v1/inspection/counts?team=other",
                      headers=auditor.headers).get_json()["rows"] == []

    r = client.get("/api/v1/inspection/counts", headers=user.headers)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    for bad in ("days=0", "days=366", "days=many", "since=2026-01-01"):
        r = client.get(f"/api/v1/inspection/counts?{bad}", headers=auditor.headers)
        assert r.status_code == 422, bad
        assert r.get_json()["error"]["code"] == "validation_failed", bad


def _cells(html: str, team: str, kind: str) -> tuple[int, int]:
    found = re.search(rf'data-team="{team}" data-type="{kind}">.*?<td class="num">(\d+)</td>'
                      rf'\s*<td class="num">(\d+)</td>', html, re.S)
    assert found, (team, kind)
    return int(found[1]), int(found[2])


def test_the_console_page_shows_the_counts_to_admins_and_auditors(inspected, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    app = app_for(inspected.settings)
    _send(app.test_client(), inspected)
    for role in ("auditor", "admin"):
        tab = Console(app, make_person(role).actor.user_id)
        r = tab.get("/console/inspection")
        assert r.status_code == 200, (role, r.status_code)
        page = r.text
        assert 'href="/console/inspection" aria-current="page"' in page
        for kind, n in TODAY.items():
            assert _cells(page, "t", kind) == n
        assert re.search(r'<tr data-type="EMAIL_ADDRESS"><th scope="row">EMAIL_ADDRESS</th>'
                         r'<td class="num">2</td><td class="num">3</td>', page)
        assert re.search(r'<tr data-team="t"><th scope="row">t</th><td class="num">5</td>',
                         page)
        assert "example.com" not in page and "4111" not in page  # counts only
    assert _cells(tab.get("/console/inspection?days=1").text, "t", "CREDIT_CARD") == (1, 1)

    for bad in ("0", "366", "many"):
        r = tab.get(f"/console/inspection?days={bad}")
        assert r.status_code == 422 and 'data-code="validation_failed"' in r.text, bad
        assert "days must be 1 to 365" in r.text

    plain = Console(app, make_person("user").actor.user_id)
    r = plain.get("/console/inspection")
    assert r.status_code == 403 and 'data-code="forbidden"' in r.text
    assert 'href="/console/inspection"' not in plain.get("/console/").text


def test_tally_counts_only_inspected_decisions() -> None:
    """Pure: other actions and uninspected decisions add nothing; no team is ""; a
    request counts once per type, its findings as often as found."""
    at = datetime(2026, 12, 7, 23, 30, tzinfo=UTC)
    events = [
        (at, "policy.decide", {"findings": {"EMAIL_ADDRESS": 2, "IP_ADDRESS": 1},
                               "team": "t"}),
        (at, "policy.decide", {"findings": {"EMAIL_ADDRESS": 1}, "team": None}),
        (at, "policy.decide", {"findings": {}, "team": "t"}),
        (at, "policy.decide", {"policy": "dispatch"}),  # not inspected
        (at, "dispatch.outcome", {"findings": {"EMAIL_ADDRESS": 5}, "team": "t"}),
    ]
    day = at.date()
    assert counts.tally(events) == {
        (day, "t", "EMAIL_ADDRESS"): (1, 2), (day, "t", "IP_ADDRESS"): (1, 1),
        (day, "", "EMAIL_ADDRESS"): (1, 1)}


@pytest.fixture
def sqlite_world(tmp_path) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    """The embedded default (the demo): SQLite."""
    import uuid

    from charter import migrate
    from charter.actor import SYSTEM
    from charter.identity.service import actor_of, create_api_key, create_user
    from charter.settings import Settings
    from tests.conftest import SECRET, Person
    from tests.runtimes import bind_runtime, release_runtime

    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate.upgrade(url)
    settings = Settings.from_env({}, database_url=url, secret_key=SECRET,
                                 policy_dir=_policies(tmp_path, data_classes=["internal"]))
    bind_runtime(settings)

    def make_person(*roles: str) -> Person:
        user = create_user(SYSTEM, username=f"p-{uuid.uuid4().hex[:6]}", roles=list(roles))
        return Person(actor_of(user), create_api_key(SYSTEM, user.id, name="t").token)

    w = make_world(settings, make_person)
    yield w
    w.node.stop()
    release_runtime()


def test_the_embedded_database_counts_too(sqlite_world) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    _send(app_for(sqlite_world.settings).test_client(), sqlite_world)
    assert counts.rollup(limit=4) > 4
    expected = {("t", kind): n for kind, n in TODAY.items()}
    assert _table(counts.counts()) == expected
    assert counts.rollup() == 0
    assert _table(counts.counts()) == expected
