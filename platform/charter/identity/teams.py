"""Teams (tenants): members, service accounts, entitlements and quotas.

A team's objects (its service accounts and their keys) are visible only to its members,
admins and auditors; to anyone else they do not exist (404, never 403).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from charter import identifiers
from charter.actor import Actor
from charter.errors import ConflictError, ForbiddenError, NotFoundError, StaleVersionError
from charter.identity.access import READ_ALL, memberships, visible_user
from charter.identity.access import can_manage_team as can_manage
from charter.identity.models import ApiKey, Team, TeamMember, User, UserRole
from charter.identity.service import _USERNAME, _field_error
from charter.uow import record, unit_of_work


def _team(session: Session, actor: Actor, team_id: str) -> Team:
    team = session.get(Team, team_id)
    if team is None or not (
        actor.has(*READ_ALL) or team_id in memberships(session, actor.user_id)
    ):
        raise NotFoundError(f"no team {team_id}", code="team_not_found")
    return team


def create_team(actor: Actor, *, name: str, description: str, entitlements: dict[str, Any],
                requests_per_day: int | None, default_data_class: str,
                limits: dict[str, Any] | None = None) -> Team:
    actor.require("admin", action="team.create", target_type="team", target_id=name)
    with unit_of_work() as session:
        if session.scalar(select(Team.id).where(Team.name == name)):
            raise ConflictError(f"a team named {name!r} exists", code="team_exists")
        team = Team(id=str(uuid.uuid4()), name=name, description=description,
                    entitlements=entitlements, requests_per_day=requests_per_day,
                    default_data_class=default_data_class, limits=limits or None)
        session.add(team)
        session.flush()
        record(session, actor=actor.ref, action="team.create", target_type="team",
                     target_id=team.id,
                     details={"name": name, "entitlements": entitlements,
                              "requests_per_day": requests_per_day,
                              "default_data_class": default_data_class,
                              "limits": limits or None})
        return team


def list_teams(actor: Actor) -> list[Team]:
    with unit_of_work() as session:
        stmt = select(Team).order_by(Team.name)
        if not actor.has(*READ_ALL):
            stmt = stmt.where(Team.id.in_(list(memberships(session, actor.user_id))))
        return list(session.scalars(stmt))


def get_team(actor: Actor, team_id: str) -> Team:
    with unit_of_work() as session:
        return _team(session, actor, team_id)


def update_team(actor: Actor, team_id: str, changes: dict[str, Any], *,
                row_version: int) -> Team:
    with unit_of_work() as session:
        team = _team(session, actor, team_id)
        actor.require("admin", action="team.update", target_type="team", target_id=team_id)
        if team.row_version != row_version:
            raise StaleVersionError("the team was changed by someone else; reload it",
                                    details={"current_row_version": team.row_version})
        before = {k: getattr(team, k) for k in changes}
        for key, value in changes.items():
            setattr(team, key, value)
        team.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action="team.update", target_type="team",
                     target_id=team.id, details={"before": before, "after": changes})
        return team


def list_members(actor: Actor, team_id: str) -> list[tuple[User, TeamMember]]:
    with unit_of_work() as session:
        _team(session, actor, team_id)
        rows = session.execute(
            select(User, TeamMember).join(TeamMember, TeamMember.user_id == User.id)
            .where(TeamMember.team_id == team_id).order_by(User.username)
        ).all()
        return [(r[0], r[1]) for r in rows]


def set_member(actor: Actor, team_id: str, user_id: str, team_role: str) -> TeamMember:
    with unit_of_work() as session:
        _team(session, actor, team_id)
        if not can_manage(session, actor, team_id):
            raise ForbiddenError("only the team's managers and admins change its members"
                                 ).audited(actor.ref, "team.set_member", "team", team_id)
        user = session.get(User, user_id)
        if user is None or not visible_user(session, actor, user) and not actor.has("admin"):
            raise NotFoundError(f"no user {user_id}", code="user_not_found")
        if user.kind == "service":
            raise ConflictError("service accounts belong to one team and are not members",
                                code="service_account_member")
        member = session.get(TeamMember, (team_id, user_id))
        before = member.team_role if member else None
        if member is None:
            member = TeamMember(team_id=team_id, user_id=user_id, team_role=team_role)
            session.add(member)
        else:
            member.team_role = team_role
            member.source = "charter"
        session.flush()
        record(session, actor=actor.ref, action="team.set_member", target_type="team",
                     target_id=team_id,
                     details={"user_id": user_id, "before": before, "after": team_role})
        return member


def remove_member(actor: Actor, team_id: str, user_id: str) -> None:
    with unit_of_work() as session:
        _team(session, actor, team_id)
        if not can_manage(session, actor, team_id):
            raise ForbiddenError("only the team's managers and admins change its members"
                                 ).audited(actor.ref, "team.remove_member", "team", team_id)
        member = session.get(TeamMember, (team_id, user_id))
        if member is None:
            raise NotFoundError("not a member of this team", code="member_not_found")
        session.delete(member)
        session.flush()
        record(session, actor=actor.ref, action="team.remove_member", target_type="team",
                     target_id=team_id, details={"user_id": user_id})


def create_service_account(actor: Actor, team_id: str, *, username: str,
                           display_name: str = "") -> User:
    """A team's machine identity; it gets the `user` role (callers of models) only."""
    if not _USERNAME.match(username):
        raise _field_error("username", "invalid",
                           "usernames are 2-100 characters: lower-case letters, digits, . _ @ -")
    with unit_of_work() as session:
        _team(session, actor, team_id)
        if not can_manage(session, actor, team_id):
            raise ForbiddenError("only the team's managers and admins create service accounts"
                                 ).audited(actor.ref, "team.create_service_account", "team",
                                           team_id)
        if session.scalar(select(User.id).where(User.username == username)):
            raise ConflictError(f"a user named {username!r} already exists", code="user_exists")
        user = User(id=str(uuid.uuid4()), username=username, display_name=display_name,
                    kind="service", owner_team_id=team_id, role_rows=[UserRole(role="user")])
        session.add(user)
        session.flush()
        record(session, actor=actor.ref, action="team.create_service_account",
                     target_type="user", target_id=user.id,
                     details={"team_id": team_id, "username": username})
        return user


def list_service_accounts(actor: Actor, team_id: str) -> list[User]:
    with unit_of_work() as session:
        _team(session, actor, team_id)
        return list(session.scalars(select(User).where(User.owner_team_id == team_id)
                                    .order_by(User.username)))


@dataclass(frozen=True, slots=True)
class Entitlements:
    models: tuple[str, ...] = ()
    data_classes: tuple[str, ...] = ()
    regions: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, list[str]]:
        return {"models": list(self.models),
                "data_classes": identifiers.stored(list(self.data_classes)),
                "regions": identifiers.stored(list(self.regions))}


@dataclass(frozen=True, slots=True)
class CallerContext:
    """What dispatch needs about a caller: teams, merged entitlements, and the team whose
    quota and default data class apply (a service account's own team, else the first by
    name)."""

    team: str | None
    team_id: str  # "" for no team
    teams: tuple[str, ...]
    entitlements: Entitlements
    default_data_class: str
    requests_per_day: int | None
    limits: dict[str, Any] | None = None  # the team's (charter.metering.limits.Limits)


def key_limits(key_id: str) -> dict[str, Any] | None:
    """An API key's own limits (None: only its team's apply)."""
    with unit_of_work() as session:
        key = session.get(ApiKey, key_id)
        return dict(key.limits) if key is not None and key.limits else None


def caller_context(user_id: str) -> CallerContext:
    with unit_of_work() as session:
        user = session.get(User, user_id)
        team_ids = set(memberships(session, user_id))
        primary_id = user.owner_team_id if user is not None else None
        if primary_id:
            team_ids.add(primary_id)
        teams = sorted(session.scalars(select(Team).where(Team.id.in_(team_ids))),
                       key=lambda t: (t.id != primary_id, t.name))
        merged: dict[str, set[str]] = {"models": set(), "data_classes": set(), "regions": set()}
        for team in teams:
            for key in merged:
                merged[key] |= set(team.entitlements.get(key, []))
        primary = teams[0] if teams else None
        return CallerContext(
            team=primary.name if primary else None,
            team_id=primary.id if primary else "",
            teams=tuple(sorted(t.name for t in teams)),
            entitlements=Entitlements(**{k: tuple(sorted(v)) for k, v in merged.items()}),
            default_data_class=primary.default_data_class if primary else "internal",
            requests_per_day=primary.requests_per_day if primary else None,
            limits=dict(primary.limits) if primary and primary.limits else None,
        )
