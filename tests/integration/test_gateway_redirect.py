"""A node that answers a redirect is a failed node: never followed, never passed on."""

from __future__ import annotations

import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from tests.integration.test_access_matrix import _approved_version
from tests.runtimes import flush_outcomes


def test_redirecting_node_is_refused(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry.service import get_version
    from tests.runtimes import app_for

    owner = make_person("steward")
    version = get_version(_approved_version(owner, 1))
    hits: list[str] = []

    class Node(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, body: dict[str, Any], **headers: str) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            info = {"model_id": version.model.source_repo, "model_sha": version.source_revision}
            self._send(200, info if self.path == "/info" else {})

        def do_POST(self) -> None:  # noqa: N802
            hits.append(self.path)
            self._send(302, {}, Location="http://169.254.169.254/latest/meta-data/")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8")
        node = nodes.register_node(SYSTEM, settings, name="redirector", region="eu-central",
                                   base_url=f"http://127.0.0.1:{server.server_address[1]}",
                                   engine="tgi", labels={}, capacity=1)
        assert nodes.probe_node(settings, node.id).attestation == "attested"
        nodes.create_deployment(SYSTEM, serving_name="r", version_id=version.id,
                                node_ids=[node.id])
        team = create_team(SYSTEM, name="t", description="", requests_per_day=None,
                           entitlements={"models": ["*"], "data_classes": ["*"],
                                         "regions": ["*"]}, default_data_class="internal")
        bot = create_service_account(SYSTEM, team.id, username="bot")
        key = create_api_key(SYSTEM, bot.id, name="k").token
        client = app_for(settings).test_client()
        r = client.post("/tgi/r/generate", headers={"Authorization": f"Bearer {key}"},
                        json={"inputs": "x"})
        assert r.status_code == 503 and r.get_json()["error_type"] == "nodes_unavailable"
        assert "169.254" not in r.get_data(as_text=True) and "Location" not in r.headers
        assert hits == ["/generate"]  # asked once, the redirect not followed
        assert flush_outcomes()  # outcomes are written after the answer
        outcome = list_events(EventFilter(action="dispatch.outcome"))[-1]
        assert outcome.details["outcome"] == "failed"
        assert outcome.details["error"] == "redirector: HTTP 302"
    finally:
        server.shutdown()
        server.server_close()
