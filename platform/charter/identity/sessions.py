"""Server-side console sessions: start at SSO login, load on each request, end at logout.

The browser holds only a random id; the database keeps its SHA-256, the per-session CSRF
token and the timestamps. Roles and teams are read from the database on every load, so a
change made by an admin takes effect on the next request.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from charter.actor import Actor
from charter.db import utcnow
from charter.errors import ForbiddenError, NotFoundError
from charter.identity.models import ConsoleSession, Team, TeamMember, User
from charter.identity.service import actor_of
from charter.identity.sso import provision
from charter.settings import Settings
from charter.uow import record, unit_of_work

# last_seen_at is written at most this often: an idle timeout accurate to ~30 s is enough,
# and it spares a database write on every request.
TOUCH_INTERVAL = timedelta(seconds=30)
_MAX_ID_TOKEN_HINT = 4096  # the column's size; a longer token is simply not kept


def digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class StartedSession:
    session_id: str  # the raw id: goes into the cookie, never stored
    actor: Actor
    ended_previous: bool


@dataclass(frozen=True, slots=True)
class LoadedSession:
    id_sha256: str
    actor: Actor
    display_name: str
    email: str | None
    csrf_token: str
    teams: list[tuple[str, str]]  # (team name, team role), by name
    expires_at: datetime


def start_session(settings: Settings, claims: dict[str, Any], *, id_token: str | None,
                  previous_id: str | None) -> StartedSession:
    """Provision the user behind verified ID-token claims and open a new session.

    The browser's previous session, if any, is ended first: the id always rotates at login.
    User, session and audit events commit together or not at all.
    """
    now = utcnow()
    session_id = secrets.token_urlsafe(32)
    id_sha256 = digest(session_id)
    with unit_of_work() as session:
        actor = provision(settings, claims, via="console")
        ended_previous = False
        if previous_id:
            old = session.get(ConsoleSession, digest(previous_id))
            if old is not None and old.ended_at is None:
                old.ended_at = now
                ended_previous = True
        hint = id_token if id_token and len(id_token) <= _MAX_ID_TOKEN_HINT else None
        session.add(ConsoleSession(
            id_sha256=id_sha256, user_id=actor.user_id, created_at=now, last_seen_at=now,
            expires_at=now + timedelta(seconds=settings.session_max_age_s),
            csrf_token=secrets.token_urlsafe(32), id_token_hint=hint,
        ))
        session.flush()
        record(session, actor=actor.ref, action="auth.login", target_type="user",
                     target_id=actor.user_id,
                     details={"via": "console", "issuer": str(claims.get("iss", "")),
                              "session": id_sha256[:16], "rotated": ended_previous})
    return StartedSession(session_id, actor, ended_previous)


def load_session(settings: Settings, session_id: str) -> LoadedSession | None:
    """The live session behind a cookie value, or None; ends it if it has gone idle."""
    if not session_id or len(session_id) > 128:
        return None
    now = utcnow()
    with unit_of_work() as session:
        row = session.get(ConsoleSession, digest(session_id))
        if row is None or row.ended_at is not None or row.expires_at <= now:
            return None
        user = session.get(User, row.user_id)
        idle = now - row.last_seen_at > timedelta(seconds=settings.session_idle_timeout_s)
        if user is None or not user.active or idle:
            row.ended_at = now
            return None
        if now - row.last_seen_at >= TOUCH_INTERVAL:
            row.last_seen_at = now
        teams = session.execute(
            select(Team.name, TeamMember.team_role)
            .join(TeamMember, TeamMember.team_id == Team.id)
            .where(TeamMember.user_id == user.id)
            .order_by(Team.name)
        ).all()
        return LoadedSession(
            id_sha256=row.id_sha256, actor=actor_of(user), display_name=user.display_name,
            email=user.email, csrf_token=row.csrf_token,
            teams=[(t.name, t.team_role) for t in teams], expires_at=row.expires_at,
        )


def end_session(id_sha256: str, actor: Actor) -> str | None:
    """End a session at logout; returns its ID token hint for the IdP's logout."""
    with unit_of_work() as session:
        row = session.get(ConsoleSession, id_sha256)
        if row is None or row.ended_at is not None:
            return None
        row.ended_at = utcnow()
        record(session, actor=actor.ref, action="auth.logout", target_type="user",
                     target_id=actor.user_id,
                     details={"via": "console", "session": id_sha256[:16]})
        return row.id_token_hint


def record_login_failure(*, reason: str, client: str, issuer: str,
                         subject: str | None = None, idp_error: str | None = None) -> None:
    """Audit a refused SSO callback. Never given codes or tokens: only what went wrong."""
    details: dict[str, Any] = {"reason": reason, "via": "console", "issuer": issuer,
                               "client": client}
    if subject:
        details["subject"] = subject
    if idp_error:
        details["idp_error"] = idp_error
    with unit_of_work() as session:
        record(session, actor="anonymous", action="auth.login_failed", target_type="auth",
                     target_id="console", outcome="denied", details=details)


def start_demo_session(settings: Settings, user_id: str) -> StartedSession:
    """The embedded demo's sign-in (no identity provider): a session for a seeded user.
    Refused unless Charter runs in demo mode; audited like an SSO login."""
    if not settings.demo:
        raise ForbiddenError("only the embedded demo signs in without SSO", code="forbidden")
    now = utcnow()
    session_id = secrets.token_urlsafe(32)
    with unit_of_work() as session:
        user = session.get(User, user_id)
        if user is None or not user.active or user.kind != "user":
            raise NotFoundError("no such demo user", code="user_not_found")
        session.add(ConsoleSession(
            id_sha256=digest(session_id), user_id=user.id, created_at=now, last_seen_at=now,
            expires_at=now + timedelta(seconds=settings.session_max_age_s),
            csrf_token=secrets.token_urlsafe(32), id_token_hint=None))
        session.flush()
        actor = actor_of(user)
        record(session, actor=actor.ref, action="auth.login", target_type="user",
                     target_id=user.id, details={"via": "console-demo",
                                                 "session": digest(session_id)[:16]})
    return StartedSession(session_id, actor, False)
