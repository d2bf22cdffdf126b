"""Engine adapters: how Charter asks a node what it serves, per engine.

TGI nodes prove what they serve through `GET /info` (`model_id`, `model_sha`). An
OpenAI-compatible engine (vLLM, SGLang, llama.cpp server) has no standard way to state its
revision; Charter asks `GET /info` all the same (a small sidecar can answer it) and, when
no revision is reported, the node stays unattested: nothing unproven serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class ProbeResult:
    healthy: bool
    model_id: str | None = None
    revision: str | None = None
    error: str = ""


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise ValueError(f"HTTP {response.status_code}")
    body = response.json()
    if not isinstance(body, dict):
        raise ValueError("not a JSON object")
    return body


def probe(client: httpx.Client, base_url: str, engine: str,
          request_kwargs: dict[str, Any]) -> ProbeResult:
    """Health, then identity. Any failure is an unhealthy node, with the reason."""
    try:
        health_path = "/health"
        r = client.get(base_url + health_path, **request_kwargs)
        if r.status_code != 200:
            return ProbeResult(False, error=f"{health_path} answered HTTP {r.status_code}")
        try:
            info = _json(client.get(base_url + "/info", **request_kwargs))
        except ValueError as exc:
            if engine == "openai":
                models = _json(client.get(base_url + "/v1/models", **request_kwargs))
                data = models.get("data") or [{}]
                model_id = data[0].get("id") if isinstance(data[0], dict) else None
                return ProbeResult(True, model_id if isinstance(model_id, str) else None, None,
                                   "the engine reports no revision (/info unavailable)")
            return ProbeResult(False, error=f"/info: {exc}")
        model_id, revision = info.get("model_id"), info.get("model_sha")
        return ProbeResult(
            True,
            model_id if isinstance(model_id, str) else None,
            revision if isinstance(revision, str) else None,
        )
    except (httpx.HTTPError, ValueError) as exc:
        return ProbeResult(False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
