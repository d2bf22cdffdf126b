"""Attestation by digests, air-gapped: a real agent (charter.nodes.agent, over HTTP) beside a
TGI node that reports what an air-gapped TGI reports (`model_id` a local path,
`model_sha` null). Charter challenges the agent, checks the signed statement against the
approved version's pinned digests, and quarantines, with its own code, a wrong file, a
replayed statement, an unknown key, a bad signature or a slow agent."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.actor import SYSTEM
from charter.audit.service import EventFilter, list_events
from charter.nodes import service as nodes
from charter.nodes.agent import Agent, ModelFiles, make_server
from charter.nodes.statement import public_key_text
from tests.batch_support import FakeNode
from tests.processes import free_port, wait_until_up

WEIGHTS = b"\x00tiny weights\x01" * 1000
CONFIG = b'{"architectures": ["LlamaForCausalLM"]}'


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class AgentWorld:
    settings: Any
    model: Path
    key: Ed25519PrivateKey
    node: FakeNode
    node_id: str
    version_id: str
    agent: ThreadingHTTPServer | None = None

    @property
    def agent_url(self) -> str:
        assert self.agent is not None
        return f"http://127.0.0.1:{self.agent.server_address[1]}"

    def serve_agent(self, handler_server: ThreadingHTTPServer | None = None) -> None:
        if self.agent is not None:
            self.agent.shutdown()
            self.agent.server_close()
        self.agent = handler_server or make_server(
            Agent(self.key, ModelFiles(self.model), node="n1", engine="tgi",
                  engine_version="3.3.6"), "127.0.0.1", 0)
        threading.Thread(target=self.agent.serve_forever, daemon=True).start()

    def enroll(self, key: Ed25519PrivateKey | None = None) -> None:
        node = nodes.get_node(self.node_id)
        nodes.enroll_agent(SYSTEM, self.settings, self.node_id, agent_url=self.agent_url,
                           agent_key=public_key_text(key or self.key),
                           row_version=node.row_version)

    def probe(self) -> Any:
        return nodes.probe_node(self.settings, self.node_id)


def _version(owner: Any) -> str:
    from tests.integration.test_access_matrix import _approved_version

    return _approved_version(owner, 1, name="tiny", files=[
        ("model.safetensors", len(WEIGHTS), _sha(WEIGHTS)),
        ("config.json", len(CONFIG), _sha(CONFIG))])


@pytest.fixture
def world(configured, make_person, tmp_path) -> Iterator[AgentWorld]:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(WEIGHTS)
    (model / "config.json").write_bytes(CONFIG)
    (model / "README.md").write_text("not pinned: does not matter")
    settings = dataclasses.replace(configured, node_allowed_networks="127.0.0.0/8",
                                   node_agent_timeout_s=1.0)
    version_id = _version(make_person("steward"))
    node = FakeNode("/data/models/tiny", None, 0.0).start()  # an air-gapped TGI
    registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                     base_url=node.url, engine="tgi", labels={}, capacity=4)
    w = AgentWorld(settings, model, Ed25519PrivateKey.generate(), node, registered.id,
                   version_id)
    w.serve_agent()
    try:
        yield w
    finally:
        node.stop()
        if w.agent is not None:
            w.agent.shutdown()
            w.agent.server_close()


def test_an_air_gapped_tgi_is_attested_by_its_agent(world: AgentWorld) -> None:
    # Without an agent, a TGI that reports a path and no revision proves nothing.
    assert world.probe().attestation == "quarantined"
    world.enroll()
    node = world.probe()
    assert (node.attestation, node.attested_version_id, node.routable) == (
        "attested", world.version_id, True)
    assert node.reported_model_id == "/data/models/tiny" and node.reported_revision is None
    enrolled = list_events(EventFilter(action="node.agent_enroll"))
    assert enrolled[-1].details["key_id"].startswith("ed25519:")


def test_one_wrong_digest_quarantines_and_the_right_bytes_bring_it_back(
        world: AgentWorld) -> None:
    world.enroll()
    assert world.probe().routable
    (world.model / "config.json").write_bytes(CONFIG.replace(b"Llama", b"Evil!"))
    node = world.probe()
    assert node.attestation == "quarantined" and not node.routable
    assert node.quarantine_reason.startswith("agent_digest_mismatch")
    assert "config.json has SHA-256" in node.quarantine_reason
    event = list_events(EventFilter(action="node.quarantine"))[-1]
    assert "config.json" in event.details["reason"] and event.outcome == "failure"
    (world.model / "config.json").unlink()
    assert "config.json is missing" in world.probe().quarantine_reason
    (world.model / "config.json").write_bytes(CONFIG)  # the right bytes again: no restart
    node = world.probe()
    assert (node.attestation, node.attested_version_id) == ("attested", world.version_id)


class _Fixed(BaseHTTPRequestHandler):
    """An agent that answers whatever the test set: a replay, a forgery, or slowly."""

    answer: Any = None
    delay_s = 0.0

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(self.delay_s)
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _fixed(answer: Any, delay_s: float = 0.0) -> ThreadingHTTPServer:
    handler = type("Handler", (_Fixed,), {"answer": answer, "delay_s": delay_s})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    return server


def _genuine(world: AgentWorld, nonce: str, key: Ed25519PrivateKey | None = None) -> Any:
    return Agent(key or world.key, ModelFiles(world.model), node="n1", engine="tgi",
                 engine_version="3.3.6").answer(nonce)


@pytest.mark.parametrize(("forge", "code"), [
    ("replayed", "agent_nonce_mismatch"),
    ("unknown key", "agent_key_unknown"),
    ("bad signature", "agent_signature_invalid"),
    ("not a statement", "agent_statement_malformed"),
])
def test_a_statement_that_does_not_hold_quarantines(world: AgentWorld, forge: str,
                                                    code: str) -> None:
    world.enroll()
    assert world.probe().routable
    answer: Any = {
        "replayed": lambda: _genuine(world, "a" * 32),  # right bytes, an old challenge
        "unknown key": lambda: _genuine(world, "a" * 32, Ed25519PrivateKey.generate()),
        "bad signature": lambda: {**_genuine(world, "a" * 32), "signature":
                                  base64.b64encode(b"x" * 64).decode()},
        "not a statement": lambda: ["files"],
    }[forge]()
    world.serve_agent(_fixed(answer))
    world.enroll()  # the agent moved (a new address); same key
    node = world.probe()
    assert node.attestation == "quarantined" and not node.routable
    assert node.quarantine_reason.split(":")[0] == code, node.quarantine_reason
    assert list_events(EventFilter(action="node.quarantine"))[-1].details["reason"].startswith(
        code)


def test_a_slow_agent_quarantines(world: AgentWorld) -> None:
    world.enroll()
    world.serve_agent(_fixed({}, delay_s=3.0))
    world.enroll()
    node = world.probe()
    assert node.quarantine_reason.startswith("agent_timeout"), node.quarantine_reason


def test_rotating_the_key_retires_the_old_one(world: AgentWorld) -> None:
    world.enroll()
    assert world.probe().routable
    new = Ed25519PrivateKey.generate()
    world.enroll(new)  # the operator rotates; the agent still signs with the old key
    node = nodes.get_node(world.node_id)
    assert node.attestation == "unverified" and not node.routable  # until a probe
    assert world.probe().quarantine_reason.startswith("agent_key_unknown")
    world.key = new
    world.serve_agent()
    world.enroll(new)
    assert world.probe().routable
    rotated = list_events(EventFilter(action="node.agent_enroll"))[-1]
    assert rotated.details["replaced_key_id"] == rotated.details["key_id"]


def test_a_key_that_is_no_ed25519_key_is_refused(world: AgentWorld) -> None:
    from charter.errors import ValidationFailedError

    node = nodes.get_node(world.node_id)
    with pytest.raises(ValidationFailedError) as caught:
        nodes.enroll_agent(SYSTEM, world.settings, world.node_id, agent_url=world.agent_url,
                           agent_key=base64.b64encode(b"short").decode(),
                           row_version=node.row_version)
    assert caught.value.details["errors"][0]["field"] == "agent_key"
    assert nodes.get_node(world.node_id).agent_key is None


def test_the_agent_hashes_a_file_again_only_when_it_changed(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a" * 5000)
    (tmp_path / "b.bin").write_bytes(b"b" * 3000)
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk").write_bytes(b"j")
    files = ModelFiles(tmp_path)
    first = files.listing()
    assert [f["path"] for f in first] == ["a.bin", "b.bin"] and files.hashed_bytes == 8000
    assert files.listing() == first and files.hashed_bytes == 8000  # nothing read again
    (tmp_path / "b.bin").write_bytes(b"c" * 3001)
    changed = {f["path"]: f["sha256"] for f in files.listing()}
    assert files.hashed_bytes == 8000 + 3001
    assert changed["b.bin"] == _sha(b"c" * 3001) and changed["a.bin"] == _sha(b"a" * 5000)


def test_the_agent_command_serves_statements(world: AgentWorld, tmp_path: Path) -> None:
    """`charter node agent keygen` and `serve`, as an operator runs them."""
    import sys

    charter = str(Path(sys.executable).parent / "charter")
    key_path = tmp_path / "agent.pem"
    public = subprocess.run([charter, "node", "agent", "keygen", "--key", str(key_path)],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    port, log = free_port(), tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([charter, "node", "agent", "serve", "--model",
                                 str(world.model), "--key", str(key_path), "--node", "n1",
                                 "--engine", "tgi", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/health", log, "the agent")
        node = nodes.get_node(world.node_id)
        nodes.enroll_agent(SYSTEM, world.settings, world.node_id,
                           agent_url=f"http://127.0.0.1:{port}", agent_key=public,
                           row_version=node.row_version)
        assert world.probe().routable
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_an_agent_that_fails_or_is_gone_quarantines(world: AgentWorld) -> None:
    class Broken(_Fixed):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    server.daemon_threads = True
    world.serve_agent(server)
    world.enroll()
    assert world.probe().quarantine_reason.startswith("agent_failed: the agent answered HTTP 500")
    world.agent = None  # nothing listens at the enrolled address any more
    server.shutdown()
    server.server_close()
    node = world.probe()
    assert node.quarantine_reason.startswith("agent_unreachable"), node.quarantine_reason
    assert not node.routable
