"""Nodes: registration (SSRF-checked), probing and attestation, drain and restore;
deployments that bind a serving name to an approved version and its nodes."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import httpx
import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from charter import scope
from charter.actor import SYSTEM, Actor
from charter.db import utcnow
from charter.errors import (
    ConflictError,
    NotFoundError,
    StaleVersionError,
    ValidationFailedError,
)
from charter.nodes import adapters, statement
from charter.nodes.models import Deployment, DeploymentNode, Node
from charter.nodes.ssrf import NodeUrlPolicy, make_client, pinned_request_kwargs
from charter.registry import service as registry
from charter.settings import Settings
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.nodes")
OPERATORS = ("admin", "operator")


def url_policy(settings: Settings) -> NodeUrlPolicy:
    return NodeUrlPolicy(allowed_networks=settings.node_networks)


def _node(session: Session, node_id: str) -> Node:
    node = session.get(Node, node_id)
    if node is None:
        raise NotFoundError(f"no node {node_id}", code="node_not_found")
    return node


def register_node(actor: Actor, settings: Settings, *, name: str, base_url: str, region: str,
                  engine: str, labels: dict[str, Any], capacity: int) -> Node:
    actor.require(*OPERATORS, action="node.register", target_type="node", target_id=name)
    url = url_policy(settings).validate(base_url).url.rstrip("/")
    with unit_of_work() as session:
        if session.scalar(select(Node.id).where(Node.name == name)):
            raise ConflictError(f"a node named {name!r} exists", code="node_exists")
        node = Node(id=str(uuid.uuid4()), name=name, base_url=url, region=region,
                    engine=engine, labels=labels, capacity=capacity, created_by=actor.ref)
        session.add(node)
        session.flush()
        record(session, actor=actor.ref, action="node.register", target_type="node",
                     target_id=node.id,
                     details={"name": name, "base_url": url, "region": region, "engine": engine,
                              "capacity": capacity, "labels": labels})
        return node


def list_nodes() -> list[Node]:
    with unit_of_work() as session:
        return list(session.scalars(select(Node).order_by(Node.region, Node.name)))


def get_node(node_id: str) -> Node:
    with unit_of_work() as session:
        return _node(session, node_id)


def _set_admin_state(actor: Actor, node_id: str, state: str, reason: str) -> Node:
    action = "node.drain" if state == "drained" else "node.restore"
    actor.require(*OPERATORS, action=action, target_type="node", target_id=node_id)
    with unit_of_work() as session:
        node = _node(session, node_id)
        if node.admin_state == state:
            raise ConflictError(f"the node is already {state}", code="node_state_unchanged")
        node.admin_state = state
        node.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action=action, target_type="node", target_id=node.id,
                     details={"name": node.name, "reason": reason})
        return node


def enroll_agent(actor: Actor, settings: Settings, node_id: str, *, agent_url: str,
                 agent_key: str, row_version: int) -> Node:
    """Enroll the node's attestation agent, or rotate its key: from now on the node is
    attested by statements signed with `agent_key` (the old key no longer counts), and it
    is not routable until the next probe verifies one (audited, `node.agent_enroll`)."""
    actor.require(*OPERATORS, action="node.agent_enroll", target_type="node",
                  target_id=node_id)
    try:
        raw = statement.parse_public_key(agent_key)
    except ValueError as exc:
        raise ValidationFailedError(str(exc), code="validation_failed", details={"errors": [
            {"field": "agent_key", "code": "invalid", "message": str(exc)}]}) from None
    url = url_policy(settings).validate(agent_url).url.rstrip("/")
    with unit_of_work() as session:
        node = _node(session, node_id)
        if node.row_version != row_version:
            raise StaleVersionError("the node changed since it was read", code="stale_version",
                                    details={"row_version": node.row_version})
        previous = node.agent_key
        node.agent_url, node.agent_key = url, statement.key_text(raw)
        node.attestation, node.attested_version_id = "unverified", None
        node.attested_adapters = {}
        node.quarantine_reason = ""
        node.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action="node.agent_enroll", target_type="node",
               target_id=node.id,
               details={"name": node.name, "agent_url": url,
                        "key_id": statement.key_id(raw),
                        "replaced_key_id": statement.key_id(statement.parse_public_key(
                            previous)) if previous else None})
        return node


def drain_node(actor: Actor, node_id: str, reason: str) -> Node:
    return _set_admin_state(actor, node_id, "drained", reason)


def restore_node(actor: Actor, node_id: str, reason: str) -> Node:
    return _set_admin_state(actor, node_id, "active", reason)


@dataclass(frozen=True, slots=True)
class Attested:
    """What a node's agent attested: the version (None: quarantined, `reason` says why)
    and the adapters of it the engine loads (version id -> its name on the engine)."""

    version_id: str | None
    reason: str = ""
    adapters: dict[str, str] = field(default_factory=dict)


def _attest_by_agent(settings: Settings, node_id: str, agent_url: str, agent_key: str,
                     info: adapters.ProbeResult, *, lora: bool) -> Attested:
    """Challenge the node's agent with a fresh nonce and check its signed statement
    against the pinned digests of the approved versions: the version whose files match,
    and (`lora`: an engine that serves adapters) each approved adapter of it whose files
    match an adapter the agent states; else None and "<code>: <why>", which quarantines
    the node."""
    found = _statement(settings, agent_url, agent_key)
    if isinstance(found, str):
        return Attested(None, found)
    pinned = registry.pinned_files_of_servable()
    base = _matching_version(node_id, found, info, pinned)
    if base.version_id is None or not lora:
        return base
    stated = found.get("adapters", {})
    served = {}
    for version_id, pins in sorted(pinned.items()):
        if pins.adapter_of != base.version_id:
            continue
        for name, files in sorted(stated.items()):
            if not statement.mismatches(files, [statement.Pinned(*f) for f in pins.files]):
                served[version_id] = name
                break
    return replace(base, adapters=served)


def _statement(settings: Settings, agent_url: str, agent_key: str) -> dict[str, Any] | str:
    """The agent's statement for a fresh nonce, checked; or why there is none."""
    nonce = secrets.token_hex(16)
    try:
        target = url_policy(settings).resolve(agent_url)
        with make_client(settings.node_agent_timeout_s) as client:
            r = client.post(target.url + "/attest", json={"nonce": nonce},
                            **pinned_request_kwargs(target))
        if r.status_code != 200:
            return f"agent_failed: the agent answered HTTP {r.status_code}"
        return statement.verify(r.json(), statement.parse_public_key(agent_key), nonce)
    except httpx.TimeoutException:
        return (f"agent_timeout: the agent did not answer within "
                f"{settings.node_agent_timeout_s:g} s")
    except (httpx.HTTPError, ValidationFailedError) as exc:
        return f"agent_unreachable: {type(exc).__name__}: {str(exc)[:200]}"
    except ValueError:
        return "agent_statement_malformed: the agent's answer is not JSON"
    except statement.AttestationError as exc:
        return f"{exc.code}: {exc.message}"


def _matching_version(node_id: str, found: dict[str, Any], info: adapters.ProbeResult,
                      pinned: dict[str, registry.PinnedVersion]) -> Attested:
    """The approved version whose pinned files the statement's files are."""
    wanted = _deployed_versions(node_id)
    problems: dict[str, list[str]] = {}
    for version_id in sorted(pinned, key=lambda v: (v not in wanted, v)):
        wrong = statement.mismatches(found["files"], [
            statement.Pinned(*f) for f in pinned[version_id].files])
        revision = pinned[version_id].revision
        if not wrong and info.revision and revision and info.revision != revision:
            wrong = [f"the engine reports revision {info.revision}, the version pins {revision}"]
        if not wrong:
            return Attested(version_id)
        problems[version_id] = wrong
    if not problems:
        return Attested(None, "agent_digest_mismatch: no approved version pins digests to "
                              "compare")
    first = next((v for v in sorted(problems) if v in wanted), sorted(problems)[0])
    return Attested(None, f"agent_digest_mismatch: the files are no approved version's; "
                          f"against {first}: " + "; ".join(problems[first][:5]))


def _deployed_versions(node_id: str) -> set[str]:
    with unit_of_work() as session:
        return {d.version_id for d in session.scalars(select(Deployment))
                if node_id in d.node_ids}


def mark_suspect(node_id: str, reason: str) -> bool:
    """A node that refused, reset or timed out a connection before the first byte of an
    answer: out of every worker's routes at once (its row turns unhealthy, which moves the
    change generation every process decides on), until a probe finds it healthy again
    (the circuit breaker's half-open trial: one probe, not a request). Audited as
    `node.suspect`. True if this call marked it (the first of many concurrent failures)."""
    with unit_of_work() as session:
        node = session.get(Node, node_id, with_for_update=True)
        if node is None or not node.healthy:
            return False
        node.healthy = False
        node.last_error = f"suspect: {reason}"[:1000]
        node.row_version += 1
        session.flush()
        record(session, actor=SYSTEM.ref, action="node.suspect", target_type="node",
               target_id=node.id, outcome="failure",
               details={"name": node.name, "region": node.region, "reason": reason[:300]})
    log.warning("node marked suspect", node_id=node_id, reason=reason)
    return True


def probe_node(settings: Settings, node_id: str, actor: Actor = SYSTEM) -> Node:
    """Ask the node what it serves; attest it or quarantine it (audited on change)."""
    with unit_of_work() as session:
        node = _node(session, node_id)
        base_url, engine = node.base_url, node.engine
        agent_url, agent_key = node.agent_url, node.agent_key
    try:
        target = url_policy(settings).resolve(base_url)  # re-checked now: DNS may have moved
        with make_client(settings.node_connect_timeout_s) as client:
            result = adapters.probe(client, target.url, engine, pinned_request_kwargs(target))
    except ValidationFailedError as exc:
        result = adapters.ProbeResult(False, error=f"{exc.code}: {exc.details.get('reason')}")
    agent: Attested | None = None
    if result.healthy and agent_url and agent_key:
        agent = _attest_by_agent(settings, node_id, agent_url, agent_key, result,
                                 lora=adapters.engine(engine).lora)
    with unit_of_work() as session:
        node = _node(session, node_id)
        before = (node.healthy, node.attestation, node.attested_version_id,
                  node.attested_adapters)
        node.healthy = result.healthy
        node.last_probe_at = utcnow()
        node.last_error = result.error
        if result.healthy and agent is not None:
            node.reported_model_id, node.reported_revision = result.model_id, result.revision
            node.attested_version_id = agent.version_id
            node.attested_adapters = agent.adapters
            node.attestation = "attested" if agent.version_id else "quarantined"
            node.quarantine_reason = agent.reason
        elif result.healthy:
            node.reported_model_id, node.reported_revision = result.model_id, result.revision
            version_id = registry.servable_version_for(result.model_id, result.revision)
            node.attested_adapters = {}  # only an agent can attest an adapter's files
            if version_id is not None:
                node.attestation, node.attested_version_id = "attested", version_id
                node.quarantine_reason = ""
            else:
                node.attestation, node.attested_version_id = "quarantined", None
                node.quarantine_reason = (
                    f"the node serves {result.model_id or '(unknown model)'} at revision "
                    f"{result.revision or '(not reported)'}, which is no approved version"
                    + (f"; {result.error}" if result.error else ""))
        after = (node.healthy, node.attestation, node.attested_version_id,
                 node.attested_adapters)
        if after != before:
            node.row_version += 1
            session.flush()
            action = ("node.quarantine" if node.attestation == "quarantined" and
                      before[1] != "quarantined" else
                      "node.attest" if node.attestation == "attested" and
                      before[1:] != after[1:] else "node.health")
            record(session, actor=actor.ref, action=action, target_type="node", target_id=node.id,
                outcome="success" if node.routable else "failure",
                details={"name": node.name, "healthy": node.healthy,
                         "attestation": node.attestation,
                         "attested_version_id": node.attested_version_id,
                         "attested_adapters": node.attested_adapters,
                         "reported_model_id": node.reported_model_id,
                         "reported_revision": node.reported_revision,
                         "reason": node.quarantine_reason or node.last_error},
            )
        return node


def probe_all(settings: Settings) -> list[Node]:
    nodes = [n.id for n in list_nodes()]
    return [probe_node(settings, node_id) for node_id in nodes]


_PROBE_LOCK_KEY = 0x43484152505242  # any fixed number: one prober at a time


def probe_round(settings: Settings) -> bool:
    """Probe every node unless another process is doing it right now; True if this one did.

    Every API worker runs the loop; a PostgreSQL advisory lock makes one of them do each
    round (SQLite: one process anyway).
    """
    database = scope.current().database
    if database.dialect != "postgresql":
        probe_all(settings)
        return True
    with database.engine.connect() as conn:
        got = conn.exec_driver_sql(f"SELECT pg_try_advisory_lock({_PROBE_LOCK_KEY})").scalar()
        conn.commit()
        if not got:
            return False
        try:
            probe_all(settings)
        finally:
            conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_PROBE_LOCK_KEY})")
            conn.commit()
    return True


# --- deployments ----------------------------------------------------------------------------

def _deployment(session: Session, deployment_id: str) -> Deployment:
    dep = session.get(Deployment, deployment_id)
    if dep is None:
        raise NotFoundError(f"no deployment {deployment_id}", code="deployment_not_found")
    return dep


def create_deployment(actor: Actor, *, serving_name: str, version_id: str,
                      node_ids: list[str]) -> Deployment:
    actor.require(*OPERATORS, action="deployment.create", target_type="deployment",
                  target_id=serving_name)
    with unit_of_work() as session:
        version = registry.version_refs([version_id]).get(version_id)
        if version is None:
            raise NotFoundError(f"no model version {version_id}", code="version_not_found")
        if version.state != "approved":
            raise ConflictError(f"only approved versions are deployed; this one is "
                                f"{version.state}", code="version_not_approved")
        for node_id in node_ids:
            _node(session, node_id)
        if session.scalar(select(Deployment.id).where(Deployment.serving_name == serving_name)):
            raise ConflictError(f"the serving name {serving_name!r} is taken",
                                code="deployment_exists")
        dep = Deployment(id=str(uuid.uuid4()), serving_name=serving_name,
                         version_id=version_id, created_by=actor.ref,
                         node_links=[DeploymentNode(node_id=n) for n in sorted(set(node_ids))])
        session.add(dep)
        session.flush()
        record(session, actor=actor.ref, action="deployment.create", target_type="deployment",
                     target_id=dep.id,
                     details={"serving_name": serving_name, "version_id": version_id,
                              "node_ids": dep.node_ids})
        return dep


def list_deployments() -> list[Deployment]:
    with unit_of_work() as session:
        return list(session.scalars(select(Deployment).order_by(Deployment.serving_name)))


def set_deployment_active(actor: Actor, deployment_id: str, active: bool) -> Deployment:
    action = "deployment.activate" if active else "deployment.deactivate"
    actor.require(*OPERATORS, action=action, target_type="deployment", target_id=deployment_id)
    with unit_of_work() as session:
        dep = _deployment(session, deployment_id)
        dep.active = active
        dep.row_version += 1
        session.flush()
        record(session, actor=actor.ref, action=action, target_type="deployment",
                     target_id=dep.id, details={"serving_name": dep.serving_name})
        return dep


# --- what dispatch and batches read of nodes and deployments (plain values) ----------------

@dataclass(frozen=True, slots=True)
class NodeTarget:
    """A node a request may be sent to."""

    id: str
    name: str
    base_url: str
    region: str
    engine: str
    reported_model_id: str | None
    # The deployment's version is a LoRA adapter this node serves beside its base: the
    # adapter's name on the engine, which each request names (charter.dispatch.upstream).
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class DeploymentRoute:
    """What an active serving name leads to: its version and the nodes that may serve it
    (routable and attested for that version; TGI's native protocol only on TGI nodes)."""

    deployment_id: str
    version_id: str
    candidates: tuple[NodeTarget, ...]
    nodes_total: int


@dataclass(frozen=True, slots=True)
class ActiveDeployment:
    serving_name: str
    version_id: str
    created_at: datetime


def deployment_route(serving_name: str, protocol: str) -> DeploymentRoute | None:
    with unit_of_work() as session:
        dep = session.scalar(select(Deployment).where(Deployment.serving_name == serving_name,
                                                      Deployment.active.is_(True)))
        if dep is None:
            return None
        nodes = list(session.scalars(select(Node).where(Node.id.in_(dep.node_ids))))
        # Every engine speaks OpenAI's protocol; TGI's and TEI's native routes only theirs.
        # An adapter goes to the nodes whose agent attested it beside its base.
        candidates = tuple(
            NodeTarget(n.id, n.name, n.base_url, n.region, n.engine, n.reported_model_id,
                       None if n.attested_version_id == dep.version_id
                       else n.attested_adapters[dep.version_id])
            for n in nodes
            if n.routable and (n.attested_version_id == dep.version_id
                               or dep.version_id in (n.attested_adapters or {}))
            and protocol in adapters.engine(n.engine).protocols)
        return DeploymentRoute(dep.id, dep.version_id, candidates, len(nodes))


def active_deployments() -> list[ActiveDeployment]:
    """Active deployments, by serving name."""
    with unit_of_work() as session:
        return [ActiveDeployment(d.serving_name, d.version_id, d.created_at)
                for d in session.scalars(select(Deployment).where(Deployment.active.is_(True))
                                         .order_by(Deployment.serving_name))]


def capacities(node_ids: Sequence[str]) -> dict[str, int]:
    """The nodes' declared capacities (concurrent requests), by id."""
    with unit_of_work() as session:
        return {i: int(c) for i, c in session.execute(
            select(Node.id, Node.capacity).where(Node.id.in_(list(node_ids))))}

