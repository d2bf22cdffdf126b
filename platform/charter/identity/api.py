"""Users and API keys under /api/v1."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from charter import scope
from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.identifiers import identifier
from charter.identity import lifecycle, service, teams
from charter.identity.models import ROLES, TEAM_ROLES

bp = ApiBlueprint("identity", __name__, url_prefix="/api/v1")
Role = Literal[ROLES]  # type: ignore[valid-type]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    username: Annotated[str, StringConstraints(min_length=2, max_length=100)]
    display_name: Annotated[str, StringConstraints(max_length=200)] = ""
    kind: Literal["user", "service"] = "user"
    roles: Annotated[list[Role], Field(max_length=len(ROLES))] = []


class RolesUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    row_version: int
    roles: Annotated[list[Role], Field(max_length=len(ROLES))]


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    username: str
    display_name: str
    kind: str
    active: bool
    roles: list[str]
    email: str | None
    owner_team_id: str | None
    external_issuer: str | None
    source: str
    last_login_at: datetime | None
    deprovisioned_at: datetime | None
    created_at: datetime
    row_version: int


class DeprovisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Annotated[str, StringConstraints(min_length=3, max_length=500)]


class DeprovisionOut(BaseModel):
    user_id: str
    username: str
    at: datetime
    keys_revoked: list[str]
    sessions_ended: int
    roles_removed: list[str]
    teams_left: list[str]
    unmanaged_teams: list[str]


Limit = Annotated[int, Field(ge=1, le=10**15)] | None


class LimitsIn(BaseModel):
    """Limits of a team or a key (charter.metering.limits); a missing or null one: none."""

    model_config = ConfigDict(extra="forbid", strict=True)
    requests_per_minute: Limit = None
    tokens_per_minute: Limit = None
    tokens_per_day: Limit = None
    tokens_per_month: Limit = None
    concurrent_streams: Annotated[int, Field(ge=1, le=100_000)] | None = None

    def stored(self) -> dict[str, int] | None:
        """What the database keeps: the limits set, or None."""
        return {k: v for k, v in self.model_dump().items() if v is not None} or None


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    expires_at: AwareDatetime | None = None
    limits: LimitsIn | None = None


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    limits: LimitsIn | None


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    user_id: str
    name: str
    created_at: datetime
    created_by: str
    expires_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None
    limits: dict[str, int] | None = None


class IssuedKeyOut(KeyOut):
    token: str = Field(description="The key itself. Shown once; Charter keeps only its hash.")


@bp.operation("GET", "/me", summary="The authenticated actor", response=UserOut)
def me(actor: Actor) -> object:
    return service.get_user(actor, actor.user_id)


@bp.operation("GET", "/users", summary="List users", response=list[UserOut], errors=(403,))
def list_users(actor: Actor) -> object:
    actor.require("admin", "auditor", action="user.list", target_type="user", target_id="*")
    return service.list_users()


@bp.operation("POST", "/users", summary="Create a user or service account", body=UserCreate,
              response=UserOut, status=201, errors=(403, 409))
def create_user(actor: Actor, body: UserCreate) -> object:
    return service.create_user(actor, username=body.username, display_name=body.display_name,
                               kind=body.kind, roles=list(body.roles))


@bp.operation("GET", "/users/<user_id>", summary="Get a user", response=UserOut)
def get_user(actor: Actor, user_id: str) -> object:
    return service.get_user(actor, user_id)


@bp.operation("PUT", "/users/<user_id>/roles", summary="Replace a user's roles",
              body=RolesUpdate, response=UserOut, errors=(403, 409))
def set_roles(actor: Actor, user_id: str, body: RolesUpdate) -> object:
    return service.set_roles(actor, user_id, list(body.roles), row_version=body.row_version)


@bp.operation("POST", "/users/<user_id>/deprovision",
              summary="End a person's access now: keys, sessions, roles, teams (admins)",
              body=DeprovisionIn, response=DeprovisionOut, errors=(403, 404, 409))
def deprovision(actor: Actor, user_id: str, body: DeprovisionIn) -> object:
    done = lifecycle.deprovision(actor, user_id, via="admin", reason=body.reason)
    return DeprovisionOut(**{k: v for k, v in vars(done).items() if k != "seconds"})


@bp.operation("GET", "/users/<user_id>/api-keys", summary="List a user's API keys",
              response=list[KeyOut], errors=(403,))
def list_keys(actor: Actor, user_id: str) -> object:
    return service.list_api_keys(actor, user_id)


@bp.operation("POST", "/users/<user_id>/api-keys",
              summary="Create an API key (the token is shown once)", body=KeyCreate,
              response=IssuedKeyOut, status=201, errors=(403,))
def create_key(actor: Actor, user_id: str, body: KeyCreate) -> object:

    ttl = scope.current().settings.api_key_default_ttl_days
    issued = service.create_api_key(actor, user_id, name=body.name, expires_at=body.expires_at,
                                    default_ttl_days=ttl,
                                    limits=body.limits.stored() if body.limits else None)
    return IssuedKeyOut.model_validate({**KeyOut.model_validate(issued.key).model_dump(),
                                        "token": issued.token})


@bp.operation("POST", "/api-keys/<key_id>/revoke", summary="Revoke an API key",
              response=KeyOut, errors=(403, 409))
def revoke_key(actor: Actor, key_id: str) -> object:
    return service.revoke_api_key(actor, key_id)


@bp.operation("PUT", "/api-keys/<key_id>/limits",
              summary="Set an API key's own limits (admins, the owner's team managers)",
              body=KeyLimits, response=KeyOut, errors=(403,))
def set_key_limits(actor: Actor, key_id: str, body: KeyLimits) -> object:
    return service.set_api_key_limits(actor, key_id,
                                      body.limits.stored() if body.limits else None)


# --- teams ------------------------------------------------------------------------------
Pattern = Annotated[str, StringConstraints(pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._/+-]{0,199})$")]


def _any_or_identifier(value: str) -> str:
    return value if value == "*" else identifier(value)


# Data classes and regions are compared by policy: "*" or an identifier, canonical.
IdPattern = Annotated[str, AfterValidator(_any_or_identifier)]
TeamRole = Literal[TEAM_ROLES]  # type: ignore[valid-type]


class Entitlements(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    models: Annotated[list[Pattern], Field(max_length=500)] = []
    data_classes: Annotated[list[IdPattern], Field(max_length=50)] = []
    regions: Annotated[list[IdPattern], Field(max_length=50)] = []


TeamName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{1,99}$")]
DataClass = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,49}$")]


class TeamCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: TeamName
    description: Annotated[str, StringConstraints(max_length=500)] = ""
    entitlements: Entitlements = Entitlements()
    requests_per_day: Annotated[int, Field(ge=0, le=1_000_000_000)] | None = None
    default_data_class: DataClass = "internal"
    limits: LimitsIn | None = None


class TeamUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    row_version: int
    description: Annotated[str, StringConstraints(max_length=500)] | None = None
    entitlements: Entitlements | None = None
    requests_per_day: Annotated[int, Field(ge=0, le=1_000_000_000)] | None = None
    default_data_class: DataClass | None = None
    limits: LimitsIn | None = None


class TeamOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    description: str
    entitlements: dict[str, list[str]]
    requests_per_day: int | None
    limits: dict[str, int] | None = None
    default_data_class: str
    created_at: datetime
    row_version: int


class MemberSet(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    team_role: TeamRole = "member"


class MemberOut(BaseModel):
    user_id: str
    username: str
    team_role: str
    source: str


class ServiceAccountCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    username: Annotated[str, StringConstraints(min_length=2, max_length=100)]
    display_name: Annotated[str, StringConstraints(max_length=200)] = ""


@bp.operation("GET", "/teams", summary="Teams the caller can see", response=list[TeamOut])
def list_teams(actor: Actor) -> object:
    return teams.list_teams(actor)


@bp.operation("POST", "/teams", summary="Create a team (admins)", body=TeamCreate,
              response=TeamOut, status=201, errors=(403, 409))
def create_team(actor: Actor, body: TeamCreate) -> object:
    return teams.create_team(actor, name=body.name, description=body.description,
                             entitlements=body.entitlements.model_dump(),
                             requests_per_day=body.requests_per_day,
                             default_data_class=body.default_data_class,
                             limits=body.limits.stored() if body.limits else None)


@bp.operation("GET", "/teams/<team_id>", summary="Get a team", response=TeamOut)
def get_team(actor: Actor, team_id: str) -> object:
    return teams.get_team(actor, team_id)


@bp.operation("PATCH", "/teams/<team_id>", summary="Change a team's entitlements or quota",
              body=TeamUpdate, response=TeamOut, errors=(403, 409))
def update_team(actor: Actor, team_id: str, body: TeamUpdate) -> object:
    changes = body.model_dump(exclude={"row_version", "limits"}, exclude_unset=True)
    if "limits" in body.model_fields_set:
        changes["limits"] = body.limits.stored() if body.limits else None
    return teams.update_team(actor, team_id, changes, row_version=body.row_version)


@bp.operation("GET", "/teams/<team_id>/members", summary="A team's members",
              response=list[MemberOut])
def list_members(actor: Actor, team_id: str) -> object:
    return [MemberOut(user_id=u.id, username=u.username, team_role=m.team_role,
                      source=m.source) for u, m in teams.list_members(actor, team_id)]


@bp.operation("PUT", "/teams/<team_id>/members/<user_id>",
              summary="Add a member or change their team role (managers, admins)",
              body=MemberSet, response=MemberOut, errors=(403, 409))
def set_member(actor: Actor, team_id: str, user_id: str, body: MemberSet) -> object:
    member = teams.set_member(actor, team_id, user_id, body.team_role)
    user = service.get_user(actor, user_id)
    return MemberOut(user_id=user_id, username=user.username, team_role=member.team_role,
                     source=member.source)


@bp.operation("DELETE", "/teams/<team_id>/members/<user_id>",
              summary="Remove a member (managers, admins)", status=204, errors=(403,))
def remove_member(actor: Actor, team_id: str, user_id: str) -> object:
    teams.remove_member(actor, team_id, user_id)
    return None


@bp.operation("GET", "/teams/<team_id>/service-accounts",
              summary="A team's service accounts", response=list[UserOut])
def list_service_accounts(actor: Actor, team_id: str) -> object:
    return teams.list_service_accounts(actor, team_id)


@bp.operation("POST", "/teams/<team_id>/service-accounts",
              summary="Create a service account owned by the team (managers, admins)",
              body=ServiceAccountCreate, response=UserOut, status=201, errors=(403, 409))
def create_service_account(actor: Actor, team_id: str, body: ServiceAccountCreate) -> object:
    return teams.create_service_account(actor, team_id, username=body.username,
                                        display_name=body.display_name)
