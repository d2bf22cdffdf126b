"""The embedding routes' refusals: a generation model asked for embeddings, in each
caller's protocol (OpenAI 400, TEI 422), audited, nothing sent to a node; malformed inputs
refused before any decision."""

from __future__ import annotations

import pytest

from charter.audit.service import EventFilter, list_events
from tests.batch_support import make_world


@pytest.fixture
def world(configured, make_person):  # type: ignore[no-untyped-def]
    found = make_world(configured, make_person)
    yield found
    found.node.stop()


def test_a_generation_model_serves_no_embeddings(world) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    client = app_for(world.settings).test_client()
    r = client.post("/v1/embeddings", headers=world.headers, json={"model": "m", "input": "hi"})
    assert r.status_code == 400, r.get_data(as_text=True)
    assert r.get_json()["error"] == {
        "message": "the model 'm' is a generation model: it serves text generation (chat, "
                   "completions, TGI's generate), not embeddings (POST /v1/embeddings, "
                   "TEI's /embed)",
        "type": "invalid_request_error", "param": None, "code": "model_task_mismatch"}
    r = client.post("/tei/m/embed", headers=world.headers, json={"inputs": ["a", "b"]})
    assert r.status_code == 422 and r.get_json()["error_type"] == "model_task_mismatch"
    # TEI's and TGI's clients post to their base URL: a generation model generates there
    r = client.post("/tei/m", headers=world.headers, json={"inputs": "hi"})
    assert r.status_code == 200, r.get_data(as_text=True)
    refused = list_events(EventFilter(action="dispatch.refused", target_id="m"))
    assert [e.details["code"] for e in refused] == ["model_task_mismatch"] * 2
    assert refused[0].details["model_task"] == "generation"
    assert refused[0].details["endpoint_task"] == "embedding"
    assert sum(world.node.hits.values()) == 1  # only the generation reached the node
    decided = [e for e in list_events(EventFilter(action="policy.decide", limit=100))
               if e.details.get("policy") == "dispatch"]
    assert len(decided) == 1  # a refusal by task is decided before any policy


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/v1/embeddings", {"model": "m"}, "`input` must be a non-empty text"),
    ("/v1/embeddings", {"model": "m", "input": ""}, "`input` must be a non-empty text"),
    ("/v1/embeddings", {"model": "m", "input": ["a", ""]}, "`input` must be a non-empty text"),
    ("/v1/embeddings", {"model": "m", "input": [[1, 2], [-1]]}, "`input` must be"),
    ("/v1/embeddings", {"model": "m", "input": [True]}, "`input` must be"),
    ("/v1/embeddings", {"model": "m", "input": "a", "encoding_format": "int8"},
     "`encoding_format` must be float or base64"),
    ("/v1/embeddings", {"model": "m", "input": "a", "dimensions": 0},
     "`dimensions` must be a positive integer"),
    ("/v1/embeddings", {"model": "m", "input": ["a"] * 2049},
     "`input` may hold at most 2048 inputs"),
    ("/tei/m/embed", {"inputs": [[1, 2]]}, "`inputs` must be a non-empty text or a non-empty "
     "list of texts"),
    ("/tei/m/embed", {"inputs": "a", "normalize": "yes"}, "`normalize` must be a boolean"),
])
def test_malformed_embedding_requests_are_refused_in_the_callers_shape(  # type: ignore[no-untyped-def]
        world, path, body, message) -> None:
    from tests.runtimes import app_for

    client = app_for(world.settings).test_client()
    r = client.post(path, headers=world.headers, json=body)
    if path.startswith("/v1/"):
        assert r.status_code == 400, r.get_data(as_text=True)
        assert r.get_json()["error"]["message"].startswith(message)
    else:
        assert r.status_code == 422, r.get_data(as_text=True)
        assert r.get_json()["error"].startswith(message)
    assert list_events(EventFilter(action="dispatch.refused"))[-1].details["message"].startswith(
        message)
    assert sum(world.node.hits.values()) == 0


def test_embedding_edges(world) -> None:  # type: ignore[no-untyped-def]
    """dimensions over the bound has its own code; TEI's null flags are its defaults; a
    batch line's inputs are held to the gateway's rules."""
    import json

    from charter.batches.jsonl import check_line
    from tests.runtimes import app_for

    client = app_for(world.settings).test_client()
    r = client.post("/v1/embeddings", headers=world.headers,
                    json={"model": "m", "input": "a", "dimensions": 70_000})
    assert r.get_json()["error"]["code"] == "dimensions_too_large"
    r = client.post("/tei/m/embed", headers=world.headers,
                    json={"inputs": "a", "normalize": None, "truncate": None})
    assert r.get_json()["error_type"] == "model_task_mismatch"  # past parsing: m generates
    for bad in ("", [], ["a", ""], [True], ["a"] * 2049):
        line = check_line(1, json.dumps({"custom_id": "x", "method": "POST",
                                         "url": "/v1/embeddings",
                                         "body": {"model": "m", "input": bad}}), set(), 100)
        assert line.error_code == "invalid_body", bad
    ok = check_line(1, json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/embeddings",
                                   "body": {"model": "m", "input": ["a", [1, 2]]}}), set(), 100)
    assert ok.valid
