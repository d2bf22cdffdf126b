"""Per-request context (request id) that services and logs read without importing Flask."""

from __future__ import annotations

import contextvars

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "charter_request_id", default=None
)


def current_request_id() -> str | None:
    return request_id_var.get()
