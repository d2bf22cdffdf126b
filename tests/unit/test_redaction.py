"""Redaction with real Presidio: a request's texts replaced in every protocol's shape, an
answer's text replaced as it streams (a card number split across chunks), whole answers,
and what would carry the text around it removed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from charter.dispatch.service import with_texts
from charter.dispatch.upstream import StreamFilter, redacted_answer
from charter.inspection.detect import Detector
from charter.inspection.stream import LOOK_BEHIND, StreamRedactor

CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector()


def test_redact_replaces_only_the_types_asked(detector: Detector) -> None:
    text = f"mail jane@example.com, card {CARD}, from 10.1.2.3"
    out, counts = detector.redact(text, ["EMAIL_ADDRESS", "IP_ADDRESS"])
    assert out == f"mail <EMAIL_ADDRESS>, card {CARD}, from <IP_ADDRESS>"
    assert counts == {"EMAIL_ADDRESS": 1, "IP_ADDRESS": 1}
    assert detector.redact("nothing here", ["EMAIL_ADDRESS"]) == ("nothing here", {})
    assert detector.redact(text, []) == (text, {})


def test_a_replaced_text_is_the_normalised_one(detector: Detector) -> None:
    out, counts = detector.redact("ｍａｉｌ jane\u200b@example.com", ["EMAIL_ADDRESS"])
    assert out == "mail <EMAIL_ADDRESS>" and counts == {"EMAIL_ADDRESS": 1}


def _upper(text: str) -> str:
    return text.upper()


@pytest.mark.parametrize(("protocol", "task", "body", "want"), [
    ("openai", "generation",
     {"model": "m", "messages": [{"role": "user", "content": "a"},
                                 {"role": "user", "content": [
                                     {"type": "text", "text": "b"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
                                 {"role": "assistant", "tool_calls": []}]},
     {"model": "m", "messages": [{"role": "user", "content": "A"},
                                 {"role": "user", "content": [
                                     {"type": "text", "text": "B"},
                                     {"type": "image_url", "image_url": {"url": "x"}}]},
                                 {"role": "assistant", "tool_calls": []}]}),
    ("openai", "generation", {"model": "m", "prompt": ["a", "b"]},
     {"model": "m", "prompt": ["A", "B"]}),
    ("openai", "generation", {"model": "m", "prompt": [1, 2]}, {"model": "m", "prompt": [1, 2]}),
    ("tgi", "generation", {"inputs": "a", "parameters": {"stop": ["x"]}},
     {"inputs": "A", "parameters": {"stop": ["x"]}}),
    ("openai", "embedding", {"model": "m", "input": ["a", [1, 2]]},
     {"model": "m", "input": ["A", [1, 2]]}),
    ("tgi", "embedding", {"inputs": "a"}, {"inputs": "A"}),
])
def test_with_texts_replaces_what_is_inspected_and_nothing_else(
        protocol: str, task: str, body: dict[str, Any], want: dict[str, Any]) -> None:
    before = json.dumps(body)
    assert with_texts(protocol, body, task, _upper) == want
    assert json.dumps(body) == before  # the caller's body is not changed


def test_a_card_split_across_chunks_is_replaced_whole(detector: Detector) -> None:
    redactor = StreamRedactor(detector, ["CREDIT_CARD"])
    pieces = ["Your card is 4111", " 1111 11", "11 1111", " and that is all. " + "x" * 200]
    out = "".join(redactor.feed(p) for p in pieces) + redactor.finish()
    assert out == "Your card is <CREDIT_CARD> and that is all. " + "x" * 200
    assert redactor.counts == {"CREDIT_CARD": 1}


def test_the_look_behind_holds_back_no_more_than_it_says(detector: Detector) -> None:
    redactor = StreamRedactor(detector, ["CREDIT_CARD"])
    released = redactor.feed("y" * (2 * LOOK_BEHIND))
    assert released == "y" * LOOK_BEHIND  # the rest is held until more text or the end
    assert redactor.feed("z") == ""
    assert redactor.finish() == "y" * LOOK_BEHIND + "z"
    assert redactor.finish() == ""


def _sse(*bodies: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(b).encode() + b"\n\n" for b in bodies)


def _chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"id": "c", "object": "chat.completion.chunk", "model": "node-model",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": {"content": [{"token": "4111"}]}}]}


def _data(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in out.split(b"\n")
            if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]


def test_an_openai_stream_is_redacted_as_it_passes(detector: Detector) -> None:
    passing = StreamFilter("openai", "tiny", strip_usage=False,
                           redactor=lambda: StreamRedactor(detector, ["CREDIT_CARD"]))
    stream = _sse(_chunk("pay with 4111 1111"), _chunk(" 1111 1111"), _chunk(" today"),
                  _chunk(None, "stop")) + b"data: [DONE]\n\n"
    out = b"".join(passing.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))
    out += passing.rest()
    events = _data(out)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "pay with <CREDIT_CARD> today"
    assert all(e["choices"][0]["logprobs"] is None for e in events)
    assert all(e["model"] == "tiny" for e in events)
    assert CARD.encode() not in out and b"4111" not in out
    assert passing.text() == "pay with 4111 1111 1111 1111 today"  # as generated: counted
    assert passing.redactors[(0, "content")].counts == {"CREDIT_CARD": 1}
    assert out.endswith(b"data: [DONE]\n\n")


def _token(text: str, *, special: bool = False, last: str | None = None) -> dict[str, Any]:
    return {"index": 1, "token": {"id": 1234, "text": text, "logprob": -0.1, "special": special},
            "generated_text": last, "details": None,
            "top_tokens": [{"id": 7, "text": "4111", "logprob": -1.0, "special": False}]}


def test_a_tgi_stream_is_redacted_and_its_token_ids_hidden(detector: Detector) -> None:
    passing = StreamFilter("tgi", "tiny", strip_usage=False,
                           redactor=lambda: StreamRedactor(detector, ["CREDIT_CARD"]))
    full = f"card {CARD} ok"
    stream = _sse(_token("card 4111"), _token(" 1111 1111 1111"), _token(" ok"),
                  _token("</s>", special=True, last=full))
    out = passing.feed(stream)
    events = _data(out)
    tokens = [e["token"] for e in events]
    assert "".join(t["text"] for t in tokens if not t["special"]) == "card <CREDIT_CARD> ok"
    assert tokens[-1] == {"id": 0, "text": "</s>", "logprob": -0.1, "special": True}
    assert {t["id"] for t in tokens} == {0}
    assert all(e["top_tokens"] is None for e in events)
    assert events[-1]["generated_text"] == "card <CREDIT_CARD> ok"
    assert b"4111" not in out


def test_whole_answers_are_redacted_in_each_protocol(detector: Detector) -> None:
    def replace(text: str) -> str:
        return detector.redact(text, ["CREDIT_CARD"])[0]

    openai = {"id": "x", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": f"card {CARD}"},
         "logprobs": {"content": [{"token": "4111"}]}},
        {"index": 1, "text": f"{CARD}!"}]}
    out = json.loads(redacted_answer("openai", json.dumps(openai).encode(), replace))
    assert out["choices"][0]["message"]["content"] == "card <CREDIT_CARD>"
    assert out["choices"][0]["logprobs"] is None
    assert out["choices"][1]["text"] == "<CREDIT_CARD>!"
    tgi = [{"generated_text": f"card {CARD}", "details": {
        "generated_tokens": 9, "tokens": [{"id": 1, "text": "4111"}], "prefill": [],
        "best_of_sequences": [{"generated_text": CARD, "tokens": [{"text": "4111"}]}]}}]
    out = json.loads(redacted_answer("tgi", json.dumps(tgi).encode(), replace))
    assert out[0]["generated_text"] == "card <CREDIT_CARD>"
    assert out[0]["details"]["tokens"] == [] and out[0]["details"]["generated_tokens"] == 9
    assert out[0]["details"]["best_of_sequences"][0] == {"generated_text": "<CREDIT_CARD>",
                                                         "tokens": []}
    assert redacted_answer("tgi", b"not json", replace) == b"not json"


def test_tool_call_arguments_reasoning_and_refusals_are_redacted_too(detector: Detector) -> None:
    """Not only the content: a model that calls a tool with a card number in its arguments,
    or reasons about one, has it replaced as well, whole and streamed."""
    def replace(text: str) -> str:
        return detector.redact(text, ["CREDIT_CARD"])[0]

    whole = {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "reasoning_content": f"the card is {CARD}",
        "refusal": f"I will not charge {CARD}",
        "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "charge", "arguments": json.dumps({"card": CARD})}}]}}]}
    out = redacted_answer("openai", json.dumps(whole).encode(), replace)
    assert b"4111" not in out
    message = json.loads(out)["choices"][0]["message"]
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "card": "<CREDIT_CARD>"}
    assert message["reasoning_content"] == "the card is <CREDIT_CARD>"

    passing = StreamFilter("openai", "tiny", strip_usage=False,
                           redactor=lambda: StreamRedactor(detector, ["CREDIT_CARD"]))
    args = json.dumps({"card": CARD})
    chunks = [{"id": "c", "model": "m", "choices": [{"index": 0, "finish_reason": None,
               "delta": {"tool_calls": [{"index": 0, "function": {"arguments": args[i:i + 5]}}]}}]}
              for i in range(0, len(args), 5)]
    chunks.append({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {"reasoning_content": f"card {CARD}"}, "finish_reason": None}]})
    chunks.append({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    out = passing.feed(_sse(*chunks))
    assert b"4111" not in out
    events = _data(out)
    joined = "".join(c["function"]["arguments"] for e in events for ch in e["choices"]
                     for c in ch["delta"].get("tool_calls") or [])
    assert json.loads(joined) == {"card": "<CREDIT_CARD>"}
    reasoning = "".join(ch["delta"].get("reasoning_content") or "" for e in events
                        for ch in e["choices"])
    assert reasoning == "card <CREDIT_CARD>"
