"""Which Runtime the code running now belongs to, and which request it serves.

An entry point binds its Runtime for the length of its work: the app for each request, a
task for its run, a CLI command, a test. Services reach the database, the policy engine and
the audit writer through `current()`; the audit log stamps events with `request_id()`.
The binding is per context (contextvars): two Runtimes in one process, bound in different
threads or requests, never see each other's parts. A thread that a part starts for itself
(the audit flusher, a task pool) is given what it needs when it is made, or binds.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from charter.runtime import Runtime


@dataclass(frozen=True, slots=True)
class Scope:
    runtime: Runtime
    request_id: str | None = None


_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar(
    "charter_scope", default=None)


class NotBoundError(RuntimeError):
    """Code that needs a Runtime ran outside every entry point's binding."""


def current() -> Runtime:
    """The Runtime bound in this context."""
    scope = _scope.get()
    if scope is None:
        raise NotBoundError("no Charter runtime is bound here: bind one with "
                            "charter.scope.bound(runtime)")
    return scope.runtime


def maybe_current() -> Runtime | None:
    scope = _scope.get()
    return scope.runtime if scope is not None else None


def request_id() -> str | None:
    """The request (or batch line) whose work this is, for the audit log and logs."""
    scope = _scope.get()
    return scope.request_id if scope is not None else None


@contextmanager
def bound(runtime: Runtime, *, request_id: str | None = None) -> Iterator[Runtime]:
    """Bind `runtime` (and a request id) in this context for the block."""
    token = _scope.set(Scope(runtime, request_id))
    try:
        yield runtime
    finally:
        _scope.reset(token)


def bind(runtime: Runtime, *, request_id: str | None = None) -> contextvars.Token[Scope | None]:
    """Bind without a block (the web layer's request hooks); undo with `unbind(token)`."""
    return _scope.set(Scope(runtime, request_id))


def unbind(token: contextvars.Token[Scope | None]) -> None:
    _scope.reset(token)
