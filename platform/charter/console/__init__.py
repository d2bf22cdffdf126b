"""The server-rendered console: SSO login, server-side sessions, CSRF, security headers."""

from __future__ import annotations

from flask import Flask

from charter.console import pages  # noqa: F401 - the pages' routes, on the blueprint
from charter.console.views import install
from charter.settings import Settings


def register_console(app: Flask, settings: Settings) -> None:
    """Mount the console blueprint, with its pages, at /console on `app`."""
    install(app, settings)


__all__ = ["register_console"]
