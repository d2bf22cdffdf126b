"""When a person leaves, their access ends at once, in one audited transaction.

Deprovisioning (an admin, or the identity provider over SCIM) disables the user, revokes
every API key they hold, ends every console session, and removes their roles and team
memberships. Service accounts belong to teams, not to people: those of the teams the
person managed keep running under the managers who remain; a team left with no manager is
named in the event and raised as `team.unmanaged` (an alarm: nobody can rotate its keys
but an admin). Every worker refuses the person's keys on its very next request: the
revocations commit in one transaction that advances the change generation, which every
read of a key checks (charter.readcache).

The `user.deprovision` event says what ended (key ids, the number of sessions, roles,
teams), who asked and through what, and, when the provider's call is known, the seconds
from that call to the commit that revoked the last credential.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy import delete, select

from charter.actor import Actor
from charter.db import utcnow
from charter.errors import ConflictError, NotFoundError
from charter.identity.models import ApiKey, ConsoleSession, Team, TeamMember, User
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.identity")

VIA = ("admin", "scim", "reconcile")


@dataclass
class Deprovisioned:
    user_id: str
    username: str
    at: datetime
    keys_revoked: list[str] = field(default_factory=list)
    sessions_ended: int = 0
    roles_removed: list[str] = field(default_factory=list)
    teams_left: list[str] = field(default_factory=list)
    unmanaged_teams: list[str] = field(default_factory=list)
    seconds: float | None = None  # from the provider's call to the commit, when known


def deprovision(actor: Actor, user_id: str, *, via: str, reason: str,
                requested_at: datetime | None = None) -> Deprovisioned:
    """End a person's access now (see the module). `via`: admin, scim or reconcile;
    `requested_at`: when the identity provider's call arrived. Idempotent: a user already
    deprovisioned is answered as it stands, and nothing is written again."""
    assert via in VIA
    if via == "admin":
        actor.require("admin", action="user.deprovision", target_type="user",
                      target_id=user_id)
    with unit_of_work() as session:
        user = session.get(User, user_id, with_for_update=True)
        if user is None:
            raise NotFoundError(f"no user {user_id}", code="user_not_found")
        if user.kind != "user":
            raise ConflictError(
                "service accounts are not people: their team's managers revoke their keys",
                code="not_a_person").audited(actor.ref, "user.deprovision", "user", user_id)
        if user.deprovisioned_at is not None and not user.active:
            return Deprovisioned(user.id, user.username, user.deprovisioned_at)
        now = utcnow()
        done = Deprovisioned(user.id, user.username, now)
        keys = session.scalars(select(ApiKey).where(ApiKey.user_id == user.id,
                                                    ApiKey.revoked_at.is_(None))).all()
        for key in keys:
            key.revoked_at = now
            done.keys_revoked.append(key.id)
        done.sessions_ended = session.execute(delete(ConsoleSession).where(
            ConsoleSession.user_id == user.id)).rowcount  # type: ignore[attr-defined]
        done.roles_removed = sorted(user.roles)
        user.role_rows = []  # delete-orphan: the rows go with the flush
        rows = session.execute(select(TeamMember, Team).join(Team, Team.id == TeamMember.team_id)
                               .where(TeamMember.user_id == user.id)).all()
        managed = [team for member, team in rows if member.team_role == "manager"]
        done.teams_left = sorted(team.name for _, team in rows)
        session.execute(delete(TeamMember).where(TeamMember.user_id == user.id))
        for team in managed:
            left = session.scalar(select(TeamMember.user_id).join(
                User, User.id == TeamMember.user_id).where(
                TeamMember.team_id == team.id, TeamMember.team_role == "manager",
                User.active.is_(True)).limit(1))
            if left is None:
                done.unmanaged_teams.append(team.name)
                accounts = session.scalars(select(User.username).where(
                    User.owner_team_id == team.id, User.active.is_(True))).all()
                record(session, actor=actor.ref, action="team.unmanaged", target_type="team",
                       target_id=team.id, outcome="failure",
                       details={"team": team.name, "after": user.username,
                                "service_accounts": sorted(accounts)})
                log.warning("a team has no manager left: only an admin can manage its "
                            "service accounts now", team=team.name, after=user.username)
        user.active = False
        user.deprovisioned_at = now
        user.row_version += 1
        session.flush()
        if requested_at is not None:
            done.seconds = round((utcnow() - requested_at).total_seconds(), 3)
        record(session, actor=actor.ref, action="user.deprovision", target_type="user",
               target_id=user.id,
               details={"username": user.username, "via": via, "reason": reason[:500],
                        "requested_at": requested_at.isoformat() if requested_at else None,
                        "keys_revoked": done.keys_revoked,
                        "sessions_ended": done.sessions_ended,
                        "roles_removed": done.roles_removed, "teams_left": done.teams_left,
                        "unmanaged_teams": done.unmanaged_teams,
                        "seconds_since_request": done.seconds})
        return done
