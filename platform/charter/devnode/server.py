"""The local dev inference node: TGI's HTTP protocol over a transformers model on the CPU,
LoRA adapters merged into copies of it that requests name (TGI's `adapter_id`, OpenAI's
`model`), and TEI's and OpenAI's embedding routes over the base model."""

from __future__ import annotations

import inspect
import json
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import prometheus_client as prom
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

import charter
from charter.devnode.embeddings import (
    EMBEDDING_TAGS,
    MAX_CLIENT_BATCH,
    EmbedError,
    add_embedding_routes,
    mean_pooled,
)
from charter.devnode.lora import check_name, merged

MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 100
MAX_TOTAL_TOKENS = 4096
MAX_STOP_SEQUENCES = 4
MAX_QUEUED = 32
OPENAI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


class NodeError(Exception):
    """A refusal in TGI's error shape, `{"error", "error_type"}`."""

    def __init__(self, message: str, status: int = 422, error_type: str = "validation") -> None:
        super().__init__(message)
        self.message, self.status, self.error_type = message, status, error_type


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int | None = None  # None until Engine.bound fills in the default
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter: str | None = None  # a loaded adapter's name; None: the base model


@dataclass(frozen=True)
class Tok:
    id: int
    text: str
    logprob: float | None
    special: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(frozen=True)
class Finished:
    reason: str  # length | eos_token | stop_sequence
    text: str
    input_length: int
    generated_tokens: int
    seed: int | None


@dataclass(frozen=True)
class Step:
    token: Tok
    final: Finished | None = None  # on the last step, so no event waits for the next token


class _Fields:
    """Reads optional typed fields, collecting every problem for one 422."""

    def __init__(self, data: dict[str, Any], errors: list[str]) -> None:
        self.data, self.errors = data, errors

    def number(self, key: str, *, integer: bool = False, gt: float | None = None,
               ge: float | None = None, le: float | None = None) -> Any:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.errors.append(f"`{key}` must be {'an integer' if integer else 'a number'}")
        elif ((gt is not None and value <= gt) or (ge is not None and value < ge)
              or (le is not None and value > le)):
            bounds = [f"{op} {v}" for op, v in ((">", gt), (">=", ge), ("<=", le)) if v is not None]
            self.errors.append(f"`{key}` must be {' and '.join(bounds)}")
        else:
            return value
        return None

    def flag(self, key: str) -> bool:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            self.errors.append(f"`{key}` must be a boolean")
        return bool(value)

    def stop(self) -> tuple[str, ...]:
        value = self.data.get("stop")
        value = [value] if isinstance(value, str) else (value or [])
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            self.errors.append("`stop` must be a list of non-empty strings")
            return ()
        if len(value) > MAX_STOP_SEQUENCES:
            self.errors.append(f"`stop` must have at most {MAX_STOP_SEQUENCES} sequences")
        return tuple(value)


def _refuse(errors: list[str]) -> None:
    if errors:
        raise NodeError("Input validation error: " + "; ".join(errors))


class Engine:
    """One model and its adapters' merged copies, one job (a generation or a batch of
    embeddings) at a time on any of them: requests queue for a single worker thread."""

    def __init__(self, model_dir: Path, on_finish: Callable[[Finished], None],
                 adapters: Mapping[str, Path] = {}) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        self.model.eval()  # type: ignore[no-untyped-call]
        self.models = {None: self.model} | {name: merged(self.model, path)
                                            for name, path in adapters.items()}
        if sum(p.numel() for p in self.model.parameters()) < 10_000_000:
            # Tiny matrices: thread hand-offs cost more than the maths (10x slower on 2 cores).
            torch.set_num_threads(1)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        window = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_total_tokens = min(int(window), MAX_TOTAL_TOKENS)
        self.max_input_tokens = self.max_total_tokens - 1
        self.hidden_size = int(self.model.config.hidden_size)
        self.vocab_size = int(self.model.config.vocab_size)
        self.eos_ids: set[int] = set()
        for source in (self.model.generation_config, self.model.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            self.eos_ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.special_ids = set(self.tokenizer.all_special_ids)
        # transformers 5 renamed the KV-cache argument; 4.x calls it past_key_values.
        forward = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        self._torch, self._on_finish = torch, on_finish
        self._lock, self._pending_lock = threading.Lock(), threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devnode-generate")
        self.pending = 0

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: list[int], *, skip_special: bool = False) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special,
                                         clean_up_tokenization_spaces=False))

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=True)
            return self.encode(str(text), special=False)  # the template writes its own BOS
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return self.encode("\n".join([*lines, "assistant:"]))

    def bound(self, ids: list[int], sampling: Sampling) -> Sampling:
        """Check the adapter, the lengths against the model's window; fill in the budget."""
        if sampling.adapter not in self.models:
            loaded = ", ".join(sorted(n for n in self.models if n)) or "none"
            raise NodeError(f"Input validation error: adapter_id `{sampling.adapter}` is not "
                            f"loaded on this node (loaded: {loaded})")
        if not ids:
            raise NodeError("Input validation error: `inputs` cannot be empty")
        if len(ids) > self.max_input_tokens:
            raise NodeError(f"Input validation error: `inputs` must have less than "
                            f"{self.max_input_tokens} tokens. Given: {len(ids)}")
        room, wanted = self.max_total_tokens - len(ids), sampling.max_new_tokens
        if wanted is None:
            return replace(sampling, max_new_tokens=min(DEFAULT_NEW_TOKENS, room))
        if wanted > room:
            raise NodeError(f"Input validation error: `inputs` tokens + `max_new_tokens` must be "
                            f"<= {self.max_total_tokens}. Given: {len(ids)} `inputs` tokens and "
                            f"{wanted} `max_new_tokens`")
        return sampling

    def _admit(self) -> bool:
        with self._pending_lock:
            if self.pending >= MAX_QUEUED:
                return False
            self.pending += 1
            return True

    def stream(self, ids: list[int], sampling: Sampling) -> Iterator[Step]:
        """Queue a generation; the iterator yields its steps as the worker makes them."""
        if not self._admit():
            raise NodeError("Model is overloaded", 429, "overloaded")
        out: queue.Queue[Step | BaseException] = queue.Queue()
        cancel = threading.Event()
        self._pool.submit(self._run, ids, sampling, out, cancel)
        return self._drain(out, cancel)

    @staticmethod
    def _drain(out: queue.Queue[Step | BaseException], cancel: threading.Event) -> Iterator[Step]:
        try:
            while True:
                item = out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.final is not None:
                    return
        finally:
            cancel.set()  # a listener that went away stops its generation at the next token

    def _run(self, ids: list[int], sampling: Sampling, out: queue.Queue[Step | BaseException],
             cancel: threading.Event) -> None:
        try:
            with self._lock:
                for step in self._generate(ids, sampling, cancel):
                    out.put(step)
                    if step.final is not None:
                        self._on_finish(step.final)
        except Exception as exc:  # handed to the request's thread, which answers with it
            out.put(exc)
        finally:
            with self._pending_lock:
                self.pending -= 1

    def embed(self, batch: list[list[int]], *, normalize: bool = True,
              dimensions: int | None = None) -> list[list[float]]:
        """Mean-pooled last hidden states as float32, queued behind the generations on the
        same worker, so an embedding never runs beside one on the model."""
        if not self._admit():
            raise EmbedError("Model is overloaded", "Overloaded")
        try:
            return self._pool.submit(self._pooled, batch, normalize, dimensions).result()
        finally:
            with self._pending_lock:
                self.pending -= 1

    def _pooled(self, batch: list[list[int]], normalize: bool, dimensions: int | None
                ) -> list[list[float]]:
        with self._lock:
            return mean_pooled(self.model, batch, normalize=normalize, dimensions=dimensions)

    def _generate(self, prompt: list[int], s: Sampling, cancel: threading.Event) -> Iterator[Step]:
        torch, budget, model = self._torch, s.max_new_tokens or 1, self.models[s.adapter]
        seed = s.seed
        if s.do_sample and seed is None:
            seed = random.randint(1, 2**62)  # noqa: S311 - a sampling seed, not a secret
        generator = torch.Generator().manual_seed(seed) if s.do_sample else None
        ids, text = list(prompt), ""
        prefix, read = max(len(prompt) - 5, 0), len(prompt)
        with torch.no_grad():
            if cancel.is_set():
                return
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
            for n in range(1, budget + 1):
                if cancel.is_set():
                    return
                scores = self._process(out.logits[0, -1].float().clone(), ids, s)
                logprobs = torch.log_softmax(scores, -1)
                token_id = self._choose(scores, s, generator)
                ids.append(token_id)
                last = n == budget or token_id in self.eos_ids
                piece, prefix, read = self._piece(ids, prefix, read, flush=last)
                text += piece
                stopped = any(x in text[-len(x) - len(piece):] for x in s.stop)
                reason = ("eos_token" if token_id in self.eos_ids else "stop_sequence" if stopped
                          else "length" if n == budget else None)
                special = token_id in self.special_ids
                token = Tok(token_id, piece, float(logprobs[token_id]), special)
                if reason is not None:
                    yield Step(token, Finished(reason, self._final_text(ids, len(prompt)),
                                               len(prompt), n, seed))
                    return
                yield Step(token)
                cache = out["cache"] if "cache" in out else out["past_key_values"]
                out = model(input_ids=torch.tensor([[token_id]]), use_cache=True,
                            **{self._cache_kw: cache})

    def _process(self, logits: Any, seen: list[int], s: Sampling) -> Any:
        torch = self._torch
        if s.repetition_penalty and s.repetition_penalty != 1.0:
            idx = torch.tensor(sorted({i for i in seen if i < logits.numel()}))
            picked = logits[idx]
            logits[idx] = torch.where(picked < 0, picked * s.repetition_penalty,
                                      picked / s.repetition_penalty)
        return logits / s.temperature if s.do_sample and s.temperature != 1.0 else logits

    def _choose(self, scores: Any, s: Sampling, generator: Any) -> int:
        torch = self._torch
        if not s.do_sample:
            return int(torch.argmax(scores))
        if s.top_k:
            kth = torch.topk(scores, min(s.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if s.top_p is not None and s.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=True)
            probs = torch.softmax(ordered, -1)
            drop = (probs.cumsum(-1) - probs) >= s.top_p  # the likeliest token always stays
            scores = scores.index_fill(0, order[drop], float("-inf"))
        return int(torch.multinomial(torch.softmax(scores, -1), 1, generator=generator))

    def _piece(self, ids: list[int], prefix: int, read: int, *, flush: bool
               ) -> tuple[str, int, int]:
        """TGI's incremental detokenisation: hold text back until it is whole UTF-8."""
        before, after = self.decode(ids[prefix:read]), self.decode(ids[prefix:])
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            return after[len(before):], read, len(ids)
        return "", prefix, read

    def _final_text(self, ids: list[int], n_prompt: int) -> str:
        start = max(n_prompt - 5, 0)  # a little context, so leading spaces decode right
        head = self.decode(ids[start:n_prompt], skip_special=True)
        return self.decode(ids[start:], skip_special=True)[len(head):]


def _body() -> dict[str, Any]:
    body = request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise NodeError("Input validation error: the body must be a JSON object")
    return body


def _pipeline_tag(model_dir: Path) -> str:
    """The card's pipeline_tag (its README's YAML front matter); text-generation without one."""
    from huggingface_hub import metadata_load

    readme = model_dir / "README.md"
    tag = (metadata_load(readme) or {}).get("pipeline_tag") if readme.is_file() else None
    return tag if isinstance(tag, str) and tag else "text-generation"


def _tgi_request(body: dict[str, Any]) -> tuple[str, Sampling, bool, bool]:
    """TGI's GenerateRequest -> (inputs, sampling, details, return_full_text)."""
    errors: list[str] = []
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        errors.append("`inputs` must be a non-empty string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        errors.append("`parameters` must be an object")
        params = {}
    if (adapter := params.get("adapter_id")) is not None and not isinstance(adapter, str):
        errors.append("`adapter_id` must be a string")
    f = _Fields(params, errors)
    temperature, top_k = f.number("temperature", gt=0), f.number("top_k", integer=True, gt=0)
    top_p, typical_p = f.number("top_p", gt=0, le=1), f.number("typical_p", gt=0, le=1)
    sampling = Sampling(
        max_new_tokens=f.number("max_new_tokens", integer=True, gt=0, le=MAX_NEW_TOKENS),
        # Like TGI: any warper turns sampling on, not only do_sample.
        do_sample=f.flag("do_sample") or temperature not in (None, 1.0) or bool(top_k)
        or (top_p or 1.0) < 1.0 or (typical_p or 1.0) < 1.0,
        temperature=temperature or 1.0, top_k=top_k, top_p=top_p,
        repetition_penalty=f.number("repetition_penalty", gt=0),
        seed=f.number("seed", integer=True, ge=0), stop=f.stop(),
        adapter=adapter if isinstance(adapter, str) else None,
    )
    # Accepted and checked, not applied: typical_p, frequency_penalty, watermark.
    f.number("frequency_penalty", ge=-2, le=2)
    f.number("best_of", integer=True, gt=0, le=1)
    f.number("truncate", integer=True, ge=0)
    f.flag("watermark")
    for unsupported in ("grammar", "top_n_tokens", "decoder_input_details"):
        if params.get(unsupported):
            errors.append(f"`{unsupported}` is not supported by this node")
    details, full_text = f.flag("details"), f.flag("return_full_text")
    _refuse(errors)
    return str(inputs), sampling, details, full_text


def _openai_sampling(body: dict[str, Any], errors: list[str]) -> tuple[Sampling, bool, bool]:
    """OpenAI fields -> (sampling, stream, include_usage); like TGI, it samples unless T=0."""
    f = _Fields(body, errors)
    budget = f.number("max_completion_tokens", integer=True, gt=0, le=MAX_NEW_TOKENS)
    budget = budget or f.number("max_tokens", integer=True, gt=0, le=MAX_NEW_TOKENS)
    temperature = f.number("temperature", ge=0, le=2)
    f.number("presence_penalty", ge=-2, le=2)
    f.number("frequency_penalty", ge=-2, le=2)
    f.number("n", integer=True, ge=1, le=1)
    sampling = Sampling(max_new_tokens=budget, do_sample=temperature != 0,
                        temperature=temperature or 1.0, top_p=f.number("top_p", gt=0, le=1),
                        seed=f.number("seed", integer=True, ge=0), stop=f.stop())
    options = body.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    return sampling, f.flag("stream"), usage


def _messages(body: dict[str, Any], errors: list[str]) -> list[dict[str, str]]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        errors.append("`messages` must be a non-empty list")
        return []
    out = []
    for i, m in enumerate(raw):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content
                              if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                content is None or isinstance(content, str)):
            errors.append(f"`messages[{i}]` must have a string `role` and text `content`")
        else:
            out.append({"role": m["role"], "content": content or ""})
    if body.get("tools"):
        errors.append("`tools` are not supported by this node")
    return out


def _sse(events: Iterator[dict[str, Any]], done: bool = False) -> Response:
    def body() -> Iterator[str]:
        try:
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except NodeError as exc:  # the status line is sent: errors travel as an event, as in TGI
            yield f"data: {json.dumps({'error': exc.message, 'error_type': exc.error_type})}\n\n"
        except Exception as exc:
            error = {"error": f"Request failed during generation: {exc}",
                     "error_type": "generation"}
            yield f"data: {json.dumps(error)}\n\n"
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # a client gone mid-stream cancels its generation now, not at GC
        if done:
            yield "data: [DONE]\n\n"

    return Response(body(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _last(steps: Iterator[Step]) -> Finished:
    final = None
    for step in steps:
        final = step.final
    assert final is not None
    return final


def _tgi_events(steps: Iterator[Step], prefix: str, *, counts: bool = True
                ) -> Iterator[dict[str, Any]]:
    for index, step in enumerate(steps, start=1):  # TGI numbers stream events from 1
        event: dict[str, Any] = {"index": index, "token": step.token.as_dict(),
                                 "generated_text": None, "details": None}
        if (final := step.final) is not None:
            event["generated_text"] = prefix + final.text
        if final is not None and counts:
            event["details"] = {"finish_reason": final.reason, "seed": final.seed,
                                "generated_tokens": final.generated_tokens,
                                "input_length": final.input_length}
        yield event


def create_node_app(model_dir: Path | str, *, region: str, model_id: str | None = None,
                    revision: str | None = None, counts: bool = True,
                    adapters: Mapping[str, Path] = {}) -> Flask:
    """Load the model from model_dir (never the network) and return the node's WSGI app.
    `adapters`: PEFT LoRA adapters by the name requests select them with; one that does not
    fit the model is refused here (AdapterError), before the node serves anything.
    `counts=False`: answer like an engine that reports no token counts (no TGI count
    headers or details, no OpenAI usage even when asked), to try what a gateway does then."""
    model_dir = Path(model_dir)
    if revision is None:
        from charter.registry.importer import content_revision

        revision = content_revision(model_dir)
    model_id = model_id or model_dir.name
    adapters = {name: Path(path) for name, path in adapters.items()}
    for name in adapters:
        check_name(name, model_id)
    pipeline_tag = _pipeline_tag(model_dir)
    embedding_model = pipeline_tag in EMBEDDING_TAGS
    started = int(time.time())
    fingerprint = f"charter-devnode-{charter.__version__}-{revision[:12]}"

    registry = prom.CollectorRegistry()
    requests = prom.Counter("charter_devnode_requests", "HTTP requests answered",
                       ["route", "status"], registry=registry)
    prompt_tokens = prom.Counter("charter_devnode_prompt_tokens",
                                 "Prompt tokens read, embedding inputs included",
                            registry=registry)
    generated = prom.Counter("charter_devnode_generated_tokens", "Tokens generated",
                        registry=registry)

    def on_finish(final: Finished) -> None:
        prompt_tokens.inc(final.input_length)
        generated.inc(final.generated_tokens)

    engine = Engine(model_dir, on_finish, adapters)
    prom.Gauge("charter_devnode_queue_depth", "Generations and embeddings queued or running",
          registry=registry).set_function(lambda: engine.pending)
    app = Flask(__name__)
    app.extensions["charter_devnode"] = engine
    app.config.update(NODE_MODEL_ID=model_id, NODE_MODEL_SHA=revision, NODE_REGION=region)

    @app.errorhandler(NodeError)
    def node_error(exc: NodeError) -> tuple[Response, int]:
        return jsonify({"error": exc.message, "error_type": exc.error_type}), exc.status

    tei_embed = add_embedding_routes(app, engine, model_id=model_id, counts=counts,
                                     prompt_tokens=prompt_tokens)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        error_type = (exc.name or "error").lower().replace(" ", "_")
        return jsonify({"error": exc.description, "error_type": error_type}), exc.code or 500

    @app.errorhandler(Exception)
    def generation_error(exc: Exception) -> tuple[Response, int]:
        app.logger.exception("generation failed")
        error = f"Request failed during generation: {exc}"
        return jsonify({"error": error, "error_type": "generation"}), 424

    @app.after_request
    def count(response: Response) -> Response:
        requests.labels(request.endpoint or "unknown", str(response.status_code)).inc()
        return response

    @app.get("/health")
    def health() -> tuple[str, int]:
        return "", 200

    @app.get("/info")
    def info() -> Response:
        answer = {
            "model_id": model_id, "model_sha": revision, "model_pipeline_tag": pipeline_tag,
            "model_dtype": engine.dtype, "model_device_type": "cpu",
            "max_concurrent_requests": MAX_QUEUED, "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": engine.max_input_tokens,
            "max_total_tokens": engine.max_total_tokens, "validation_workers": 1,
            "max_client_batch_size": MAX_CLIENT_BATCH if embedding_model else 1,
            "router": "charter-devnode", "version": charter.__version__, "sha": None,
            "docker_label": None, "region": region,
        }
        if embedding_model:  # TEI's field for what the model is served as
            answer["model_type"] = {"embedding": {"pooling": "mean"}}
        return jsonify(answer)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(prom.generate_latest(registry), mimetype=prom.CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    def tokenize() -> Response:
        inputs = _tgi_request(_body())[0]
        enc = engine.tokenizer(inputs, return_offsets_mapping=True)
        return jsonify([{"id": t, "text": inputs[a:b], "start": a, "stop": b}
                        for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)])

    def tgi(body: dict[str, Any], *, stream: bool, as_list: bool = False) -> Response:
        inputs, sampling, details, full_text = _tgi_request(body)
        ids = engine.encode(inputs)
        truncate = (body.get("parameters") or {}).get("truncate")
        ids = ids[-truncate:] if truncate else ids
        steps = engine.stream(ids, engine.bound(ids, sampling))
        prefix = inputs if full_text else ""
        if stream:
            return _sse(_tgi_events(steps, prefix, counts=counts))
        all_steps = list(steps)
        final = all_steps[-1].final
        assert final is not None
        answer: dict[str, Any] = {"generated_text": prefix + final.text}
        if details and counts:
            answer["details"] = {
                "finish_reason": final.reason, "generated_tokens": final.generated_tokens,
                "seed": final.seed, "prefill": [], "tokens": [s.token.as_dict() for s in all_steps],
            }
        response = jsonify([answer] if as_list else answer)
        response.headers["x-compute-type"] = "cpu"
        if counts:
            response.headers.update({"x-prompt-tokens": str(len(ids)),
                                     "x-generated-tokens": str(final.generated_tokens)})
        return response

    @app.post("/generate")
    def generate() -> Response:
        return tgi(_body(), stream=False)

    @app.post("/generate_stream")
    def generate_stream() -> Response:
        return tgi(_body(), stream=True)

    @app.post("/")
    def compat() -> Response:
        if embedding_model:  # like TEI, whose `/` embeds: InferenceClient.feature_extraction
            return tei_embed()
        body = _body()
        if not isinstance(stream := body.get("stream", False), bool):
            raise NodeError("Input validation error: `stream` must be a boolean")
        return tgi(body, stream=stream, as_list=True)

    def openai(body: dict[str, Any], errors: list[str], ids_of: Callable[[], list[int]],
               kind: str) -> Response:
        """Chat and legacy completions: one choice; streams end with `data: [DONE]`."""
        sampling, stream, include_usage = _openai_sampling(body, errors)
        include_usage = include_usage and counts
        _refuse(errors)
        # An adapter's name selects it, as in TGI and vLLM; any other `model` is the base.
        adapter = name if isinstance(name := body.get("model"), str) and name in adapters else None
        ids = ids_of()
        steps = engine.stream(ids, engine.bound(ids, replace(sampling, adapter=adapter)))
        chat = kind == "chat.completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": adapter or model_id,
                "system_fingerprint": fingerprint}

        def choice(text: str, final: Finished | None, key: str) -> dict[str, Any]:
            content = {key: {"role": "assistant", "content": text}} if chat else {"text": text}
            return {"index": 0, **content, "logprobs": None,
                    "finish_reason": OPENAI_FINISH[final.reason] if final else None}

        def usage(final: Finished) -> dict[str, int]:
            return {"prompt_tokens": final.input_length,
                    "completion_tokens": final.generated_tokens,
                    "total_tokens": final.input_length + final.generated_tokens}

        if not stream:
            final = _last(steps)
            whole = {**head, "choices": [choice(final.text, final, "message")]}
            return jsonify({**whole, "usage": usage(final)} if counts else whole)
        if chat:
            head["object"] = "chat.completion.chunk"

        def chunks() -> Iterator[dict[str, Any]]:
            for step in steps:
                text = "" if step.token.special else step.token.text
                if text or step.final:
                    yield {**head, "choices": [choice(text, step.final, "delta")], "usage": None}
                if step.final and include_usage:
                    yield {**head, "choices": [], "usage": usage(step.final)}

        return _sse(chunks(), done=True)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body, errors = _body(), list[str]()
        messages = _messages(body, errors)
        return openai(body, errors, lambda: engine.chat_prompt(messages), "chat.completion")

    @app.post("/v1/completions")
    def completions() -> Response:
        body, errors = _body(), []
        prompt = body.get("prompt")
        prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
        if not isinstance(prompt, str) or not prompt:
            errors.append("`prompt` must be one non-empty string")
        return openai(body, errors, lambda: engine.encode(str(prompt)), "text_completion")

    @app.get("/v1/models")
    def models() -> Response:
        entry = {"id": model_id, "object": "model", "created": started, "owned_by": "charter"}
        loras = [{"id": name, "object": "model", "created": started,
                  "owned_by": "charter-devnode", "parent": model_id, "root": path.name}
                 for name, path in adapters.items()]  # vLLM's entries for its LoRA modules
        return jsonify({"object": "list", "data": [entry, *loras]})

    return app


def serve_node(app: Flask, host: str, port: int) -> None:
    """Serve with werkzeug's threaded server: a thread per request, generations queued."""
    from werkzeug.serving import run_simple

    run_simple(host, port, app, threaded=True, use_reloader=False, use_debugger=False)
