"""The registry's pure rules: the lifecycle as a table, and the four-eyes rule."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# The whole lifecycle: (from state, action) -> to state. Nothing else is allowed.
TRANSITIONS: Mapping[tuple[str, str], str] = MappingProxyType({
    ("draft", "submit"): "submitted",
    ("submitted", "approve"): "approved",
    ("submitted", "reject"): "rejected",
    ("approved", "deprecate"): "deprecated",
    ("approved", "revoke"): "revoked",
    # Only the system takes these, when the approval's expires_at has passed.
    ("approved", "expire"): "expired",
    ("deprecated", "expire"): "expired",
})
SYSTEM_ACTIONS = frozenset({"expire"})  # no endpoint: not offered to callers as allowed
EXPIRABLE = tuple(sorted({s for (s, a) in TRANSITIONS if a == "expire"}))


def next_state(state: str, action: str) -> str | None:
    """The state `action` leads to from `state`; None when the lifecycle forbids it."""
    return TRANSITIONS.get((state, action))


def allowed_actions(state: str) -> list[str]:
    """What a caller may do to a version in `state` (the system's own actions excluded)."""
    return sorted(a for (s, a) in TRANSITIONS if s == state and a not in SYSTEM_ACTIONS)


def four_eyes_ok(decider_id: str, *authors: str | None) -> bool:
    """Whether `decider_id` may decide on a version these people created, edited or
    submitted (separation of duties: whoever changed its content may not decide on it)."""
    return decider_id not in {a for a in authors if a}
