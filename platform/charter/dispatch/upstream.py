"""Sending an admitted request to a node: shared by the gateway and the batch runner.

No Flask here. The caller picks the node (a Plan's nodes, in order) and owns the response;
`send` re-checks the node's address against the SSRF policy on every call and turns a
node's 5xx or redirect into NodeRefused, so the caller may try the next node (only before
the first byte of an answer has been passed on).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from charter import scope
from charter.nodes import adapters
from charter.nodes import service as nodes
from charter.nodes.client import NodePool, NodeResponse
from charter.nodes.service import NodeTarget
from charter.nodes.ssrf import NodeUrlPolicy

log = structlog.get_logger("charter.dispatch")


class NodeRefused(Exception):
    """The node answered with a server error or a redirect: another node may be tried."""

    def __init__(self, node: NodeTarget, status: int) -> None:
        super().__init__(f"{node.name}: HTTP {status}")
        self.status = status


def payload_for(node: NodeTarget, protocol: str, body: dict[str, Any], raw: bytes) -> bytes:
    """The bytes to send: the caller's, but OpenAI's `model` names what the node serves,
    and a request to an adapter names it as the engine knows it: OpenAI's `model` (vLLM's
    LoRA module, TGI's adapter), TGI's `parameters.adapter_id`."""
    if protocol == "openai" and (node.adapter or node.reported_model_id):
        return json.dumps({**body, "model": node.adapter or node.reported_model_id}).encode()
    if protocol == "tgi" and node.adapter:
        params = body.get("parameters") or {}
        return json.dumps({**body, "parameters": {**params, "adapter_id": node.adapter}}).encode()
    return raw


def count_failure(node: NodeTarget, exc: Exception) -> None:
    """A node that failed before the first byte, on /metrics by node and kind."""
    kind = ("http_error" if isinstance(exc, NodeRefused) else
            "connection" if type(exc).__name__ == "NodeCallError" else "address_refused")
    scope.current().counter(
        "charter_upstream_errors_total", "Node calls that failed before the first byte, by "
        "node and kind (connection, http_error, address_refused)", ("node", "kind")).labels(
        node.name, kind).inc()


def suspect(node: NodeTarget, reason: str) -> None:
    """A connection refused, reset or timed out before the first byte: the node leaves
    every worker's routes until a probe finds it healthy (nodes.service.mark_suspect). A
    database that cannot say so does not stop the caller from trying the next node."""
    try:
        nodes.mark_suspect(node.id, reason)
    except Exception as exc:  # noqa: BLE001 - the request goes on to the next node
        log.error("could not mark the node suspect", node=node.name, error=str(exc))


def send(pool: NodePool, policy: NodeUrlPolicy, node: NodeTarget, path: str, payload: bytes,
         headers: dict[str, str]) -> NodeResponse:
    """POST to the node; raises NodeCallError, CharterError (SSRF) or NodeRefused."""
    target = policy.resolve(node.base_url)  # re-checked: DNS may have moved
    resp = pool.request(target, "POST", path, payload, headers)
    if resp.status >= 500 or 300 <= resp.status < 400:
        # A node error, or a redirect (never followed, never passed on).
        resp.close(reuse=False)
        raise NodeRefused(node, resp.status)
    return resp


def error_body(protocol: str, message: str, *, code: str, kind: str = "api_error",
               param: Any = None) -> dict[str, Any]:
    """An error in the caller's protocol: OpenAI's four-key error object (`kind` is its
    `type`), or TGI's `{"error", "error_type"}` (the code is the type)."""
    if protocol == "openai":
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return {"error": message, "error_type": code}


def error_for_caller(protocol: str, node: NodeTarget, content: bytes) -> bytes:
    """A node's refusal (4xx) in the caller's protocol: TGI's passed on to a TGI caller;
    anything else rebuilt from what it says (vLLM's `{"object": "error"}`, Ollama's
    `{"error": "..."}`, FastAPI's `{"detail"}`, text), in OpenAI's four-key error object
    for an OpenAI caller (keeping the node's `type`, `param` and `code` where it gave them)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if protocol in ("tgi", "tei") and node.engine == protocol:
        return content
    message = adapters.error_message(content)
    if protocol == "openai":
        given = body.get("error") if isinstance(body, dict) else None
        given = given if isinstance(given, dict) else {}
        return json.dumps(error_body(
            "openai", message, kind=given.get("type") or "invalid_request_error",
            param=given.get("param"), code=given.get("code") or "node_rejected")).encode()
    return json.dumps(error_body("tgi", message, code="validation")).encode()


def usage(protocol: str, body: Any) -> tuple[int | None, int | None]:
    """(tokens in, tokens out) a whole answer reports in the protocol's shape: OpenAI's
    `usage`, TGI's `details` (the prompt only with `decoder_input_details`); None for a
    count it does not report."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return None, None
    if protocol == "openai":
        found = body.get("usage")
        if not isinstance(found, dict):
            return None, None
        return _reported(found.get("prompt_tokens")), _reported(found.get("completion_tokens"))
    details = body.get("details")
    if not isinstance(details, dict):
        return None, None
    prefill = details.get("prefill")
    return (len(prefill) if isinstance(prefill, list) and prefill else None,
            _reported(details.get("generated_tokens")))


def embedding_usage(protocol: str, body: Any, headers: Any) -> int | None:
    """The input tokens an embedding answer reports: OpenAI's `usage.prompt_tokens`, TEI's
    `x-compute-tokens` header; None where it reports none."""
    if protocol == "openai":
        found = body.get("usage") if isinstance(body, dict) else None
        return _reported(found.get("prompt_tokens")) if isinstance(found, dict) else None
    try:
        return _reported(int(headers.get("x-compute-tokens")))
    except (TypeError, ValueError):
        return None


def redacted_answer(protocol: str, content: bytes, replace: Callable[[str], str]) -> bytes:
    """A whole answer with each generated text put through `replace`: OpenAI's choices'
    message content, reasoning, refusal and tool calls' arguments, or a completion's text
    (their `logprobs` removed), TGI's `generated_text` and its
    best-of sequences' (their token lists emptied: tokens carry the text). Anything that
    is not such an answer comes back as it was."""
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if protocol == "openai" and isinstance(body, dict):
        for choice in body.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            holder = message if isinstance(message, dict) else choice
            for key in TEXT_FIELDS if isinstance(message, dict) else ("text",):
                if isinstance(holder.get(key), str):
                    holder[key] = replace(holder[key])
            for call in (holder.get("tool_calls") or ()) if isinstance(message, dict) else ():
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    function["arguments"] = replace(function["arguments"])
            if choice.get("logprobs") is not None:
                choice["logprobs"] = None
    elif protocol == "tgi":
        for answer in body if isinstance(body, list) else [body]:
            if not isinstance(answer, dict):
                continue
            details = answer.get("details")
            for one in [answer, *((details or {}).get("best_of_sequences") or ()
                                  if isinstance(details, dict) else ())]:
                if not isinstance(one, dict):
                    continue
                if isinstance(one.get("generated_text"), str):
                    one["generated_text"] = replace(one["generated_text"])
                for held in (one, one.get("details")):
                    if isinstance(held, dict):
                        for key in ("tokens", "prefill", "top_tokens"):
                            if isinstance(held.get(key), list):
                                held[key] = []
    else:
        return content
    return json.dumps(body, separators=(",", ":")).encode()


def named_as_asked(content: bytes, serving_name: str) -> bytes:
    """A whole OpenAI answer whose `model` is the serving name the caller used (the node
    names what it loaded: a path, a Hub id); anything else is passed on unchanged."""
    try:
        body = json.loads(content)
    except ValueError:
        return content
    if not isinstance(body, dict) or "model" not in body:
        return content
    body["model"] = serving_name
    return json.dumps(body, separators=(",", ":")).encode()


class Redactor(Protocol):
    """One stream of an answer's text, redacted as it passes (charter.inspection.stream):
    feed() each piece and pass on what it returns, finish() at its end; whole() redacts a
    text the stream already passed on in pieces (TGI's closing `generated_text`)."""

    def feed(self, text: str) -> str: ...

    def finish(self) -> str: ...

    def whole(self, text: str) -> str: ...

    @property
    def counts(self) -> Counter[str]:
        """What it replaced, by type."""


# The texts an OpenAI-shaped answer's message (or a stream's delta) carries besides tool
# calls: the content, the reasoning some engines return beside it (vLLM), a refusal.
TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")


class StreamFilter:
    """What passes from a node's stream of server-sent events to the caller, event by
    event (a partial event waits for the next chunk): OpenAI events get the serving name
    as `model`; the node's token counts are taken as they pass (OpenAI's usage chunk,
    which Charter asks for; TGI's last event's `details`); and when the caller did not
    ask for usage, the usage chunk and the `usage: null` of the others are removed, so the
    caller receives what it would have without Charter's asking.

    `redactor` (the decision obliged redacting the answer): each choice's text goes
    through its own Redactor, and what would carry the text around it is removed (OpenAI's
    `logprobs`; TGI's token ids, which become 0, and `top_tokens`). An answer the node
    cuts off before its end keeps what the redactor held back."""

    def __init__(self, protocol: str, serving_name: str, *, strip_usage: bool,
                 redactor: Callable[[], Redactor] | None = None) -> None:
        self.protocol, self.serving_name, self.strip_usage = protocol, serving_name, strip_usage
        self._pending = b""
        self.tokens_in: int | None = None  # as the node reported them, None if it did not
        self.tokens_out: int | None = None
        self.events = 0  # token events seen (a TGI stream's are its generated tokens)
        # The generated text (a capture's; an estimate's): a TGI token event's raw line is
        # kept as it came and parsed only if the text is asked for.
        self._text: list[str | bytes] = []
        self._redactor = redactor
        self.redactors: dict[Any, Redactor] = {}  # a choice's index -> its redactor

    def _redacting(self, key: Any) -> Redactor:
        """The redactor of one text of the answer: a choice's (TGI: 0), or one field of a
        choice (`(index, field)`, `(index, "tool", n)` for a tool call's arguments)."""
        assert self._redactor is not None
        if key not in self.redactors:
            self.redactors[key] = self._redactor()
        return self.redactors[key]

    def text(self) -> str:
        """The text generated so far, as the caller received it."""
        return "".join(_token_text(t) if isinstance(t, bytes) else t for t in self._text)

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk
        end = max(data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n"))
        if end < 0:
            self._pending = data
            return b""
        cut = end + (4 if data[end:end + 4] == b"\r\n\r\n" else 2)
        self._pending = data[cut:]
        return b"".join(self._event(e) for e in _events(data[:cut]))

    def rest(self) -> bytes:
        """What is left when the node ends: passed on as it came (read as a last event
        when the answer is redacted)."""
        rest, self._pending = self._pending, b""
        if self._redactor is not None and rest.strip():
            return self._event(rest)
        return rest

    def _event(self, event: bytes) -> bytes:
        lines = event.split(b"\n")
        keep = []
        for line in lines:
            bare = line.rstrip(b"\r")
            if not bare.startswith(b"data:") or bare[5:].strip() == b"[DONE]":
                keep.append(line)
                continue
            if (self.protocol == "tgi" and self._redactor is None
                    and b'"details":null' in bare and b'"token":{' in bare):
                # A plain token event passes as it came: counted now, read only if its
                # text is asked for (a capture, an estimate). Outside JSON strings, where
                # these bytes cannot hide, they say it carries no counts.
                self.events += 1
                self._text.append(bare[5:])
                keep.append(line)
                continue
            try:
                body = json.loads(bare[5:])
            except ValueError:
                keep.append(line)
                continue
            if not isinstance(body, dict):
                keep.append(line)
                continue
            if self.protocol == "openai":
                line = self._openai(body, line)
            else:
                line = self._tgi(body, line)
            if line:
                keep.append(line)
        if not any(k.rstrip(b"\r").startswith(b"data:") for k in keep):
            return b""  # only the usage chunk: not for this caller
        return b"\n".join(keep)

    def _openai(self, body: dict[str, Any], line: bytes) -> bytes:
        usage = body.get("usage")
        if isinstance(usage, dict):
            self.tokens_in = _reported(usage.get("prompt_tokens"))
            self.tokens_out = _reported(usage.get("completion_tokens"))
        if choices := body.get("choices"):
            self.events += 1
            for choice in choices if isinstance(choices, list) else ():
                if isinstance(choice, dict):
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    if isinstance(text, str):
                        self._text.append(text)
        elif self.strip_usage and isinstance(usage, dict):
            return b""
        changed = "model" in body
        if self._redactor is not None and isinstance(choices, list):
            changed = True
            for choice in choices:
                if isinstance(choice, dict):
                    self._redact_choice(choice)
        if changed:
            body["model"] = self.serving_name
        if self.strip_usage and "usage" in body:
            body.pop("usage")
            changed = True
        if not changed:
            return line
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + (
            b"\r" if line.endswith(b"\r") else b"")

    def _redact_choice(self, choice: dict[str, Any]) -> None:
        """Every text a streamed choice carries, each through its own redactor: the content
        (or a completion's text), the reasoning and refusal texts, each tool call's
        arguments; at the choice's end what each held back is flushed into this chunk."""
        index = choice.get("index") if isinstance(choice.get("index"), int) else 0
        delta = choice.get("delta")
        holder = delta if isinstance(delta, dict) else choice
        fields = TEXT_FIELDS if isinstance(delta, dict) else ("text",)
        ending = choice.get("finish_reason") is not None
        for name in fields:
            text = holder.get(name)
            if isinstance(text, str):
                holder[name] = self._redacting((index, name)).feed(text)
        calls = holder.get("tool_calls") if isinstance(delta, dict) else None
        for n, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                at = call.get("index") if isinstance(call.get("index"), int) else n
                function["arguments"] = self._redacting((index, "tool", at)).feed(
                    function["arguments"])
        if ending:
            for key, redactor in list(self.redactors.items()):
                if not (isinstance(key, tuple) and key[0] == index):
                    continue
                rest = redactor.finish()
                if not rest:
                    continue
                if key[1] == "tool":
                    if not isinstance(holder.get("tool_calls"), list):
                        holder["tool_calls"] = []
                    holder["tool_calls"].append({"index": key[2],
                                                 "function": {"arguments": rest}})
                else:
                    holder[key[1]] = (holder.get(key[1]) or "") + rest
        if choice.get("logprobs") is not None:
            choice["logprobs"] = None

    def _tgi(self, body: dict[str, Any], line: bytes) -> bytes:
        if isinstance(body.get("token"), dict):
            self.events += 1
            text = body["token"].get("text")
            if isinstance(text, str) and body["token"].get("special") is not True:
                self._text.append(text)
        details = body.get("details")
        if isinstance(details, dict):
            self.tokens_out = _reported(details.get("generated_tokens"))
            self.tokens_in = _reported(details.get("input_length"))
        if self._redactor is None:
            return line
        redactor, before = self._redacting(0), b""
        token = body.get("token")
        token = token if isinstance(token, dict) else {}
        special = token.get("special") is True
        if isinstance(token.get("text"), str) and not special:
            token["text"] = redactor.feed(token["text"])
        if "id" in token:
            token["id"] = 0
        if body.get("top_tokens") is not None:
            body["top_tokens"] = None
        if isinstance(body.get("generated_text"), str):  # the last event
            rest = redactor.finish()
            if rest and not special:
                token["text"] = token.get("text", "") + rest
            elif rest:  # before the closing special token, as a token of its own
                before = b"data: " + json.dumps({
                    "index": body.get("index"), "token": {
                        "id": 0, "text": rest, "logprob": 0.0, "special": False},
                    "generated_text": None, "details": None, "top_tokens": None},
                    separators=(",", ":")).encode() + b"\n\n"
            body["generated_text"] = redactor.whole(body["generated_text"])
        return before + b"data: " + json.dumps(body, separators=(",", ":")).encode() + (
            b"\r" if line.endswith(b"\r") else b"")


def _token_text(data: bytes) -> str:
    """A TGI token event's text, as `_tgi` would have taken it ("" for a special token)."""
    try:
        body = json.loads(data)
    except ValueError:
        return ""
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, dict) or token.get("special") is True:
        return ""
    text = token.get("text")
    return text if isinstance(text, str) else ""


def _events(data: bytes) -> list[bytes]:
    """Complete events, each with its blank-line separator."""
    out, start = [], 0
    while True:
        lf, crlf = data.find(b"\n\n", start), data.find(b"\r\n\r\n", start)
        ends = [(i, n) for i, n in ((lf, 2), (crlf, 4)) if i >= 0]
        if not ends:
            break
        i, n = min(ends)
        out.append(data[start:i + n])
        start = i + n
    return out


def _reported(value: Any) -> int | None:
    """A count as a node reported it: a whole number, or None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def outgoing(protocol: str, body: dict[str, Any], raw: bytes, *, stream: bool
             ) -> tuple[dict[str, Any], bytes, bool]:
    """What to send for an OpenAI stream: the caller's request, asking the node for the
    usage chunk when the caller did not (True: strip it on the way back)."""
    if protocol != "openai" or not stream:
        return body, raw, False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return body, raw, False
    asked = {**body, "stream_options": {**(options if isinstance(options, dict) else {}),
                                        "include_usage": True}}
    return asked, json.dumps(asked).encode(), True


def header_usage(headers: Any) -> tuple[int, int] | None:
    """TGI's own counts, in the headers of every non-streamed answer."""
    try:
        return int(headers.get("x-prompt-tokens")), int(headers.get("x-generated-tokens"))
    except (TypeError, ValueError):
        return None
