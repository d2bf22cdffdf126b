"""Witnesses: real `charter witness serve` processes that the log submits each checkpoint
to, over HTTP, as C2SP tlog-witness says. A witness cosigns only consistent extensions,
keeps its state across restarts, and a bundle verifies only with the quorum of
cosignatures the auditor asks for."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from charter.audit import checkpoints, witnesses
from charter.audit.bundle import Selection
from charter.audit.keys import load_signers
from charter.audit.service import EventFilter, export_bundle, list_events
from charter.audit.verify import main as charter_verify
from charter.audit.verify import verify_bundle
from charter.runtime import Runtime
from charter.settings import Settings
from charter.witness.cli import witness as witness_cli
from tests.audit_support import ORIGIN, append_many, as_insider, rechain, signing
from tests.processes import free_port, wait_until_up
from tests.runtimes import bound_runtime

CHARTER = Path(sys.executable).parent / "charter"


@dataclass
class WitnessProcess:
    name: str
    key_file: Path
    state: Path
    log_key: str
    public: str = ""
    url: str = ""
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.state.with_suffix(".log").open("ab")
        self.proc = subprocess.Popen(
            [str(CHARTER), "witness", "serve", "--name", self.name, "--key",
             str(self.key_file), "--state", str(self.state), "--log",
             f"{ORIGIN}={self.log_key}", "--bind", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
        wait_until_up(self.proc, f"{self.url}/healthz", self.state.with_suffix(".log"),
                      "the witness")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    @property
    def entry(self) -> str:
        return f"{self.public} {self.url}"


@pytest.fixture
def make_witness(tmp_path: Path) -> Iterator[Callable[[str, str], WitnessProcess]]:
    made: list[WitnessProcess] = []

    def make(name: str, log_key: str) -> WitnessProcess:
        folder = tmp_path / name.replace("/", "-")
        folder.mkdir()
        result = CliRunner().invoke(witness_cli, ["keygen", "--name", name,
                                                  str(folder / "key.pem")])
        assert result.exit_code == 0, result.output
        w = WitnessProcess(name, folder / "key.pem", folder / "state.db", log_key,
                           public=result.output.rsplit(" ", 1)[1].strip())
        w.start()
        made.append(w)
        return w

    witnesses._known.clear()
    yield make
    for w in made:
        w.stop()


@pytest.fixture
def log_settings(configured: Settings, tmp_path: Path) -> Settings:
    (tmp_path / "keys").mkdir()
    return signing(configured, tmp_path / "keys",
                   audit_checkpoint_dir=str(tmp_path / "outside"))


def _witnessed(settings: Settings, *ws: WitnessProcess) -> Settings:
    import dataclasses

    return dataclasses.replace(settings, audit_witnesses=",".join(w.entry for w in ws))


def _export(settings: Settings) -> bytes:
    out = io.BytesIO()
    export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    return out.getvalue()


def test_checkpoints_are_cosigned_and_bundles_need_the_quorum(
        log_settings: Settings, make_witness, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    log_key = str(load_signers(log_settings)[0].verifier)
    w1, w2 = make_witness("witness.test/w1", log_key), make_witness("witness.test/w2", log_key)
    settings = _witnessed(log_settings, w1, w2)
    with bound_runtime(settings) as runtime:
        _run_quorum_story(runtime, w1, w2, tmp_path)


def _run_quorum_story(runtime: Runtime, w1: WitnessProcess, w2: WitnessProcess,
                      tmp_path: Path) -> None:
    settings = runtime.settings
    trusted = [s.verifier for s in load_signers(settings)]
    keys = [witnesses.CosignerKey.parse(w.public) for w in (w1, w2)]
    append_many(40)
    first = checkpoints.issue(settings, force=True)
    append_many(25, start=40)
    second = checkpoints.issue(settings, force=True)  # old 40 and a proof to each witness
    assert first is not None and second is not None
    latest = (Path(settings.audit_checkpoint_dir) / "latest.note").read_text()
    assert latest.count("\u2014 witness.test/w") == 2  # the external copy carries them
    bundle = _export(settings)
    report = verify_bundle(bundle, trusted, witnesses=keys, quorum=2)
    assert report.ok and report.witnessed_size == 65, report.findings

    # One witness down: checkpoints go on, cosigned by the other only.
    w2.stop()
    append_many(5, start=65)
    third = checkpoints.issue(settings, force=True)
    assert third is not None and third.size == 71  # with the export event (66)
    failures = generate_latest(runtime.metrics).decode()
    assert ('charter_audit_witness_failures_total{reason="unreachable",'
            'witness="witness.test/w2"} 1.0') in failures
    bundle = _export(settings)
    assert verify_bundle(bundle, trusted, witnesses=keys, quorum=1).ok
    report = verify_bundle(bundle, trusted, witnesses=keys, quorum=2)
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "witness_quorum", 66)
    path = tmp_path / "b.zip"
    path.write_bytes(bundle)
    args = [str(path), "--key", str(trusted[0]), "--witness-key", w1.public,
            "--witness-key", w2.public]
    assert charter_verify([*args, "--quorum", "1"]) == 0
    assert charter_verify(args) == 1  # all of them, by default
    assert charter_verify([*args, "--quorum", "3"]) == 2  # more than there are

    # It comes back with its state and catches up from the size it cosigned (65).
    w2.start()
    settings = _witnessed(settings, w1, w2)
    append_many(3, start=71)
    assert checkpoints.issue(settings, force=True) is not None
    bundle = _export(settings)
    assert verify_bundle(bundle, trusted, witnesses=keys, quorum=2).ok


def _one_witness(log_settings: Settings, make_witness) -> tuple[WitnessProcess, Settings]:  # type: ignore[no-untyped-def]
    """A witness of the log, and the log's settings that submit to it."""
    w1 = make_witness("witness.test/w1", str(load_signers(log_settings)[0].verifier))
    return w1, _witnessed(log_settings, w1)


def test_a_witness_refuses_the_rewritten_log_even_with_the_folder_wiped_and_a_restart(
        log_settings: Settings, make_witness, pg_conn) -> None:  # type: ignore[no-untyped-def]
    w1, settings = _one_witness(log_settings, make_witness)
    with bound_runtime(settings):
        append_many(40)
        assert checkpoints.issue(settings, force=True) is not None
        # The insider's whole attack, the checkpoint folder included (the second case).
        as_insider(pg_conn, "UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 17",
                   "DELETE FROM audit_tree_nodes", "DELETE FROM audit_checkpoints")
        rechain(pg_conn, 17)
        shutil.rmtree(settings.audit_checkpoint_dir)
        w1.stop()
        w1.start()  # its state is on its own storage
        settings = _witnessed(settings, w1)
        witnesses._known.clear()  # a freshly started log server knows nothing either
        append_many(5, start=40)
        with pytest.raises(checkpoints.AuditIntegrityError) as refused:
            checkpoints.issue(settings, force=True)
        assert refused.value.details["reason"] == "witness_refused"
        assert refused.value.details["witness"] == "witness.test/w1"
        alarm = list_events(EventFilter(action="audit.integrity_alarm"))
        assert alarm and alarm[-1].details["code"] == "audit_integrity"
    shown = CliRunner().invoke(witness_cli, ["show", "--state", str(w1.state), ORIGIN])
    assert shown.exit_code == 0 and "(inconsistent)" in shown.output
    assert shown.output.startswith(f"{ORIGIN}\n40\n")  # it still holds the honest tree


def test_a_witness_that_saw_more_than_the_log_holds_raises_the_alarm(
        log_settings: Settings, make_witness, pg_conn) -> None:  # type: ignore[no-untyped-def]
    _, settings = _one_witness(log_settings, make_witness)
    with bound_runtime(settings):
        append_many(40)
        assert checkpoints.issue(settings, force=True) is not None
        as_insider(pg_conn, "DELETE FROM audit_events WHERE seq > 30",
                   "DELETE FROM audit_tree_nodes", "DELETE FROM audit_checkpoints")
        shutil.rmtree(settings.audit_checkpoint_dir)
        witnesses._known.clear()
        with pytest.raises(checkpoints.AuditIntegrityError) as refused:
            checkpoints.issue(settings, force=True)
        assert refused.value.details["reason"] == "truncated"
        assert refused.value.details["first_bad_seq"] == 31


def test_cosignatures_are_append_only(log_settings: Settings, make_witness, pg_conn) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    _, settings = _one_witness(log_settings, make_witness)
    with bound_runtime(settings):
        append_many(3)
        assert checkpoints.issue(settings, force=True) is not None
    assert pg_conn.execute("SELECT count(*) FROM audit_cosignatures").fetchone()[0] == 1
    for statement in ("UPDATE audit_cosignatures SET line = 'x'",
                      "DELETE FROM audit_cosignatures", "TRUNCATE audit_cosignatures"):
        with pytest.raises(psycopg.Error, match="append-only"):
            pg_conn.execute(statement)


def test_an_export_takes_the_checkpoint_the_witnesses_cosigned_at_its_size(
        log_settings: Settings, make_witness) -> None:  # type: ignore[no-untyped-def]
    w1, settings = _one_witness(log_settings, make_witness)
    key = witnesses.CosignerKey.parse(w1.public)
    with bound_runtime(settings):
        append_many(12)
        w1.stop()
        first = checkpoints.issue(settings, force=True)  # size 12, no witness to ask
        w1.start()
        settings = _witnessed(settings, w1)
        second = checkpoints.issue(settings, force=True)  # size 12 again, cosigned
        assert first is not None and second is not None and first.size == second.size == 12
        out = io.BytesIO()
        export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    trusted = [s.verifier for s in load_signers(settings)]
    report = verify_bundle(out.getvalue(), trusted, witnesses=[key], quorum=1)
    assert report.ok and report.witnessed_size == 12, report.findings
