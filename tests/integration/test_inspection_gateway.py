"""Content inspection on the request path: where policy data asks for it, the findings'
types and counts are dispatch input, the policy refuses what the data class may not carry
(in each caller's protocol, audited with counts, never the text), and nothing of the
content is kept anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events
from tests.batch_support import make_world

ROOT = Path(__file__).resolve().parents[2]
CARD = "4111 1111 1111 1111"
MARKER = "marker-7f3a9c-do-not-keep"


def _policies(tmp_path: Path, **inspect: list[str]) -> str:
    target = tmp_path / "policies"
    shutil.copytree(ROOT / "policies", target)
    path = target / "data" / "inspection.json"
    data = json.loads(path.read_text())
    data["inspect"].update(inspect)
    path.write_text(json.dumps(data))
    return str(target)


def _chat(text: str) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": text}]}


@pytest.fixture
def inspected(configured, make_person, tmp_path):  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person,
                       policy_dir=_policies(tmp_path, data_classes=["internal"]))
    yield world
    world.node.stop()


def _decisions() -> list[Any]:
    return [e for e in list_events(EventFilter(action="policy.decide", limit=1000))
            if e.details.get("policy") == "dispatch"]


def test_a_card_number_under_internal_is_refused_in_each_protocol(inspected) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(inspected.settings).test_client()
    r = client.post("/v1/chat/completions", headers=inspected.headers,
                    json=_chat(f"{MARKER} my card is {CARD}"))
    assert r.status_code == 403, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "policy_denied"
    assert error["message"] == ("policy denies this request: the request carries 1 of "
                                "CREDIT_CARD, which internal data may not")
    r = client.post("/tgi/m/generate", headers=inspected.headers,
                    json={"inputs": "key AKIAIOSFODNN7EXAMPLE", "parameters": {}})
    assert r.status_code == 403 and r.get_json()["error_type"] == "policy_denied"
    assert "AWS_ACCESS_KEY" in r.get_json()["error"]
    assert sum(inspected.node.hits.values()) == 0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'charter_inspection_findings_total{type="CREDIT_CARD"} 1.0' in metrics
    assert 'charter_inspection_findings_total{type="AWS_ACCESS_KEY"} 1.0' in metrics
    assert "charter_inspection_seconds_count 2.0" in metrics
    first, second = _decisions()[-2:]
    assert first.details["findings"] == {"CREDIT_CARD": 1}
    assert first.details["violations"] == ["content_not_permitted"]
    assert second.details["findings"] == {"AWS_ACCESS_KEY": 1}

    # what internal data may carry passes, its findings recorded
    r = client.post("/v1/chat/completions", headers=inspected.headers,
                    json=_chat("write to jane.doe@example.com"))
    assert r.status_code == 200, r.get_data(as_text=True)
    assert _decisions()[-1].details["findings"] == {"EMAIL_ADDRESS": 1}
    r = client.post("/v1/chat/completions", headers=inspected.headers,
                    json=_chat("nothing personal here"))
    assert r.status_code == 200 and _decisions()[-1].details["findings"] == {}


def test_content_that_cannot_be_read_is_refused(inspected) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(inspected.settings).test_client()
    r = client.post("/v1/completions", headers=inspected.headers,
                    json={"model": "m", "prompt": [1, 2, 3], "max_tokens": 2})
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "content_not_inspectable"
    refused = list_events(EventFilter(action="dispatch.refused"))[-1]
    assert refused.details["code"] == "content_not_inspectable"
    assert sum(inspected.node.hits.values()) == 0


def test_without_inspection_nothing_is_looked_at(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    world = make_world(configured, make_person)  # the bundled data: nothing inspected
    try:
        client = app_for(world.settings).test_client()
        r = client.post("/v1/chat/completions", headers=world.headers,
                        json=_chat(f"my card is {CARD}"))
        assert r.status_code == 200
        assert "findings" not in _decisions()[-1].details
    finally:
        world.node.stop()


def test_no_prompt_is_kept_anywhere(inspected, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """The marker text, sent refused and served, is in no table and no log line."""
    import logging

    from tests.runtimes import app_for

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger().addHandler(handler)
    try:
        client = app_for(inspected.settings).test_client()
        for text in (f"{MARKER} {CARD}", f"{MARKER} harmless"):
            client.post("/v1/chat/completions", headers=inspected.headers, json=_chat(text))
    finally:
        logging.getLogger().removeHandler(handler)
    assert not any(MARKER in line for line in records)
    tables = [r[0] for r in pg_conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
    for table in tables:
        hits = pg_conn.execute(
            f'SELECT count(*) FROM "{table}" t WHERE t::text LIKE %s',  # noqa: S608
            (f"%{MARKER}%",)).fetchone()[0]
        assert hits == 0, table


def test_an_inspection_that_cannot_run_refuses(inspected) -> None:  # type: ignore[no-untyped-def]
    """Fail closed: Presidio missing or broken refuses the request (503), audited, and
    nothing reaches the node."""
    from charter.inspection.detect import Detector, InspectionUnavailableError
    from tests.runtimes import app_for

    class Broken(Detector):
        def findings(self, texts):  # type: ignore[no-untyped-def]
            raise InspectionUnavailableError("presidio-analyzer is not installed")

    app = app_for(inspected.settings)
    app.extensions["charter.runtime"].part("inspection", lambda rt: Broken())
    r = app.test_client().post("/v1/chat/completions", headers=inspected.headers,
                               json=_chat("hello"))
    assert r.status_code == 503, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "inspection_unavailable"
    assert "presidio-analyzer is not installed" in error["message"]
    assert r.headers["Retry-After"] == "5"
    refused = list_events(EventFilter(action="dispatch.refused"))[-1]
    assert refused.details["code"] == "inspection_unavailable"
    assert sum(inspected.node.hits.values()) == 0
    assert "charter_inspection_failures_total 1.0" in app.test_client().get(
        "/metrics").get_data(as_text=True)


def test_a_serving_process_loads_inspection_before_its_first_request(inspected) -> None:  # type: ignore[no-untyped-def]
    """`charter serve`'s workers and `charter worker` call warm_inspection at start: where
    policy data inspects anything, Presidio is loaded then, not on a request."""
    from charter.dispatch.service import warm_inspection
    from charter.policy.service import InspectionScope
    from tests.runtimes import app_for

    runtime = app_for(inspected.settings).extensions["charter.runtime"]
    warm_inspection(runtime)
    detector = runtime.part("inspection", lambda rt: pytest.fail("not loaded at start"))
    assert detector._analyzer is not None
    assert not InspectionScope() and InspectionScope(teams=frozenset({"t"}))
