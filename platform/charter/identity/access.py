"""Who may see and manage what within teams: the one place these rules live."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from charter.actor import Actor
from charter.identity.models import TeamMember, User

READ_ALL = ("admin", "auditor")


def memberships(session: Session, user_id: str) -> dict[str, str]:
    """team id -> the user's team role."""
    rows = session.execute(
        select(TeamMember.team_id, TeamMember.team_role).where(TeamMember.user_id == user_id)
    ).all()
    return {r.team_id: r.team_role for r in rows}


def can_manage_team(session: Session, actor: Actor, team_id: str) -> bool:
    return actor.has("admin") or memberships(session, actor.user_id).get(team_id) == "manager"


def visible_user(session: Session, actor: Actor, user: User) -> bool:
    """Whether `actor` may see `user` at all; if not, the user does not exist for them."""
    if actor.user_id == user.id or actor.has(*READ_ALL):
        return True
    return user.owner_team_id is not None and user.owner_team_id in memberships(
        session, actor.user_id)


def can_manage_keys(session: Session, actor: Actor, user: User) -> bool:
    """Own keys; any key for admins; a team service account's keys for its managers."""
    if actor.user_id == user.id or actor.has("admin"):
        return True
    return user.owner_team_id is not None and can_manage_team(session, actor, user.owner_team_id)
