"""Signed checkpoints in the C2SP tlog-checkpoint format, as C2SP signed notes (Ed25519).

A checkpoint states a log's origin, its tree size and its RFC 9162 root hash:

    charter.example.org/audit
    10432
    <base64 of the 32-byte root hash>
    [extension lines]

    — charter.example.org/audit <base64(4-byte key id || 64-byte Ed25519 signature)>

The signature covers the text above the blank line. A key id is the first four bytes of
SHA-256(key name || "\\n" || 0x01 || public key), so a key is known by its name and id;
verifier keys are written `<name>+<key id hex>+<base64(0x01 || public key)>` (the signed
note convention). A note may carry several signatures (a key rotation signs with the old
and the new key); it verifies when one of them is a good signature by a key the verifier
trusts, and signatures by keys it does not know are ignored.

Parsing and verification live in the standalone verifier (charter.audit.verify); signing
here.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.verify import (
    DASH,
    ED25519,
    Checkpoint,
    CheckpointError,
    Signature,
    Verifier,
    key_id,
    open_note,
    parse,
    parse_note,
    verify,
)

__all__ = ["DASH", "ED25519", "Checkpoint", "CheckpointError", "Signature", "Signer",
           "Verifier", "key_id", "open_note", "parse", "parse_note", "sign", "sign_note",
           "verify"]


@dataclass(frozen=True)
class Signer:
    name: str
    private_key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() or c == "+" for c in self.name):
            raise CheckpointError("a key name has no spaces or '+' characters")

    @property
    def verifier(self) -> Verifier:
        public = self.private_key.public_key()
        return Verifier(self.name, key_id(self.name, public), public)

    def signature_line(self, body: bytes) -> str:
        blob = self.verifier.key_id + self.private_key.sign(body)
        return f"{DASH} {self.name} {base64.b64encode(blob).decode()}\n"


def sign(checkpoint: Checkpoint, *signers: Signer) -> str:
    """The signed note: the body, a blank line, one signature line per signer."""
    if not signers:
        raise CheckpointError("a checkpoint needs at least one signer")
    body = checkpoint.body()
    return body.decode() + "\n" + "".join(s.signature_line(body) for s in signers)


def sign_note(text: str, *signers: Signer) -> str:
    """Any text as a signed note (the bundle manifest's signature, for one)."""
    if not text.endswith("\n") or "\n\n" in text or not signers:
        raise CheckpointError("a note's text ends with a newline, has no blank line and "
                              "needs at least one signer")
    body = text.encode()
    return text + "\n" + "".join(s.signature_line(body) for s in signers)
