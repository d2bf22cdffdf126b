"""Counting tokens a node did not report, with the version's own tokenizer.

A node's own counts are the truth and are always preferred: TGI's `details` and count
headers, OpenAI's `usage` (which Charter asks every engine for, streams included). Some
answers come without them: an engine that ignores `stream_options`, a proxy in front of TGI
that drops its headers, a stream cut before its last event. Then Charter counts, and the
figure is marked estimated wherever it goes (the outcome event, the usage counters, the
usage API and the chargeback report).

How it counts, best first:
- **tokenizer**: the version's own tokenizer, placed by the operator under
  `CHARTER_TOKENIZERS_DIR` as `<model name>/<version label>/` (the tokenizer files of the
  model's snapshot: `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`),
  loaded with transformers, offline (no hub is ever asked). Where the registry pinned a
  digest for `tokenizer.json`, the file on disk must match it, or it is not used: counting
  with another model's tokenizer would be a wrong figure presented as a careful one. A chat
  request is counted through the tokenizer's chat template, as the engine renders it.
- **events**: a TGI stream's token events (one per generated token).
- **bytes**: a UTF-8 byte count divided by four (rounded up), the usual rough figure for
  English text under a BPE vocabulary; for a version without a usable tokenizer.

No Flask here: the gateway and the batch runner call it after the node has answered, so
its cost falls on answers without counts only, never on the decision before the first byte.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("charter.metering")

BYTES_PER_TOKEN = 4
RECHECK_S = 60.0  # a version without a usable tokenizer is looked for again after this


@dataclass(frozen=True, slots=True)
class TokenizerPin:
    """Where a version's tokenizer is found and what it must be: from the registry."""

    model_name: str
    label: str
    sha256: str | None  # of tokenizer.json, where the registry pinned one


@dataclass(frozen=True, slots=True)
class Count:
    tokens_in: int
    tokens_out: int
    method: str  # tokenizer | events | bytes


def prompt_of(protocol: str, body: dict[str, Any]) -> list[dict[str, str]] | str | list[int]:
    """What a request asks the model: OpenAI chat messages (their text parts), an OpenAI
    completion prompt (text, or token ids as sent), or TGI's `inputs`."""
    if protocol == "openai" and isinstance(body.get("messages"), list):
        return [{"role": str(m.get("role") or "user"), "content": _text(m.get("content"))}
                for m in body["messages"] if isinstance(m, dict)]
    if protocol == "openai":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if isinstance(prompt, list):
            return "".join(_text(p) for p in prompt)
        return _text(prompt)
    return _text(body.get("inputs"))


def inputs_of(protocol: str, body: dict[str, Any]) -> list[str | list[int]]:
    """The inputs of an embedding request, each embedded (and counted) on its own:
    OpenAI's `input` (a text, token ids, or a list of either), TEI's `inputs`."""
    given = body.get("input" if protocol == "openai" else "inputs")
    if isinstance(given, str) or (isinstance(given, list) and given and all(
            isinstance(t, int) for t in given)):
        return [given]
    if not isinstance(given, list):
        return []
    return [item if isinstance(item, list) else _text(item) for item in given]


def answer_of(protocol: str, body: Any) -> str:
    """The generated text of a whole answer: every choice's message or text (OpenAI), the
    `generated_text` of TGI's answer (or of each in a list)."""
    if protocol == "openai":
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            return ""
        out = []
        for choice in body["choices"]:
            if not isinstance(choice, dict):
                continue
            message = choice.get("message")
            out.append(_text(message.get("content") if isinstance(message, dict)
                             else choice.get("text")))
        return "".join(out)
    answers = body if isinstance(body, list) else [body]
    return "".join(_text(a.get("generated_text")) for a in answers if isinstance(a, dict))


def _text(value: Any) -> str:
    """Text from a string or from OpenAI's content parts (`{"type": "text", "text"}`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text") or "" if isinstance(p, dict) else _text(p)
                       for p in value)
    return ""


def rough(text: str) -> int:
    """The bytes estimate: UTF-8 bytes over four, rounded up."""
    return -(-len(text.encode("utf-8")) // BYTES_PER_TOKEN)


class Tokenizers:
    """The versions' tokenizers, loaded on first need and kept (the most recent
    `capacity` of them); a version without one is looked for again after RECHECK_S."""

    def __init__(self, root: str, pin_of: Callable[[str], TokenizerPin | None], *,
                 capacity: int = 8) -> None:
        self.root = Path(root) if root else None
        self._pin_of = pin_of
        self._capacity = capacity
        self._loaded: OrderedDict[str, Any] = OrderedDict()
        self._missing: dict[str, float] = {}
        self._lock = threading.Lock()

    def count(self, version_id: str, prompt: list[dict[str, str]] | str | list[int],
              answer: str, *, events: int | None = None) -> Count:
        """Tokens in and out of one request. `events`: a TGI stream's token events,
        which count the generated tokens one by one."""
        tokenizer = self.get(version_id)
        if tokenizer is None:
            tokens_in = len(prompt) if _ids(prompt) else rough(
                prompt if isinstance(prompt, str)
                else "".join(m["content"] for m in prompt))  # type: ignore[index]
            if events is not None:
                return Count(tokens_in, events, "events")
            return Count(tokens_in, rough(answer), "bytes")
        tokens_in = _count_prompt(tokenizer, prompt)
        tokens_out = events if events is not None else len(
            tokenizer(answer, add_special_tokens=False)["input_ids"])
        return Count(tokens_in, tokens_out, "tokenizer")

    def get(self, version_id: str) -> Any | None:
        """The version's tokenizer, or None where it has none here that may be used."""
        if self.root is None:
            return None
        with self._lock:
            found = self._loaded.get(version_id)
            if found is not None:
                self._loaded.move_to_end(version_id)
                return found
            if time.monotonic() - self._missing.get(version_id, -RECHECK_S) < RECHECK_S:
                return None
            tokenizer = self._load(version_id)
            if tokenizer is None:
                self._missing[version_id] = time.monotonic()
                return None
            self._missing.pop(version_id, None)
            self._loaded[version_id] = tokenizer
            while len(self._loaded) > self._capacity:
                self._loaded.popitem(last=False)
            return tokenizer

    def _load(self, version_id: str) -> Any | None:
        assert self.root is not None
        pin = self._pin_of(version_id)
        if pin is None:
            return None
        folder = tokenizer_folder(str(self.root), pin.model_name, pin.label)
        if folder is None:
            return None
        if pin.sha256 is not None:
            digest = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
            if digest != pin.sha256:
                log.error("the tokenizer on disk is not the one the registry pinned; "
                          "not counting with it", version=version_id, folder=str(folder),
                          pinned=pin.sha256, found=digest)
                return None
        try:
            from transformers import AutoTokenizer  # heavy: imported on first need only

            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - a bad folder leaves the rough count
            log.error("could not load a tokenizer", version=version_id, folder=str(folder),
                      error=str(exc))
            return None


def tokenizer_folder(root: str, model_name: str, label: str) -> Path | None:
    """Where a version's tokenizer is placed, `<root>/<model name>/<version label>/`, when
    it holds a `tokenizer.json`; None when it does not, or when the names could not be
    folder names under root (`..`, empty parts)."""
    parts = [*model_name.split("/"), label]
    if not root or any(p in ("", ".", "..") or "\\" in p for p in parts):
        return None
    folder = Path(root).joinpath(*parts)  # links are followed (a Hub cache's are)
    return folder if (folder / "tokenizer.json").is_file() else None


def _ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)


def _count_prompt(tokenizer: Any, prompt: list[dict[str, str]] | str | list[int]) -> int:
    if _ids(prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(prompt, tokenize=True,
                                                add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template refusing these roles: a transcript
            log.info("the chat template refused the messages; counting a transcript",
                     error=str(exc))
        else:
            return len(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids")
                       else ids)
    # No template: the plain transcript engines fall back to (and the dev node uses).
    lines = [f"{m['role']}: {m['content']}" for m in prompt if isinstance(m, dict)]
    return len(tokenizer("\n".join([*lines, "assistant:"]))["input_ids"])
