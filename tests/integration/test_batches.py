"""Batches in-process (the embedded task backend) against PostgreSQL and a real HTTP node.

The same service and tasks run under Celery in production (tests/e2e/test_batch_workers.py).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events, verify_chain
from tests.batch_support import BatchWorld, jsonl_lines, make_world, to_jsonl

TERMINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def world(configured, make_person) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    w = make_world(configured, make_person, capacity=8, batch_sweep_interval_s=0.5)
    yield w
    w.node.stop()


@pytest.fixture
def client(world):  # type: ignore[no-untyped-def]
    """The app over the world's own runtime, bound for the test's direct calls too."""
    from charter import scope
    from tests.runtimes import app_for

    app = app_for(world.settings)
    with scope.bound(app.extensions["charter.runtime"]):
        yield app.test_client()


def upload(client: Any, world: BatchWorld, content: bytes, name: str = "in.jsonl") -> Any:
    return client.post("/v1/files", headers=world.headers,
                       data={"purpose": "batch", "file": (io.BytesIO(content), name)},
                       content_type="multipart/form-data")


def create(client: Any, world: BatchWorld, file_id: str, **extra: Any) -> Any:
    return client.post("/v1/batches", headers={**world.headers, **extra.pop("headers", {})},
                       json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                             "completion_window": "24h", **extra})


def wait_batch(client: Any, world: BatchWorld, batch_id: str, *, statuses: tuple[str, ...] =
               TERMINAL, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v1/batches/{batch_id}", headers=world.headers).get_json()
        if body["status"] in statuses or time.monotonic() > deadline:
            return body  # type: ignore[no-any-return]
        time.sleep(0.1)


def content_lines(client: Any, world: BatchWorld, file_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/files/{file_id}/content", headers=world.headers)
    assert r.status_code == 200
    return [json.loads(x) for x in r.data.decode().splitlines()]


def test_a_batch_runs_every_line_once_through_the_governed_path(client, world) -> None:  # type: ignore[no-untyped-def]
    lines = jsonl_lines(40)
    bad = ['{"custom_id": "broken", "method": "POST"', json.dumps({**lines[0]}),  # dup id
           json.dumps({"custom_id": "other-url", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": "x"}})]
    r = upload(client, world, to_jsonl([*lines, *bad]))
    assert r.status_code == 200, r.get_json()
    f = r.get_json()
    assert (f["object"], f["purpose"], f["lines"], f["invalid_lines"]) == (
        "file", "batch", 43, 2)  # the last is valid JSONL, but not for this batch's endpoint
    r = create(client, world, f["id"], metadata={"case": "archive"},
               headers={"X-Charter-Data-Class": "internal", "X-Charter-Purpose": "assistant"})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["status"] in ("validating", "in_progress")
    done = wait_batch(client, world, r.get_json()["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 43, "completed": 40, "failed": 3}
    assert done["metadata"] == {"case": "archive"}
    out = content_lines(client, world, done["output_file_id"])
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(40)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert out[7]["response"]["body"]["choices"][0]["message"]["content"] == "echo: line-7"
    assert {o["response"]["body"]["model"] for o in out} == {"m"}  # the name the line used
    errors = content_lines(client, world, done["error_file_id"])
    assert [(e["custom_id"], e["error"]["code"], e["error"]["line"]) for e in errors] == [
        (None, "invalid_json", 41), ("req-0", "duplicate_custom_id", 42),
        ("other-url", "url_mismatch", 43)]
    # Each line reached the node exactly once, decided and recorded once, with its batch.
    assert world.node.hits == {f"line-{i}": 1 for i in range(40)}
    decisions = list_events(EventFilter(action="policy.decide", target_id="m"))
    outcomes = list_events(EventFilter(action="dispatch.outcome", target_id="m"))
    assert len(decisions) == len(outcomes) == 40
    assert {d.details["custom_id"] for d in decisions} == {f"req-{i}" for i in range(40)}
    assert all(d.details["batch_id"] == done["id"] and d.outcome == "success"
               for d in decisions)
    by_decision = {o.details["decision_id"]: o for o in outcomes}
    assert set(by_decision) == {d.details["decision_id"] for d in decisions}
    assert all(o.details["data_class"] == "internal" and o.details["tokens_out"] == 2
               for o in outcomes)
    actions = [e.action for e in list_events(EventFilter(target_id=done["id"]))]
    assert actions == ["batch.created", "batch.started", "batch.completed"]
    assert verify_chain().ok


def test_the_openai_batch_shapes(client, world) -> None:  # type: ignore[no-untyped-def]
    from openai.types import Batch, FileObject

    f = upload(client, world, to_jsonl(jsonl_lines(2))).get_json()
    FileObject.model_validate(f)
    b = create(client, world, f["id"]).get_json()
    Batch.model_validate(b)
    done = wait_batch(client, world, b["id"])
    assert Batch.model_validate(done).request_counts.completed == 2  # type: ignore[union-attr]
    listed = client.get("/v1/batches?limit=1", headers=world.headers).get_json()
    assert listed["object"] == "list" and [x["id"] for x in listed["data"]] == [b["id"]]
    files = client.get("/v1/files?purpose=batch_output", headers=world.headers).get_json()
    assert [x["id"] for x in files["data"]] == [done["output_file_id"]]


@pytest.mark.parametrize(("content", "code"), [
    (b"\xff\xfe not utf-8", "invalid_file"),
    (b"\n\n", "empty_file"),
])
def test_a_file_that_is_wrong_whole_is_refused_and_audited(client, world, content, code) -> None:  # type: ignore[no-untyped-def]
    r = upload(client, world, content)
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == code
    refused = list_events(EventFilter(action="file.upload"))
    assert [(e.outcome, e.details["code"]) for e in refused] == [("denied", code)]
    assert client.get("/v1/files", headers=world.headers).get_json()["data"] == []


def test_bad_batch_requests_get_openai_errors(client, world, make_person) -> None:  # type: ignore[no-untyped-def]
    f = upload(client, world, to_jsonl(jsonl_lines(1))).get_json()
    r = client.post("/v1/batches", headers=world.headers,
                    json={"input_file_id": f["id"], "endpoint": "/v1/moderations",
                          "completion_window": "24h"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_endpoint"
    r = create(client, world, f["id"], completion_window="1h")
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "invalid_completion_window"
    r = create(client, world, "file-nope")
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "file_not_found"
    # Someone else's file is not there for you.
    other = make_person("user")
    r = client.post("/v1/batches", headers=other.headers,
                    json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"})
    assert r.status_code == 404 and r.get_json()["error"]["type"] == "not_found_error"
    assert client.get(f"/v1/files/{f['id']}", headers=other.headers).status_code == 404
    r = client.post("/v1/files", data={"purpose": "batch"}, headers=world.headers)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "missing_file"
    assert client.get("/v1/batches").status_code == 401
    denied = [e.details["code"] for e in list_events(EventFilter(action="batch.create"))]
    assert denied == ["invalid_endpoint", "invalid_completion_window", "file_not_found",
                      "file_not_found"]


def test_an_oversized_file_is_refused(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    w = make_world(configured, make_person, files_max_bytes=2048)
    try:
        client = app_for(w.settings).test_client()
        r = upload(client, w, to_jsonl(jsonl_lines(40)))
        assert r.status_code == 413 and r.get_json()["error"]["code"] == "payload_too_large"
        big = client.post("/v1/files", headers=w.headers, data={
            "purpose": "batch", "file": (io.BytesIO(b"x" * 200_000), "big.jsonl")},
            content_type="multipart/form-data")
        assert big.status_code == 413 and big.get_json()["error"]["code"] == "payload_too_large"
        refusals = list_events(EventFilter(action="file.upload"))
        assert [(e.outcome, e.details["code"], e.target_id) for e in refusals] == [
            ("denied", "payload_too_large", "in.jsonl"), ("denied", "payload_too_large", "-")]
        assert upload(client, w, to_jsonl(jsonl_lines(2))).status_code == 200
    finally:
        w.node.stop()


def test_a_cancelled_batch_stops_within_seconds(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    w = make_world(configured, make_person, capacity=2, delay_s=0.2)
    try:
        client = app_for(w.settings).test_client()
        f = upload(client, w, to_jsonl(jsonl_lines(60))).get_json()
        b = create(client, w, f["id"]).get_json()
        wait_batch(client, w, b["id"], statuses=("in_progress",))
        time.sleep(0.5)
        started = time.monotonic()
        r = client.post(f"/v1/batches/{b['id']}/cancel", headers=w.headers)
        assert r.status_code == 200 and r.get_json()["status"] in ("cancelling", "cancelled")
        done = wait_batch(client, w, b["id"], timeout=10)
        assert done["status"] == "cancelled" and time.monotonic() - started < 3
        sent = sum(w.node.hits.values())
        assert 0 < sent < 60
        counts = done["request_counts"]
        assert counts["total"] == 60 and counts["completed"] + counts["failed"] == 60
        assert counts["completed"] == sent  # every line that reached the node is kept
        errors = content_lines(client, w, done["error_file_id"])
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
        time.sleep(0.5)
        assert sum(w.node.hits.values()) == sent  # nothing started after the cancel
        r = client.post(f"/v1/batches/{b['id']}/cancel", headers=w.headers)
        assert r.status_code == 409 and r.get_json()["error"]["code"] == (
            "batch_not_cancellable")
    finally:
        w.node.stop()


def test_a_batch_whose_model_is_revoked_stops_and_says_why(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.registry import service as registry
    from charter.registry.schemas import RequiredReason
    from tests.runtimes import app_for

    w = make_world(configured, make_person, capacity=2, delay_s=0.05)
    try:
        client = app_for(w.settings).test_client()
        f = upload(client, w, to_jsonl(jsonl_lines(80))).get_json()
        b = create(client, w, f["id"]).get_json()
        deadline = time.monotonic() + 30
        while sum(w.node.hits.values()) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        registry.revoke_version(SYSTEM, w.version_id, RequiredReason(reason="withdrawn"))
        done = wait_batch(client, w, b["id"])
        assert done["status"] == "failed"
        assert done["errors"]["data"][0]["code"] == "version_revoked"
        sent = sum(w.node.hits.values())
        assert 10 <= sent < 80 and done["request_counts"]["completed"] == sent
        errors = content_lines(client, w, done["error_file_id"])
        assert {e["error"]["code"] for e in errors} == {"version_revoked"}
        stopped = list_events(EventFilter(action="batch.stopped"))
        assert len(stopped) == 1 and stopped[0].details["code"] == "version_revoked"
        assert verify_chain().ok
    finally:
        w.node.stop()


def test_batch_lines_never_take_more_than_their_share_of_a_node(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    # capacity 4 x share 0.5: two slots, with 8 task threads wanting the node.
    w = make_world(configured, make_person, capacity=4, delay_s=0.05)
    try:
        client = app_for(w.settings).test_client()
        f = upload(client, w, to_jsonl(jsonl_lines(40))).get_json()
        done = wait_batch(client, w, create(client, w, f["id"]).get_json()["id"])
        assert done["status"] == "completed"
        assert w.node.max_in_flight == 2
    finally:
        w.node.stop()


def test_a_line_whose_worker_vanished_is_taken_again_once(world, client) -> None:  # type: ignore[no-untyped-def]
    from charter.batches import lanes
    from charter.batches.models import Batch, BatchLine
    from charter.db import utcnow
    from charter.uow import unit_of_work

    f = upload(client, world, to_jsonl(jsonl_lines(3))).get_json()
    b = create(client, world, f["id"]).get_json()
    done = wait_batch(client, world, b["id"])
    assert done["status"] == "completed"
    # As if a worker had claimed line 2 and died, the batch still running: attempt 1 made,
    # the lease run out.
    with unit_of_work() as session:
        session.get(Batch, b["id"]).status = "in_progress"
        line = session.query(BatchLine).filter_by(batch_id=b["id"], line_no=2).one()
        line.status, line.claim, line.attempts = "running", "dead", 1
        line.lease_until = utcnow() - timedelta(seconds=1)
        line_id = line.id
    info = lanes._batch_info(b["id"])
    assert lanes.run_next(info, world.settings) == "succeeded"
    assert lanes.run_next(info, world.settings) == "empty"  # nothing else to take
    interrupted = list_events(EventFilter(action="batch.line_interrupted"))
    assert [(e.details["line"], e.details["attempt"]) for e in interrupted] == [(2, 1)]
    with unit_of_work() as session:
        line = session.get(BatchLine, line_id)
        assert (line.status, line.attempts, line.claim) == ("succeeded", 2, None)
    assert world.node.hits["line-1"] == 2  # the vanished attempt may have reached it too


def test_a_duplicate_lane_ends_at_once(world, client) -> None:  # type: ignore[no-untyped-def]
    from charter.batches import lanes, slots
    from tests.runtimes import with_current_runtime

    f = upload(client, world, to_jsonl(jsonl_lines(2))).get_json()
    b = create(client, world, f["id"]).get_json()
    wait_batch(client, world, b["id"])
    from concurrent.futures import ThreadPoolExecutor

    other = ThreadPoolExecutor(1)  # another worker thread (a lock is its holder's session's)
    name = lanes.lane_name(b["id"], 0)
    with slots.named_lock(name) as held:
        assert held
        assert other.submit(with_current_runtime(slots.lock_is_free), name).result() is False
        run_lane = with_current_runtime(lanes.run_lane)
        assert other.submit(run_lane, b["id"], 0, world.settings).result() == "duplicate"
    assert other.submit(with_current_runtime(slots.lock_is_free), name).result() is True


def test_an_answer_from_a_worker_that_lost_its_line_is_dropped(world, client) -> None:  # type: ignore[no-untyped-def]
    from charter.batches import lanes
    from charter.batches.models import BatchLine
    from charter.uow import unit_of_work

    f = upload(client, world, to_jsonl(jsonl_lines(1))).get_json()
    b = create(client, world, f["id"]).get_json()
    wait_batch(client, world, b["id"])
    with unit_of_work() as session:
        line = session.query(BatchLine).filter_by(batch_id=b["id"]).one()
        line.status, line.claim = "running", "someone-else"
        before = len(list_events(EventFilter()))
        claim = lanes._Claim(line.id, b["id"], 1, "req-0", line.request, 1, "mine", 0, "",
                               "/v1/chat/completions", None, None)
    assert lanes._finish(claim, status="succeeded", response_status=200,
                           response_body="{}", error_code=None, error_message=None) is False
    assert len(list_events(EventFilter())) == before
    with unit_of_work() as session:
        assert session.get(BatchLine, claim.line_id).claim == "someone-else"


def test_sweep_starts_lost_batches_and_expires_late_ones(world, client, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from charter.batches import service
    from charter.batches.models import Batch
    from charter.db import utcnow
    from charter.uow import unit_of_work

    f = upload(client, world, to_jsonl(jsonl_lines(3))).get_json()
    b = create(client, world, f["id"]).get_json()
    wait_batch(client, world, b["id"])
    # A batch created while the queue was away: never started; the sweep starts it.
    f2 = upload(client, world, to_jsonl(jsonl_lines(2, start=10))).get_json()
    with unit_of_work() as session:
        from charter.identity.models import User

        bot = session.get(User, world.bot_id)
        session.add(Batch(id="batch_lost", owner_user_id=bot.id, actor_ref="service:bot",
                          endpoint="/v1/chat/completions", input_file_id=f2["id"],
                          completion_window="24h", status="validating", errors=[],
                          created_at=utcnow() - timedelta(seconds=10),
                          expires_at=utcnow() + timedelta(hours=1)))
    stats = service.sweep(world.settings)
    assert stats["started"] == 1
    assert wait_batch(client, world, "batch_lost")["status"] == "completed"
    # Past its window, what has not run expires.
    f3 = upload(client, world, to_jsonl(jsonl_lines(2, start=20))).get_json()
    with unit_of_work() as session:
        session.add(Batch(id="batch_late", owner_user_id=world.bot_id,
                          actor_ref="service:bot", endpoint="/v1/chat/completions",
                          input_file_id=f3["id"], completion_window="24h",
                          status="validating", errors=[], created_at=utcnow(),
                          expires_at=utcnow() + timedelta(seconds=1)))
    from charter import scope
    from charter.batches.models import BatchLine
    from charter.batches.service import start_batch

    # Start it with its line messages lost (the broker was away).
    sent: list[Any] = []
    monkeypatch.setattr(scope.current().tasks, "send",
                        lambda name, *args: sent.append(name) or True)
    start_batch("batch_late")
    monkeypatch.undo()
    assert sent == ["charter.batches.lane"] * world.settings.batch_lanes
    time.sleep(1.1)
    stats = service.sweep(world.settings)
    assert stats["expired"] == 2 and stats["finalized"] >= 1
    late = wait_batch(client, world, "batch_late")
    assert late["status"] == "expired"
    with unit_of_work() as session:
        codes = {line.error_code for line in session.query(BatchLine).filter_by(
            batch_id="batch_late")}
    assert codes == {"batch_expired"}
    assert world.node.hits["line-20"] == 0


def test_deleting_a_file_keeps_its_trail(client, world) -> None:  # type: ignore[no-untyped-def]
    f = upload(client, world, to_jsonl(jsonl_lines(1))).get_json()
    r = client.delete(f"/v1/files/{f['id']}", headers=world.headers)
    assert r.get_json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{f['id']}", headers=world.headers).status_code == 404
    deleted = list_events(EventFilter(action="file.deleted"))
    assert [e.details["sha256"] for e in deleted] == [f["sha256"]]


def test_retention_purges_old_files_of_finished_batches(client, world) -> None:  # type: ignore[no-untyped-def]
    from charter.batches import files
    from charter.db import utcnow

    f = upload(client, world, to_jsonl(jsonl_lines(1))).get_json()
    done = wait_batch(client, world, create(client, world, f["id"]).get_json()["id"])
    assert files.purge_expired_files(world.settings) == []
    later = utcnow() + timedelta(days=world.settings.file_retention_days + 1)
    purged = files.purge_expired_files(world.settings, now=later)
    assert set(purged) == {f["id"], done["output_file_id"]}
    assert client.get(f"/v1/files/{f['id']}/content", headers=world.headers).status_code == 404
    assert len(list_events(EventFilter(action="file.purged"))) == 2
    assert verify_chain().ok


@pytest.fixture
def sqlite_world(tmp_path) -> Iterator[BatchWorld]:  # type: ignore[no-untyped-def]
    """The embedded default (the demo): SQLite, in-process tasks."""
    import uuid

    from charter import migrate
    from charter.actor import SYSTEM
    from charter.identity.service import actor_of, create_api_key, create_user
    from charter.settings import Settings
    from tests.conftest import SECRET, Person
    from tests.runtimes import bind_runtime, release_runtime

    url = f"sqlite:///{tmp_path / 'b.db'}"
    migrate.upgrade(url)
    settings = Settings.from_env({}, database_url=url, secret_key=SECRET)
    bind_runtime(settings)

    def make_person(*roles: str) -> Person:
        user = create_user(SYSTEM, username=f"p-{uuid.uuid4().hex[:6]}", roles=list(roles))
        return Person(actor_of(user), create_api_key(SYSTEM, user.id, name="t").token)

    w = make_world(settings, make_person, capacity=4, delay_s=0.01)
    yield w
    w.node.stop()
    release_runtime()


def test_the_embedded_database_runs_batches_too(sqlite_world) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    w = sqlite_world
    client = app_for(w.settings).test_client()
    f = upload(client, w, to_jsonl(jsonl_lines(30))).get_json()
    done = wait_batch(client, w, create(client, w, f["id"]).get_json()["id"])
    assert done["status"] == "completed", done
    out = content_lines(client, w, done["output_file_id"])
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(30))
    assert w.node.hits == {f"line-{i}": 1 for i in range(30)}
    assert w.node.max_in_flight <= 2  # capacity 4 x share 0.5
    outcomes = list_events(EventFilter(action="dispatch.outcome", limit=1000))
    assert sorted(o.details["custom_id"] for o in outcomes) == sorted(
        f"req-{i}" for i in range(30))
    assert verify_chain().ok


def test_an_auditor_reads_every_batch_but_changes_none(client, world, make_person) -> None:  # type: ignore[no-untyped-def]
    f = upload(client, world, to_jsonl(jsonl_lines(3))).get_json()
    b = create(client, world, f["id"]).get_json()
    auditor, admin = make_person("auditor"), make_person("admin")
    assert client.get(f"/v1/batches/{b['id']}", headers=auditor.headers).status_code == 200
    r = client.post(f"/v1/batches/{b['id']}/cancel", headers=auditor.headers)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.delete(f"/v1/files/{f['id']}", headers=auditor.headers)
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    refused = [(e.action, e.outcome) for e in list_events(EventFilter(outcome="denied"))
               if e.actor == auditor.actor.ref]
    assert refused == [("batch.cancel", "denied"), ("file.delete", "denied")]
    r = client.post(f"/v1/batches/{b['id']}/cancel", headers=admin.headers)
    assert r.status_code in (200, 409)  # an admin may (409: it had finished already)
