"""CharterError and its subclasses: every failure carries a stable code, a status and details."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from charter.audit.journal import Event


@dataclass(frozen=True, slots=True)
class AuditedRefusal:
    """Asks the unit of work to record this refusal in the audit log after rolling back."""

    actor: str
    action: str
    target_type: str
    target_id: str


class CharterError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details: dict[str, Any] = details or {}
        # Written to the audit log after the rollback of the unit of work it leaves
        # (charter.uow): the refusal itself, and events that record how it came about.
        self.audit: AuditedRefusal | None = None
        self.events: tuple[Event, ...] = ()

    def audited(self, actor: str, action: str, target_type: str, target_id: str) -> CharterError:
        """Mark the attempt as auditable: the refusal is written to the audit log."""
        self.audit = AuditedRefusal(actor, action, target_type, target_id)
        return self

    def recording(self, *events: Event) -> CharterError:
        """Have these events written with the refusal (e.g. a policy engine's failure)."""
        self.events = (*self.events, *events)
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r})"


class ConfigurationError(CharterError):
    code = "invalid_configuration"


class ValidationFailedError(CharterError):
    status = 422
    code = "validation_failed"


def validation_failed(exc: Any, what: str) -> ValidationFailedError:
    """Every field error of a pydantic ValidationError, in Charter's error shape."""
    errors = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(p) for p in err["loc"]) or what
        errors.append({"field": field, "code": err["type"], "message": err["msg"]})
    return ValidationFailedError(
        f"the {what} is invalid ({len(errors)} problem{'s' * (len(errors) != 1)})",
        details={"errors": errors},
    )


class InvalidJsonError(CharterError):
    status = 400
    code = "invalid_json"


class NotFoundError(CharterError):
    status = 404
    code = "not_found"


class ConflictError(CharterError):
    status = 409
    code = "conflict"


class StaleVersionError(ConflictError):
    code = "stale_version"


class IllegalTransitionError(ConflictError):
    code = "illegal_transition"


class UnauthenticatedError(CharterError):
    status = 401
    code = "unauthenticated"


class ForbiddenError(CharterError):
    status = 403
    code = "forbidden"


class AdmissionDeniedError(ConflictError):
    code = "admission_denied"


class SelfApprovalError(ForbiddenError):
    code = "self_approval_forbidden"


class PayloadTooLargeError(CharterError):
    status = 413
    code = "payload_too_large"


class DatabaseUnavailableError(CharterError):
    status = 503
    code = "database_unavailable"


class SchemaOutdatedError(CharterError):
    status = 503
    code = "schema_outdated"


class ImportFailedError(CharterError):
    status = 422
    code = "import_failed"
