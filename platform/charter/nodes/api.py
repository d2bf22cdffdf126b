"""Nodes and deployments under /api/v1, for operators."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from charter import scope
from charter.actor import Actor
from charter.apikit import ApiBlueprint
from charter.nodes import service
from charter.nodes.models import ENGINES
from charter.settings import Settings

bp = ApiBlueprint("nodes", __name__, url_prefix="/api/v1")
READERS = ("admin", "operator", "auditor")  # node addresses are infrastructure details
Engine = Literal[ENGINES]  # type: ignore[valid-type]
Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,99}$")]
Region = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,49}$")]
ServingName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,199}$")]


class NodeCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name
    base_url: Annotated[str, StringConstraints(min_length=8, max_length=500)]
    region: Region
    engine: Engine = "tgi"
    labels: dict[str, Annotated[str, StringConstraints(max_length=200)]] = {}
    capacity: Annotated[int, Field(ge=1, le=10_000)] = 8


class AgentEnrollment(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    agent_url: Annotated[str, StringConstraints(min_length=8, max_length=500)]
    agent_key: Annotated[str, StringConstraints(min_length=40, max_length=64)]
    row_version: int


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: Annotated[str, StringConstraints(min_length=3, max_length=2000)]


class NodeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    name: str
    base_url: str
    region: str
    engine: str
    labels: dict[str, Any]
    capacity: int
    admin_state: str
    attestation: str
    attested_version_id: str | None
    attested_adapters: dict[str, str]
    reported_model_id: str | None
    reported_revision: str | None
    quarantine_reason: str
    healthy: bool
    last_probe_at: datetime | None
    last_error: str
    routable: bool
    row_version: int
    agent_url: str | None
    agent_key: str | None


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    serving_name: ServingName
    version_id: Annotated[str, StringConstraints(min_length=1, max_length=36)]
    node_ids: Annotated[list[Annotated[str, StringConstraints(max_length=36)]],
                        Field(min_length=1, max_length=100)]


class DeploymentOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    serving_name: str
    version_id: str
    active: bool
    node_ids: list[str]
    created_at: datetime
    created_by: str


def _settings() -> Settings:
    return scope.current().settings


@bp.operation("GET", "/nodes", summary="Inference nodes", response=list[NodeOut],
              errors=(403,))
def list_nodes(actor: Actor) -> object:
    actor.require(*READERS, action="node.read", target_type="node", target_id="*")
    return service.list_nodes()


@bp.operation("POST", "/nodes", summary="Register a node (URL checked against SSRF)",
              body=NodeCreate, response=NodeOut, status=201, errors=(403, 409))
def register_node(actor: Actor, body: NodeCreate) -> object:
    return service.register_node(actor, _settings(), **body.model_dump())


@bp.operation("GET", "/nodes/<node_id>", summary="One node", response=NodeOut, errors=(403,))
def get_node(actor: Actor, node_id: str) -> object:
    actor.require(*READERS, action="node.read", target_type="node", target_id=node_id)
    return service.get_node(node_id)


@bp.operation("POST", "/nodes/<node_id>/probe",
              summary="Probe health and attest what the node serves now", response=NodeOut,
              errors=(403,))
def probe_node(actor: Actor, node_id: str) -> object:
    actor.require(*service.OPERATORS, action="node.probe", target_type="node",
                  target_id=node_id)
    return service.probe_node(_settings(), node_id, actor)


@bp.operation("POST", "/nodes/<node_id>/agent",
              summary="Enroll the node's attestation agent, or rotate its key",
              body=AgentEnrollment, response=NodeOut, errors=(403, 409, 422))
def enroll_agent(actor: Actor, node_id: str, body: AgentEnrollment) -> object:
    return service.enroll_agent(actor, _settings(), node_id, agent_url=body.agent_url,
                                agent_key=body.agent_key, row_version=body.row_version)


@bp.operation("POST", "/nodes/<node_id>/drain", summary="Stop routing to the node",
              body=Reason, response=NodeOut, errors=(403, 409))
def drain_node(actor: Actor, node_id: str, body: Reason) -> object:
    return service.drain_node(actor, node_id, body.reason)


@bp.operation("POST", "/nodes/<node_id>/restore", summary="Route to the node again",
              body=Reason, response=NodeOut, errors=(403, 409))
def restore_node(actor: Actor, node_id: str, body: Reason) -> object:
    return service.restore_node(actor, node_id, body.reason)


@bp.operation("GET", "/deployments", summary="Deployments", response=list[DeploymentOut])
def list_deployments(actor: Actor) -> object:
    return service.list_deployments()


@bp.operation("POST", "/deployments",
              summary="Bind a serving name to an approved version and its nodes",
              body=DeploymentCreate, response=DeploymentOut, status=201, errors=(403, 404, 409))
def create_deployment(actor: Actor, body: DeploymentCreate) -> object:
    return service.create_deployment(actor, serving_name=body.serving_name,
                                     version_id=body.version_id, node_ids=body.node_ids)


@bp.operation("POST", "/deployments/<deployment_id>/deactivate",
              summary="Stop serving a deployment", response=DeploymentOut, errors=(403,))
def deactivate_deployment(actor: Actor, deployment_id: str) -> object:
    return service.set_deployment_active(actor, deployment_id, False)


@bp.operation("POST", "/deployments/<deployment_id>/activate",
              summary="Serve a deployment again", response=DeploymentOut, errors=(403,))
def activate_deployment(actor: Actor, deployment_id: str) -> object:
    return service.set_deployment_active(actor, deployment_id, True)
