"""The dev node's embeddings: TEI's `/embed` (and `POST /` for an embedding model's card) and
OpenAI's `/v1/embeddings`, the mean of the model's last hidden states, queued with its
generations on the engine's worker."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import prometheus_client as prom
from flask import Flask, Response, jsonify, request

MAX_CLIENT_BATCH = 32  # TEI's default max_client_batch_size
EMBEDDING_TAGS = ("feature-extraction", "sentence-similarity")
# TEI's statuses per error_type since v1.9.0; before it, Validation answered 413.
TEI_STATUS = {"Validation": 422, "Empty": 400, "Overloaded": 429}


class EmbedError(Exception):
    """A refused embedding request. `kind` is TEI's error_type (Validation, Empty or
    Overloaded); the TEI routes answer `{"error", "error_type"}`, OpenAI's route its own shape."""

    def __init__(self, message: str, kind: str = "Validation", param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.kind, self.param = message, kind, param


class Embedder(Protocol):
    """What the routes need of the node's engine."""

    @property
    def max_input_tokens(self) -> int: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str, *, special: bool = True) -> list[int]: ...
    def embed(self, batch: list[list[int]], *, normalize: bool = True,
              dimensions: int | None = None) -> list[list[float]]: ...


@dataclass(frozen=True)
class Embedded:
    vectors: list[list[float]]
    tokens: int  # after truncation: what the model read
    characters: int  # TEI's x-compute-characters: characters, or token ids given as such


def mean_pooled(model: Any, batch: list[list[int]], *, normalize: bool,
                dimensions: int | None) -> list[list[float]]:
    """The float32 mean of the model's last hidden states for each input, cut to `dimensions`.
    The caller holds the model for itself."""
    import torch

    vectors = []
    with torch.no_grad():
        for ids in batch:  # one at a time: no padding, so no vector depends on its batch
            input_ids = torch.tensor([ids])
            mask = torch.ones_like(input_ids)
            hidden = model.base_model(input_ids=input_ids, attention_mask=mask
                                      ).last_hidden_state.float()
            weights = mask.unsqueeze(-1).float()
            vector = ((hidden * weights).sum(1) / weights.sum(1))[0, :dimensions]
            if normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            vectors.append(vector.tolist())
    return vectors


def add_embedding_routes(app: Flask, engine: Embedder, *, model_id: str, counts: bool,
                         prompt_tokens: prom.Counter) -> Callable[[], Response]:
    """Register `/embed`, `/v1/embeddings` and their error handler on app; return TEI's embed
    view, which `POST /` answers for an embedding model."""

    @app.errorhandler(EmbedError)
    def embed_error(exc: EmbedError) -> tuple[Response, int]:
        if request.endpoint == "embeddings":  # OpenAI's route: the shape its clients parse
            status = 429 if exc.kind == "Overloaded" else 400
            error = {"message": exc.message, "param": exc.param,
                     "type": "requests" if status == 429 else "invalid_request_error",
                     "code": "rate_limit_exceeded" if status == 429 else None}
            return jsonify({"error": error}), status
        return jsonify({"error": exc.message, "error_type": exc.kind}), TEI_STATUS[exc.kind]

    def embed(inputs: list[str | list[int]], field: str, *, normalize: bool = True,
              side: str | None = None, dimensions: int | None = None) -> Embedded:
        """Tokenise, bound to the window (truncating on `side` when given), embed, count."""
        limit, batch = engine.max_input_tokens, []
        for item in inputs:
            ids = engine.encode(item) if isinstance(item, str) else item
            if not all(0 <= i < engine.vocab_size for i in ids):
                raise EmbedError(f"Input validation error: `{field}` token ids must be in "
                                 f"[0, {engine.vocab_size})", param=field)
            if len(ids) > limit and side is None:
                raise EmbedError(f"Input validation error: `{field}` must have less than "
                                 f"{limit} tokens. Given: {len(ids)}", param=field)
            batch.append(ids[:limit] if side != "Left" else ids[-limit:])
        vectors = engine.embed(batch, normalize=normalize, dimensions=dimensions)
        tokens = sum(map(len, batch))
        prompt_tokens.inc(tokens)
        return Embedded(vectors, tokens, sum(map(len, inputs)))

    def tei_headers(response: Response, done: Embedded, since: float) -> Response:
        took = str(int((time.perf_counter() - since) * 1000))
        response.headers.update({"x-compute-type": "cpu", "x-compute-time": took,
                                 "x-total-time": took,
                                 "x-compute-characters": str(done.characters)})
        if counts:
            response.headers["x-compute-tokens"] = str(done.tokens)
        return response

    @app.post("/embed")
    def tei_embed() -> Response:
        since, body = time.perf_counter(), _embed_body()
        normalize, side, dimensions = _tei_options(body, engine.hidden_size)
        done = embed(_embed_inputs(body.get("inputs"), "inputs"), "inputs", normalize=normalize,
                     side=side, dimensions=dimensions)
        return tei_headers(jsonify(done.vectors), done, since)

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        since, body = time.perf_counter(), _embed_body()
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise EmbedError('`encoding_format` must be "float" or "base64"',
                             param="encoding_format")
        if body.get("dimensions") is not None:  # vLLM's answer for a model without MRL
            raise EmbedError(f'Model "{model_id}" does not support matryoshka representation, '
                             "changing output dimensions will lead to poor results.",
                             param="dimensions")
        done = embed(_embed_inputs(body.get("input"), "input"), "input")
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64(v) if encoding == "base64" else v}
                for i, v in enumerate(done.vectors)]
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model_id}
        if counts:
            answer["usage"] = {"prompt_tokens": done.tokens, "total_tokens": done.tokens}
        return tei_headers(jsonify(answer), done, since)

    return tei_embed


def _embed_body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise EmbedError("Input validation error: the body must be a JSON object")
    return body


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)


def _embed_inputs(value: Any, field: str) -> list[str | list[int]]:
    """TEI's `inputs`, OpenAI's `input`: a text or token ids, or a list of them."""
    if isinstance(value, str) or _is_ids(value):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) or _is_ids(v) for v in value):
        raise EmbedError(f"Input validation error: `{field}` must be a string, a list of "
                         "strings, a list of token ids or a list of such lists", param=field)
    if not value or not all(value):
        raise EmbedError(f"Input validation error: `{field}` cannot be empty", "Empty", field)
    if len(value) > MAX_CLIENT_BATCH:
        raise EmbedError(f"batch size {len(value)} > maximum allowed batch size "
                         f"{MAX_CLIENT_BATCH}", param=field)
    return value


def _tei_options(body: dict[str, Any], hidden_size: int) -> tuple[bool, str | None, int | None]:
    """TEI's EmbedRequest fields but `inputs` -> (normalize, truncation side, dimensions),
    with the generation routes' words for a wrong type or bound."""
    errors: list[str] = []
    for key in ("normalize", "truncate"):
        if body.get(key) is not None and not isinstance(body[key], bool):
            errors.append(f"`{key}` must be a boolean")
    normalize, truncate = body.get("normalize") is not False, body.get("truncate") is True
    side = str(body.get("truncation_direction") or "Right").capitalize()
    if side not in ("Left", "Right"):
        errors.append("`truncation_direction` must be Left or Right")
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool)
                                   or not isinstance(dimensions, int)):
        errors.append("`dimensions` must be an integer")
        dimensions = None
    elif dimensions is not None and not 0 < dimensions <= hidden_size:
        errors.append(f"`dimensions` must be > 0 and <= {hidden_size}")
        dimensions = None
    if (name := body.get("prompt_name")) is not None:  # TEI's words: this model has no prompts
        errors.append(f"`default-prompt-name` is set to `{name}` but no prompts were found in "
                      "the Sentence Transformers configuration")
    if errors:
        raise EmbedError("Input validation error: " + "; ".join(errors))
    return normalize, side if truncate else None, dimensions


def _base64(vector: list[float]) -> str:
    """OpenAI's base64 embedding: the vector's little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
