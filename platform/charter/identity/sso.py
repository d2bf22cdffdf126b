"""Just-in-time provisioning from identity-provider claims: user, roles and teams.

The identity provider is the source of truth for the roles and team memberships it maps:
they are synchronised at every login and every JWT-authenticated request, so a change in
the IdP takes effect on the next request. Roles granted in Charter to users the mapping
does not cover stay as they are.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from charter.actor import Actor
from charter.db import utcnow
from charter.errors import UnauthenticatedError
from charter.identity.models import ROLES, Team, TeamMember, User, UserRole
from charter.identity.service import actor_of
from charter.settings import Settings
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.sso")
_UNSAFE = re.compile(r"[^a-z0-9._@-]+")


def groups_of(claims: dict[str, Any], claim: str) -> list[str]:
    value = claims.get(claim, [])
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list):
        return []
    return sorted({g for g in value if isinstance(g, str)})


def mapped_roles(settings: Settings, groups: Iterable[str]) -> list[str] | None:
    """Roles the mapping gives these groups; None when no mapping is configured."""
    mapping = settings.role_map
    if not mapping:
        return None
    roles = {r for g in groups for r in mapping.get(g, []) if r in ROLES}
    return sorted(roles or {"user"})


def _username(session: Session, claims: dict[str, Any]) -> str:
    base = str(claims.get("preferred_username") or claims.get("email") or claims["sub"])
    base = _UNSAFE.sub("-", base.lower()).strip("-.")[:80] or "user"
    if len(base) < 2:
        base = f"user-{base}"
    name, n = base, 1
    while session.scalar(select(User.id).where(User.username == name)) is not None:
        n += 1
        name = f"{base}-{n}"
    return name


def _provisioned(session: Session, claims: dict[str, Any], issuer: str, subject: str,
                 via: str) -> User | None:
    """The account the identity provider made over SCIM for the person now signing in for
    the first time, linked to this subject (`user.linked`); None when there is none. The
    match is on the provider's immutable id only: the SCIM `externalId` equal to the
    token's `oid` (Entra ID's object id, its default SCIM externalId) or `sub` (Okta's
    user id); never on a user name or an e-mail address, which a person may be able to
    set for themselves at their provider and so claim someone else's account."""
    ids = {str(claims[k]) for k in ("oid", "sub") if isinstance(claims.get(k), str)
           and claims[k]}
    if not ids:
        return None
    user = session.scalar(select(User).where(
        User.source == "scim", User.kind == "user", User.external_subject.is_(None),
        User.scim_deleted_at.is_(None), User.external_id.in_(ids)).limit(1))
    if user is None:
        return None
    user.external_issuer, user.external_subject = issuer, subject
    user.row_version += 1
    session.flush()
    record(session, actor=f"user:{user.username}", action="user.linked", target_type="user",
           target_id=user.id, details={"issuer": issuer, "via": via,
                                       "matched": "externalId"})
    return user


def provision(settings: Settings, claims: dict[str, Any], *, via: str) -> Actor:
    """Find or create the user behind verified claims and bring roles and teams in line."""
    issuer, subject = claims.get("iss"), claims.get("sub")
    if not isinstance(issuer, str) or not isinstance(subject, str) or not subject:
        raise UnauthenticatedError("the token names no subject", code="claims_missing")
    groups = groups_of(claims, settings.oidc_groups_claim)
    with unit_of_work() as session:
        user = session.scalar(select(User).where(User.external_issuer == issuer,
                                                 User.external_subject == subject))
        if user is None:
            user = _provisioned(session, claims, issuer, subject, via)
        if user is None:
            user = User(id=str(uuid.uuid4()), username=_username(session, claims),
                        display_name=str(claims.get("name") or "")[:200],
                        email=str(claims["email"])[:320] if claims.get("email") else None,
                        kind="user", source="sso", external_issuer=issuer,
                        external_subject=subject,
                        role_rows=[])
            session.add(user)
            session.flush()
            record(session, actor=f"user:{user.username}", action="user.provision",
                         target_type="user", target_id=user.id,
                         details={"issuer": issuer, "via": via, "groups": groups})
        if not user.active:
            raise UnauthenticatedError("the account is disabled", code="account_disabled")
        sync_groups(session, settings, user, groups, via=via, actor=f"user:{user.username}")
        if via == "console":
            user.last_login_at = utcnow()
        return actor_of(user)


def sync_groups(session: Session, settings: Settings, user: User, groups: list[str], *,
                via: str, actor: str) -> None:
    """Bring a user's roles (with a role map) and provider-granted teams (with a team map)
    in line with the provider's groups it is in: an SSO token's groups claim, or its SCIM
    groups (`user.roles_synced` when the roles change)."""
    roles = mapped_roles(settings, groups)
    if roles is not None and roles != user.roles:
        before = user.roles
        user.role_rows = [UserRole(role=r) for r in roles]
        user.row_version += 1
        session.flush()
        record(session, actor=actor, action="user.roles_synced", target_type="user",
               target_id=user.id, details={"before": before, "after": roles,
                                           "groups": groups, "via": via})
    sync_teams(session, settings, user, groups, via)


def sync_teams(session: Session, settings: Settings, user: User, groups: list[str],
                via: str) -> None:
    mapping = settings.team_map
    if not mapping:
        return
    wanted_names = {mapping[g] for g in groups if g in mapping}
    teams = {t.name: t for t in session.scalars(select(Team).where(Team.name.in_(
        set(mapping.values()))))}
    missing = sorted(wanted_names - set(teams))
    if missing:
        log.warning("teams named in CHARTER_OIDC_TEAM_MAP do not exist", teams=missing)
    wanted = {teams[n].id for n in wanted_names if n in teams}
    memberships = list(session.scalars(select(TeamMember).where(TeamMember.user_id == user.id)))
    current = {m.team_id: m for m in memberships if m.source == "idp"}
    added = sorted(wanted - {m.team_id for m in memberships})  # granted in Charter: kept
    removed = sorted(set(current) - wanted)
    for team_id in added:
        session.add(TeamMember(team_id=team_id, user_id=user.id, source="idp"))
    for team_id in removed:
        session.delete(current[team_id])
    if added or removed:
        session.flush()
        record(session, actor=f"user:{user.username}", action="user.teams_synced",
                     target_type="user", target_id=user.id,
                     details={"added": added, "removed": removed, "via": via})
