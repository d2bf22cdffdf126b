"""Signed checkpoints (C2SP signed notes, Ed25519): round trips, rotation, and every way a
note can be wrong."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.checkpoint import (
    DASH,
    Checkpoint,
    CheckpointError,
    Signer,
    Verifier,
    parse,
    sign,
    verify,
)
from charter.audit.merkle import leaf_hash, root

ORIGIN = "charter.example.org/audit"


def signer(name: str = ORIGIN) -> Signer:
    return Signer(name, Ed25519PrivateKey.generate())


def checkpoint(size: int = 3) -> Checkpoint:
    return Checkpoint(ORIGIN, size, root([leaf_hash(bytes([i])) for i in range(size)]))


def test_a_signed_checkpoint_verifies_and_reads_back() -> None:
    key = signer()
    note = sign(checkpoint(), key)
    body, _, sig = note.partition("\n\n")
    assert body.split("\n")[:2] == [ORIGIN, "3"]
    assert sig.startswith(f"{DASH} {ORIGIN} ") and sig.endswith("\n")
    assert verify(note, [key.verifier]) == checkpoint()
    # The verifier key travels as text (published at /api/v1/audit/keys) and parses back.
    text = str(key.verifier)
    assert text.startswith(f"{ORIGIN}+{key.verifier.key_id.hex()}+")
    assert verify(note, [Verifier.parse(text)]) == checkpoint()


def test_rotation_old_and_new_keys_both_verify_what_they_signed() -> None:
    old, new = signer(), signer()
    during = sign(checkpoint(3), old, new)  # the rotation's checkpoint carries both
    after = sign(checkpoint(4), new)
    assert verify(during, [old.verifier]).size == 3
    assert verify(during, [new.verifier]).size == 3
    assert verify(after, [old.verifier, new.verifier]).size == 4
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        verify(after, [old.verifier])


@pytest.mark.parametrize("tamper", [
    lambda n: n.replace("\n3\n", "\n4\n", 1),  # another size
    lambda n: n.replace(ORIGIN + "\n", "other.example/audit\n", 1),  # another log
    lambda n: n.replace("\n\n", "\nextra line\n\n", 1),  # an added extension
])
def test_a_changed_body_fails(tamper) -> None:  # type: ignore[no-untyped-def]
    key = signer()
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(tamper(sign(checkpoint(), key)), [key.verifier])


def test_a_changed_root_fails() -> None:
    key = signer()
    note = sign(checkpoint(), key)
    head = base64.b64encode(checkpoint().root_hash).decode()
    forged = base64.b64encode(bytes(32)).decode()
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(note.replace(head, forged), [key.verifier])


def test_a_bad_signature_or_a_swapped_key_id_fails() -> None:
    key, other = signer(), signer()
    note = sign(checkpoint(), key)
    body, _, line = note.partition("\n\n")
    blob = base64.b64decode(line.split(" ")[2])
    bad_sig = blob[:4] + bytes([blob[4] ^ 1]) + blob[5:]
    bad = f"{body}\n\n{DASH} {ORIGIN} {base64.b64encode(bad_sig).decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(bad, [key.verifier])
    # Signed by another key but labelled with the trusted key's id.
    theirs = base64.b64decode(sign(checkpoint(), other).partition("\n\n")[2].split(" ")[2])
    swapped = key.verifier.key_id + theirs[4:]
    forged = f"{body}\n\n{DASH} {ORIGIN} {base64.b64encode(swapped).decode()}\n"
    with pytest.raises(CheckpointError, match="does not verify"):
        verify(forged, [key.verifier])
    # A key of the same name that nobody trusts is ignored, not believed.
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        verify(sign(checkpoint(), other), [key.verifier])


@pytest.mark.parametrize("note", [
    "",
    f"{ORIGIN}\n3\n",  # no signatures
    f"{ORIGIN}\n03\n{base64.b64encode(bytes(32)).decode()}\n\n{DASH} a AAAA\n",
    f"{ORIGIN}\nthree\n{base64.b64encode(bytes(32)).decode()}\n\n{DASH} a AAAA\n",
    f"{ORIGIN}\n3\nnot base64!\n\n{DASH} a AAAA\n",
    f"{ORIGIN}\n3\n{base64.b64encode(bytes(31)).decode()}\n\n{DASH} a AAAA\n",
    f"{ORIGIN}\n3\n{base64.b64encode(bytes(32)).decode()}\n\n- a AAAA\n",
    f"{ORIGIN}\n3\n{base64.b64encode(bytes(32)).decode()}\n\n{DASH} a AAAA\n",  # short sig
])
def test_malformed_notes_are_refused(note: str) -> None:
    with pytest.raises(CheckpointError):
        parse(note)


def test_verifier_keys_are_checked() -> None:
    text = str(signer().verifier)
    name, hex_id, b64 = text.split("+", 2)
    with pytest.raises(CheckpointError, match="key id does not match"):
        Verifier.parse(f"{name}+{'00' * 4}+{b64}")
    with pytest.raises(CheckpointError, match="key id does not match"):
        Verifier.parse(f"another+{hex_id}+{b64}")
    with pytest.raises(CheckpointError):
        Verifier.parse("nonsense")
    for bad_name in ("", "two words", "a+b"):
        with pytest.raises(CheckpointError, match="key name"):
            Signer(bad_name, Ed25519PrivateKey.generate())
