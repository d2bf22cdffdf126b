"""The server-rendered console: SSO login, server-side sessions, CSRF, security headers."""

from __future__ import annotations

from flask import Flask

from charter.settings import Settings


def register_console(app: Flask, settings: Settings) -> None:
    """Mount the console blueprint at /console on `app`."""
    from charter.console.views import install

    install(app, settings)


__all__ = ["register_console"]
