"""Engine adapters: one per inference engine, behind one interface. Each says how to tell
the engine is up, what it reports it serves, which callers' protocols it speaks, and how
its error answers read, so that a refusal reaches the caller in the caller's protocol.

- `tgi` (Text Generation Inference): up if `GET /health`; identity from `GET /info`
  (`model_id`, `model_sha`); speaks TGI's protocol and OpenAI's.
- `tei` (Text Embeddings Inference): up if `GET /health`; identity from `GET /info`
  (`model_id`, `model_sha`); speaks TEI's protocol (`/embed`) and OpenAI's
  (`/v1/embeddings`).
- `vllm`, `sglang`: up if `GET /health`; identity from `GET /v1/models`; OpenAI.
- `llamacpp` (llama.cpp's server, llama-cpp-python's): up if `GET /v1/models`; OpenAI.
- `ollama`: up if `GET /api/version`; identity from `GET /v1/models`; OpenAI (`/v1`).
- `openai` (any other OpenAI-compatible server): up if `GET /health` or `GET /v1/models`;
  identity from `/info` if it answers, else `GET /v1/models`; OpenAI.

Only TGI and TEI state a revision, and only when it could ask the Hub: every engine is attested
by its node agent's signed digests (charter.nodes.statement), TGI also by `/info`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import httpx


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    model_id: str | None = None
    revision: str | None = None
    error: str = ""


@dataclass(frozen=True)
class Engine:
    kind: str
    health: tuple[str, ...]  # paths tried in turn: the first that answers 200 means up
    protocols: frozenset[str]
    # GET /info (`model_id`, `model_sha`): TGI's, which must answer; a generic OpenAI
    # server's, if a small sidecar answers it; the others have none.
    info: Literal["required", "optional", "none"] = "none"
    # Serves LoRA adapters a request names (TGI's `adapter_id`, vLLM's LoRA modules by
    # `model`): an agent may attest the adapters beside the base.
    lora: bool = False

    def probe(self, client: httpx.Client, base_url: str,
              request_kwargs: dict[str, Any]) -> ProbeResult:
        """Health, then identity. Any failure is an unhealthy node, with the reason."""
        try:
            statuses = []
            for path in self.health:
                r = client.get(base_url + path, **request_kwargs)
                statuses.append(f"{path} answered HTTP {r.status_code}")
                if r.status_code == 200:
                    break
            else:
                return ProbeResult(False, error="; ".join(statuses))
            if self.info != "none":
                try:
                    info = _json(client.get(base_url + "/info", **request_kwargs))
                    model_id, revision = info.get("model_id"), info.get("model_sha")
                    return ProbeResult(True, _str(model_id), _str(revision))
                except ValueError as exc:
                    if self.info == "required":
                        return ProbeResult(False, error=f"/info: {exc}")
            models = _json(client.get(base_url + "/v1/models", **request_kwargs))
            data = models.get("data") or models.get("models") or [{}]
            first = data[0] if isinstance(data, list) and data else {}
            model_id = first.get("id") or first.get("name") if isinstance(first, dict) else None
            return ProbeResult(True, _str(model_id), None,
                               "the engine reports no revision: its agent attests it")
        except (httpx.HTTPError, ValueError) as exc:
            return ProbeResult(False, error=f"{type(exc).__name__}: {str(exc)[:200]}")


OPENAI = frozenset({"openai"})
ENGINES: dict[str, Engine] = {e.kind: e for e in (
    Engine("tgi", ("/health",), frozenset({"tgi", "openai"}), info="required", lora=True),
    Engine("tei", ("/health",), frozenset({"tei", "openai"}), info="required"),
    Engine("vllm", ("/health",), OPENAI, lora=True),
    Engine("sglang", ("/health",), OPENAI),
    Engine("llamacpp", ("/v1/models",), OPENAI),
    Engine("ollama", ("/api/version",), OPENAI),
    Engine("openai", ("/health", "/v1/models"), OPENAI, info="optional"),
)}


def engine(kind: str) -> Engine:
    return ENGINES[kind]


def probe(client: httpx.Client, base_url: str, kind: str,
          request_kwargs: dict[str, Any]) -> ProbeResult:
    return ENGINES[kind].probe(client, base_url, request_kwargs)


def error_message(content: bytes) -> str:
    """What an engine's error answer says, whatever its shape: OpenAI's and vLLM's
    `{"error": {"message"}}` or `{"message"}`, TGI's and Ollama's `{"error": "..."}`,
    FastAPI's `{"detail": ...}`, or plain text."""
    try:
        body = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace").strip()[:500] or "the node refused"
    if isinstance(body, dict):
        error = body.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message[:500]
        for value in (error, body.get("message"), body.get("detail")):
            if isinstance(value, str) and value:
                return value[:500]
        if body.get("detail") is not None:
            return json.dumps(body["detail"])[:500]
    return json.dumps(body)[:500]


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}")
    body = response.json()
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
