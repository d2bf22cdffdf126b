"""Signed checkpoints over the stored Merkle tree: roots and proofs match the RFC 9162
reference, the due rules, refusal to sign an altered log, external copies, keys."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import select

from charter.audit import checkpoints
from charter.audit.checkpoint import Verifier, verify
from charter.audit.merkle import consistency_proof, inclusion_proof, leaf_hash, root
from charter.audit.models import AuditEvent
from charter.audit.tree import TILE, Tree
from charter.audit.verify import multiproof_root, verify_consistency, verify_inclusion
from charter.uow import unit_of_work
from tests.audit_support import ORIGIN, append_many, signing


def _leaves() -> list[bytes]:
    with unit_of_work() as session:
        hashes = session.scalars(select(AuditEvent.hash).order_by(AuditEvent.seq)).all()
    return [leaf_hash(bytes.fromhex(h)) for h in hashes]


def test_a_checkpoint_signs_the_rfc_root_and_the_tree_proves_any_event(
        configured, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = signing(configured, tmp_path)
    append_many(3 * TILE + 77)
    cp = checkpoints.issue(s, force=True)
    assert cp is not None and cp.size == 3 * TILE + 77
    leaves = _leaves()
    key = checkpoints.load_signers(s)[0].verifier
    signed = verify(cp.note, [key])
    assert (signed.origin, signed.size, signed.root_hash) == (ORIGIN, cp.size, root(leaves))
    assert signed.extensions[0].startswith("time 20")
    with unit_of_work() as session:
        tree = Tree(session.connection())
        assert tree.stored_leaves() == 3 * TILE
        for index in (0, 1, TILE - 1, TILE, 2 * TILE + 5, cp.size - 1):
            path = tree.inclusion(index, cp.size)
            assert path == inclusion_proof(leaves, index)
            verify_inclusion(leaves[index], index, cp.size, path, signed.root_hash)
        chosen = [3, 4, 5, 300, 301, TILE * 2, cp.size - 1]
        nodes = tree.batch_proof(cp.size, chosen, signed.root_hash)
        assert multiproof_root(cp.size, chosen, [leaves[i] for i in chosen],
                               nodes) == signed.root_hash

    append_many(TILE + 3, start=10_000)
    later = checkpoints.issue(s, force=True)
    assert later is not None and later.size == cp.size + TILE + 3
    leaves = _leaves()
    with unit_of_work() as session:
        tree = Tree(session.connection())
        proof = tree.consistency(cp.size, later.size)
        assert proof == consistency_proof(leaves, cp.size)
        assert tree.root(later.size) == root(leaves)
    verify_consistency(cp.size, later.size, bytes.fromhex(cp.root_hash),
                       bytes.fromhex(later.root_hash), proof)


def test_checkpoints_come_when_due_and_also_when_idle(configured, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = signing(configured, tmp_path, audit_checkpoint_every=10,
                audit_checkpoint_interval_s=3600, audit_checkpoint_idle_s=7200)
    first = checkpoints.issue(s)
    assert first is not None and first.size == 0  # an empty log is signed too
    assert checkpoints.issue(s) is None
    append_many(9)
    assert checkpoints.issue(s) is None  # 9 < every, interval not reached
    append_many(1, start=9)
    assert checkpoints.issue(s).size == 10  # type: ignore[union-attr]
    append_many(1, start=10)
    assert checkpoints.issue(dataclasses.replace(s, audit_checkpoint_interval_s=0.001)
                             ).size == 11  # type: ignore[union-attr]
    assert checkpoints.issue(s) is None
    idle = checkpoints.issue(dataclasses.replace(s, audit_checkpoint_idle_s=0.001))
    assert idle is not None and idle.size == 11 and idle.root_hash == checkpoints.checkpoint_at(
        11).root_hash  # type: ignore[union-attr]
    assert idle.issued_at - first.issued_at < timedelta(minutes=1)
    assert checkpoints.issue(configured) is None  # no key: no checkpoints


def test_no_checkpoint_is_signed_over_an_altered_log(configured, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = signing(configured, tmp_path)
    append_many(20)
    assert checkpoints.issue(s, force=True) is not None
    append_many(5, start=20)
    pg_conn.execute("ALTER TABLE audit_events DISABLE TRIGGER USER")
    pg_conn.execute("UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 23")
    with pytest.raises(checkpoints.AuditIntegrityError) as caught:
        checkpoints.issue(s, force=True)
    assert caught.value.details == {"first_bad_seq": 23, "reason": "edited"}
    # History rewritten before the last checkpoint, hashes and links made consistent: the
    # new tree no longer extends the signed one.
    pg_conn.execute("UPDATE audit_events SET actor = 'user:alice' WHERE seq = 23")
    pg_conn.execute("DELETE FROM audit_events WHERE seq > 10")
    with pytest.raises(checkpoints.AuditIntegrityError, match="fewer than"):
        checkpoints.issue(s, force=True)
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
        pg_conn.execute("DELETE FROM audit_checkpoints")


def test_checkpoints_are_copied_out_and_keys_published_across_a_rotation(
        configured, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "external"
    old = signing(configured, tmp_path, "old", audit_checkpoint_dir=str(out))
    append_many(3)
    a = checkpoints.issue(old, force=True)
    both = signing(configured, tmp_path, "new", "old", audit_checkpoint_dir=str(out))
    append_many(2, start=3)
    b = checkpoints.issue(both, force=True)
    new = signing(configured, tmp_path, "new", audit_checkpoint_dir=str(out))
    c = checkpoints.issue(new, force=True)
    assert a and b and c
    names = sorted(p.name for p in out.iterdir())
    # three notes and the latest; the proof that 5 extends 3 (none between the two of 5)
    assert [n.rsplit(".", 1)[1] for n in names] == ["note", "note", "proof", "note", "note"]
    assert names[-1] == "latest.note" and names[2].startswith("000000000005-")
    assert (out / "latest.note").read_text() == c.note
    keys = checkpoints.published_keys(new)
    assert [(k.signing, k.first_used_at is not None) for k in keys] == [(False, True),
                                                                         (True, True)]
    trusted = [Verifier.parse(k.verifier) for k in keys]
    for cp in (a, b, c):
        assert verify(cp.note, trusted).size == cp.size
    only_new = [Verifier.parse(keys[1].verifier)]
    assert verify(b.note, only_new).size == 5
    with pytest.raises(ValueError, match="no signature by a trusted key"):
        verify(a.note, only_new)
