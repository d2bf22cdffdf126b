"""The witness's side of C2SP tlog-witness, check by check, on a real state file: what it
answers for each kind of request, that it cosigns only consistent extensions, and that
its state survives a restart."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.checkpoint import Checkpoint, Signer, sign
from charter.audit.verify import (
    EMPTY_ROOT,
    CheckpointError,
    cosignatures,
    leaf_hash,
    node_hash,
    range_root,
)
from charter.witness.server import Witness
from charter.witness.state import WitnessState

ORIGIN = "charter.test/audit"
NOW = 1_800_000_000


def _leaves(n: int) -> list[bytes]:
    return [leaf_hash(hashlib.sha256(str(i).encode()).digest()) for i in range(n)]


def _proof(leaves: list[bytes], m: int, n: int) -> list[bytes]:
    """RFC 9162 PROOF(m, D[n]) over in-memory leaves."""
    def sub(m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
        size = hi - lo
        if m == size:
            return [] if whole else [range_root(leaves[lo:hi])]
        k = 1 << ((size - 1).bit_length() - 1)
        if m <= k:
            return [*sub(m, lo, lo + k, whole), range_root(leaves[lo + k:hi])]
        return [*sub(m - k, lo + k, hi, False), range_root(leaves[lo:lo + k])]
    return sub(m, 0, n, True)


def _request(old: int, proof: list[bytes], note: str) -> bytes:
    return (f"old {old}\n" + "".join(base64.b64encode(h).decode() + "\n" for h in proof)
            + "\n" + note).encode()


@pytest.fixture
def log_key() -> Signer:
    return Signer(ORIGIN, Ed25519PrivateKey.generate())


@pytest.fixture
def witness(tmp_path: Path, log_key: Signer) -> Witness:
    return Witness("witness.test/w1", Ed25519PrivateKey.generate(),
                   {ORIGIN: [log_key.verifier]}, WitnessState(tmp_path / "w.db"),
                   clock=lambda: NOW)


def _note(signer: Signer, leaves: list[bytes], origin: str = ORIGIN) -> str:
    return sign(Checkpoint(origin, len(leaves), range_root(leaves)), signer)


def test_it_cosigns_a_first_checkpoint_and_then_only_consistent_extensions(
        witness: Witness, log_key: Signer) -> None:
    leaves = _leaves(13)
    first = _note(log_key, leaves[:5])
    reply = witness.add_checkpoint(_request(0, [], first))
    assert reply.status == 200 and reply.body.startswith("\u2014 witness.test/w1 ")
    assert cosignatures(first + reply.body, [witness.verifier], now=NOW) == {
        "witness.test/w1": NOW}
    second = _note(log_key, leaves)
    reply = witness.add_checkpoint(_request(5, _proof(leaves, 5, 13), second))
    assert reply.status == 200
    blob = base64.b64decode(reply.body.split()[-1])
    assert len(blob) == 4 + 8 + 64 and int.from_bytes(blob[4:12], "big") == NOW
    # The same size again, same root: cosigned again (a fresh timestamp), no proof.
    assert witness.add_checkpoint(_request(13, [], second)).status == 200


def test_each_refusal_has_the_status_the_spec_gives_it(
        witness: Witness, log_key: Signer, tmp_path: Path) -> None:
    leaves = _leaves(8)
    note = _note(log_key, leaves[:6])
    assert witness.add_checkpoint(_request(0, [], note)).status == 200
    grown = _note(log_key, leaves)
    # 409: the old size is not the one it cosigned; the body says which, to retry with.
    reply = witness.add_checkpoint(_request(0, [], grown))
    assert (reply.status, reply.content_type, reply.body) == (409, "text/x.tlog.size",
                                                              "6\n")
    # 422: a proof that does not lead from its tree to the new one (a rewritten log).
    other = _leaves(8)
    other[2] = leaf_hash(b"rewritten")
    forged = _note(log_key, other)
    reply = witness.add_checkpoint(_request(6, _proof(other, 6, 8), forged))
    assert reply.status == 422 and "not a consistent extension" in reply.body
    assert [r for _, r, _ in witness.state.evidence(ORIGIN)] == ["inconsistent"]
    # 422: the same size with another root; 422: a size-0 tree without the empty root
    six = _note(log_key, other[:6])
    assert witness.add_checkpoint(_request(6, [], six)).status == 422
    bad_empty = sign(Checkpoint(ORIGIN, 0, b"\x01" * 32), log_key)
    assert witness.add_checkpoint(_request(0, [], bad_empty)).status == 422
    # 400: an old size above the checkpoint's; malformed lines
    assert witness.add_checkpoint(_request(9, [], grown)).status == 400
    assert witness.add_checkpoint(b"old 06\n\n" + grown.encode()).status == 400
    assert witness.add_checkpoint(b"old 6\nnot base64!\n\n" + grown.encode()).status == 400
    assert witness.add_checkpoint(_request(6, [b"\x00" * 32] * 64, grown)).status == 400
    # 404: a log it does not know; 403: not signed by the log's key
    stranger = Signer("elsewhere/log", Ed25519PrivateKey.generate())
    assert witness.add_checkpoint(_request(0, [], _note(stranger, leaves, "elsewhere/log"))
                                  ).status == 404
    mallory = Signer(ORIGIN, Ed25519PrivateKey.generate())
    assert witness.add_checkpoint(_request(6, _proof(leaves, 6, 8),
                                           _note(mallory, leaves))).status == 403
    # None of that moved its state: the consistent extension is still cosigned.
    reply = witness.add_checkpoint(_request(6, _proof(leaves, 6, 8), grown))
    assert reply.status == 200


def test_its_state_survives_a_restart(witness: Witness, log_key: Signer,
                                      tmp_path: Path) -> None:
    leaves = _leaves(20)
    assert witness.add_checkpoint(_request(0, [], _note(log_key, leaves[:11]))).status == 200
    again = Witness("witness.test/w1", witness.key, witness.logs, WitnessState(tmp_path / "w.db"))
    reply = again.add_checkpoint(_request(0, [], _note(log_key, leaves)))
    assert (reply.status, reply.body) == (409, "11\n")  # it remembers size 11
    assert again.add_checkpoint(_request(11, _proof(leaves, 11, 20),
                                         _note(log_key, leaves))).status == 200


def test_a_cosignature_that_does_not_verify_or_is_dated_ahead_is_refused(
        witness: Witness, log_key: Signer) -> None:
    note = _note(log_key, _leaves(3))
    line = witness.add_checkpoint(_request(0, [], note)).body
    name, b64 = line[2:].split()
    blob = bytearray(base64.b64decode(b64))
    blob[-1] ^= 1
    broken = f"\u2014 {name} {base64.b64encode(bytes(blob)).decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        cosignatures(note + broken, [witness.verifier], now=NOW)
    with pytest.raises(CheckpointError, match="future"):
        cosignatures(note + line, [witness.verifier], now=NOW - 3600)
    assert cosignatures(note + line, [], now=NOW) == {}  # unknown cosigners are ignored


def test_proofs_here_are_rfc9162_proofs() -> None:
    leaves = _leaves(7)
    assert _proof(leaves, 4, 7) == [range_root(leaves[4:7])]
    assert node_hash(range_root(leaves[:4]), range_root(leaves[4:7])) == range_root(leaves)
    assert range_root([]) == EMPTY_ROOT
