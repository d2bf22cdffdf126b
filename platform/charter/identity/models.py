"""Users (people and service accounts), their roles, and hashed API keys."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from charter.db import Base, UTCDateTime, utcnow

ROLES = ("admin", "steward", "approver", "operator", "auditor", "user")
# `provisioner`: an identity provider's SCIM client; its keys open /scim/v2 and nothing else.
USER_KINDS = ("user", "service", "provisioner")


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    display_name: Mapped[str] = mapped_column(String(200), nullable=False, default="")
    kind: Mapped[str] = mapped_column(String(20), nullable=False, default="user")
    active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    email: Mapped[str | None] = mapped_column(String(320))
    # Set for users provisioned from an identity provider: (issuer, subject) is their key.
    external_issuer: Mapped[str | None] = mapped_column(String(300))
    external_subject: Mapped[str | None] = mapped_column(String(300))
    # A service account belongs to one team; people may be members of several.
    owner_team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Where the user came from: local (an admin, the CLI), sso (a first sign-in) or scim
    # (the identity provider provisioned it); the provider's own id (SCIM externalId); when
    # its access ended (charter.identity.lifecycle).
    source: Mapped[str] = mapped_column(String(10), nullable=False, default="local",
                                        server_default="local")
    external_id: Mapped[str | None] = mapped_column(String(300))
    deprovisioned_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), onupdate=utcnow)
    scim_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    role_rows: Mapped[list[UserRole]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="UserRole.role"
    )

    # Bumped by the service on every change; the UPDATE checks the old value (409 if stale).
    __mapper_args__ = {"version_id_col": row_version, "version_id_generator": False}
    __table_args__ = (
        UniqueConstraint("external_issuer", "external_subject", name="uq_users_external"),
    )

    @property
    def roles(self) -> list[str]:
        return [r.role for r in self.role_rows]


class UserRole(Base):
    __tablename__ = "user_roles"

    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(20), primary_key=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(24), primary_key=True)  # public key id
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(100), nullable=False)
    secret_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(200), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Requests and tokens per minute, tokens per day and month, concurrent streams
    # (charter.metering.limits.Limits); None: none beyond the team's.
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)


TEAM_ROLES = ("member", "manager")


class Team(Base):
    """A tenant: owns service accounts and keys, and carries the entitlements that the
    dispatch policy checks (models, data classes, regions) and quotas."""

    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    description: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    entitlements: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False, default=dict)
    requests_per_day: Mapped[int | None] = mapped_column(Integer)
    limits: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # see ApiKey.limits
    default_data_class: Mapped[str] = mapped_column(String(50), nullable=False,
                                                    default="internal")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    __mapper_args__ = {"version_id_col": row_version, "version_id_generator": False}


class TeamMember(Base):
    __tablename__ = "team_members"

    team_id: Mapped[str] = mapped_column(ForeignKey("teams.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    team_role: Mapped[str] = mapped_column(String(20), nullable=False, default="member")
    source: Mapped[str] = mapped_column(String(20), nullable=False, default="charter")


class ConsoleSession(Base):
    """A server-side console session; the cookie carries a random id, stored hashed."""

    __tablename__ = "console_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), nullable=False, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False,
                                                   default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    csrf_token: Mapped[str] = mapped_column(String(64), nullable=False)
    id_token_hint: Mapped[str | None] = mapped_column(String(4096))


class ScimGroup(Base):
    """A group as the identity provider provisions it over SCIM (charter.identity.scim); it
    maps to roles and a team by its display name (CHARTER_OIDC_ROLE_MAP, _TEAM_MAP)."""

    __tablename__ = "scim_groups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    external_id: Mapped[str | None] = mapped_column(String(300))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), onupdate=utcnow)
    row_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)


class ScimGroupMember(Base):
    __tablename__ = "scim_group_members"

    group_id: Mapped[str] = mapped_column(ForeignKey("scim_groups.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id"), primary_key=True, index=True)
    display: Mapped[str | None] = mapped_column(String(200))  # as the provider names it
