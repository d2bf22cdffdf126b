"""What passes from a node's answer to the caller (dispatch.upstream): the model named as
the caller asked for it, and the node's own token counts taken on the way, whole answers
and server-sent events alike, however the node's bytes are cut into chunks."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from charter.dispatch.upstream import StreamFilter, named_as_asked, outgoing

EVENTS = [
    {"id": "c1", "object": "chat.completion.chunk", "model": "/models/tiny-llama",
     "choices": [{"index": 0, "delta": {"content": f"tok{i} \n\n data: x"}}], "usage": None}
    for i in range(5)
]
USAGE = {"id": "c1", "object": "chat.completion.chunk", "model": "/models/tiny-llama",
         "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5,
                                  "total_tokens": 12}}
OPENAI = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in [*EVENTS, USAGE]) + (
    b"data: [DONE]\n\n")
TGI = b"".join(b"data:" + json.dumps({
    "index": i, "token": {"id": i, "text": f"t{i}", "logprob": -0.1, "special": False},
    "generated_text": "t0t1t2" if i == 2 else None,
    "details": {"finish_reason": "length", "generated_tokens": 3, "input_length": 4,
                "seed": None} if i == 2 else None}).encode() + b"\r\n\r\n" for i in range(3))


def _through(stream: bytes, cuts: list[int], f: StreamFilter) -> bytes:
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    out = b"".join(f.feed(stream[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    return out + f.rest()


def test_a_whole_answer_names_the_serving_name() -> None:
    body = json.dumps({"id": "x", "model": "charter/tiny-llama", "choices": []}).encode()
    assert json.loads(named_as_asked(body, "tiny"))["model"] == "tiny"
    for other in (b"not json", b"[1, 2]", b'{"error": {"message": "m"}}'):
        assert named_as_asked(other, "tiny") is other


def test_charter_asks_an_openai_stream_for_usage_and_says_whether_to_strip_it() -> None:
    body = {"model": "m", "stream": True, "messages": []}
    sent, raw, strip = outgoing("openai", body, b"{}", stream=True)
    assert sent["stream_options"] == {"include_usage": True} and strip
    assert json.loads(raw)["stream_options"] == {"include_usage": True}
    asked = {**body, "stream_options": {"include_usage": True}}
    assert outgoing("openai", asked, b"raw", stream=True) == (asked, b"raw", False)
    assert outgoing("openai", body, b"raw", stream=False) == (body, b"raw", False)
    assert outgoing("tgi", body, b"raw", stream=True) == (body, b"raw", False)


@given(st.lists(st.integers(1, len(OPENAI) - 1), max_size=12))
def test_an_openai_stream_is_renamed_and_counted_wherever_it_is_cut(cuts: list[int]) -> None:
    f = StreamFilter("openai", "tiny", strip_usage=True)
    events = [e for e in _through(OPENAI, cuts, f).split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    decoded = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    # What the caller gets is what it would have had without Charter asking for usage.
    assert len(decoded) == len(EVENTS) and all("usage" not in d for d in decoded)
    assert [d["model"] for d in decoded] == ["tiny"] * len(EVENTS)
    assert [d["choices"] for d in decoded] == [e["choices"] for e in EVENTS]
    assert (f.tokens_in, f.tokens_out) == (7, 5)
    assert f.text() == "".join(e["choices"][0]["delta"].get("content", "") for e in EVENTS)


def test_a_caller_that_asked_for_usage_gets_it() -> None:
    f = StreamFilter("openai", "tiny", strip_usage=False)
    decoded = [json.loads(e.removeprefix(b"data: ")) for e in
               _through(OPENAI, [], f).split(b"\n\n") if e and e != b"data: [DONE]"]
    assert decoded[-1]["usage"] == USAGE["usage"] and decoded[-1]["model"] == "tiny"
    assert (f.tokens_in, f.tokens_out) == (7, 5)


@given(st.lists(st.integers(1, len(TGI) - 1), max_size=8))
def test_a_tgi_stream_passes_unchanged_and_counts_from_its_details(cuts: list[int]) -> None:
    f = StreamFilter("tgi", "tiny", strip_usage=False)
    assert _through(TGI, cuts, f) == TGI
    assert (f.tokens_in, f.tokens_out, f.events) == (4, 3, 3)


def test_a_node_that_reports_nothing_leaves_its_counts_unknown_and_its_text_kept() -> None:
    """None, not 0: Charter counts them (charter.metering.tokens), from the text passed on."""
    plain = b"".join(b"data: " + json.dumps({k: v for k, v in e.items() if k != "usage"}
                                             ).encode() + b"\n\n" for e in EVENTS)
    f = StreamFilter("openai", "tiny", strip_usage=True)
    _through(plain, [], f)
    assert (f.tokens_in, f.tokens_out, f.events) == (None, None, len(EVENTS))
    assert f.text() and f.text() == "".join(
        e["choices"][0]["delta"].get("content", "") for e in EVENTS)


@given(st.lists(st.tuples(st.text(max_size=12), st.booleans()), min_size=1, max_size=8),
       st.booleans(), st.lists(st.integers(1, 400), max_size=6))
def test_tgi_token_events_read_lazily_give_the_same_text_and_counts(
        tokens: list[tuple[str, bool]], details: bool, cuts: list[int]) -> None:
    """TGI's own compact events (`"details":null`) pass without being parsed; their text,
    read when asked for, is what parsing each would have given, whatever the text holds
    (quotes, `"details":null`, `"token":{` and line breaks included)."""
    tokens = [(t + '"details":null,"token":{' if i == 0 else t, special)
              for i, (t, special) in enumerate(tokens)]
    last = len(tokens) - 1
    stream = b"".join(b"data:" + json.dumps({
        "index": i, "token": {"id": i, "text": text, "logprob": -0.1, "special": special},
        "generated_text": "".join(t for t, _ in tokens) if i == last else None,
        "details": {"finish_reason": "length", "generated_tokens": len(tokens),
                    "input_length": 4, "seed": None} if i == last and details else None},
        separators=(",", ":")).encode() + b"\n\n" for i, (text, special) in enumerate(tokens))
    f = StreamFilter("tgi", "tiny", strip_usage=False)
    assert _through(stream, cuts, f) == stream
    assert f.events == len(tokens)
    assert f.text() == "".join(t for t, special in tokens if not special)
    assert (f.tokens_in, f.tokens_out) == ((4, len(tokens)) if details else (None, None))
