"""Apps over runtimes of their own, for tests that need other settings than the fixture's;
each is closed when the test ends (conftest's autouse fixture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import Token
from typing import TypeVar

from flask import Flask

from charter import scope
from charter.app import create_app
from charter.boot import build_runtime
from charter.runtime import Runtime
from charter.scope import Scope
from charter.settings import Settings

T = TypeVar("T")

_open: list[Runtime] = []


def runtime_for(settings: Settings) -> Runtime:
    made = build_runtime(settings)
    _open.append(made)
    return made


def app_for(settings: Settings) -> Flask:
    return create_app(runtime_for(settings))


def mark() -> tuple[int, int]:
    return len(_open), len(_bound)


def close_runtimes(since: tuple[int, int] = (0, 0)) -> None:
    """Close what was made after `since` (a test's, not its module fixtures')."""
    while len(_bound) > since[1]:
        release_runtime()
    while len(_open) > since[0]:
        _open.pop().close()


@contextmanager
def bound_runtime(settings: Settings) -> Iterator[Runtime]:
    """A Runtime of its own, bound for the block (a test's second database, say)."""
    made = build_runtime(settings)
    try:
        with scope.bound(made):
            yield made
    finally:
        made.close()


_bound: list[tuple[Runtime, Token[Scope | None]]] = []


def bind_runtime(settings: Settings) -> Runtime:
    """Build a Runtime and bind it here until release_runtime() (or the test's end)."""
    made = build_runtime(settings)
    _bound.append((made, scope.bind(made)))
    return made


def release_runtime() -> None:
    made, token = _bound.pop()
    scope.unbind(token)
    made.close()


def flush_outcomes() -> bool:
    """Write the outcome events every runtime of this test still queues (they are written
    after the answer); True when nothing is left anywhere."""
    runtimes = [*_open, *(r for r, _ in _bound)]
    current = scope.maybe_current()
    if current is not None:
        runtimes.append(current)
    return all([r.writer.flush() for r in runtimes])


def with_current_runtime(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` for another thread, run with this thread's Runtime bound there (and nothing
    else of this context: that thread opens its own units of work)."""
    runtime = scope.current()

    def run(*args: object) -> T:
        with scope.bound(runtime):
            return fn(*args)

    return run
