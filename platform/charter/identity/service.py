"""Identity rules: users, roles, API keys (shown once, stored hashed), authentication."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from charter import scope
from charter.actor import SYSTEM, Actor
from charter.db import utcnow
from charter.errors import (
    ConflictError,
    ForbiddenError,
    NotFoundError,
    StaleVersionError,
    UnauthenticatedError,
    ValidationFailedError,
)
from charter.identity.access import can_manage_keys, can_manage_team, memberships, visible_user
from charter.identity.models import ROLES, USER_KINDS, ApiKey, Team, User, UserRole
from charter.uow import record, unit_of_work

KEY_PREFIX = "chk"
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{1,99}$")
_LAST_USED_RESOLUTION = timedelta(minutes=5)


def _field_error(field: str, code: str, message: str) -> ValidationFailedError:
    return ValidationFailedError(
        message, details={"errors": [{"field": field, "code": code, "message": message}]}
    )


def _check_roles(roles: list[str]) -> None:
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise _field_error("roles", "unknown_role", f"unknown roles: {', '.join(unknown)}")


def actor_of(user: User) -> Actor:
    return Actor(
        user_id=user.id, username=user.username, kind=user.kind, roles=frozenset(user.roles)
    )


def create_user(
    actor: Actor, *, username: str, display_name: str = "", kind: str = "user",
    roles: list[str] | None = None,
) -> User:
    actor.require("admin", action="user.create", target_type="user", target_id=username)
    if not _USERNAME.match(username):
        raise _field_error(
            "username", "invalid",
            "usernames are 2-100 characters: lower-case letters, digits, . _ @ -",
        )
    if kind not in USER_KINDS:
        raise _field_error("kind", "invalid", f"kind must be one of {', '.join(USER_KINDS)}")
    roles = sorted(set(roles or []))
    _check_roles(roles)
    with unit_of_work() as session:
        if session.scalar(select(User.id).where(User.username == username)):
            raise ConflictError(
                f"a user named {username!r} already exists", code="user_exists"
            )
        user = User(
            id=str(uuid.uuid4()), username=username, display_name=display_name, kind=kind,
            role_rows=[UserRole(role=r) for r in roles],
        )
        session.add(user)
        session.flush()
        record(
            session, actor=actor.ref, action="user.create", target_type="user", target_id=user.id,
            details={"username": username, "kind": kind, "roles": roles},
        )
        return user


def _visible_user(session: Session, actor: Actor, user_id: str) -> User:
    user = session.get(User, user_id)
    if user is None or not visible_user(session, actor, user):
        raise NotFoundError(f"no user {user_id}", code="user_not_found")
    return user


def active_actor(user_id: str) -> Actor | None:
    """The user as an actor, or None when the user is gone or inactive."""
    with unit_of_work() as session:
        user = session.get(User, user_id)
        return actor_of(user) if user is not None and user.active else None


def get_user(actor: Actor, user_id: str) -> User:
    """Self, admins, auditors, and members of a service account's team; else 404."""
    with unit_of_work() as session:
        return _visible_user(session, actor, user_id)


def list_users() -> list[User]:
    with unit_of_work() as session:
        return list(session.scalars(select(User).order_by(User.username)))


def set_roles(actor: Actor, user_id: str, roles: list[str], *, row_version: int) -> User:
    actor.require("admin", action="user.set_roles", target_type="user", target_id=user_id)
    roles = sorted(set(roles))
    _check_roles(roles)
    with unit_of_work() as session:
        user = session.get(User, user_id)
        if user is None:
            raise NotFoundError(f"no user {user_id}", code="user_not_found")
        if user.row_version != row_version:
            raise StaleVersionError(
                "the user was changed by someone else; reload it and try again",
                details={"current_row_version": user.row_version},
            )
        before = user.roles
        if "admin" in before and "admin" not in roles and _other_admins(session, user.id) == 0:
            raise ForbiddenError(
                "the last active admin cannot lose the admin role", code="last_admin"
            ).audited(actor.ref, "user.set_roles", "user", user_id)
        user.role_rows = [UserRole(role=r) for r in roles]
        user.row_version += 1
        session.flush()
        record(
            session, actor=actor.ref, action="user.set_roles",
            target_type="user", target_id=user.id,
            details={"before": before, "after": roles},
        )
        return user


def _other_admins(session, user_id: str) -> int:  # type: ignore[no-untyped-def]
    return len(
        session.scalars(
            select(UserRole.user_id)
            .join(User, User.id == UserRole.user_id)
            .where(UserRole.role == "admin", User.active.is_(True), User.id != user_id)
        ).all()
    )


@dataclass(frozen=True, slots=True)
class IssuedKey:
    key: ApiKey
    token: str  # shown once, never stored


def create_api_key(
    actor: Actor, user_id: str, *, name: str, expires_at: datetime | None = None,
    default_ttl_days: int = 90, limits: dict[str, Any] | None = None,
) -> IssuedKey:
    now = utcnow()
    expires_at = expires_at or now + timedelta(days=default_ttl_days)
    if expires_at <= now:
        raise _field_error("expires_at", "in_past", "expires_at must be in the future")
    if not name.strip() or len(name) > 100:
        raise _field_error("name", "invalid", "name must be 1-100 characters")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    with unit_of_work() as session:
        user = _visible_user(session, actor, user_id)
        if not user.active:
            raise NotFoundError(f"no active user {user_id}", code="user_not_found")
        if not can_manage_keys(session, actor, user):
            raise ForbiddenError(
                "API keys are created by their owner, an admin, or the team's managers",
                details={"action": "api_key.create"},
            ).audited(actor.ref, "api_key.create", "user", user_id)
        key = ApiKey(
            id=key_id, user_id=user_id, name=name, secret_sha256=_digest(secret),
            created_by=actor.ref, expires_at=expires_at, limits=limits or None,
        )
        session.add(key)
        session.flush()
        record(
            session, actor=actor.ref, action="api_key.create",
            target_type="api_key", target_id=key_id,
            details={"user_id": user_id, "name": name, "expires_at": expires_at.isoformat(),
                     "limits": limits or None},
        )
        return IssuedKey(key=key, token=f"{KEY_PREFIX}_{key_id}_{secret}")


def list_api_keys(actor: Actor, user_id: str) -> list[ApiKey]:
    with unit_of_work() as session:
        _visible_user(session, actor, user_id)
        return list(
            session.scalars(
                select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at)
            )
        )


def revoke_api_key(actor: Actor, key_id: str) -> ApiKey:
    with unit_of_work() as session:
        key = session.get(ApiKey, key_id)
        owner = session.get(User, key.user_id) if key is not None else None
        if key is None or owner is None or not visible_user(session, actor, owner):
            raise NotFoundError(f"no API key {key_id}", code="api_key_not_found")
        if not can_manage_keys(session, actor, owner):
            raise ForbiddenError(
                "API keys are revoked by their owner, an admin, or the team's managers",
                details={"action": "api_key.revoke"},
            ).audited(actor.ref, "api_key.revoke", "api_key", key_id)
        if key.revoked_at is not None:
            raise ConflictError("the API key is already revoked", code="already_revoked")
        key.revoked_at = utcnow()
        session.flush()
        record(
            session, actor=actor.ref, action="api_key.revoke",
            target_type="api_key", target_id=key_id,
            details={"user_id": key.user_id},
        )
        return key


def set_api_key_limits(actor: Actor, key_id: str, limits: dict[str, Any] | None) -> ApiKey:
    """Replace a key's own limits (None: only its team's apply). Admins and the managers
    of the owner's team: the owner could otherwise lift a limit put on their key."""
    with unit_of_work() as session:
        key = session.get(ApiKey, key_id)
        owner = session.get(User, key.user_id) if key is not None else None
        if key is None or owner is None or not visible_user(session, actor, owner):
            raise NotFoundError(f"no API key {key_id}", code="api_key_not_found")
        if not actor.has("admin") and (owner.id == actor.user_id
                                       or not can_manage_keys(session, actor, owner)):
            raise ForbiddenError(
                "a key's limits are set by an admin or the managers of its owner's team",
                details={"action": "api_key.set_limits"},
            ).audited(actor.ref, "api_key.set_limits", "api_key", key_id)
        before = key.limits
        key.limits = limits or None
        session.flush()
        record(session, actor=actor.ref, action="api_key.set_limits", target_type="api_key",
               target_id=key_id, details={"user_id": key.user_id, "before": before,
                                          "after": limits or None})
        return key


def _digest(secret: str) -> str:
    # Secrets are 256 random bits, so one SHA-256 is enough: nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _KeyRecord:
    secret_sha256: str
    expires_at: datetime
    revoked: bool
    last_used_at: datetime | None
    actor: Actor | None  # None: the user is gone or inactive


def _load_key(key_id: str) -> _KeyRecord | None:
    with unit_of_work() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            return None
        user = session.get(User, key.user_id)
        actor = (dataclasses.replace(actor_of(user), key_id=key.id)
                 if user is not None and user.active else None)
        return _KeyRecord(key.secret_sha256, key.expires_at, key.revoked_at is not None,
                          key.last_used_at, actor)


def authenticate_api_key(token: str, *, generation: int | None = None) -> Actor:
    """Map a presented key to its actor, or raise UnauthenticatedError (never says why).

    The key's row is read through the read cache of `generation` (charter.readcache), which
    any committed change to keys, users or roles invalidates; the secret and the expiry
    are checked on every call.
    """
    rt = scope.current()
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not re.fullmatch(r"[0-9a-f]{16}", parts[1]):
        raise UnauthenticatedError("invalid API key", code="invalid_credentials")
    record = rt.readcache.cached(generation, ("api_key", parts[1]),
                                 lambda: _load_key(parts[1]))
    now = utcnow()
    if (
        record is None
        or not hmac.compare_digest(record.secret_sha256, _digest(parts[2]))
        or record.revoked
        or record.expires_at <= now
        or record.actor is None
    ):
        raise UnauthenticatedError("invalid API key", code="invalid_credentials")
    # The cached row keeps the old last_used_at (that column does not advance the change
    # generation, migration 0006), so this process remembers its own writes.
    touches = rt.authenticator.key_touches
    last = max(filter(None, (record.last_used_at, touches.get(parts[1]))), default=None)
    if last is None or now - last > _LAST_USED_RESOLUTION:
        touches[parts[1]] = now
        with unit_of_work() as session:
            key = session.get(ApiKey, parts[1])
            if key is not None:
                key.last_used_at = now
    return record.actor


def bootstrap_admin(username: str, *, key_name: str = "bootstrap") -> IssuedKey:
    """Create the first admin and a key for it (CLI only: the actor is the system)."""
    with unit_of_work() as session:
        if session.scalar(
            select(UserRole.user_id)
            .join(User, User.id == UserRole.user_id)
            .where(UserRole.role == "admin", User.active.is_(True))
            .limit(1)
        ):
            raise ConflictError(
                "an admin exists already: ask them to create users and keys through the API",
                code="already_bootstrapped",
            )
        user = create_user(SYSTEM, username=username, roles=["admin"])
        return create_api_key(SYSTEM, user.id, name=key_name)


def scim_credential(name: str) -> IssuedKey:
    """The identity provider's SCIM credential: a user of kind `provisioner` named
    `scim-<name>` (made the first time) and a new API key for it, which opens /scim/v2
    and nothing else (CLI only; rotate by running it again and revoking the old key)."""
    username = f"scim-{name}"
    if not _USERNAME.match(username):
        raise _field_error("name", "invalid", "a provider's name: letters, digits, . _ @ -")
    with unit_of_work() as session:
        user_id = session.scalar(select(User.id).where(User.username == username))
        kind = session.scalar(select(User.kind).where(User.username == username))
    if user_id is not None and kind != "provisioner":
        raise ConflictError(f"{username!r} is a user that is not a SCIM credential",
                            code="user_exists")
    if user_id is None:
        user_id = create_user(SYSTEM, username=username, kind="provisioner",
                              display_name=f"SCIM provisioning by {name}").id
    return create_api_key(SYSTEM, user_id, name=f"scim {utcnow():%Y-%m-%d}")


def person_record(user_id: str) -> dict[str, Any] | None:
    """A person's account and keys as the offboarding evidence shows them (no secret, no
    digest): None when there is no such user."""
    with unit_of_work() as session:
        user = session.get(User, user_id)
        if user is None:
            return None
        keys = session.scalars(select(ApiKey).where(ApiKey.user_id == user_id)
                               .order_by(ApiKey.created_at)).all()
        return {
            "id": user.id, "username": user.username, "display_name": user.display_name,
            "kind": user.kind, "source": user.source, "external_id": user.external_id,
            "external_issuer": user.external_issuer, "active": user.active,
            "roles": user.roles, "created_at": user.created_at,
            "last_login_at": user.last_login_at, "deprovisioned_at": user.deprovisioned_at,
            "keys": [{"id": k.id, "name": k.name, "created_at": k.created_at,
                      "created_by": k.created_by, "expires_at": k.expires_at,
                      "revoked_at": k.revoked_at, "last_used_at": k.last_used_at}
                     for k in keys]}


# --- reads for the console (it never queries identity's tables itself) ---------------------

def user_id_by_name(username: str) -> str:
    """The id of the user named `username` (404 otherwise, as for one the actor cannot see)."""
    with unit_of_work() as session:
        found = session.scalar(select(User.id).where(User.username == username.strip()))
    if found is None:
        raise NotFoundError(f"no user {username.strip()[:100]}", code="user_not_found")
    return found


def active_user_named(username: str) -> Actor:
    """The active user `username` as an actor (the CLI acts as one)."""
    with unit_of_work() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None or not user.active:
            raise NotFoundError(f"no active user {username!r}", code="user_not_found")
        return actor_of(user)


def team_roles_of(user_id: str) -> dict[str, str]:
    """team id -> the user's role in it."""
    with unit_of_work() as session:
        return memberships(session, user_id)


def may_manage_team(actor: Actor, team_id: str) -> bool:
    with unit_of_work() as session:
        return can_manage_team(session, actor, team_id)


def may_manage_keys(actor: Actor, user: User) -> bool:
    with unit_of_work() as session:
        return can_manage_keys(session, actor, user)


def last_activity() -> dict[str, datetime]:
    """user id -> its latest sign-in or use of one of its keys (the console's users list)."""
    with unit_of_work() as session:
        out: dict[str, datetime] = {}
        rows = [*session.execute(select(User.id, User.last_login_at)),
                *session.execute(select(ApiKey.user_id, func.max(ApiKey.last_used_at))
                                 .group_by(ApiKey.user_id))]
        for user_id, when in rows:
            if when is not None and (user_id not in out or when > out[user_id]):
                out[user_id] = when
        return out


def team_names() -> dict[str, str]:
    """team id -> name, for every team."""
    with unit_of_work() as session:
        return {t_id: name for t_id, name in session.execute(select(Team.id, Team.name))}

