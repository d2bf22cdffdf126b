"""Access: teams with their members, entitlements, quota and usage; service accounts; API
keys (shown once, in the answer to the form that made them; revoked here); users and roles
for admins.

The services decide who may do what (the actor is passed along). Admin-only forms are
refused before the service is reached, with the action names the services audit, so a
forged post answers the 403 page; refusals that depend on the data (not a manager of this
team, the last admin) come back as notices.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from functools import wraps

from flask import flash, g, redirect, request, url_for
from pydantic import ValidationError
from werkzeug.wrappers import Response

from charter import scope
from charter.audit.service import EventFilter, list_events
from charter.console.blueprint import bp
from charter.console.ui import action, form_list, problems, render
from charter.db import utcnow
from charter.errors import CharterError, ValidationFailedError
from charter.identity import lifecycle, teams
from charter.identity import service as identity
from charter.identity.api import TeamCreate, TeamUpdate
from charter.identity.models import ROLES, TEAM_ROLES
from charter.metering import service as metering

USAGE_DAYS = 14
USER_READERS = ("admin", "auditor")  # as GET /api/v1/users


# --- helpers -----------------------------------------------------------------------------

def _admins(action_name: str, target_type: str, target: Callable[..., str]
            ) -> Callable[[Callable[..., Response]], Callable[..., Response]]:
    """Refuse a non-admin before the form is read: the 403 page, audited under the action
    name the service would have used (it is refused once, here)."""
    def decorate(view: Callable[..., Response]) -> Callable[..., Response]:
        @wraps(view)
        def guarded(**kwargs: str) -> Response:
            g.actor.require("admin", action=action_name, target_type=target_type,
                            target_id=target(**kwargs)[:200] or "-")
            return view(**kwargs)
        return guarded
    return decorate


def _field(name: str) -> Callable[..., str]:
    return lambda **_: request.form.get(name, "").strip()


def _refused(exc: Exception) -> None:
    code = exc.code if isinstance(exc, CharterError) else "validation_failed"
    for i, line in enumerate(problems(exc)):
        flash(f"{line} ({code})" if i == 0 else line, "error")


def _day(name: str) -> datetime | None:
    raw = request.form.get(name, "").strip()
    if not raw:
        return None
    try:
        day = datetime.strptime(raw, "%Y-%m-%d").date()
    except ValueError:
        raise ValidationFailedError(f"`{name}` is not a date", details={"errors": [
            {"field": name, "code": "format", "message": "a date (YYYY-MM-DD)"}]}) from None
    return datetime.combine(day, time(23, 59, 59), tzinfo=UTC)


def _quota(raw: str) -> int | None:
    raw = raw.strip()
    if not raw:
        return None  # no limit
    if not raw.isdigit():
        raise ValidationFailedError("the quota is a whole number of requests a day",
                                    details={"errors": [{"field": "requests_per_day",
                                                         "code": "invalid",
                                                         "message": "digits, or empty for none"}]})
    return int(raw)


def _entitlements() -> dict[str, list[str]]:
    return {k: form_list(k) for k in ("models", "data_classes", "regions")}


def _row_version() -> int:
    raw = request.form.get("row_version", "")
    return int(raw) if raw.isdigit() else -1


# --- the overview: own keys, teams, quotas -----------------------------------------------

@bp.get("/access")
def access() -> Response:
    me = identity.get_user(g.actor, g.actor.user_id)
    keys = identity.list_api_keys(g.actor, g.actor.user_id)
    found = teams.list_teams(g.actor)
    mine = identity.team_roles_of(g.actor.user_id)
    return render("console/pages/access.html", section="access", title="Access", user=me,
                  keys=keys, teams=found, mine=mine,
                  used=metering.requests_today([t.id for t in found]), now=utcnow(),
                  default_ttl=scope.current().settings
                  .api_key_default_ttl_days, team_roles=TEAM_ROLES)


@bp.post("/access/teams")
@_admins("team.create", "team", _field("name"))
@action(lambda: url_for("console.access"))
def team_create() -> str:
    name = request.form.get("name", "").strip()
    body = TeamCreate.model_validate({
        "name": name, "description": request.form.get("description", ""),
        "entitlements": _entitlements(),
        "requests_per_day": _quota(request.form.get("requests_per_day", "")),
        "default_data_class": request.form.get("default_data_class", "").strip() or "internal"})
    team = teams.create_team(g.actor, name=body.name, description=body.description,
                             entitlements=body.entitlements.model_dump(),
                             requests_per_day=body.requests_per_day,
                             default_data_class=body.default_data_class)
    return f"Created team {team.name}."


# --- a team ------------------------------------------------------------------------------

@bp.get("/access/teams/<team_id>")
def team(team_id: str) -> Response:
    found = teams.get_team(g.actor, team_id)
    members = teams.list_members(g.actor, team_id)
    accounts = teams.list_service_accounts(g.actor, team_id)
    since = utcnow().date() - timedelta(days=USAGE_DAYS - 1)
    usage = metering.usage_since([team_id], since)
    return render("console/pages/access_team.html", section="access", title=found.name,
                  team=found, members=members, accounts=accounts, usage=usage, since=since,
                  used_today=metering.requests_today([team_id]).get(team_id, 0),
                  manager=identity.may_manage_team(g.actor, team_id), team_roles=TEAM_ROLES)


def _team_back(team_id: str, **_: str) -> str:
    return url_for("console.team", team_id=team_id)


@bp.post("/access/teams/<team_id>")
@_admins("team.update", "team", lambda team_id: team_id)
@action(_team_back)
def team_update(team_id: str) -> str:
    body = TeamUpdate.model_validate({
        "row_version": _row_version(), "description": request.form.get("description", ""),
        "entitlements": _entitlements(),
        "requests_per_day": _quota(request.form.get("requests_per_day", "")),
        "default_data_class": request.form.get("default_data_class", "").strip() or "internal"})
    changes = body.model_dump(exclude={"row_version"})
    updated = teams.update_team(g.actor, team_id, changes, row_version=body.row_version)
    return f"Saved team {updated.name}."


@bp.post("/access/teams/<team_id>/members")
@action(_team_back)
def member_set(team_id: str) -> str:
    role = request.form.get("team_role", "member")
    if role not in TEAM_ROLES:
        raise ValidationFailedError("the team role is member or manager", details={"errors": [
            {"field": "team_role", "code": "invalid", "message": "member or manager"}]})
    username = request.form.get("username", "")
    teams.get_team(g.actor, team_id)  # an unseen team stays unseen, whatever the name
    member = teams.set_member(g.actor, team_id, identity.user_id_by_name(username), role)
    return f"{username.strip()} is a {member.team_role} of the team."


@bp.post("/access/teams/<team_id>/members/<user_id>/remove")
@action(_team_back)
def member_remove(team_id: str, user_id: str) -> str:
    teams.remove_member(g.actor, team_id, user_id)
    return "Removed the member."


@bp.post("/access/teams/<team_id>/service-accounts")
@action(_team_back)
def service_account_create(team_id: str) -> str:
    user = teams.create_service_account(
        g.actor, team_id, username=request.form.get("username", "").strip(),
        display_name=request.form.get("display_name", "").strip())
    return f"Created service account {user.username}; give it an API key on its page."


# --- a user's keys -----------------------------------------------------------------------

@bp.get("/access/users/<user_id>")
def user_keys(user_id: str) -> Response:
    user = identity.get_user(g.actor, user_id)
    keys = identity.list_api_keys(g.actor, user_id)
    owner = teams.get_team(g.actor, user.owner_team_id) if user.owner_team_id else None
    history = (list_events(EventFilter(target_type="user", target_id=user.id, limit=200))
               if g.actor.has("admin", "auditor") else [])
    return render("console/pages/access_user.html", section="access", title=user.username,
                  user=user, keys=keys, owner_team=owner, manage=identity.may_manage_keys(
                      g.actor, user), history=history,
                  now=utcnow(), default_ttl=scope.current().settings
                  .api_key_default_ttl_days)


def _keys_back(user_id: str) -> str:
    if user_id == g.actor.user_id:
        return url_for("console.access")
    return url_for("console.user_keys", user_id=user_id)


@bp.post("/access/users/<user_id>/api-keys")
def key_create(user_id: str) -> Response:
    """The token is in this answer and nowhere else: not stored, not in a redirect."""
    try:
        issued = identity.create_api_key(
            g.actor, user_id, name=request.form.get("name", "").strip(),
            expires_at=_day("expires_at"),
            default_ttl_days=scope.current().settings
            .api_key_default_ttl_days)
        user = identity.get_user(g.actor, user_id)
    except (CharterError, ValidationError) as exc:
        if isinstance(exc, CharterError) and exc.status == 404:
            raise
        _refused(exc)
        return redirect(_keys_back(user_id), code=303)
    return render("console/pages/access_key.html", section="access", title="New API key",
                  key=issued.key, token=issued.token, user=user,
                  back=_keys_back(user_id), status=201)


@bp.post("/access/api-keys/<key_id>/revoke")
def key_revoke(key_id: str) -> Response:
    back_user = request.form.get("user_id", g.actor.user_id)
    try:
        key = identity.revoke_api_key(g.actor, key_id)
        flash(f"Revoked the API key {key.name} ({key.id}).", "ok")
    except CharterError as exc:
        _refused(exc)
    return redirect(_keys_back(back_user if isinstance(back_user, str) else ""), code=303)


# --- users and roles (admins; auditors read) ---------------------------------------------

@bp.get("/access/users")
def users() -> Response:
    g.actor.require(*USER_READERS, action="user.list", target_type="user", target_id="*")
    everyone = identity.list_users()
    names = identity.team_names()
    # With a role map the provider is the source of truth for SSO users' roles: a change
    # here would be undone at their next sign-in, so it is not offered.
    idp_roles = bool(scope.current().settings.oidc_role_map)
    return render("console/pages/access_users.html", section="access", title="Users",
                  users=everyone, roles=ROLES, team_names=names, idp_roles=idp_roles,
                  activity=identity.last_activity())


@bp.post("/access/users")
@_admins("user.create", "user", _field("username"))
@action(lambda: url_for("console.users"))
def user_create() -> str:
    username = request.form.get("username", "").strip()
    roles = [r for r in request.form.getlist("roles") if r]
    user = identity.create_user(g.actor, username=username,
                                display_name=request.form.get("display_name", "").strip(),
                                kind="user", roles=roles)
    return f"Created {user.username} ({', '.join(user.roles) or 'no roles'})."


@bp.post("/access/users/<user_id>/deprovision")
@action(lambda user_id: url_for("console.user_keys", user_id=user_id))
def user_deprovision(user_id: str) -> str:
    done = lifecycle.deprovision(g.actor, user_id, via="admin",
                                 reason=request.form.get("reason", "").strip()[:500]
                                 or "ended in the console")
    return (f"Access of {done.username} ended: {len(done.keys_revoked)} keys revoked, "
            f"{done.sessions_ended} sessions ended, roles and teams removed.")


@bp.post("/access/users/<user_id>/roles")
@_admins("user.set_roles", "user", lambda user_id: user_id)
@action(lambda user_id: url_for("console.users"))
def user_roles(user_id: str) -> str:
    user = identity.set_roles(g.actor, user_id, request.form.getlist("roles"),
                              row_version=_row_version())
    return f"{user.username} now has: {', '.join(user.roles) or 'no roles'}."

