"""The authenticated actor that every service call receives as an argument."""

from __future__ import annotations

from dataclasses import dataclass

from charter.errors import ForbiddenError
from charter.uow import refuse


@dataclass(frozen=True, slots=True)
class Actor:
    user_id: str
    username: str
    kind: str  # user | service | system
    roles: frozenset[str]
    key_id: str | None = None  # the API key it authenticated with, if it did

    @property
    def ref(self) -> str:
        """How the audit log names this actor."""
        return f"{self.kind}:{self.username}"

    def has(self, *roles: str) -> bool:
        return bool(self.roles.intersection(roles))

    def require(self, *roles: str, action: str, target_type: str, target_id: str) -> None:
        """Refuse, and audit the refusal, unless the actor holds one of the roles."""
        if not self.has(*roles):
            refuse(ForbiddenError(
                f"{action} needs one of the roles: {', '.join(roles)}",
                details={"required_roles": list(roles), "action": action},
            ).audited(self.ref, action, target_type, target_id))


SYSTEM = Actor(user_id="system", username="charter", kind="system", roles=frozenset({"admin"}))
