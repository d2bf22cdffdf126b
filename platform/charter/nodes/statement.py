"""Signed attestation statements: what a node agent states about the bytes its engine
serves, and how Charter checks it, offline.

The agent (charter.nodes.agent) hashes the model directory the engine loads and answers
Charter's challenge (a fresh nonce) with a statement signed by the node's Ed25519 key:

    {"type": "charter.node-attestation/1", "nonce", "node", "engine": {"kind", "version"},
     "issued_at": seconds since the epoch, "files": [{"path", "size", "sha256"}, ...],
     "adapters": {name: [{"path", "size", "sha256"}, ...]}}  (only where it loads any)

sent as {"statement": ..., "key_id": ..., "signature": base64 of Ed25519 over the
statement's canonical JSON}. Charter holds the public key enrolled for the node; it
checks the key, the signature, its own nonce, then each pinned file of an approved
version against the stated files. No network beyond the agent, no Hub: air-gapped.
Each failure has its own code, which the node's quarantine reason and audit event carry.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

STATEMENT_TYPE = "charter.node-attestation/1"


class AttestationError(Exception):
    """Why a statement does not attest the node: `code` is stable, `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def key_id(public_raw: bytes) -> str:
    """A short, stable name of a public key: what the agent says it signed with."""
    return "ed25519:" + hashlib.sha256(public_raw).hexdigest()[:16]


def public_key_text(key: Ed25519PrivateKey) -> str:
    """The public key as an operator enrolls it: base64 of the raw 32 bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def parse_public_key(text: str) -> bytes:
    """The raw 32 bytes of an enrolled key (base64), or ValueError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the agent key is not base64") from None
    if len(raw) != 32:
        raise ValueError("the agent key is not an Ed25519 public key (32 bytes)")
    return raw


def key_text(public_raw: bytes) -> str:
    return base64.b64encode(public_raw).decode()


def sign(key: Ed25519PrivateKey, statement: Mapping[str, Any]) -> dict[str, Any]:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"statement": dict(statement), "key_id": key_id(raw),
            "signature": base64.b64encode(key.sign(canonical(statement))).decode()}


def verify(envelope: Any, public_raw: bytes, nonce: str) -> dict[str, Any]:
    """The statement, if `envelope` is signed by the enrolled key and answers `nonce`."""
    if not isinstance(envelope, dict) or not isinstance(envelope.get("statement"), dict):
        raise AttestationError("agent_statement_malformed", "the agent's answer is no statement")
    statement: dict[str, Any] = envelope["statement"]
    if envelope.get("key_id") != key_id(public_raw):
        raise AttestationError(
            "agent_key_unknown", f"the statement is signed with {envelope.get('key_id')!r}, "
            f"not the key enrolled for this node ({key_id(public_raw)})")
    try:
        signature = base64.b64decode(str(envelope.get("signature", "")), validate=True)
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, canonical(statement))
    except (binascii.Error, ValueError, InvalidSignature):
        raise AttestationError("agent_signature_invalid",
                               "the statement's signature does not verify") from None
    if statement.get("type") != STATEMENT_TYPE:
        raise AttestationError("agent_statement_malformed",
                               f"the statement is of type {statement.get('type')!r}")
    if statement.get("nonce") != nonce:
        raise AttestationError("agent_nonce_mismatch",
                               "the statement answers another challenge (replayed or stale)")
    if not _listing(statement.get("files")):
        raise AttestationError("agent_statement_malformed", "the statement's files are malformed")
    adapters = statement.get("adapters", {})
    if not isinstance(adapters, dict) or not all(
            isinstance(name, str) and ADAPTER_NAME.fullmatch(name) and _listing(files)
            for name, files in adapters.items()):
        raise AttestationError("agent_statement_malformed",
                               "the statement's adapters are malformed")
    return statement


# An adapter's name as engines take it (TGI's adapter_id, vLLM's LoRA module name).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


def _listing(files: Any) -> bool:
    return isinstance(files, list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str)
        and isinstance(f.get("sha256"), str) and isinstance(f.get("size"), int)
        for f in files)


@dataclass(frozen=True)
class Pinned:
    path: str
    size: int | None
    sha256: str


def mismatches(stated: Iterable[Mapping[str, Any]], pinned: Iterable[Pinned]) -> list[str]:
    """What keeps the stated files from being the pinned ones: a missing file, another
    digest or size. Files the version does not pin (a README) do not matter."""
    by_path = {f["path"]: f for f in stated}
    problems = []
    for p in pinned:
        found = by_path.get(p.path)
        if found is None:
            problems.append(f"{p.path} is missing")
        elif found["sha256"] != p.sha256:
            problems.append(f"{p.path} has SHA-256 {found['sha256'][:12]}..., "
                            f"pinned {p.sha256[:12]}...")
        elif p.size is not None and found["size"] != p.size:
            problems.append(f"{p.path} is {found['size']} bytes, pinned {p.size}")
    return problems
