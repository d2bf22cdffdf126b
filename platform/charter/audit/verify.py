"""charter-verify: check an exported audit bundle offline, without trusting Charter.

    charter-verify BUNDLE.zip [--key KEY]... [--keys FILE] [--checkpoints DIR]
                   [--seal-key FILE] [--witness-key KEY]... [--quorum K]
                   [--receipt FILE]... [--json]

This one module is the whole verifier. It depends on the standard library and on
`cryptography` only, so an auditor can copy this file to an air-gapped laptop and run
`python verify.py BUNDLE.zip` with the network off. Charter's server code imports its
primitives (Merkle hashing, signed notes) from here, so both sides share one definition.

What a bundle is (format `charter-audit-export/1`, a zip archive):

    manifest.json       what was selected (filter), the sequence numbers and the event hash
                        of every exported event, the covering checkpoints, file digests
    manifest.sig        a signed note over the SHA-256 of manifest.json
    events.jsonl        one event a line: the exact RFC 8785 bytes that were hashed
    checkpoints/*.note  signed checkpoints (C2SP tlog-checkpoint notes, Ed25519)
    proofs.json         per checkpoint, the Merkle nodes that prove its events are in the
                        tree it signed (a batch inclusion proof); consistency proofs
                        between consecutive checkpoints; links: consistency proofs from
                        the checkpoints the external copy does not chain to the bundle's
    keys.txt            the log's verifier keys (`name+keyid+base64key`), one a line
    seals.jsonl         each event's id and seal (forward-secure MACs, see "Seals" below)

The log's Merkle tree (RFC 9162) has one leaf an event: leaf i is HASH(0x00 || the 32-byte
event hash of sequence number i + 1), and an event hash is SHA-256 of its canonical bytes.

What is checked: the manifest's signature and every file digest; every checkpoint's
signature by a trusted key, its origin, and its consistency with the checkpoint before it
(a fork is a failure); every event line against the signed list of event hashes; and every
event's inclusion in the tree of its covering checkpoint (the first checkpoint whose size
reaches it). The verdict names the first bad sequence number and why.

Keys: pass the log's keys with --key/--keys (from /api/v1/audit/keys or your own copy);
without them the keys inside the bundle are used and the report says so, since a bundle
that carries its own keys proves only that it is self-consistent. --checkpoints DIR
holds the bundle's checkpoints against copies kept elsewhere (the external copy, its
`.note` files and the `.proof` files beside them), of any size: two different notes of
one size are a fork, and every checkpoint but the largest must be proven a prefix of a
larger one (by the kept proofs, the bundle's chain or its `links`): a failing proof is a
fork, a checkpoint nothing ties to a larger one a failure too.
--seal-key FILE (the auditors' seal verification key) checks every event's seal; without
it, only that every event from the checkpoints' `seals-from` on carries one.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import io
import json
import re
import sys
import zipfile
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

FORMAT = "charter-audit-export/1"
MANIFEST_NOTE = "charter-audit-export/1 manifest"

# --- Merkle trees (RFC 9162, section 2.1) ---------------------------------------------------

_sha256 = hashlib.sha256
EMPTY_ROOT = _sha256(b"").digest()


class ProofError(ValueError):
    """A proof that does not verify, or a request no proof can answer."""


def leaf_hash(entry: bytes) -> bytes:
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): where RFC 9162 splits a tree."""
    return 1 << ((n - 1).bit_length() - 1)


def range_root(leaves: Sequence[bytes]) -> bytes:
    """MTH over consecutive leaf hashes, level by level: pair neighbours, carry an odd last
    node up unchanged. The same value as RFC 9162's recursive split (tests prove it), with
    one hashing call a node and no recursion."""
    if not leaves:
        return EMPTY_ROOT
    level = list(leaves)
    while len(level) > 1:
        odd = level[-1] if len(level) & 1 else None
        level = [_sha256(b"\x01" + a + b).digest()
                 for a, b in zip(level[0::2], level[1::2], strict=False)]
        if odd is not None:
            level.append(odd)
    return level[0]


class Frontier:
    """An append-only RFC 9162 tree kept as the roots of its perfect subtrees, largest
    first: a leaf appended in O(1) hashing (amortized), the root of everything appended so
    far in O(log n). The database walk uses it to hold the log against signed checkpoints
    as it goes."""

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []  # (height, subtree root)
        self.size = 0

    def append(self, leaf: bytes) -> None:
        """Append a leaf hash (leaf_hash of the entry)."""
        node, height = leaf, 0
        stack = self._stack
        while stack and stack[-1][0] == height:
            node = _sha256(b"\x01" + stack.pop()[1] + node).digest()
            height += 1
        stack.append((height, node))
        self.size += 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        """Append leaf hashes in bulk, as many append() calls would: the leaves go in as
        perfect blocks aligned on the tree's size (a block of 2^h where the size is a
        multiple of 2^h), each hashed level by level, one call a node."""
        i, n, stack = 0, len(leaves), self._stack
        while i < n:
            size = self.size
            k = 1 << ((n - i).bit_length() - 1)
            if size:
                k = min(k, size & -size)  # the largest block the alignment allows
            level = leaves[i:i + k]
            while len(level) > 1:
                level = [_sha256(b"\x01" + a + b).digest()
                         for a, b in zip(level[0::2], level[1::2], strict=True)]
            node, height = level[0], k.bit_length() - 1
            while stack and stack[-1][0] == height:
                node = _sha256(b"\x01" + stack.pop()[1] + node).digest()
                height += 1
            stack.append((height, node))
            self.size += k
            i += k

    def root(self) -> bytes:
        """MTH of the leaves appended so far: the subtrees folded from the right."""
        if not self._stack:
            return EMPTY_ROOT
        acc = self._stack[-1][1]
        for _, node in reversed(self._stack[:-1]):
            acc = _sha256(b"\x01" + node + acc).digest()
        return acc


def verify_inclusion(leaf: bytes, index: int, size: int, path: Sequence[bytes],
                     expected_root: bytes) -> None:
    """RFC 9162 2.1.3.2; raises ProofError unless `leaf` is at `index` of the tree."""
    if not 0 <= index < size:
        raise ProofError(f"leaf {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if sn == 0:
            raise ProofError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the inclusion proof is too short")
    if r != expected_root:
        raise ProofError("the inclusion proof does not lead to the tree's root")


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> None:
    """RFC 9162 2.1.4.2; raises ProofError unless the first tree is a prefix of the
    second."""
    if not 0 < first <= second:
        raise ProofError(f"no consistency from size {first} to size {second}")
    if first == second:
        if path:
            raise ProofError("a proof between equal sizes must be empty")
        if first_root != second_root:
            raise ProofError("two trees of the same size with different roots")
        return
    if not path:
        raise ProofError("the consistency proof is empty")
    proof = list(path)
    if first & (first - 1) == 0:  # an exact power of two: its root is a node of the second
        proof.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the consistency proof is too short")
    if fr != first_root:
        raise ProofError("the consistency proof does not lead to the first tree's root")
    if sr != second_root:
        raise ProofError("the consistency proof does not lead to the second tree's root")


def walk_multiproof(size: int, indices: Sequence[int],
                    on_leaves: Callable[[int, int], bytes],
                    on_gap: Callable[[int, int], bytes]) -> bytes:
    """The root of a tree of `size` leaves of which `indices` (sorted, distinct) are known.

    The tree is walked by RFC 9162's split: a subtree holding only known leaves is
    `on_leaves(a, b)` (the known leaves indices[a:b]), one holding none is `on_gap(lo, hi)`
    (a node hash from a proof, or, on the server, from the stored tree); the others are
    split. The gaps, left to right, are the batch inclusion proof of those leaves."""
    if size <= 0:
        raise ProofError("an empty tree proves nothing")
    if indices and not (0 <= indices[0] and indices[-1] < size):
        raise ProofError(f"a leaf is outside the tree of size {size}")

    def walk(lo: int, hi: int) -> bytes:
        a, b = bisect_left(indices, lo), bisect_left(indices, hi)
        if a == b:
            return on_gap(lo, hi)
        if b - a == hi - lo:
            return on_leaves(a, b)
        k = split(hi - lo)
        return node_hash(walk(lo, lo + k), walk(lo + k, hi))

    return walk(0, size)


def multiproof_root(size: int, indices: Sequence[int], leaves: Sequence[bytes],
                    nodes: Sequence[tuple[int, int, bytes]]) -> bytes:
    """Recompute a tree's root from some of its leaves and a batch inclusion proof (the
    node hashes of the subtrees without known leaves, as (lo, hi, hash), left to right).
    Raises ProofError when a node is missing, unexpected or out of order."""
    given = iter(nodes)

    def gap(lo: int, hi: int) -> bytes:
        node = next(given, None)
        if node is None:
            raise ProofError(f"the proof lacks the node over leaves {lo}..{hi - 1}")
        if (node[0], node[1]) != (lo, hi):
            raise ProofError(f"the proof has a node over leaves {node[0]}..{node[1] - 1} "
                             f"where the tree has one over {lo}..{hi - 1}")
        return node[2]

    root = walk_multiproof(size, indices, lambda a, b: range_root(leaves[a:b]), gap)
    if next(given, None) is not None:
        raise ProofError("the proof has more nodes than the tree needs")
    return root


# --- Signed notes and checkpoints (C2SP signed-note, tlog-checkpoint) -----------------------

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


def key_id(name: str, public_key: Ed25519PublicKey, algorithm: int = ED25519) -> bytes:
    """SHA-256(name || "\\n" || algorithm byte || public key)[:4]: a signed-note key's id
    (0x01: a note signature; 0x04: a cosignature/v1)."""
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _sha256(name.encode() + b"\n" + bytes([algorithm]) + raw).digest()[:4]


def _vkey_text(name: str, key: bytes, public_key: Ed25519PublicKey, algorithm: int) -> str:
    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return f"{name}+{key.hex()}+{base64.b64encode(bytes([algorithm]) + raw).decode()}"


def _parse_vkey(text: str, algorithm: int, what: str
                ) -> tuple[str, bytes, Ed25519PublicKey]:
    """`<name>+<key id hex>+<base64(algorithm || public key)>`; the id must match the key.
    Names hold no "+"; base64 may."""
    try:
        name, hex_id, b64 = text.strip().split("+", 2)
        raw = base64.b64decode(b64, validate=True)
        claimed = bytes.fromhex(hex_id)
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError(f"malformed {what}: {exc}") from None
    if not name or len(raw) != 33 or raw[0] != algorithm or len(claimed) != 4:
        raise CheckpointError(f"malformed {what}: not an Ed25519 key of type "
                              f"0x{algorithm:02x}")
    public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
    if key_id(name, public_key, algorithm) != claimed:
        raise CheckpointError(f"{what} {name}: the key id does not match the key")
    return name, claimed, public_key


@dataclass(frozen=True)
class Verifier:
    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    def __str__(self) -> str:
        return _vkey_text(self.name, self.key_id, self.public_key, ED25519)

    @classmethod
    def parse(cls, text: str) -> Verifier:
        """`<name>+<key id hex>+<base64(0x01 || public key)>`; the id must match the key."""
        return cls(*_parse_vkey(text, ED25519, "verifier key"))


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes


def parse_note(note: str) -> tuple[str, list[Signature]]:
    """A signed note's text (up to and with its last newline) and its signature lines."""
    body_text, sep, sig_text = note.partition("\n\n")
    if not sep or not sig_text.endswith("\n") or not body_text:
        raise CheckpointError("not a signed note: no blank line, or no final newline")
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
        if len(blob) < 5:
            raise CheckpointError(f"signature by {name} is too short")
        signatures.append(Signature(name, blob[:4], blob[4:]))
    return body_text + "\n", signatures


def open_note(note: str, trusted: Sequence[Verifier]) -> str:
    """The note's text, if a trusted key signed it; raises CheckpointError otherwise (a bad
    signature by a trusted key is an error, not something to skip; signatures by keys the
    verifier does not know are ignored)."""
    text, signatures = parse_note(note)
    body = text.encode()
    keys = {(v.name, v.key_id): v for v in trusted}
    good = False
    for sig in signatures:
        key = keys.get((sig.name, sig.key_id))
        if key is None:
            continue  # unknown keys, cosignatures among them, are ignored
        try:
            if len(sig.signature) != 64:
                raise InvalidSignature
            key.public_key.verify(sig.signature, body)
        except InvalidSignature:
            raise CheckpointError(
                f"the signature by {sig.name} ({sig.key_id.hex()}) does not verify") from None
        good = True
    if not good:
        raise CheckpointError("no signature by a trusted key")
    return text


def parse(note: str) -> tuple[Checkpoint, list[Signature]]:
    """Split and check the form of a checkpoint note (no signature is checked here)."""
    text, signatures = parse_note(note)
    return _checkpoint(text), signatures


def _checkpoint(text: str) -> Checkpoint:
    lines = text[:-1].split("\n")
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
    checkpoint = Checkpoint(origin, int(size_text), root_hash, tuple(extensions))
    if checkpoint.body() != text.encode():  # e.g. a non-canonical base64
        raise CheckpointError("the checkpoint is not in its canonical form")
    return checkpoint


def verify(note: str, trusted: Sequence[Verifier]) -> Checkpoint:
    """The checkpoint, if a trusted key signed it; raises CheckpointError otherwise."""
    parse(note)  # the form first: a malformed checkpoint says so, whoever signed it
    return _checkpoint(open_note(note, trusted))


# --- Cosignatures (C2SP tlog-cosignature, Ed25519 cosignature/v1) ---------------------------
#
# A witness's cosignature is a signature line on the checkpoint note: key id
# SHA-256(name || "\n" || 0x04 || public key)[:4], then an 8-byte big-endian timestamp and
# an Ed25519 signature over "cosignature/v1\ntime <timestamp>\n" and the note's text. It
# says: as of that time, this is the largest tree of this log the witness has seen, and
# the witness checked that it extends every tree it cosigned before.

COSIGNATURE_V1 = 0x04
COSIGNATURE_FUTURE_S = 600  # a cosignature dated further ahead than this is refused


def cosigned_message(body: bytes, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + body


@dataclass(frozen=True)
class CosignerKey:
    """A witness's verifier key: `<name>+<key id hex>+<base64(0x04 || public key)>`."""

    name: str
    key_id: bytes
    public_key: Ed25519PublicKey

    @classmethod
    def of(cls, name: str, public_key: Ed25519PublicKey) -> CosignerKey:
        return cls(name, key_id(name, public_key, COSIGNATURE_V1), public_key)

    def __str__(self) -> str:
        return _vkey_text(self.name, self.key_id, self.public_key, COSIGNATURE_V1)

    @classmethod
    def parse(cls, text: str) -> CosignerKey:
        return cls(*_parse_vkey(text, COSIGNATURE_V1, "witness key"))


def cosignatures(note: str, witnesses: Sequence[CosignerKey], *,
                 now: float | None = None) -> dict[str, int]:
    """{witness name: timestamp} of the good cosignatures on `note` by `witnesses`. A
    cosignature line by one of them that does not verify, or is dated in the future, is
    an error (as a bad signature by a trusted key is); other lines are ignored."""
    text, signatures = parse_note(note)
    body = text.encode()
    keys = {(w.name, w.key_id): w for w in witnesses}
    limit = (now if now is not None else datetime.now().timestamp()) + COSIGNATURE_FUTURE_S
    good: dict[str, int] = {}
    for sig in signatures:
        key = keys.get((sig.name, sig.key_id))
        if key is None:
            continue
        if len(sig.signature) != 8 + 64:
            raise CheckpointError(f"the cosignature by {sig.name} is malformed")
        timestamp = int.from_bytes(sig.signature[:8], "big")
        try:
            key.public_key.verify(sig.signature[8:], cosigned_message(body, timestamp))
        except InvalidSignature:
            raise CheckpointError(f"the cosignature by {sig.name} does not verify") from None
        if timestamp == 0 or timestamp > limit:
            raise CheckpointError(f"the cosignature by {sig.name} is dated {timestamp}, in "
                                  "the future or not at all")
        good[sig.name] = max(timestamp, good.get(sig.name, 0))
    return good


# --- Seals (forward-secure MACs over each event) --------------------------------------------
#
# Every event is sealed when it is made, before the database sees it: an HMAC-SHA256, with
# the key of the current epoch, over its id, its epoch and its content (its canonical bytes
# without what only its place in the chain gives: seq, ts, prev_hash). Epoch keys evolve
# one way, key(e+1) = SHA-256("charter-seal/1 evolve" || key(e)), and the server erases each
# as it moves on: a key stolen today cannot seal yesterday. The verification key is the
# seed key(0) derives from, kept by the auditors, never by the servers (as journald's
# Forward Secure Sealing, or Schneier and Kelsey's log MACs, do).

SEAL_VERSION = "charter-seal/1"
SEAL_VERIFY_FORMAT = "charter-seal-verify/1"


class SealError(ValueError):
    """A seal that is missing, malformed or wrong, or a key that cannot check it."""


def seal_key0(seed: bytes) -> bytes:
    return hmac.new(seed, SEAL_VERSION.encode() + b" epoch 0", hashlib.sha256).digest()


def seal_evolve(key: bytes) -> bytes:
    return _sha256(SEAL_VERSION.encode() + b" evolve" + key).digest()


def sealed_text(event_id: str, epoch: int, content: bytes) -> bytes:
    return f"{SEAL_VERSION}\n{epoch}\n{event_id}\n".encode() + content


def seal_mac(key: bytes, event_id: str, epoch: int, content: bytes) -> str:
    return hmac.digest(key, sealed_text(event_id, epoch, content), "sha256").hex()


EVENT_ID = re.compile(r"[0-9a-f]{32}")


def event_id_ms(event_id: str) -> int:
    """The millisecond clock an event id starts with (48 bits, then 80 random bits)."""
    if not EVENT_ID.fullmatch(event_id):
        raise SealError(f"malformed event id {event_id[:40]!r}")
    return int(event_id[:12], 16)


def sealed_content(line: bytes) -> bytes:
    """An event's sealed content from its canonical line: the same bytes with the values
    of prev_hash, seq and ts taken out (the key names stay)."""
    return sealed_parts(line)[0]


def sealed_parts(line: bytes) -> tuple[bytes, str]:
    """(sealed content, ts) of a canonical event line, by position: the keys after
    `details` come in a fixed order with plain values, and no string value can hold a `"`
    unescaped, so each is found from the right, whatever `details` holds."""
    a, b, c, d, e = _sealed_spans(line)
    return line[:a] + line[b:c] + line[d:e], line[e:-2].decode()


def _sealed_spans(line: bytes) -> tuple[int, int, int, int, int]:
    """The sealed content is line[:a] + line[b:c] + line[d:e]; the time is line[e:-2]."""
    rfind = line.rfind
    e = rfind(b',"ts":"') + 7
    d = rfind(b',"target_id":', 0, e)
    c = rfind(b',"seq":', 0, d) + 7
    a = rfind(b',"prev_hash":"', 0, c) + 14
    b = a + 64
    if (e < 7 or d < 0 or c < 7 or a < 14 or line[-2:] != b'"}'
            or not line.startswith(b'{"action":') or not line.startswith(
                b'","request_id":', b) or not line[c:d].isdigit()
            or line.find(b'"details":', 0, a) < 0):
        raise SealError("not an event line in its canonical form")
    return a, b, c, d, e


@dataclass(frozen=True)
class SealVerifier:
    """What checks seals: the seed, the start of epoch 0 (Unix seconds) and the epoch
    length. Secret: whoever holds it could seal any epoch."""

    seed: bytes
    t0: int
    interval_s: int
    _keys: list[bytes] = field(default_factory=list, repr=False, compare=False)
    # Per epoch, HMAC-SHA256's inner and outer hash states after its padded key (RFC
    # 2104): a MAC is then two copies and three updates, half the cost of a fresh HMAC.
    _pads: dict[int, tuple[Any, Any, bytes]] = field(default_factory=dict, repr=False,
                                                     compare=False)

    @classmethod
    def load(cls, text: str) -> SealVerifier:
        try:
            doc = json.loads(text)
            if doc.get("format") != SEAL_VERIFY_FORMAT:
                raise ValueError(f"not a {SEAL_VERIFY_FORMAT} key")
            seed = bytes.fromhex(doc["seed"])
            t0, interval = int(doc["t0"]), int(doc["interval_s"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SealError(f"malformed seal verification key: {exc}") from None
        if len(seed) != 32 or interval <= 0:
            raise SealError("malformed seal verification key: a 32-byte seed and an "
                            "epoch length are needed")
        return cls(seed, t0, interval)

    def epoch_of(self, ms: int) -> int:
        return (ms // 1000 - self.t0) // self.interval_s

    def key(self, epoch: int) -> bytes:
        if epoch < 0 or epoch > 10_000_000:
            raise SealError(f"epoch {epoch} is out of range")
        keys = self._keys
        if not keys:
            keys.append(seal_key0(self.seed))
        while len(keys) <= epoch:
            keys.append(seal_evolve(keys[-1]))
        return keys[epoch]

    def check(self, event_id: str, seal: str, content: bytes, ms: int | None = None
              ) -> None:
        """Raise SealError unless `seal` is this event's: the right epoch for its id's
        clock (`ms`, when the caller has read it already), and the MAC of that epoch's
        key."""
        epoch_text, sep, mac = seal.partition(".")
        if not sep or not epoch_text.isdigit() or len(mac) != 64:
            raise SealError("malformed seal")
        epoch = int(epoch_text)
        if epoch != self.epoch_of(event_id_ms(event_id) if ms is None else ms):
            raise SealError(f"sealed in epoch {epoch}, not in its id's epoch")
        if not hmac.compare_digest(mac, self.mac(epoch, event_id, content)):
            raise SealError("the seal does not match: the event was forged or changed")

    def pads(self, epoch: int) -> tuple[Any, Any, bytes]:
        """The epoch's HMAC-SHA256 inner and outer hash states after its padded key (RFC
        2104), and the sealed text's prefix: a MAC is then two copies and three updates,
        half the cost of a fresh HMAC."""
        pads = self._pads.get(epoch)
        if pads is None:
            key = self.key(epoch).ljust(64, b"\0")
            pads = self._pads[epoch] = (_sha256(bytes(b ^ 0x36 for b in key)),
                                        _sha256(bytes(b ^ 0x5C for b in key)),
                                        f"{SEAL_VERSION}\n{epoch}\n".encode())
        return pads

    def mac(self, epoch: int, event_id: str, content: bytes) -> str:
        """seal_mac(key(epoch), event_id, epoch, content), from the epoch's pads."""
        inner0, outer0, prefix = self.pads(epoch)
        inner, outer = inner0.copy(), outer0.copy()
        inner.update(b"".join((prefix, event_id.encode(), b"\n", content)))
        outer.update(inner.digest())
        return outer.hexdigest()  # type: ignore[no-any-return]


# --- Receipts (a signed promise that the log holds an event) ---------------------------------

RECEIPT_FORMAT = "charter-audit-receipt/1"


@dataclass(frozen=True)
class Receipt:
    origin: str
    seq: int
    hash: bytes
    action: str
    time: str

    @classmethod
    def open(cls, text: str, trusted: Sequence[Verifier]) -> Receipt:
        """A receipt from its note (or the JSON object the API answers with), if a trusted
        key signed it; raises CheckpointError otherwise."""
        if text.lstrip().startswith("{"):
            try:
                text = json.loads(text)["note"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"not a receipt: {exc}") from None
        body = open_note(text, trusted)
        lines = body[:-1].split("\n")
        try:
            fmt, origin, seq, digest, action, time = lines
            if fmt != RECEIPT_FORMAT or not seq.startswith("seq ") or not digest.startswith(
                    "hash ") or not action.startswith("action ") or not time.startswith(
                    "time "):
                raise ValueError("unexpected lines")
            receipt = cls(origin, int(seq[4:]), bytes.fromhex(digest[5:]), action[7:],
                          time[5:])
        except ValueError as exc:
            raise CheckpointError(f"not a {RECEIPT_FORMAT} receipt: {exc}") from None
        if receipt.seq < 1 or len(receipt.hash) != 32:
            raise CheckpointError("a receipt names an event by its seq and 32-byte hash")
        return receipt


def _receipts(receipts: Sequence[Receipt], origin: str, seqs: list[int],
              expected: list[bytes], tree_size: int, report: Report) -> None:
    """Hold the bundle against the receipts: each promised event must be in the log with
    its hash (when exported), and the log must still reach it."""
    for r in receipts:
        if r.origin != origin:
            report.add(None, "receipt_other_log", f"the receipt of event {r.seq} is from "
                       f"another log ({r.origin})")
            continue
        i = bisect_left(seqs, r.seq)
        if i < len(seqs) and seqs[i] == r.seq:
            if expected[i] != r.hash:
                report.add(r.seq, "receipt_broken", f"event {r.seq} is not the event the "
                           f"log promised on {r.time} ({r.action}): its hash differs")
            else:
                report.receipts.append({"seq": r.seq, "status": "held"})
        elif r.seq > tree_size:
            report.add(r.seq, "receipt_missing", f"the log promised event {r.seq} on "
                       f"{r.time} ({r.action}); it now holds {tree_size} events: it was cut")
        else:
            report.receipts.append({"seq": r.seq, "status": "not exported"})


# --- Bundles --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    seq: int | None  # the first sequence number it concerns; None: the bundle as a whole
    reason: str
    message: str


@dataclass
class Report:
    ok: bool = False
    events: int = 0
    checkpoints: int = 0
    first_bad_seq: int | None = None
    reason: str | None = None
    message: str | None = None
    keys: list[str] = field(default_factory=list)
    keys_from_bundle: bool = False
    witnessed_size: int | None = None  # the largest tree a quorum of witnesses cosigned
    receipts: list[dict[str, Any]] = field(default_factory=list)  # held, not exported
    findings: list[Finding] = field(default_factory=list)

    def add(self, seq: int | None, reason: str, message: str) -> None:
        self.findings.append(Finding(seq, reason, message))

    def close(self) -> Report:
        self.ok = not self.findings
        if self.findings:
            first = min(self.findings, key=lambda f: (f.seq is None, f.seq or 0))
            self.first_bad_seq, self.reason, self.message = first.seq, first.reason, first.message
        return self


class BundleError(ValueError):
    """Not a bundle this verifier can read at all."""


def _seqs(runs: Any) -> list[int]:
    out: list[int] = []
    for run in runs:
        first, last = int(run[0]), int(run[1])
        if first < 1 or last < first or (out and first <= out[-1]):
            raise BundleError("manifest.json: the sequence runs are not ascending")
        out.extend(range(first, last + 1))
    return out


def verify_bundle(source: str | Path | bytes, trusted: Sequence[Verifier] | None = None,
                  external: dict[int, list[str]] | None = None,
                  seal_key: SealVerifier | None = None,
                  witnesses: Sequence[CosignerKey] = (), quorum: int = 0,
                  receipts: Sequence[Receipt] = (),
                  kept_proofs: Sequence[tuple[int, int, Any]] = ()) -> Report:
    """Check a bundle (path or bytes). `trusted`: the log's verifier keys, None to use the
    bundle's own; `external`: checkpoint notes kept elsewhere, by tree size; `seal_key`:
    the auditors' seal verification key, to check every event's seal; `witnesses` and
    `quorum`: every event must be under a checkpoint cosigned by `quorum` of them (all of
    them when 0); `receipts`: events the log promised to hold; `kept_proofs`: the
    consistency proofs kept beside the external notes, (from, to, hex path)."""
    report = Report()
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = set(archive.namelist())
        manifest_bytes = archive.read("manifest.json")
        manifest = json.loads(manifest_bytes)
        if manifest.get("format") != FORMAT:
            raise BundleError(f"not a {FORMAT} bundle")
        seqs = _seqs(manifest["events"]["seqs"])
        hashes = manifest["events"]["hashes"]
        if len(hashes) != len(seqs):
            raise BundleError("manifest.json lists a different number of hashes and events")
        expected = [bytes.fromhex(h) for h in hashes]
        if any(len(h) != 32 for h in expected):
            raise BundleError("manifest.json: an event hash is not 32 bytes")
        listed = manifest["checkpoints"]
        origin = manifest["origin"]
    except (zipfile.BadZipFile, KeyError, TypeError, ValueError) as exc:
        report.add(None, "unreadable", f"not a readable bundle: {exc}")
        return report.close()
    report.events = len(seqs)

    # Keys: given by the auditor, or (said so) the bundle's own.
    if trusted is None:
        report.keys_from_bundle = True
        trusted = []
        for line in _text(archive, "keys.txt", report).splitlines():
            if line.strip() and not line.startswith("#"):
                try:
                    trusted.append(Verifier.parse(line))
                except CheckpointError as exc:
                    report.add(None, "bad_key", f"keys.txt: {exc}")
    trusted = list(trusted)
    report.keys = [str(v) for v in trusted]

    # The manifest's signature, then every file it lists.
    try:
        text = open_note(_text(archive, "manifest.sig", report), trusted)
        digest = _sha256(manifest_bytes).hexdigest()
        if text != f"{MANIFEST_NOTE}\n{digest}\n":
            report.add(None, "manifest_signature", "manifest.sig is not over this manifest")
    except CheckpointError as exc:
        report.add(None, "manifest_signature", f"manifest.sig: {exc}")
    for name, meta in manifest.get("files", {}).items():
        if name == "events.jsonl":
            continue  # checked line by line against the signed event hashes, below
        if name not in names:
            report.add(None, "missing_file", f"{name} is listed but not in the bundle")
        elif _sha256(archive.read(name)).hexdigest() != meta.get("sha256"):
            report.add(None, "file_digest", f"{name} does not match its digest")

    # Events: each line against the signed list of event hashes.
    raw = archive.read("events.jsonl") if "events.jsonl" in names else b""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    digests = [_sha256(line).digest() for line in lines]
    if digests != expected:
        _locate(report, seqs, expected, lines, digests)
    leaves = [_sha256(b"\x00" + d).digest() for d in expected]

    # Checkpoints: signatures, origin, external copies, consistency, then inclusion.
    proofs = _json(archive, "proofs.json", report) or {}
    checkpoints = _checkpoints(archive, listed, origin, trusted, seqs, report)
    report.checkpoints = len(checkpoints)
    _consistency(checkpoints, proofs.get("consistency", []), seqs, report)
    if external is not None:
        _external(checkpoints, proofs.get("consistency", []), proofs.get("links", []),
                  external, kept_proofs, trusted, origin, seqs, report)
    _inclusion(checkpoints, proofs.get("inclusion", []), seqs, leaves, report)
    _seals(archive, seqs, lines if digests == expected else None, checkpoints, seal_key,
           report)
    if witnesses:
        _witnessed(checkpoints, witnesses, quorum or len(witnesses), seqs, report)
    if receipts:
        _receipts(receipts, origin, seqs, expected, int(manifest.get("tree_size") or 0),
                  report)
    return report.close()


SEAL_CLOCK_SKEW_S = 3600  # how far an event's time may be from its id's clock


def _seals(archive: zipfile.ZipFile, seqs: list[int], lines: list[bytes] | None,
           checkpoints: list[_Listed], seal_key: SealVerifier | None,
           report: Report) -> None:
    """From the first event the signed checkpoints say was sealed (`seals-from N`), every
    event must carry a seal with an id of its own; with the verification key, each seal
    must be the one its content was sealed with."""
    marks = [seals_from_extensions(c.checkpoint.extensions) for c in checkpoints
             if c.checkpoint is not None]
    sealed_from = min((m for m in marks if m is not None), default=None)
    if sealed_from is None and seal_key is None:
        return
    if "seals.jsonl" not in set(archive.namelist()):
        if sealed_from is not None and seqs and seqs[-1] >= sealed_from:
            report.add(seqs[bisect_left(seqs, sealed_from)], "unsealed",
                       "the bundle has no seals.jsonl, but its checkpoints say events "
                       f"from {sealed_from} on are sealed")
        return
    try:
        listed, ids, seals = _seal_records(archive.read("seals.jsonl"))
    except ValueError as exc:
        report.add(None, "unreadable", f"seals.jsonl: {exc}")
        return
    if listed != seqs:
        report.add(None, "seals_mismatch", "seals.jsonl does not list the exported events")
        return
    # Presence and uniqueness, a comprehension at a time (C speed, not a loop of Python).
    marks_ok = [type(x) is str and type(y) is str for x, y in zip(ids, seals, strict=True)]
    stop = len(seqs)  # the first presence finding, where checking stops
    finding: tuple[int, str, str] | None = None
    if not all(marks_ok):
        first_from = bisect_left(seqs, sealed_from) if sealed_from is not None else stop
        bare = next((i for i in range(first_from, stop) if not marks_ok[i]), None)
        if bare is not None:
            stop, finding = bare, (seqs[bare], "unsealed", f"event {seqs[bare]} has no "
                                   f"seal, but every event from {sealed_from} on was sealed")
    present = [x for x, ok in zip(ids, marks_ok, strict=True) if ok]
    if len(set(present)) != len(present):
        seen: dict[str, int] = {}
        for i, (x, ok) in enumerate(zip(ids, marks_ok, strict=True)):
            if not ok:
                continue
            if x in seen:
                if i < stop:
                    stop, finding = i, (seqs[i], "replayed", f"event {seqs[i]} repeats "
                                        f"event {seen[x]} (the same event id): a sealed "
                                        "event was copied")
                break
            seen[x] = seqs[i]
    to_check = [i for i in range(stop) if marks_ok[i]]
    if seal_key is not None and lines is not None and to_check:
        forged = _check_seals(seal_key, ids, seals, lines, to_check)
        if forged is not None and forged[0] < stop:
            i, message = forged
            finding = (seqs[i], "forged", f"event {seqs[i]}: {message}")
    if finding is not None:
        report.add(*finding)


def _seal_records(data: bytes) -> tuple[list[Any], list[Any], list[Any]]:
    """(seq, id, seal) of each line of seals.jsonl: decoded as one JSON array (one call
    into the C decoder a bundle, not one a line)."""
    records = json.loads(b"[" + b",".join(r for r in data.split(b"\n") if r) + b"]")
    if not all(isinstance(r, dict) for r in records):
        raise ValueError("a line is not a JSON object")
    return ([r.get("seq") for r in records], [r.get("id") for r in records],
            [r.get("seal") for r in records])


def _check_seals(seal_key: SealVerifier, ids: list[Any], seals: list[Any],
                 lines: list[bytes], to_check: list[int]) -> tuple[int, str] | None:
    """Check the seal of each event at the indices `to_check`; the first (index, why)
    that fails, or None. SealVerifier.check, inlined: this runs once an event."""
    epoch_of, pads_of, compare = seal_key.epoch_of, seal_key.pads, hmac.compare_digest
    seconds: dict[bytes, float] = {}
    for i in to_check:
        event_id, seal, line = ids[i], seals[i], lines[i]
        try:
            a, b, c, d, e = _sealed_spans(line)
            if len(event_id) != 32:  # the MAC binds the id's exact text; this, its clock
                raise SealError(f"malformed event id {event_id[:40]!r}")
            ms = int(event_id[:12], 16)
            second = line[e:e + 19]  # events of one second share the parse; the skew
            when = seconds.get(second)  # allowed is an hour, so whole seconds will do
            if when is None:
                when = seconds[second] = _utc_seconds(second.decode() + ".000000Z")
            if abs(ms / 1000 - when) > SEAL_CLOCK_SKEW_S + 1:
                raise SealError("its id's clock is far from its time: moved from elsewhere")
            epoch_text, sep, mac = seal.partition(".")
            if not sep or not epoch_text.isdigit() or len(mac) != 64:
                raise SealError("malformed seal")
            epoch = int(epoch_text)
            if epoch != epoch_of(ms):
                raise SealError(f"sealed in epoch {epoch}, not in its id's epoch")
            inner0, outer0, prefix = pads_of(epoch)
            inner, outer = inner0.copy(), outer0.copy()
            inner.update(b"".join((prefix, event_id.encode(), b"\n", line[:a], line[b:c],
                                   line[d:e])))
            outer.update(inner.digest())
            if not compare(mac, outer.hexdigest()):
                raise SealError("the seal does not match: the event was forged or changed")
        except (SealError, ValueError, KeyError, TypeError) as exc:
            return i, str(exc)
    return None


def _utc_seconds(text: str) -> float:
    """Unix seconds of a log time (`YYYY-MM-DDTHH:MM:SS.ffffffZ`)."""
    if len(text) != 27 or text[-1] != "Z":
        raise ValueError(f"not a log time: {text[:40]!r}")
    return datetime.fromisoformat(text).timestamp()


def seals_from_extensions(extensions: Sequence[str]) -> int | None:
    """A checkpoint's `seals-from N` line: every event from N on is sealed."""
    for line in extensions:
        if line.startswith("seals-from ") and line[11:].isdigit():
            return int(line[11:])
    return None


def _text(archive: zipfile.ZipFile, name: str, report: Report) -> str:
    try:
        return archive.read(name).decode()
    except (KeyError, UnicodeDecodeError) as exc:
        report.add(None, "missing_file", f"{name}: {exc}")
        return ""


def _json(archive: zipfile.ZipFile, name: str, report: Report) -> Any:
    try:
        return json.loads(archive.read(name))
    except (KeyError, ValueError) as exc:
        report.add(None, "missing_file", f"{name}: {exc}")
        return None


def _locate(report: Report, seqs: list[int], expected: list[bytes], lines: list[bytes],
            digests: list[bytes]) -> None:
    """Name the first place where the events depart from the signed list, and how."""
    position = {h: i for i, h in enumerate(expected)}
    seen: set[int] = set()
    for i, seq in enumerate(seqs):
        if i >= len(lines):
            report.add(seq, "missing", f"event {seq} is missing (the bundle ends early)")
            return
        got = digests[i]
        if got == expected[i]:
            seen.add(i)
            continue
        j = position.get(got)
        claimed = _claimed_seq(lines[i])
        if j is None:
            inserted = claimed != seq or (i + 1 < len(digests)
                                          and digests[i + 1] == expected[i])
            reason = "inserted" if inserted else "edited"
            report.add(seq, reason, f"event {seq}: the line in its place is not the signed "
                       + ("event (its content was changed)" if reason == "edited"
                          else f"event (it claims to be event {claimed})"))
        elif j in seen:
            report.add(seq, "duplicated", f"event {seq}: its place holds a second copy of "
                       f"event {seqs[j]}")
        elif j > i and expected[i] in digests[i + 1:]:
            report.add(seq, "reordered", f"event {seq} is out of order: event {seqs[j]} "
                       "stands in its place")
        else:
            report.add(seq, "missing", f"event {seq} is missing (event {seqs[j]} follows "
                       f"event {seqs[i - 1] if i else 'none'})")
        return
    if len(lines) > len(seqs):
        extra = _claimed_seq(lines[len(seqs)])
        report.add(seqs[-1] if seqs else None, "inserted",
                   f"the bundle has {len(lines) - len(seqs)} more lines than events; the "
                   f"first claims to be event {extra}")


def _claimed_seq(line: bytes) -> int | None:
    try:
        value = json.loads(line).get("seq")
    except (ValueError, AttributeError):
        return None
    return value if type(value) is int else None


@dataclass(frozen=True)
class _Listed:
    size: int
    checkpoint: Checkpoint | None
    first: int  # index into seqs of the first event it covers
    last: int  # one past the last
    note: str = ""


def _checkpoints(archive: zipfile.ZipFile, listed: list[dict[str, Any]], origin: str,
                 trusted: list[Verifier], seqs: list[int], report: Report) -> list[_Listed]:
    out: list[_Listed] = []
    previous = 0
    names = set(archive.namelist())
    for entry in listed:
        size = int(entry["size"])
        lo, hi = bisect_left(seqs, previous + 1), bisect_left(seqs, size + 1)
        first_seq = seqs[lo] if lo < len(seqs) else None
        previous = max(previous, size)
        name = entry.get("file", "")
        checkpoint, note = None, ""
        if name not in names:
            report.add(first_seq, "checkpoint_missing",
                       f"the checkpoint of size {size} is not in the bundle")
        else:
            note = archive.read(name).decode(errors="replace")
            try:
                checkpoint = verify(note, trusted)
                if checkpoint.origin != origin or checkpoint.size != size:
                    report.add(first_seq, "checkpoint_mismatch",
                               f"{name} is for {checkpoint.origin} at size {checkpoint.size}")
                    checkpoint = None
            except CheckpointError as exc:
                report.add(first_seq, "checkpoint_signature", f"{name}: {exc}")
        out.append(_Listed(size, checkpoint, lo, hi, note))
    if seqs and (not out or out[-1].size < seqs[-1]):
        uncovered = bisect_left(seqs, previous + 1)
        report.add(seqs[uncovered], "uncovered",
                   f"event {seqs[uncovered]} and later are covered by no checkpoint")
    return out


def _witnessed(checkpoints: list[_Listed], witnesses: Sequence[CosignerKey], quorum: int,
               seqs: list[int], report: Report) -> None:
    """Every event must be in a tree that `quorum` of the witnesses cosigned: under the
    largest such checkpoint, since the bundle's checkpoints are chained by consistency
    proofs. Returns nothing; the findings name the first event no quorum covers."""
    best = 0
    for c in checkpoints:
        if c.checkpoint is None:
            continue
        try:
            names = cosignatures(c.note, witnesses)
        except CheckpointError as exc:
            report.add(seqs[c.first] if c.first < len(seqs) else None, "cosignature",
                       f"the checkpoint of size {c.size}: {exc}")
            continue
        if len(names) >= quorum:
            best = max(best, c.size)
    report.witnessed_size = best
    if seqs and seqs[-1] > best:
        first = seqs[bisect_left(seqs, best + 1)]
        report.add(first, "witness_quorum", f"event {first} and later are under no "
                   f"checkpoint cosigned by {quorum} of the {len(witnesses)} witnesses")


def _external(checkpoints: list[_Listed], consistency: Any, links: Any,
              external: dict[int, list[str]], kept_proofs: Sequence[tuple[int, int, Any]],
              trusted: list[Verifier], origin: str, seqs: list[int],
              report: Report) -> None:
    """Hold the bundle's checkpoints against the checkpoints kept elsewhere, of any size.

    Two different signed notes of one size are a fork, and so is a kept note whose size
    the bundle has with another root. Then every checkpoint, kept or in the bundle, but
    the largest must be proven a prefix of a larger one: by the proofs kept beside the
    notes (`<name>.proof`: each from the folder's newest note before it), by the bundle's
    own chain of consistency proofs, or by its `links` (from other checkpoints the log
    signed to the bundle's nearest). Prefix of prefix is prefix, so all of them are then
    prefixes of the largest: one log. A failing proof is a fork; a checkpoint with no
    proof to a larger one cannot be told from a fork (`checkpoint_unlinked`)."""
    good = {c.size: c for c in checkpoints if c.checkpoint is not None}
    if not good:
        return
    roots: dict[int, bytes] = {}
    for size, c in good.items():
        assert c.checkpoint is not None
        roots[size] = c.checkpoint.root_hash

    def first_seq(size: int) -> int | None:
        near = good[min((s for s in good if s >= size), default=max(good))]
        return seqs[near.first] if near.first < len(seqs) else None

    forked: set[int] = set()
    for size in sorted(external):
        kept: dict[bytes, str] = {}
        for note in external[size]:
            try:
                checkpoint = verify(note, trusted)
            except CheckpointError as exc:
                report.add(None, "checkpoint_forged", f"the checkpoint of size {size} kept "
                           f"elsewhere is not signed by a trusted key: {exc}")
                continue
            if checkpoint.origin == origin:
                kept.setdefault(checkpoint.root_hash, note)
        if size == 0 or not kept:
            continue
        if len(kept) > 1:
            report.add(first_seq(size), "checkpoint_fork", f"the copy kept elsewhere holds "
                       f"{len(kept)} different signed checkpoints of size {size}: the log "
                       "was forked")
            forked.add(size)
            continue
        root = next(iter(kept))
        if size in roots and roots[size] != root:
            report.add(first_seq(size), "checkpoint_fork", f"the bundle's checkpoint of "
                       f"size {size} differs from the copy kept elsewhere")
            forked.add(size)
            continue
        roots[size] = root
    # Every proof there is: (from, to, path).
    edges: list[tuple[int, int, Any, str]] = []
    try:
        edges += [(int(p["from"]), int(p["to"]), p.get("path", []), "the bundle's proofs")
                  for p in consistency]
        for link in links:
            a, b = int(link["size"]), int(link["to"])
            edges.append((min(a, b), max(a, b), link.get("path", []), "the bundle's links"))
    except (KeyError, TypeError, ValueError) as exc:
        report.add(None, "unreadable", f"proofs.json: malformed proofs: {exc}")
        return
    edges += [(a, b, path, "the proofs kept elsewhere") for a, b, path in kept_proofs]
    up: set[int] = set()  # sizes proven a prefix of a larger one
    for a, b, path, source in edges:
        if a in up or a not in roots or b not in roots or not 0 < a < b:
            continue
        try:
            verify_consistency(a, b, roots[a], roots[b], [bytes.fromhex(h) for h in path])
        except (ProofError, ValueError, TypeError) as exc:
            report.add(first_seq(b), "checkpoint_fork", f"the checkpoints of size {a} and "
                       f"{b} are not one log ({source}): {exc}")
            forked.update((a, b))
            continue
        up.add(a)
    top = max(roots)
    for size in sorted(roots):
        if size != top and size not in up and size not in forked:
            where = "in the bundle" if size in good else "kept elsewhere"
            report.add(None, "checkpoint_unlinked", f"the checkpoint of size {size} {where}: "
                       "no consistency proof ties it to a larger checkpoint")


def _consistency(checkpoints: list[_Listed], proofs: list[dict[str, Any]], seqs: list[int],
                 report: Report) -> None:
    by_pair = {(int(p["from"]), int(p["to"])): p.get("path", []) for p in proofs}
    good = [c for c in checkpoints if c.checkpoint is not None]
    for older, newer in zip(good, good[1:], strict=False):
        assert older.checkpoint is not None and newer.checkpoint is not None
        first_seq = seqs[newer.first] if newer.first < len(seqs) else None
        try:
            path = [bytes.fromhex(h) for h in by_pair[(older.size, newer.size)]]
            verify_consistency(older.size, newer.size, older.checkpoint.root_hash,
                               newer.checkpoint.root_hash, path)
        except KeyError:
            report.add(first_seq, "checkpoint_fork", f"no consistency proof from size "
                       f"{older.size} to size {newer.size}")
        except (ProofError, ValueError) as exc:
            report.add(first_seq, "checkpoint_fork", f"the checkpoint of size {newer.size} "
                       f"does not extend the one of size {older.size}: {exc}")


def _inclusion(checkpoints: list[_Listed], proofs: list[dict[str, Any]], seqs: list[int],
               leaves: list[bytes], report: Report) -> None:
    by_size = {int(p["size"]): p.get("nodes", []) for p in proofs}
    for c in checkpoints:
        if c.first == c.last or c.checkpoint is None:
            continue
        first_seq = seqs[c.first]
        try:
            nodes = [(int(lo), int(hi), bytes.fromhex(h)) for lo, hi, h in by_size[c.size]]
            indices = [s - 1 for s in seqs[c.first:c.last]]
            root = multiproof_root(c.size, indices, leaves[c.first:c.last], nodes)
        except KeyError:
            report.add(first_seq, "inclusion", f"no inclusion proof for the checkpoint of "
                       f"size {c.size}")
            continue
        except (ProofError, ValueError, TypeError) as exc:
            report.add(first_seq, "inclusion", f"events {first_seq}..{seqs[c.last - 1]}: "
                       f"{exc}")
            continue
        if root != c.checkpoint.root_hash:
            report.add(first_seq, "inclusion", f"events {first_seq}..{seqs[c.last - 1]} "
                       f"and their proof do not lead to the root of checkpoint {c.size}")


def _load_keys(values: list[str], files: list[str]) -> list[Verifier]:
    texts = list(values)
    for name in files:
        texts += [ln for ln in Path(name).read_text().splitlines()
                  if ln.strip() and not ln.startswith("#")]
    return [Verifier.parse(t) for t in texts]


def load_kept_proofs(directory: str) -> list[tuple[int, int, list[str]]]:
    """The consistency proofs kept beside the notes (`*.proof`, charter-consistency/1)."""
    out = []
    for path in sorted(Path(directory).glob("*.proof")):
        try:
            doc = json.loads(path.read_text())
            out.append((int(doc["from"]), int(doc["to"]), [str(h) for h in doc["path"]]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable proof proves nothing; what needs it is unlinked
    return out


def _load_external(directory: str) -> dict[int, list[str]]:
    kept: dict[int, list[str]] = {}
    for path in sorted(Path(directory).glob("*.note")):
        note = path.read_text()
        try:
            kept.setdefault(parse(note)[0].size, []).append(note)
        except CheckpointError:
            continue
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="charter-verify", description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--key", action="append", default=[],
                        help="a trusted verifier key (name+keyid+base64key); repeatable")
    parser.add_argument("--keys", action="append", default=[],
                        help="a file of trusted verifier keys, one a line")
    parser.add_argument("--checkpoints", help="a folder of checkpoint notes kept elsewhere")
    parser.add_argument("--seal-key", help="the auditors' seal verification key (a file): "
                        "check every event's seal")
    parser.add_argument("--witness-key", action="append", default=[],
                        help="a witness's cosignature key (name+keyid+base64key, as "
                        "`charter witness keygen` prints); repeatable")
    parser.add_argument("--quorum", type=int, default=0,
                        help="how many of the --witness-key witnesses must have cosigned "
                        "a checkpoint over every event (default: all of them)")
    parser.add_argument("--receipt", action="append", default=[],
                        help="a receipt the log gave for a lifecycle action (a file: the "
                        "JSON the API answered with, or its note); repeatable")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        trusted = _load_keys(args.key, args.keys) if (args.key or args.keys) else None
        external = _load_external(args.checkpoints) if args.checkpoints else None
        seal_key = (SealVerifier.load(Path(args.seal_key).read_text(encoding="utf-8"))
                    if args.seal_key else None)
        witnesses = [CosignerKey.parse(k) for k in args.witness_key]
        if not 0 <= args.quorum <= len(witnesses) or (args.quorum and not witnesses):
            raise CheckpointError(f"--quorum {args.quorum}: between 1 and the number of "
                                  f"--witness-key given ({len(witnesses)})")
        if args.receipt and not trusted:
            raise CheckpointError("--receipt needs the log's keys (--key or --keys)")
        receipts = [Receipt.open(Path(f).read_text(encoding="utf-8"), trusted or [])
                    for f in args.receipt]
        kept_proofs = load_kept_proofs(args.checkpoints) if args.checkpoints else []
        report = verify_bundle(args.bundle, trusted, external, seal_key, witnesses,
                               args.quorum, receipts, kept_proofs)
    except (OSError, CheckpointError, SealError) as exc:
        print(f"charter-verify: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        verdict = "OK" if report.ok else "FAILED"
        print(f"{verdict}: {report.events} events, {report.checkpoints} checkpoints")
        if report.keys_from_bundle:
            print("warning: keys taken from the bundle itself; compare them with the log's "
                  "published keys or pass --key/--keys")
        for key in report.keys:
            print(f"key: {key}")
        for held in report.receipts:
            print(f"receipt: event {held['seq']}: {held['status']}")
        if report.witnessed_size is not None:
            print(f"witnessed: the tree of size {report.witnessed_size} has the quorum of "
                  "cosignatures")
        if not report.ok:
            where = report.first_bad_seq if report.first_bad_seq is not None else "-"
            print(f"first bad sequence number: {where} ({report.reason}): {report.message}")
            for f in report.findings[1:20]:
                print(f"  also: {f.seq if f.seq is not None else '-'} ({f.reason}): "
                      f"{f.message}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
