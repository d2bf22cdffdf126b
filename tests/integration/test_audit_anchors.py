"""The log held against the checkpoints an insider cannot rewrite: the external copy, and
checkpoint rows only a trusted key could have signed. Tampering is done as a PostgreSQL
superuser would (triggers bypassed), by someone who knows the algorithm."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from charter import scope
from charter.audit import checkpoints
from charter.audit.bundle import Selection
from charter.audit.checkpoint import Checkpoint, sign
from charter.audit.keys import load_signers
from charter.audit.service import EventFilter, export_bundle, list_events, verify_chain
from charter.runtime import Runtime
from charter.settings import Settings
from tests.audit_support import append_many, as_insider, rechain, signing
from tests.runtimes import bound_runtime


@pytest.fixture
def anchored(configured: Settings, tmp_path: Path) -> Iterator[Runtime]:
    """A signing log with its external copy in `tmp_path/outside`, bound for the test."""
    (tmp_path / "keys").mkdir()
    settings = signing(configured, tmp_path / "keys",
                       audit_checkpoint_dir=str(tmp_path / "outside"))
    with bound_runtime(settings) as runtime:
        yield runtime


def _two_checkpoints(settings: Settings) -> tuple[int, int]:
    append_many(40)
    first = checkpoints.issue(settings, force=True)
    append_many(25, start=40)
    second = checkpoints.issue(settings, force=True)
    assert first is not None and second is not None
    return first.size, second.size


def _alarms(runtime: Runtime) -> float:
    text = generate_latest(runtime.metrics).decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("charter_audit_integrity_alarms_total{"))


def test_a_healthy_log_holds_against_every_signed_checkpoint(anchored: Runtime) -> None:
    first, second = _two_checkpoints(anchored.settings)
    append_many(3, start=65)  # past the last checkpoint: fine
    verdict = verify_chain()
    assert verdict.ok and verdict.count == second + 3 and verdict.checkpoint is None
    outside = sorted(p.name for p in Path(anchored.settings.audit_checkpoint_dir).iterdir())
    # two notes, the proof that the second extends the first, and the latest
    assert [n.rsplit(".", 1)[1] for n in outside] == ["note", "note", "proof", "note"]
    assert outside[-1] == "latest.note"
    assert checkpoints.issue(anchored.settings, force=True) is not None  # extends them
    assert _alarms(anchored) == 0


def test_a_rewritten_and_rechained_log_with_its_tree_and_checkpoints_dropped_is_caught(
        anchored: Runtime, pg_conn) -> None:  # type: ignore[no-untyped-def]
    settings = anchored.settings
    first, second = _two_checkpoints(settings)
    # The attack of the issue: rewrite an event, recompute the chain from there, drop the
    # tree and the checkpoint table. The database alone now looks perfect.
    as_insider(pg_conn, "UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 17",
               "DELETE FROM audit_tree_nodes", "DELETE FROM audit_checkpoints")
    rechain(pg_conn, 17)
    verdict = verify_chain()
    assert (verdict.ok, verdict.reason, verdict.checkpoint) == (False, "rewritten", first)
    assert verdict.first_bad_seq == 1 and "1..40" in (verdict.message or "")
    # The issuer refuses to sign the rewritten log, and says so loudly.
    with pytest.raises(checkpoints.AuditIntegrityError) as refused:
        checkpoints.issue(settings, force=True)
    assert refused.value.code == "audit_integrity" and refused.value.status == 409
    assert refused.value.details["reason"] == "rewritten"
    assert refused.value.details["source"].startswith("external:")
    alarm = list_events(EventFilter(action="audit.integrity_alarm"))
    assert alarm and alarm[-1].outcome == "denied"
    assert alarm[-1].details["code"] == "audit_integrity"
    assert _alarms(anchored) >= 2  # the walk's and the issuer's


def test_a_cut_tail_is_caught_even_with_the_checkpoint_table_gone(
        anchored: Runtime, pg_conn) -> None:  # type: ignore[no-untyped-def]
    settings = anchored.settings
    first, second = _two_checkpoints(settings)
    as_insider(pg_conn, f"DELETE FROM audit_events WHERE seq > {first + 5}",
               "DELETE FROM audit_checkpoints", "DELETE FROM audit_tree_nodes")
    verdict = verify_chain()
    assert (verdict.ok, verdict.reason) == (False, "truncated")
    assert verdict.checkpoint == second and verdict.first_bad_seq == first + 6
    with pytest.raises(checkpoints.AuditIntegrityError) as refused:
        checkpoints.issue(settings, force=True)
    assert refused.value.details["reason"] == "truncated"
    assert refused.value.details["checkpoint"] == second


def test_a_checkpoint_row_no_trusted_key_signed_is_named(
        anchored: Runtime, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = anchored.settings
    _two_checkpoints(settings)
    mallory = signing(dataclasses.replace(settings, audit_signing_keys=""),
                      tmp_path, "mallory")
    forged = sign(Checkpoint(settings.audit_log_origin, 3, b"\x07" * 32, ("time x",)),
                  *load_signers(mallory))
    as_insider(pg_conn, "INSERT INTO audit_checkpoints (size, root_hash, issued_at, note, keys) "
                        "VALUES (3, %s, now(), %s, 'mallory')", params=("07" * 32, forged))
    verdict = verify_chain()
    assert (verdict.ok, verdict.reason) == (False, "checkpoint_forged")
    assert "database:" in (verdict.message or "")


def test_two_signed_roots_of_one_size_are_a_fork(anchored: Runtime) -> None:
    """A fork (e.g. a log rolled back and grown again before it was anchored): the walk
    finds it at any size; the issuer, which reads only the newest external notes, finds it
    when it is at the newest size."""
    settings = anchored.settings
    first, second = _two_checkpoints(settings)
    outside = Path(settings.audit_checkpoint_dir)
    for size, name in ((first, "fork-a"), (second, "fork-b")):
        other = sign(Checkpoint(settings.audit_log_origin, size, bytes([size]) * 32,
                                ("time y",)), *load_signers(settings))
        (outside / f"{size:012d}-{name}.note").write_text(other)
    verdict = verify_chain()
    assert (verdict.ok, verdict.reason) == (False, "forked")
    assert f"size {first}" in (verdict.message or "")
    with pytest.raises(checkpoints.AuditIntegrityError) as refused:
        checkpoints.issue(settings, force=True)
    assert refused.value.details["reason"] == "forked"
    assert refused.value.details["size"] == second


def test_exports_of_a_broken_log_are_refused_cleanly(
        anchored: Runtime, pg_conn, make_person) -> None:  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    settings = anchored.settings
    _two_checkpoints(settings)
    as_insider(pg_conn, "DELETE FROM audit_events WHERE seq = 12")  # a middle row gone
    with pytest.raises(checkpoints.AuditIntegrityError) as refused:
        export_bundle(settings, Selection(), io.BytesIO(), actor_ref="user:auditor")
    assert refused.value.code == "audit_integrity"
    auditor = make_person("auditor")
    client = app_for(settings).test_client()
    r = client.post("/api/v1/audit/exports", headers=auditor.headers, json={})
    assert r.status_code == 409, r.get_data(as_text=True)[:300]
    assert r.get_json()["error"]["code"] == "audit_integrity"
    r = client.get("/api/v1/audit/proofs/inclusion?seq=20", headers=auditor.headers)
    assert r.status_code in (200, 409) and (
        r.status_code == 200 or r.get_json()["error"]["code"] == "audit_integrity")
    assert scope.current() is anchored


def test_auditors_see_the_alarm_on_the_console(anchored: Runtime, pg_conn,  # type: ignore[no-untyped-def]
                                               make_person) -> None:
    from tests.console_support import Console
    from tests.runtimes import app_for

    settings = anchored.settings
    first, _ = _two_checkpoints(settings)
    as_insider(pg_conn, f"DELETE FROM audit_events WHERE seq > {first}")
    with pytest.raises(checkpoints.AuditIntegrityError):
        checkpoints.issue(settings, force=True)
    app = app_for(settings)
    auditor, steward = make_person("auditor"), make_person("steward")
    page = Console(app, auditor.actor.user_id).get("/console/").get_data(as_text=True)
    assert 'id="integrity-alarm"' in page and "truncated" in page
    page = Console(app, steward.actor.user_id).get("/console/").get_data(as_text=True)
    assert 'id="integrity-alarm"' not in page  # auditors and admins only


def _kept(folder: Path) -> dict[int, list[str]]:
    """The auditor's copy of the external folder, as charter-verify reads it."""
    from charter.audit.verify import _load_external

    return _load_external(str(folder))


def _kept_proofs(folder: Path) -> list[tuple[int, int, list[str]]]:
    from charter.audit.verify import load_kept_proofs

    return load_kept_proofs(str(folder))


def test_a_bundle_is_held_against_kept_checkpoints_of_every_size(
        anchored: Runtime, tmp_path: Path) -> None:
    from charter.audit.verify import verify_bundle

    settings = anchored.settings
    first, second = _two_checkpoints(settings)
    append_many(10, start=65)
    third = checkpoints.issue(settings, force=True)
    assert third is not None
    keys = [s.verifier for s in load_signers(settings)]
    # Events 41..50 only: the bundle holds the checkpoint of size 65; those of sizes 40
    # and 75 are linked to it by the proofs it carries.
    out = io.BytesIO()
    export_bundle(settings, Selection(first_seq=41, last_seq=50), out, actor_ref="user:auditor")
    folder = Path(settings.audit_checkpoint_dir)
    kept, proofs = _kept(folder), _kept_proofs(folder)
    assert sorted(kept) == [first, second, third.size]
    # The folder chains its notes: a proof beside each from the one before it.
    assert [(a, b) for a, b, _ in proofs] == [(first, second), (second, third.size)]
    report = verify_bundle(out.getvalue(), keys, kept, kept_proofs=proofs)
    assert report.ok and report.checkpoints == 1, report.findings
    with zipfile.ZipFile(io.BytesIO(out.getvalue())) as z:
        links = json.loads(z.read("proofs.json"))["links"]
    # The folder chains the rest: one link, to the newest (above the bundle's checkpoint).
    assert [(x["size"], x["to"]) for x in links] == [(third.size, second)]
    # Without the proofs kept beside the notes, nothing ties checkpoint 40 to the others.
    report = verify_bundle(out.getvalue(), keys, kept)
    assert (report.ok, report.reason) == (False, "checkpoint_unlinked")
    assert f"size {first} kept elsewhere" in (report.message or "")
    # A kept checkpoint nothing ties to a larger one fails: it cannot be told from a fork.
    other = sign(Checkpoint(settings.audit_log_origin, 50, b"\x05" * 32, ("time z",)),
                 *load_signers(settings))
    report = verify_bundle(out.getvalue(), keys, {**kept, 50: [other]}, kept_proofs=proofs)
    assert (report.ok, report.reason) == (False, "checkpoint_unlinked")
    # Two different signed notes of one size kept elsewhere are a fork, even if one of
    # them is the bundle's.
    forked = sign(Checkpoint(settings.audit_log_origin, first, b"\x06" * 32, ("time z",)),
                  *load_signers(settings))
    report = verify_bundle(out.getvalue(), keys, {**kept, first: [*kept[first], forked]},
                           kept_proofs=proofs)
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "checkpoint_fork", 41)
    # A kept checkpoint whose proof to the next does not hold: a fork.
    report = verify_bundle(out.getvalue(), keys, {**kept, first: [forked]},
                           kept_proofs=proofs)
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "checkpoint_fork", 41)
    assert f"size {first}" in (report.message or "")


def test_the_issues_attack_with_the_servers_folder_wiped_fails_against_the_auditors_copy(
        anchored: Runtime, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The second case of the threat model: the insider also controls Charter's checkpoint
    folder. The server then signs the rewritten log; an auditor's own copy of the
    checkpoints still catches it in every export."""
    import shutil

    from charter.audit.verify import verify_bundle

    settings = anchored.settings
    first, second = _two_checkpoints(settings)
    folder = Path(settings.audit_checkpoint_dir)
    auditors = tmp_path / "auditors-copy"
    shutil.copytree(folder, auditors)
    as_insider(pg_conn, "UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 17",
               "DELETE FROM audit_tree_nodes", "DELETE FROM audit_checkpoints")
    rechain(pg_conn, 17)
    shutil.rmtree(folder)
    assert verify_chain().ok  # nothing left on the server to hold it against
    keys = [s.verifier for s in load_signers(settings)]
    for extra in (0, 5):  # re-signed at the same size, then grown past it
        append_many(extra, start=65)
        out = io.BytesIO()
        export_bundle(settings, Selection(), out, actor_ref="user:auditor")
        assert verify_bundle(out.getvalue(), keys).ok  # alone, it looks perfect
        report = verify_bundle(out.getvalue(), keys, _kept(auditors),
                               kept_proofs=_kept_proofs(auditors))
        assert (report.ok, report.reason, report.first_bad_seq) == (False, "checkpoint_fork",
                                                                    1)
        assert f"size {second}" in (report.message or "")


def test_the_scheduled_walk_raises_the_alarm_unasked(anchored: Runtime, pg_conn) -> None:  # type: ignore[no-untyped-def]
    """An edit in place under an old checkpoint: the issuer signs on (it re-reads only new
    events, and the hashes it signs are the true ones), so the scheduled walk is what
    raises the alarm without anyone verifying."""
    from charter.tasks import TASKS, schedule

    settings = anchored.settings
    assert schedule(settings)["charter.audit.walk"] == settings.audit_walk_interval_s == 86400
    assert "charter.audit.walk" not in schedule(
        dataclasses.replace(settings, audit_walk_interval_s=0))
    _two_checkpoints(settings)
    as_insider(pg_conn, "UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 17")
    assert checkpoints.issue(settings, force=True) is not None
    TASKS["charter.audit.walk"](anchored)
    alarm = list_events(EventFilter(action="audit.integrity_alarm"))
    assert len(alarm) == 1 and alarm[0].actor == "system:charter"
    assert (alarm[0].details["reason"], alarm[0].details["first_bad_seq"]) == ("edited", 17)
    assert _alarms(anchored) >= 1
