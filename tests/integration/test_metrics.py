"""/metrics: what operators watch, with label sets bounded by configuration (teams, serving
names, nodes, policy codes), never by callers or requests: a label that could grow with
traffic fails here."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from charter.audit.service import EventFilter, list_events
from tests.batch_support import make_world
from tests.runtimes import app_for, flush_outcomes

CHAT = {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
BOUNDED = {"method", "endpoint", "status", "team", "model", "direction", "node", "outcome",
           "policy", "result", "code", "kind", "reason", "witness", "region", "limit",
           "action", "destination", "estimator"}


def test_metrics_count_what_happened_with_bounded_labels(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    world = make_world(configured, make_person)
    try:
        client = app_for(world.settings).test_client()
        for _ in range(3):
            assert client.post("/v1/chat/completions", headers=world.headers,
                               json=CHAT).status_code == 200
        client.post("/v1/chat/completions", json=CHAT,
                    headers={**world.headers, "X-Charter-Purpose": "marketing"})  # denied
        for i in range(20):  # what a scanner sends: odd methods, paths, people
            client.open(f"/v1/probe-{i}", method=f"X{i}")
            client.get(f"/api/v1/versions/{i}", headers=make_person("user").headers)
        assert flush_outcomes()
        text = client.get("/metrics").get_data(as_text=True)
    finally:
        world.node.stop()
    samples = [s for f in text_string_to_metric_families(text) if f.name.startswith("charter")
               for s in f.samples]
    labels = {name for s in samples for name in s.labels}
    assert labels - {"le"} <= BOUNDED, labels - BOUNDED
    methods = {s.labels["method"] for s in samples if "method" in s.labels}
    assert methods <= {"GET", "POST", "other"}, methods
    endpoints = {s.labels["endpoint"] for s in samples if "endpoint" in s.labels}
    assert not any("probe-" in e or "/" in e for e in endpoints), endpoints

    def value(name: str, **want: str) -> float:
        return sum(s.value for s in samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in want.items()))

    outcomes = list_events(EventFilter(action="dispatch.outcome"))
    assert value("charter_tokens_total", team="t", model="m", direction="out") == sum(
        o.details["tokens_out"] for o in outcomes) == 6
    assert value("charter_policy_decisions_total", policy="dispatch", result="allow") == 3
    assert value("charter_policy_decisions_total", policy="dispatch", result="deny",
                 code="purpose_not_approved") == 1
    assert value("charter_dispatch_outcomes_total", model="m", node="n1",
                 outcome="completed") == 3
    assert value("charter_time_to_first_token_seconds_count", model="m", node="n1") == 3
    assert value("charter_audit_commit_seconds_count") >= 4  # the writer's transactions
    assert value("charter_audit_commit_entries_sum") >= value("charter_audit_commit_seconds_count")
    for state in ("healthy", "attested", "routable"):  # read from the database at scrape
        assert value(f"charter_node_{state}", node="n1", region="eu-central") == 1.0, state


def test_the_checkpoint_age_is_on_metrics(configured, make_person, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from charter.audit import checkpoints
    from tests.audit_support import signing

    settings = signing(configured, tmp_path)
    client = app_for(settings).test_client()
    assert "charter_audit_checkpoint_age_seconds" not in client.get("/metrics").text  # none yet
    make_person("user")  # an event to sign
    assert checkpoints.issue(settings, force=True) is not None
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    age = families["charter_audit_checkpoint_age_seconds"].samples[0].value
    assert 0 <= age < 60


def test_every_worker_of_charter_serve_is_in_every_scrape(configured, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Three gunicorn workers (SO_REUSEPORT spreads new connections over them): whichever
    answers /metrics, it reports the requests all of them served, summed."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    from tests.conftest import SECRET
    from tests.processes import free_port, wait_until_up

    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CHARTER_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(CHARTER_DATABASE_URL=configured.database_url, CHARTER_SECRET_KEY=SECRET,
               CHARTER_LOG_LEVEL="WARNING")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "charter"), "serve",
                                 "--bind", f"127.0.0.1:{port}", "--workers", "3",
                                 "--threads", "4"], env=env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, url + "/healthz", log, "charter serve")
        for _ in range(60):  # a connection each: spread over the workers
            assert httpx.get(url + "/healthz", timeout=5).status_code == 200
        pattern = re.compile(r'^charter_http_requests_total\{endpoint="healthz",method="GET",'
                             r'status="200"\} (\d+)', re.M)
        seen = set()
        for _ in range(12):
            text = httpx.get(url + "/metrics", timeout=5).text
            found = pattern.search(text)
            assert found is not None, text[:2000]
            seen.add(int(found.group(1)))
            assert "charter_node_healthy" in text or "# HELP charter_http" in text
        # Every scrape saw at least the 60 (and the first readiness polls), never one
        # worker's share: one sum, the same in every scrape.
        assert len(seen) == 1 and min(seen) >= 60, seen
    finally:
        proc.terminate()
        proc.wait(timeout=30)
