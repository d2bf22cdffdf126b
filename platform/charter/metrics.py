"""What /metrics reads from the database at scrape time: each node's state, and how old the
newest signed checkpoint is. One query each a scrape; a database that does not answer
leaves these out of that scrape (the HTTP and process metrics still come)."""

from __future__ import annotations

from collections.abc import Iterator

import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from charter.audit import checkpoints
from charter.db import utcnow
from charter.nodes import service as nodes
from charter.runtime import Runtime
from charter.scope import bound

log = structlog.get_logger("charter.metrics")


class StateCollector(Collector):
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The names, without a query (the registry asks once, at registration)."""
        for name in ("charter_node_healthy", "charter_node_attested", "charter_node_routable"):
            yield GaugeMetricFamily(name, "", labels=("node", "region"))
        yield GaugeMetricFamily("charter_audit_checkpoint_age_seconds", "")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with bound(self.runtime):
                found = nodes.list_nodes()
                newest = checkpoints.newest()
        except Exception as exc:  # noqa: BLE001 - a scrape never fails on the database
            log.warning("state metrics unavailable", error=str(exc))
            return
        healthy = GaugeMetricFamily("charter_node_healthy", "1 if the node's last probe or "
                                    "call found it up", labels=("node", "region"))
        attested = GaugeMetricFamily("charter_node_attested", "1 if the node is attested for "
                                     "an approved version", labels=("node", "region"))
        routable = GaugeMetricFamily("charter_node_routable", "1 if requests may go to the "
                                     "node (active, attested, healthy)", labels=("node", "region"))
        for n in found:
            for family, value in ((healthy, n.healthy), (attested, n.attestation == "attested"),
                                  (routable, n.routable)):
                family.add_metric((n.name, n.region), 1.0 if value else 0.0)
        yield from (healthy, attested, routable)
        if newest is not None:
            age = GaugeMetricFamily("charter_audit_checkpoint_age_seconds",
                                    "Seconds since the newest signed checkpoint was issued")
            age.add_metric((), max(0.0, (utcnow() - newest.issued_at).total_seconds()))
            yield age
