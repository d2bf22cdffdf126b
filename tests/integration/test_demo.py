"""`charter demo --no-serve`: embedded SQLite, seeded users and models, the tiny real model."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from charter.audit.service import head, verify_chain
from charter.cli import main
from charter.identity.service import authenticate_api_key, list_users
from charter.registry import service
from charter.settings import Settings
from tests.runtimes import bound_runtime

USERS = {
    "admin": ["admin"],
    "sam.steward": ["steward"],
    "ava.approver": ["approver"],
    "oli.operator": ["operator"],
    "aud.auditor": ["auditor"],
    "svc-helpdesk": ["user"],
}
STATES = {
    "TinyLlama-1.1B-Chat-v1.0": "approved",
    "Phi-3-mini-4k-instruct": "draft",
    "gemma-2b-it": "submitted",
    "Mistral-7B-Instruct-v0.3": "submitted",
    "Qwen2-1.5B-Instruct": "submitted",
    "charter-tiny-llama": "approved",
}


@dataclass
class Demo:
    data_dir: Path
    result: Result
    keys_modes_at_chmod: list[int]

    @property
    def keys_file(self) -> Path:
        return self.data_dir / "demo-keys.json"

    @property
    def tiny_dir(self) -> Path:
        return self.data_dir / "models" / "charter-tiny-llama"


def _run_demo(data_dir: Path, modes: list[int] | None = None) -> Result:
    real_chmod = os.chmod

    def chmod(path, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Record how open the keys file was just before it was locked down.
        if modes is not None and not isinstance(path, int) and Path(path).name == "demo-keys.json":
            modes.append(stat.S_IMODE(os.stat(path).st_mode))
        return real_chmod(path, mode, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("CHARTER_"):
                mp.delenv(key)
        mp.setattr(os, "chmod", chmod)
        return CliRunner().invoke(
            main, ["demo", "--no-serve", "--data-dir", str(data_dir)],
            catch_exceptions=False,
        )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    data_dir = tmp_path_factory.mktemp("demo")
    modes: list[int] = []
    result = _run_demo(data_dir, modes)
    return Demo(data_dir, result, modes)


@pytest.fixture
def demo_db(demo: Demo) -> Iterator[Demo]:
    url = f"sqlite:///{demo.data_dir / 'charter.db'}"
    with bound_runtime(Settings.from_env({}, database_url=url, demo=True)):
        yield demo


def test_demo_runs_and_reports(demo: Demo) -> None:
    assert demo.result.exit_code == 0, demo.result.output
    out = demo.result.output
    for name, state in list(STATES.items())[:5]:
        assert f"seeded {name} " in out and f"({state}" in out
    assert "admission: denied license_mismatch" in out  # gemma's careless declaration
    assert "built and imported charter-tiny-llama 0.1 (6 files)" in out
    assert (demo.data_dir / "charter.db").is_file()


def test_users_and_roles(demo_db: Demo) -> None:
    users = list_users()
    assert {u.username: u.roles for u in users} == USERS
    assert {u.username: u.kind for u in users}["svc-helpdesk"] == "service"


def test_models_and_states(demo_db: Demo) -> None:
    models = service.list_models()
    assert sorted(m.name for m in models) == sorted(STATES)
    states = {}
    for model in models:
        versions = service.list_versions(model.id)
        assert len(versions) == 1, model.name
        states[model.name] = versions[0].state
    assert states == STATES
    for version in service.list_versions(state="approved"):
        assert [d.decision for d in version.decisions] == ["approved"]
        assert version.decisions[0].decided_by_user_id != version.created_by_user_id
        assert version.decisions[0].allowed_regions == ["eu-central", "eu-west"]


def test_tiny_model_version(demo_db: Demo) -> None:
    model = service.find_model("charter-tiny-llama")
    assert model is not None
    (version,) = service.list_versions(model.id)
    on_disk = sorted(p for p in demo_db.tiny_dir.iterdir() if p.is_file())
    assert len(version.files) == len(on_disk) == 6
    assert {f.path: (f.size, f.sha256) for f in version.files} == {
        p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in on_disk
    }
    assert version.weight_format == "safetensors" and version.unsafe_weights is False
    assert (version.architecture, version.context_length) == ("LlamaForCausalLM", 512)
    assert version.license_card == "apache-2.0"
    assert version.parameter_count and version.parameter_count > 0


def test_keys_file_is_private_and_keys_work(demo_db: Demo) -> None:
    assert stat.S_IMODE(demo_db.keys_file.stat().st_mode) == 0o600
    # Never readable by others, not even between writing and locking it down.
    assert all(mode & 0o077 == 0 for mode in demo_db.keys_modes_at_chmod), [
        oct(m) for m in demo_db.keys_modes_at_chmod
    ]
    keys = json.loads(demo_db.keys_file.read_text())
    assert set(keys) == set(USERS)
    for username, token in keys.items():
        actor = authenticate_api_key(token)
        assert actor.username == username
        assert actor.roles == frozenset(USERS[username])


def test_audit_chain_verifies(demo_db: Demo) -> None:
    verdict = verify_chain()
    count, head_hash = head()
    assert verdict.ok, verdict
    assert verdict.count == count > 0
    assert verdict.head_hash == head_hash


def test_second_run_is_idempotent(demo: Demo) -> None:
    """Last in the file: it runs the demo again on the same data directory."""
    url = f"sqlite:///{demo.data_dir / 'charter.db'}"
    keys_before = demo.keys_file.read_bytes()
    tiny_before = {p.name: p.read_bytes() for p in demo.tiny_dir.iterdir()}
    with bound_runtime(Settings.from_env({}, database_url=url, demo=True)):
        events_before = head()

    result = _run_demo(demo.data_dir)
    assert result.exit_code == 0, result.output
    assert "seeded" not in result.output and "built and imported" not in result.output

    with bound_runtime(Settings.from_env({}, database_url=url, demo=True)):
        assert head() == events_before
        assert verify_chain().ok
        assert len(list_users()) == len(USERS)
        assert len(service.list_models()) == len(STATES)
        assert len(service.list_versions()) == len(STATES)
    assert demo.keys_file.read_bytes() == keys_before
    assert {p.name: p.read_bytes() for p in demo.tiny_dir.iterdir()} == tiny_before


def test_one_version_is_approved_on_evidence_and_one_refused_without(demo_db: Demo) -> None:
    """The demo organisation's rule (its own evidence.json beside the bundled policies):
    a high-risk version needs a recorded charter_qa evaluation. The tiny model has one, a
    real lm-eval run, and is approved; Mistral has none, and admission says so."""
    out = demo_db.result.output
    assert "charter-tiny-llama 0.1 approved on evidence: lm-eval charter_qa exact_match 0" in out
    assert "refused for its evidence: no result of charter_qa exact_match" in out
    rule = json.loads((demo_db.data_dir / "policies" / "data" / "evidence.json").read_text())
    assert rule["requirements"][0]["risk_tiers"] == ["high"]
    model = service.find_model("charter-tiny-llama")
    assert model is not None
    (tiny,) = service.list_versions(model.id)
    assert (tiny.risk_tier, tiny.state) == ("high", "approved")
    assert tiny.admission is not None and tiny.admission["allow"] is True
    [evaluation] = service.list_evaluations(tiny.id)
    assert evaluation.format == "lm-eval" and evaluation.model_named == ["charter-tiny-llama"]
    mistral = service.find_model("Mistral-7B-Instruct-v0.3")
    assert mistral is not None
    (refused,) = service.list_versions(mistral.id)
    assert refused.admission is not None
    assert "evaluation_missing" in [v["code"] for v in refused.admission["violations"]]
