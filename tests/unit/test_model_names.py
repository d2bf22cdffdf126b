"""Answers name the model as the caller asked for it (dispatch.upstream): whole answers and
server-sent events, however the node's bytes are cut into chunks."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from charter.dispatch.upstream import StreamRenamer, named_as_asked

EVENTS = [
    {"id": "c1", "object": "chat.completion.chunk", "model": "/models/tiny-llama",
     "choices": [{"index": 0, "delta": {"content": f"tok{i} \n\n data: x"}}]}
    for i in range(5)
]
STREAM = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in EVENTS) + (
    b"data: [DONE]\n\n")


def test_a_whole_answer_names_the_serving_name() -> None:
    body = json.dumps({"id": "x", "model": "charter/tiny-llama", "choices": []}).encode()
    assert json.loads(named_as_asked(body, "tiny"))["model"] == "tiny"
    for other in (b"not json", b"[1, 2]", b'{"error": {"message": "m"}}'):
        assert named_as_asked(other, "tiny") is other


@given(st.lists(st.integers(1, len(STREAM) - 1), max_size=12, unique=True))
def test_a_stream_names_the_serving_name_wherever_it_is_cut(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    renamer = StreamRenamer("tiny")
    out = b"".join(renamer.feed(STREAM[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    out += renamer.rest()
    events = [e for e in out.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    decoded = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert [d["model"] for d in decoded] == ["tiny"] * len(EVENTS)
    assert [d["choices"] for d in decoded] == [e["choices"] for e in EVENTS]
