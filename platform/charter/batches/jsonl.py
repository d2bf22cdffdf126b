"""Batch input files: JSONL, one request a line, checked line by line.

A file that is not UTF-8 JSONL at all, is empty or has too many lines is refused whole;
a line that is wrong is kept as invalid (with its line number and why) and reported in the
batch's error file, so one bad line never sinks the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from charter.dispatch.service import adapter_field, embedding_inputs_problem
from charter.errors import ValidationFailedError

ENDPOINTS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt",
             "/v1/embeddings": "input"}
TASKS = {"/v1/embeddings": "embedding"}  # what the endpoint asks of a model; else generation


@dataclass(frozen=True)
class Line:
    line_no: int  # 1-based, in the file
    custom_id: str | None
    url: str | None
    body: dict[str, Any] | None  # None when the line is invalid
    error_code: str | None = None
    error_message: str | None = None

    @property
    def valid(self) -> bool:
        return self.error_code is None


def _invalid(line_no: int, custom_id: str | None, code: str, message: str,
             url: str | None = None) -> Line:
    return Line(line_no, custom_id, url, None, code, message)


def check_line(line_no: int, text: str, seen: set[str], max_tokens: int) -> Line:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return _invalid(line_no, None, "invalid_json", "the line is not valid JSON")
    if not isinstance(obj, dict):
        return _invalid(line_no, None, "invalid_line", "the line must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > 200:
        return _invalid(line_no, None, "invalid_custom_id",
                        "`custom_id` must be a string of 1 to 200 characters")
    if custom_id in seen:
        return _invalid(line_no, custom_id, "duplicate_custom_id",
                        f"`custom_id` {custom_id!r} is used by an earlier line")
    seen.add(custom_id)
    url = obj.get("url")
    if obj.get("method") != "POST":
        return _invalid(line_no, custom_id, "invalid_method", "`method` must be POST")
    if url not in ENDPOINTS:
        return _invalid(line_no, custom_id, "invalid_url",
                        f"`url` must be one of {', '.join(sorted(ENDPOINTS))}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _invalid(line_no, custom_id, "invalid_body", "`body` must be an object", url)
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 200 or not model.isprintable():
        return _invalid(line_no, custom_id, "invalid_model",
                        "`body.model` must be a serving name", url)
    required = ENDPOINTS[url]
    value = body.get(required)
    if url == "/v1/embeddings" and (
            problem := embedding_inputs_problem(value, "body.input", ids=True)) is not None:
        return _invalid(line_no, custom_id, "invalid_body", problem[0], url)
    if value is None or (required == "messages" and (not isinstance(value, list) or not value)):
        return _invalid(line_no, custom_id, "invalid_body", f"`body.{required}` is required",
                        url)
    if (field := adapter_field(body)) is not None:
        return _invalid(line_no, custom_id, "adapter_id_not_allowed",
                        f"`body.{field}` is not accepted: an adapter is a model version of "
                        "its own; name its serving name in `body.model`", url)
    if body.get("stream", False) is not False:
        return _invalid(line_no, custom_id, "invalid_body",
                        "`body.stream` is not allowed in a batch", url)
    for name in ("max_tokens", "max_completion_tokens"):
        n = body.get(name)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not
                              1 <= n <= max_tokens):
            return _invalid(line_no, custom_id, "invalid_body",
                            f"`body.{name}` must be an integer from 1 to {max_tokens}", url)
    return Line(line_no, custom_id, url, body)


def parse(content: bytes, *, max_lines: int, max_tokens: int) -> list[Line]:
    """Every non-blank line of the file, checked; raises for a file that is wrong whole."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationFailedError("the file is not UTF-8 text", code="invalid_file", status=400,
                                    details={"byte": exc.start}) from None
    lines: list[Line] = []
    seen: set[str] = set()
    for line_no, raw in _numbered(text):
        if len(lines) >= max_lines:
            raise ValidationFailedError(f"a batch file may hold at most {max_lines} lines",
                                        code="too_many_lines", status=400,
                                        details={"max_lines": max_lines})
        lines.append(check_line(line_no, raw, seen, max_tokens))
    if not lines:
        raise ValidationFailedError("the file holds no lines", code="empty_file", status=400)
    return lines


def _numbered(text: str) -> Iterator[tuple[int, str]]:
    for line_no, raw in enumerate(text.split("\n"), start=1):
        if raw.strip():
            yield line_no, raw
