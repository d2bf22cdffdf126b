"""What every `charter ...` command shares: the settings, the command's Runtime, actors by
name, and errors printed plainly (exit 2) instead of tracebacks."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console

from charter import scope
from charter.actor import Actor
from charter.boot import build_runtime
from charter.errors import CharterError, SchemaOutdatedError
from charter.identity import service as identity
from charter.logs import configure_logging
from charter.migrate import schema_status
from charter.runtime import Runtime
from charter.settings import Settings

console = Console(stderr=True)


def settings_from_env(**overrides: Any) -> Settings:
    return Settings.from_env(None, **overrides)


def fail(exc: CharterError) -> None:
    console.print(f"[bold red]error[/] ({exc.code}): {exc.message}")
    for key, value in exc.details.items():
        console.print(f"  {key}: {value}")
    sys.exit(2)


class CharterGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CharterError as exc:
            fail(exc)
        return None


def command_runtime(settings: Settings | None = None) -> Runtime:
    """This command's Runtime: built once from the settings, the schema checked, bound
    (charter.scope) until the command ends, then closed."""
    settings = settings or settings_from_env()
    configure_logging(settings)
    ctx = click.get_current_context()
    runtime = build_runtime(settings)
    ctx.call_on_close(runtime.close)
    status = schema_status(runtime.database.engine)
    if not status.current:
        raise SchemaOutdatedError(status.message, details=status.as_dict())
    ctx.with_resource(scope.bound(runtime))
    return runtime


def actor_named(username: str) -> Actor:
    """The active user `username`, as the actor a command acts as."""
    return identity.active_user_named(username)
