"""Nodes and deployments: what each node reports beside what was approved, probes, drain and
restore; deployments on and off."""

from __future__ import annotations

from flask import g, request, url_for
from werkzeug.wrappers import Response

from charter import scope
from charter.console.blueprint import bp
from charter.console.ui import action, render
from charter.nodes import service as nodes
from charter.registry import service as registry

READERS = ("admin", "operator", "auditor")


@bp.get("/nodes", endpoint="nodes")
def nodes_page() -> Response:
    g.actor.require(*READERS, action="node.read", target_type="node", target_id="*")
    found = nodes.list_nodes()
    versions = {v.id: v for v in registry.list_versions()}
    deployments = nodes.list_deployments()
    by_id = {n.id: n for n in found}
    return render("console/pages/nodes.html", section="nodes", title="Nodes", nodes=found,
                  versions=versions, deployments=deployments, by_id=by_id)


def _back(**_: str) -> str:
    return url_for("console.nodes")


@bp.post("/nodes/<node_id>/probe")
@action(_back)
def probe(node_id: str) -> str:
    g.actor.require(*nodes.OPERATORS, action="node.probe", target_type="node",
                    target_id=node_id)
    node = nodes.probe_node(scope.current().settings, node_id, g.actor)
    return (f"Probed {node.name}: {'healthy' if node.healthy else 'not healthy'}, "
            f"{node.attestation}.")


@bp.post("/nodes/<node_id>/drain")
@action(_back)
def drain(node_id: str) -> str:
    node = nodes.drain_node(g.actor, node_id, request.form.get("reason", ""))
    return f"Draining {node.name}: nothing new is routed to it."


@bp.post("/nodes/<node_id>/restore")
@action(_back)
def restore(node_id: str) -> str:
    node = nodes.restore_node(g.actor, node_id, request.form.get("reason", ""))
    return f"Restored {node.name}."


@bp.post("/deployments/<deployment_id>/active")
@action(_back)
def deployment_active(deployment_id: str) -> str:
    on = request.form.get("active") == "1"
    d = nodes.set_deployment_active(g.actor, deployment_id, on)
    return f"{d.serving_name} {'activated' if on else 'deactivated'}."
