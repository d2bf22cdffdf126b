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

Standard library and `cryptography` only: the standalone bundle verifier imports it as is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ED25519 = 0x01  # the signed-note algorithm byte
DASH = "\u2014"  # signature lines start with an em dash and a space


class CheckpointError(ValueError):
    """A note that is malformed, or whose signatures do not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> bytes:
        """The signed text: every line ends with a newline."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode(),
                 *self.extensions]
        return ("\n".join(lines) + "\n").encode()


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + raw).digest()[:4]


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    def __str__(self) -> str:
        raw = self.public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return (f"{self.name}+{self.key_id.hex()}+"
                f"{base64.b64encode(bytes([ED25519]) + raw).decode()}")

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """`<name>+<key id hex>+<base64(0x01 || public key)>`; the id must match the key."""
        try:
            name, hex_id, b64 = text.strip().split("+", 2)  # names hold no "+"; keys may
            raw = base64.b64decode(b64, validate=True)
            claimed = bytes.fromhex(hex_id)
        except (ValueError, binascii.Error) as exc:
            raise CheckpointError(f"malformed verifier key: {exc}") from None
        if not name or len(raw) != 33 or raw[0] != ED25519 or len(claimed) != 4:
            raise CheckpointError("malformed verifier key: not an Ed25519 signed-note key")
        public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
        if key_id(name, public_key) != claimed:
            raise CheckpointError(f"verifier key {name}: the key id does not match the key")
        return cls(name, claimed, public_key)


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


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes


def parse(note: str) -> tuple[Checkpoint, list[Signature]]:
    """Split and check the form of a note (no signature is checked here)."""
    body_text, sep, sig_text = note.partition("\n\n")
    if not sep or not sig_text.endswith("\n"):
        raise CheckpointError("not a signed note: no blank line, or no final newline")
    lines = body_text.split("\n")
    if len(lines) < 3:
        raise CheckpointError("a checkpoint has an origin, a size and a root hash")
    origin, size_text, root_text, *extensions = lines
    if not origin or not size_text.isdigit() or (size_text != "0"
                                                  and size_text.startswith("0")):
        raise CheckpointError("the checkpoint's origin or tree size is malformed")
    try:
        root_hash = base64.b64decode(root_text, validate=True)
    except binascii.Error:
        raise CheckpointError("the checkpoint's root hash is not base64") from None
    if len(root_hash) != 32 or any(not e for e in extensions):
        raise CheckpointError("the checkpoint's root hash or an extension line is malformed")
    signatures = []
    for line in sig_text[:-1].split("\n"):
        prefix = f"{DASH} "
        if not line.startswith(prefix) or line.count(" ") != 2:
            raise CheckpointError(f"malformed signature line: {line[:80]!r}")
        name, b64 = line[len(prefix):].split(" ")
        try:
            blob = base64.b64decode(b64, validate=True)
        except binascii.Error:
            raise CheckpointError(f"signature by {name} is not base64") from None
        if len(blob) != 4 + 64:
            raise CheckpointError(f"signature by {name} is not an Ed25519 signature")
        signatures.append(Signature(name, blob[:4], blob[4:]))
    checkpoint = Checkpoint(origin, int(size_text), root_hash, tuple(extensions))
    if checkpoint.body() != (body_text + "\n").encode():  # e.g. a non-canonical base64
        raise CheckpointError("the checkpoint is not in its canonical form")
    return checkpoint, signatures


def verify(note: str, trusted: list[Verifier]) -> Checkpoint:
    """The checkpoint, if a trusted key signed it; raises CheckpointError otherwise (a bad
    signature by a trusted key is an error, not something to skip)."""
    checkpoint, signatures = parse(note)
    body = checkpoint.body()
    keys = {(v.name, v.key_id): v for v in trusted}
    good = False
    for sig in signatures:
        key = keys.get((sig.name, sig.key_id))
        if key is None:
            continue  # a key this verifier does not know
        try:
            key.public_key.verify(sig.signature, body)
        except InvalidSignature:
            raise CheckpointError(
                f"the signature by {sig.name} ({sig.key_id.hex()}) does not verify") from None
        good = True
    if not good:
        raise CheckpointError("no signature by a trusted key")
    return checkpoint
