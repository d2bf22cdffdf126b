"""The console's policies page without a browser: the active revision and the data tables
for every role, and the playground (its roles as the API's, audited decisions, CSRF, bad
input refused with its code)."""

from __future__ import annotations

import json
import re

from charter.audit.service import EventFilter, list_events
from charter.console.pages.policies import EXAMPLES
from charter.policy import service as policy
from tests.console_support import Console

EVALUATORS = ("admin", "steward", "approver")


def _row(html: str, row_id: str) -> str:
    match = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', html, re.S)
    assert match, row_id
    return re.sub(r"\s+", " ", match.group(1))


def test_every_role_reads_the_revision_and_data(app, make_person) -> None:  # type: ignore[no-untyped-def]
    active = policy.describe()
    for role in ("admin", "steward", "approver", "operator", "auditor", "user"):
        r = Console(app, make_person(role).actor.user_id).get("/console/policies")
        assert r.status_code == 200, role
        page = r.text
        assert 'href="/console/policies" aria-current="page"' in page
        assert f'<code data-field="revision">{active["revision"]}</code>' in page
        assert f'<dd data-field="engine">{active["engine"]}</dd>' in page
        # What each license allows and forbids, as the policy data says.
        assert "allowed" in _row(page, "license-apache-2.0")
        nc = _row(page, "license-cc-by-nc-4.0")
        assert "forbidden" in nc and "allowed" not in nc
        assert "restricted" in _row(page, "license-openrail")
        zones = page[page.index('id="zones"'):page.index('id="data-classes"')]
        assert "eu-central" in zones and "Frankfurt data centre" in zones
        classes = page[page.index('id="data-classes"'):page.index('id="organisation"')]
        assert re.search(r"<code>restricted</code></th><td><span class=\"tag\">eu-central</span>"
                         r"</td>", classes)
        assert '<span class="tag">TinyLlama</span>' in page[page.index('id="publishers"'):]
        offered = 'id="evaluate-form"' in page
        assert offered == (role in EVALUATORS), role
        assert ('id="playground-closed"' in page) == (role not in EVALUATORS)
        assert "vendor/htmx.min.js" in page


def test_the_playground_shows_the_decision_and_audits_it(app, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    tab = Console(app, steward.actor.user_id)
    example = tab.get("/console/policies?policy=dispatch").text
    assert '<option value="dispatch" selected>' in example
    assert "attested_version_id" in example  # the dispatch example is in the textarea

    r = tab.post("/console/policies/evaluate",
                 {"policy": "admission", "input": json.dumps(EXAMPLES["admission"])})
    assert r.status_code == 200
    assert 'data-allow="true"' in r.text and "No violations." in r.text
    allowed_id = re.search(r'data-field="decision_id">([^<]+)<', r.text).group(1)  # type: ignore[union-attr]

    unpinned = json.loads(json.dumps(EXAMPLES["admission"]))
    unpinned["version"]["source_revision"] = "main"
    unpinned["version"]["license_card"] = "cc-by-nc-4.0"
    r = tab.post("/console/policies/evaluate",
                 {"policy": "admission", "input": json.dumps(unpinned)})
    assert r.status_code == 200 and 'data-allow="false"' in r.text
    violations = r.text[r.text.index('id="violations"'):]
    assert '<span class="tag">revision_not_pinned</span>' in violations
    assert "main" in r.text  # the input stays in the textarea for the next try

    events = list_events(EventFilter(action="policy.decide", target_type="policy"))
    assert [(e.actor, e.target_id, e.outcome) for e in events] == [
        (steward.actor.ref, "admission", "success"), (steward.actor.ref, "admission", "denied")]
    assert all(e.details["playground"] is True for e in events)
    assert events[0].details["decision_id"] == allowed_id
    assert "revision_not_pinned" in events[1].details["violations"]


def test_the_playground_refuses_what_the_api_refuses(app, make_person) -> None:  # type: ignore[no-untyped-def]
    body = {"policy": "dispatch", "input": json.dumps(EXAMPLES["dispatch"])}
    for role in ("operator", "auditor", "user"):
        tab = Console(app, make_person(role).actor.user_id)
        r = tab.post("/console/policies/evaluate", body)
        assert r.status_code == 403 and 'data-code="forbidden"' in r.text, role
    refused = list_events(EventFilter(action="policy.evaluate", outcome="denied"))
    assert len(refused) == 3 and {e.target_id for e in refused} == {"dispatch"}
    assert list_events(EventFilter(action="policy.decide")) == []

    tab = Console(app, make_person("approver").actor.user_id)
    r = tab.post("/console/policies/evaluate", body, csrf=False)
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    for text, why in (("{not json", "Expecting property name"), ("[1, 2]", "must be an object"),
                      ('{"n": 1e999}', "cannot be recorded exactly")):
        r = tab.post("/console/policies/evaluate", {"policy": "admission", "input": text})
        assert r.status_code == 422, text
        assert "(validation_failed)" in r.text and why in r.text, text
        assert 'id="decision"' not in r.text
    r = tab.post("/console/policies/evaluate", {"policy": "exceptions", "input": "{}"})
    assert r.status_code == 422 and "admission or dispatch" in r.text
    assert list_events(EventFilter(action="policy.decide")) == []
