"""Policy endpoints: the active revision and data, and a playground to try an input."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.policy import service

bp = ApiBlueprint("policy", __name__, url_prefix="/api/v1")


class PolicyOut(BaseModel):
    revision: str
    engine: str
    packages: list[str]
    files: list[str]
    data: dict[str, Any]


class EvaluateIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    policy: Literal["admission", "dispatch"]
    input: dict[str, Any]


class FindingOut(BaseModel):
    code: str
    msg: str


class DecisionOut(BaseModel):
    policy: str
    allow: bool
    violations: list[FindingOut]
    warnings: list[FindingOut]
    decision_id: str
    policy_revision: str
    engine: str
    duration_ms: float
    input_digest: str


@bp.operation("GET", "/policy", summary="The active policy revision, packages and data",
              response=PolicyOut, errors=(503,))
def show_policy(actor: Actor) -> object:
    return service.describe()


@bp.operation("POST", "/policy/evaluate",
              summary="Evaluate a policy on an input (playground; the decision is audited)",
              body=EvaluateIn, response=DecisionOut, errors=(403, 503))
def evaluate(actor: Actor, body: EvaluateIn) -> object:
    return service.playground(actor, body.policy, body.input).as_dict()
