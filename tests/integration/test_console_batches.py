"""The console's batches page without a browser, against batches that ran for real (the
in-process task backend and a real HTTP node): progress from the lines, the files through
the files service, cancel; who sees which batch is the batches service's answer."""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.identity.teams import set_member
from tests.batch_support import BatchWorld, jsonl_lines, make_world, to_jsonl
from tests.console_support import Console, notices

TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def world(configured, make_person) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    w = make_world(configured, make_person, capacity=2, batch_sweep_interval_s=0.5)
    yield w
    w.node.stop()


@pytest.fixture
def app(world):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    return app_for(world.settings)


def _submit(app: Any, headers: dict[str, str], lines: list[Any]) -> str:
    api = app.test_client()
    r = api.post("/v1/files", headers=headers, content_type="multipart/form-data",
                 data={"purpose": "batch", "file": (io.BytesIO(to_jsonl(lines)), "in.jsonl")})
    assert r.status_code == 200, r.get_json()
    r = api.post("/v1/batches", headers=headers, json={
        "input_file_id": r.get_json()["id"], "endpoint": "/v1/chat/completions",
        "completion_window": "24h", "metadata": {"case": "archive"}})
    assert r.status_code == 200, r.get_json()
    return str(r.get_json()["id"])


def _wait(app: Any, headers: dict[str, str], batch_id: str,
          statuses: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
    api = app.test_client()
    deadline = time.monotonic() + 30
    while True:
        body: dict[str, Any] = api.get(f"/v1/batches/{batch_id}", headers=headers).get_json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body
        time.sleep(0.1)


def _row(html: str, batch_id: str) -> str:
    match = re.search(rf'<tr id="{batch_id}">(.*?)</tr>', html, re.S)
    assert match, batch_id
    return re.sub(r"\s+", " ", match.group(1))


def test_progress_files_and_who_sees_them(app, world, make_person) -> None:  # type: ignore[no-untyped-def]
    owner, stranger = make_person("user"), make_person("steward")
    set_member(SYSTEM, world.team_id, owner.actor.user_id, "member")
    lines = [*jsonl_lines(3), '{"custom_id": "broken"']
    batch_id = _submit(app, owner.headers, lines)
    done = _wait(app, owner.headers, batch_id)
    assert done["status"] == "completed", done

    tab = Console(app, owner.actor.user_id)
    page = tab.get("/console/batches")
    assert page.status_code == 200 and 'href="/console/batches" aria-current="page"' in page.text
    row = _row(page.text, batch_id)
    total = done["request_counts"]["total"]
    assert f"{total} of {total} done (100%)" in row
    assert '<span data-count="completed">3</span> succeeded' in row
    assert 'class="state state-completed"' in row and "case: archive" in row
    assert "Cancel" not in row  # a completed batch is past cancelling
    assert "hx-trigger" not in page.text  # nothing runs: nothing to refresh

    output = re.search(r'href="(/console/batches/files/[^"]+)" download data-file="output"', row)
    errors = re.search(r'href="(/console/batches/files/[^"]+)" download data-file="error"', row)
    assert output and errors
    r = tab.get(output.group(1))
    assert r.status_code == 200 and r.headers["Content-Disposition"].startswith("attachment")
    answers = {json.loads(x)["custom_id"]: json.loads(x) for x in r.data.decode().splitlines()}
    assert set(answers) == {"req-0", "req-1", "req-2"}
    assert answers["req-1"]["response"]["body"]["choices"][0]["message"]["content"] == (
        "echo: line-1")
    r = tab.get(errors.group(1))
    assert r.status_code == 200 and b"invalid" in r.data.lower()

    other = Console(app, stranger.actor.user_id)
    assert batch_id not in other.get("/console/batches").text
    assert "No batches." in other.get("/console/batches").text
    r = other.get(output.group(1))
    assert r.status_code == 404 and 'data-code="file_not_found"' in r.text
    r = other.post(f"/console/batches/{batch_id}/cancel")
    assert any("(batch_not_found)" in n for n in notices(r.text, "error"))

    for role in ("auditor", "admin"):  # they read every batch, as the API says
        page = Console(app, make_person(role).actor.user_id).get("/console/batches").text
        assert batch_id in page and "Every batch" in page
        assert ('<th scope="col">Action</th>' in page) == (role == "admin")
    auditor = Console(app, make_person("auditor").actor.user_id)
    assert auditor.get(output.group(1)).status_code == 200


def test_cancel_from_the_page(app, world, make_person) -> None:  # type: ignore[no-untyped-def]
    owner = make_person("user")
    set_member(SYSTEM, world.team_id, owner.actor.user_id, "member")
    world.node.delay_s = 0.2
    batch_id = _submit(app, owner.headers, jsonl_lines(40))
    _wait(app, owner.headers, batch_id, statuses=("in_progress",))
    tab = Console(app, owner.actor.user_id)
    page = tab.get("/console/batches").text
    row = _row(page, batch_id)
    assert 'class="state state-in_progress"' in row and "Cancel" in row
    assert 'hx-trigger="every 5s"' in page and "vendor/htmx.min.js" in page

    r = tab.post(f"/console/batches/{batch_id}/cancel", csrf=False)
    assert r.status_code == 403 and 'data-code="csrf_failed"' in r.text
    assert _wait(app, owner.headers, batch_id, statuses=("in_progress",))["status"] == (
        "in_progress")
    r = tab.post(f"/console/batches/{batch_id}/cancel")
    (notice,) = notices(r.text, "ok")
    assert notice.startswith(f"Cancelling {batch_id}")
    done = _wait(app, owner.headers, batch_id)
    assert done["status"] == "cancelled"
    row = _row(tab.get("/console/batches").text, batch_id)
    assert 'class="state state-cancelled"' in row and "Cancel</button>" not in row
    assert "40 of 40 done (100%)" in row  # cancelled lines are ended, not left open
    r = tab.post(f"/console/batches/{batch_id}/cancel")
    assert any("(batch_not_cancellable)" in n for n in notices(r.text, "error"))
    (event,) = list_events(EventFilter(action="batch.cancel", target_id=batch_id,
                                       outcome="success"))
    assert event.actor == owner.actor.ref
