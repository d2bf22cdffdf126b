"""What every console page shares: the role-aware navigation, rendering with the signed-in
person, and form actions that answer with a notice or the refusal, never a bare error.

Every action is enforced again by the service it calls (the actor is passed along); the
console only leaves out what a role may not use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import current_app, flash, g, redirect, render_template, request
from markupsafe import Markup
from pydantic import ValidationError
from werkzeug.wrappers import Response

from charter.errors import CharterError

ALL = ("admin", "steward", "approver", "operator", "auditor", "user")


@dataclass(frozen=True)
class NavItem:
    section: str
    label: str
    endpoint: str
    roles: tuple[str, ...]


NAV = (
    NavItem("overview", "Overview", "console.home", ALL),
    NavItem("models", "Models", "console.models", ALL),
    NavItem("nodes", "Nodes", "console.nodes", ("admin", "operator", "auditor")),
    NavItem("policies", "Policies", "console.policies", ALL),
    NavItem("audit", "Audit", "console.audit", ("admin", "auditor")),
    NavItem("access", "Access", "console.access", ALL),
    NavItem("batches", "Batches", "console.batches", ALL),
    NavItem("usage", "Usage", "console.usage_page", ALL),
    NavItem("inspection", "Inspection", "console.inspection", ("admin", "auditor")),
)


def can(*roles: str) -> bool:
    """Whether the signed-in person holds one of these roles (what to offer, not what to
    allow: services decide that)."""
    return bool(g.get("actor")) and g.actor.has(*roles)


def render(template: str, *, section: str, title: str, status: int = 200,
           **context: Any) -> Response:
    views = current_app.view_functions
    nav = [item for item in NAV if can(*item.roles) and item.endpoint in views]
    html = render_template(template, me=g.console, nav=nav, section=section, title=title,
                           can=can, **context)
    return Response(html, status=status, mimetype="text/html")


def problems(exc: Exception) -> list[str]:
    """Readable lines for a refusal: the message and each field error."""
    if isinstance(exc, ValidationError):
        return [f"{'.'.join(str(p) for p in e['loc']) or 'form'}: {e['msg']}"
                for e in exc.errors()]
    assert isinstance(exc, CharterError)
    lines = [exc.message]
    for e in exc.details.get("errors", []) if isinstance(exc.details, dict) else []:
        if isinstance(e, dict):
            lines.append(f"{e.get('field', 'form')}: {e.get('message', e.get('code', ''))}")
    return lines


def action(back: Callable[..., str]) -> Callable[[Callable[..., str]], Callable[..., Response]]:
    """A POST handler: it returns the notice to show; a refusal (CharterError, a form that
    does not validate) becomes an error notice with its code. Either way the browser goes
    back to `back(**view_args)` with 303, so a reload never repeats the action."""
    def decorate(fn: Callable[..., str]) -> Callable[..., Response]:
        @wraps(fn)
        def view(**kwargs: Any) -> Response:
            try:
                flash(fn(**kwargs), "ok")
            except (CharterError, ValidationError) as exc:
                code = exc.code if isinstance(exc, CharterError) else "validation_failed"
                for i, line in enumerate(problems(exc)):
                    flash(f"{line} ({code})" if i == 0 else line, "error")
            return redirect(back(**kwargs), code=303)
        return view
    return decorate


def form_list(name: str) -> list[str]:
    """A comma- or line-separated form field as a list of trimmed, non-empty values."""
    raw = request.form.get(name, "")
    return [v.strip() for v in raw.replace("\n", ",").split(",") if v.strip()]


def markdown(text: str) -> Markup:
    """A model card's Markdown as HTML a page may include: CommonMark with raw HTML off
    (a `<script>` in a card is text), tables on, links only to http(s) and mailto, and
    images shown as their text (a card must not make the console fetch anything)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
    md.validateLink = lambda url: url.strip().lower().startswith(  # type: ignore[method-assign]
        ("http://", "https://", "mailto:", "#"))
    md.disable("image")
    return Markup(md.render(text))  # noqa: S704 - rendered with raw HTML disabled
