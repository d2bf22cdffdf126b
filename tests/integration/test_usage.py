"""Usage counters: concurrent outcomes of a day's first requests all count."""

from __future__ import annotations

import threading

from sqlalchemy import select

from charter.db import unit_of_work
from charter.dispatch.models import Usage
from charter.dispatch.service import NodeTarget, Plan, record_outcome
from charter.identity.actor import SYSTEM
from charter.policy.engine import Decision


def test_concurrent_outcomes_count_exactly(configured) -> None:  # type: ignore[no-untyped-def]
    decision = Decision("dispatch", True, (), (), "d1", "sha256:x", "regorus", 0.1, "sha256:y")
    plan = Plan(actor=SYSTEM, serving_name="m", deployment_id="dep", version_id="v",
                model_name="m", team_id="t1", team="t", data_class="internal",
                purpose="assistant", decision=decision, nodes=[])
    node = NodeTarget("n", "n", "http://127.0.0.1:9", "eu-central", "tgi", None)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                record_outcome(plan, node=node, outcome="completed", status=200, tokens_in=2,
                               tokens_out=3, ttft_ms=1.0, request_digest="sha256:z",
                               stream=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with unit_of_work() as session:
        row = session.scalar(select(Usage).where(Usage.team_id == "t1"))
        assert (row.requests, row.tokens_in, row.tokens_out) == (40, 80, 120)
