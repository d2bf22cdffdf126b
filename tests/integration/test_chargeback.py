"""Chargeback: prices per model version (admins, audited), a month's use per team and
model priced exactly (decimal, each line rounded, totals the sum of lines), as JSON, CSV
and a console page."""

from __future__ import annotations

from charter.audit.service import EventFilter, list_events
from charter.db import utcnow
from tests.batch_support import make_world
from tests.console_support import Console
from tests.runtimes import app_for, flush_outcomes

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


def test_a_month_priced_per_team_and_model(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person)
    try:
        app = app_for(world.settings)
        client = app.test_client()
        admin, auditor, user = make_person("admin"), make_person("auditor"), make_person("user")
        price = {"currency": "EUR", "input_per_million": "1000", "output_per_million": "3000.5"}
        r = client.put(f"/api/v1/prices/{world.version_id}", headers=user.headers, json=price)
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
        r = client.put("/api/v1/prices/nope", headers=admin.headers, json=price)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "version_not_found"
        for bad in ({**price, "currency": "eur"}, {**price, "input_per_million": "-1"},
                    {**price, "output_per_million": "0.0000001"}):
            r = client.put(f"/api/v1/prices/{world.version_id}", headers=admin.headers, json=bad)
            assert r.status_code == 422, bad
        r = client.put(f"/api/v1/prices/{world.version_id}", headers=admin.headers, json=price)
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["output_per_million"] == "3000.5"
        assert [e.outcome for e in list_events(EventFilter(action="price.set"))] == [
            "denied", "success"]  # the refused attempt is on record too
        changed = list_events(EventFilter(action="price.set", outcome="success"))
        assert [e.details["after"]["currency"] for e in changed] == ["EUR"]
        assert changed[0].details["before"] is None
        # 4 answers of 3 tokens in and 2 out: 12 x 1000 + 8 x 3000.5 = 36,004 per million.
        for _ in range(4):
            assert client.post("/v1/chat/completions", headers=world.headers,
                               json=CHAT).status_code == 200
        assert flush_outcomes()
        month = utcnow().strftime("%Y-%m")
        r = client.get("/api/v1/chargeback", headers=auditor.headers)
        assert r.status_code == 200, r.get_json()
        report = r.get_json()
        assert report["month"] == month
        [team] = report["teams"]
        assert (team["team"], team["requests"], team["tokens_in"], team["tokens_out"]) == (
            "t", 4, 12, 8)
        assert team["cost"] == {"EUR": "0.0360"} and team["unpriced_tokens"] == 0
        [line] = team["lines"]
        assert line["version"] is not None and line["cost"] == "0.0360"
        assert line["price"] == {"input_per_million": "1000", "output_per_million": "3000.5"}
        assert report["totals"]["cost"] == {"EUR": "0.0360"}
        r = client.get("/api/v1/chargeback", headers=auditor.headers,
                       query_string={"format": "csv", "month": month})
        assert r.get_data(as_text=True).splitlines()[1] == (
            f'"{month}","t","m","{line["version"]}","4","12","8","0","EUR","0.0360"')
        r = client.get("/api/v1/chargeback", headers=auditor.headers,
                       query_string={"month": "2026-13"})
        assert r.status_code == 422
        # Another month: nothing; a person in no team: no team's figures.
        assert client.get("/api/v1/chargeback", headers=auditor.headers,
                          query_string={"month": "2020-01"}).get_json()["teams"] == []
        for edge in ("0001-01", "9999-12"):  # the calendar's ends: answered, not a 500
            r = client.get("/api/v1/chargeback", headers=auditor.headers,
                           query_string={"month": edge})
            assert r.status_code == 200 and r.get_json()["teams"] == [], edge
        assert client.get("/api/v1/chargeback", headers=user.headers).get_json()["teams"] == []
        # The console's page: the team, its model by name, the cost.
        page = Console(app, auditor.actor.user_id).get("/console/usage")
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        assert 'data-team="t"' in html and "0.0360 EUR" in html and line["version"] in html
        assert world.version_id not in html  # names, not ids
    finally:
        world.node.stop()
