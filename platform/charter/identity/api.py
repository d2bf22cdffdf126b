"""Users and API keys under /api/v1."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from charter.apikit import ApiBlueprint
from charter.identity import service
from charter.identity.actor import Actor
from charter.identity.models import ROLES

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
    created_at: datetime
    row_version: int


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Annotated[str, StringConstraints(min_length=1, max_length=100)]
    expires_at: AwareDatetime | None = None


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


class IssuedKeyOut(KeyOut):
    token: str = Field(description="The key itself. Shown once; Charter keeps only its hash.")


@bp.operation("GET", "/me", summary="The authenticated actor", response=UserOut)
def me(actor: Actor) -> object:
    return service.get_user(actor.user_id)


@bp.operation("GET", "/users", summary="List users", response=list[UserOut], errors=(403,))
def list_users(actor: Actor) -> object:
    actor.require("admin", "auditor", action="user.list", target_type="user", target_id="*")
    return service.list_users()


@bp.operation("POST", "/users", summary="Create a user or service account", body=UserCreate,
              response=UserOut, status=201, errors=(403, 409))
def create_user(actor: Actor, body: UserCreate) -> object:
    return service.create_user(actor, username=body.username, display_name=body.display_name,
                               kind=body.kind, roles=list(body.roles))


@bp.operation("GET", "/users/<user_id>", summary="Get a user", response=UserOut, errors=(403,))
def get_user(actor: Actor, user_id: str) -> object:
    if user_id != actor.user_id:
        actor.require("admin", "auditor", action="user.read", target_type="user",
                      target_id=user_id)
    return service.get_user(user_id)


@bp.operation("PUT", "/users/<user_id>/roles", summary="Replace a user's roles",
              body=RolesUpdate, response=UserOut, errors=(403, 409))
def set_roles(actor: Actor, user_id: str, body: RolesUpdate) -> object:
    return service.set_roles(actor, user_id, list(body.roles), row_version=body.row_version)


@bp.operation("GET", "/users/<user_id>/api-keys", summary="List a user's API keys",
              response=list[KeyOut], errors=(403,))
def list_keys(actor: Actor, user_id: str) -> object:
    return service.list_api_keys(actor, user_id)


@bp.operation("POST", "/users/<user_id>/api-keys",
              summary="Create an API key (the token is shown once)", body=KeyCreate,
              response=IssuedKeyOut, status=201, errors=(403,))
def create_key(actor: Actor, user_id: str, body: KeyCreate) -> object:
    from flask import current_app

    ttl = current_app.extensions["charter.settings"].api_key_default_ttl_days
    issued = service.create_api_key(actor, user_id, name=body.name, expires_at=body.expires_at,
                                    default_ttl_days=ttl)
    return IssuedKeyOut.model_validate({**KeyOut.model_validate(issued.key).model_dump(),
                                        "token": issued.token})


@bp.operation("POST", "/api-keys/<key_id>/revoke", summary="Revoke an API key",
              response=KeyOut, errors=(403, 409))
def revoke_key(actor: Actor, key_id: str) -> object:
    return service.revoke_api_key(actor, key_id)
