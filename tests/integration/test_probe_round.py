"""Periodic probing: one process per round, the others skip it."""

from __future__ import annotations

from charter.actor import SYSTEM
from charter.nodes.service import _PROBE_LOCK_KEY, get_node, probe_round, register_node


def test_one_prober_per_round(configured, pg_conn) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    # Loopback only: the probe really connects (nothing listens on the discard port).
    configured = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
    node = register_node(SYSTEM, configured, name="n1", base_url="http://127.0.0.1:9",
                         region="eu-central", engine="tgi", labels={}, capacity=1)
    pg_conn.execute(f"SELECT pg_advisory_lock({_PROBE_LOCK_KEY})")  # another worker probing
    assert probe_round(configured) is False
    assert get_node(node.id).last_probe_at is None
    pg_conn.execute(f"SELECT pg_advisory_unlock({_PROBE_LOCK_KEY})")
    assert probe_round(configured) is True
    probed = get_node(node.id)
    assert probed.last_probe_at is not None and probed.healthy is False  # nothing listens
    assert probed.last_error
    held = pg_conn.execute(  # in this test's database: other databases' tests lock too
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()
    assert held[0] == 0  # released after the round
