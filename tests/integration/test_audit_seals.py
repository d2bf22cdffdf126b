"""Event seals: made before the database sees an event, with a key it never sees, evolving
one way. A row an insider writes, even with a correct chain hash, is found and named."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.actor import SYSTEM
from charter.audit import checkpoints
from charter.audit.chain import event_body
from charter.audit.journal import Event
from charter.audit.seal import Sealer, make_seal_keys, verifier_from_file, write_new
from charter.audit.service import verify_chain
from charter.audit.verify import SealError, SealVerifier, seal_mac, sealed_content
from charter.audit.writer import Entry
from charter.identity.service import create_user
from charter.runtime import Runtime
from charter.settings import Settings
from tests.audit_support import (
    append_forged,
    append_many,
    as_insider,
    insider_row,
    rechain,
    signing,
)
from tests.runtimes import bound_runtime


@pytest.fixture
def sealed(configured: Settings, tmp_path: Path) -> Iterator[tuple[Runtime, SealVerifier]]:
    """A runtime that seals (and signs checkpoints), and the auditors' verification key."""
    keys = make_seal_keys(60)
    write_new(tmp_path / "seal.json", keys.sealing)
    write_new(tmp_path / "verify.json", keys.verification)
    settings = signing(configured, tmp_path, audit_seal_key=str(tmp_path / "seal.json"),
                       audit_checkpoint_dir=str(tmp_path / "outside"))
    with bound_runtime(settings) as runtime:
        yield runtime, verifier_from_file(str(tmp_path / "verify.json"))


_row = insider_row


def _line(row: dict) -> bytes:  # type: ignore[type-arg]
    from charter.audit.chain import canonical_json

    return canonical_json(event_body(
        seq=row["seq"], ts=row["ts"], actor=row["actor"], action=row["action"],
        target_type=row["target_type"], target_id=row["target_id"], outcome=row["outcome"],
        details=row["details"], request_id=row["request_id"], prev_hash=row["prev_hash"]))


def test_every_event_is_sealed_on_both_paths_and_the_seals_verify(
        sealed: tuple[Runtime, SealVerifier], pg_conn) -> None:  # type: ignore[no-untyped-def]
    runtime, verifier = sealed
    create_user(SYSTEM, username="sealed-person", roles=["user"])  # a service's unit of work
    entry = runtime.writer.commit(Entry(events=(Event.of(  # the gateway's group commit
        actor="key:bot", action="policy.decide", target_type="deployment",
        target_id="m", details={"allow": True, "ttft_ms": 12.5}),)))
    assert entry.result == "written"
    runtime.writer.defer(Entry(events=(Event.of(
        actor="key:bot", action="dispatch.outcome", target_type="deployment",
        target_id="m", details={"tokens_out": 8, "latency_ms": 1.25e-3}),)))
    assert runtime.writer.flush()
    rows = pg_conn.execute("SELECT seq, event_id, seal FROM audit_events ORDER BY seq").fetchall()
    assert rows and all(r[1] and r[2] for r in rows)
    assert len({r[1] for r in rows}) == len(rows)
    for seq, event_id, seal in rows:  # what charter-verify does with a bundle's lines
        verifier.check(event_id, seal, sealed_content(_line(_row(pg_conn, seq))))
    assert verify_chain(seal_key=verifier).ok


def test_a_forged_row_with_a_correct_chain_hash_is_found_and_named(
        sealed: tuple[Runtime, SealVerifier], pg_conn) -> None:  # type: ignore[no-untyped-def]
    runtime, verifier = sealed
    append_many(20)
    assert checkpoints.issue(runtime.settings, force=True) is not None  # says: seals-from 1
    head = _row(pg_conn, 20)
    # The attack of the issue: a forged approval appended with a correct chain hash.
    for seal in (None, f"{head['seal'].split('.')[0]}.{'0' * 64}"):
        as_insider(pg_conn, "DELETE FROM audit_events WHERE seq = 21")
        assert append_forged(pg_conn, seal=seal, details={"reason": "trust me"}) == 21
        assert verify_chain().ok is (seal is not None)  # without the key: presence only
        verdict = verify_chain(seal_key=verifier)
        assert (verdict.ok, verdict.first_bad_seq) == (False, 21)
        assert verdict.reason == ("unsealed" if seal is None else "forged")


def test_an_edited_and_rechained_event_is_named_exactly(
        sealed: tuple[Runtime, SealVerifier], pg_conn) -> None:  # type: ignore[no-untyped-def]
    _, verifier = sealed
    append_many(30)
    as_insider(pg_conn, """UPDATE audit_events SET details = '{"i": 0, "team": "x"}'
                           WHERE seq = 17""")
    rechain(pg_conn, 17)
    assert verify_chain().ok  # nothing signed covers it, and the chain was recomputed
    verdict = verify_chain(seal_key=verifier)
    assert (verdict.ok, verdict.reason, verdict.first_bad_seq) == (False, "forged", 17)


def test_a_copied_sealed_row_is_a_replay(
        sealed: tuple[Runtime, SealVerifier], pg_conn) -> None:  # type: ignore[no-untyped-def]
    _, verifier = sealed
    append_many(10)
    as_insider(pg_conn, "ALTER TABLE audit_events DROP CONSTRAINT uq_audit_events_event_id")
    source = _row(pg_conn, 4)
    as_insider(pg_conn, "INSERT INTO audit_events (seq, ts, actor, action, target_type, "
                        "target_id, outcome, details, request_id, prev_hash, hash, event_id, "
                        "seal) SELECT 11, ts, actor, action, target_type, target_id, outcome,"
                        " details, request_id, '', 'x', event_id, seal FROM audit_events "
                        "WHERE seq = 4")
    rechain(pg_conn, 11)
    verdict = verify_chain(seal_key=verifier)
    assert (verdict.ok, verdict.reason, verdict.first_bad_seq) == (False, "replayed", 11)
    assert source["event_id"]


def test_keys_move_forward_and_the_old_ones_are_gone(tmp_path: Path) -> None:
    keys = make_seal_keys(60, t0=int(time.time()) - 3 * 60 - 5)  # epoch 3 now
    write_new(tmp_path / "seal.json", keys.sealing)
    verifier = SealVerifier.load(keys.verification)
    sealer = Sealer(str(tmp_path / "seal.json"))
    assert sealer.epoch == 3
    stored = json.loads((tmp_path / "seal.json").read_text())
    assert stored["epoch"] == 3 and stored["key"] == verifier.key(3).hex()
    assert keys.sealing.count(verifier.key(0).hex()) == 1  # epoch 0's key is no longer there
    assert verifier.key(0).hex() not in (tmp_path / "seal.json").read_text()
    content = b'{"action":"x"}'
    event_id, seal = sealer.seal(content)
    verifier.check(event_id, seal, content)
    # A thief holding epoch 3's key cannot seal epoch 2: the MAC is epoch 2's key's.
    stolen = bytes.fromhex(stored["key"])
    back_id = f"{(verifier.t0 + 2 * 60 + 1) * 1000:012x}" + "a" * 20
    with pytest.raises(SealError):
        verifier.check(back_id, f"2.{seal_mac(stolen, back_id, 2, content)}", content)
    with pytest.raises(SealError):  # nor claim epoch 3 for an id of epoch 2's time
        verifier.check(back_id, f"3.{seal_mac(stolen, back_id, 3, content)}", content)


def test_bundles_carry_the_seals_and_charter_verify_checks_them(
        sealed: tuple[Runtime, SealVerifier], pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import io
    import zipfile

    from charter.audit.bundle import Selection
    from charter.audit.keys import load_signers
    from charter.audit.service import export_bundle
    from charter.audit.verify import main as charter_verify
    from charter.audit.verify import verify_bundle

    runtime, verifier = sealed
    settings = runtime.settings
    append_many(30)
    assert checkpoints.issue(settings, force=True) is not None
    trusted = [s.verifier for s in load_signers(settings)]
    out = io.BytesIO()
    export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    good = out.getvalue()
    assert verify_bundle(good, trusted, seal_key=verifier).ok
    (tmp_path / "good.zip").write_bytes(good)
    assert charter_verify([str(tmp_path / "good.zip"), "--key", str(trusted[0]),
                           "--seal-key", str(tmp_path / "verify.json")]) == 0

    # A row forged after the checkpoint, with a chain hash and a made-up seal: the issuer
    # cannot tell (it holds no verification key) and signs it; the auditor's key finds it.
    # (after 31, the export's own audit.export event)
    assert append_forged(pg_conn, id_tail="e") == 32
    out = io.BytesIO()
    export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    report = verify_bundle(out.getvalue(), trusted)
    assert report.ok  # without the verification key: every event carries a seal
    report = verify_bundle(out.getvalue(), trusted, seal_key=verifier)
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "forged", 32)

    # Seals stripped from a bundle: its signed manifest no longer matches.
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["seals.jsonl"] = b"".join(
        json.dumps({**json.loads(line), "seal": None}).encode() + b"\n"
        for line in members["seals.jsonl"].splitlines())
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    report = verify_bundle(buf.getvalue(), trusted)
    assert not report.ok and {f.reason for f in report.findings} >= {"file_digest",
                                                                     "unsealed"}


def test_the_issuer_refuses_to_sign_over_an_unsealed_event(
        sealed: tuple[Runtime, SealVerifier], pg_conn) -> None:  # type: ignore[no-untyped-def]
    runtime, _ = sealed
    append_many(10)
    assert checkpoints.issue(runtime.settings, force=True) is not None
    append_many(5, start=10)
    as_insider(pg_conn, "UPDATE audit_events SET seal = NULL WHERE seq = 13")
    with pytest.raises(checkpoints.AuditIntegrityError) as refused:
        checkpoints.issue(runtime.settings, force=True)
    assert refused.value.details == {"reason": "unsealed", "first_bad_seq": 13}
