"""The server's side of event seals: the evolving key, and sealing an event as it is made.

`charter audit sealkey` makes a seed. Its verification key (the seed, the start of epoch 0
and the epoch length) goes to the auditors and nowhere else; the sealing key file
(`CHARTER_AUDIT_SEAL_KEY`) holds only the key of the current epoch. Each process moves the
key forward as epochs pass (key(e+1) = SHA-256("charter-seal/1 evolve" || key(e)), see
charter.audit.verify), forgets the old one, and rewrites the file with the new one when it
can write it: someone who steals the file, or a process's memory, can seal from that epoch
on, never before. Where the file is read-only (a Kubernetes Secret), a stolen file can seal
from the epoch it was written in: evolve it on writable storage to keep the guarantee.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from charter.audit.verify import (
    SEAL_VERIFY_FORMAT,
    SealVerifier,
    seal_evolve,
    seal_key0,
    seal_mac,
)
from charter.errors import ConfigurationError

SEAL_KEY_FORMAT = "charter-seal-key/1"
DEFAULT_INTERVAL_S = 900


@dataclass(frozen=True)
class SealKeys:
    sealing: str  # the sealing key file's text (epoch 0's key)
    verification: str  # the auditors' verification key


def make_seal_keys(interval_s: int = DEFAULT_INTERVAL_S, *, t0: int | None = None) -> SealKeys:
    """A new seed: the sealing key file (its epoch 0 key) and the verification key."""
    seed = secrets.token_bytes(32)
    start = int(time.time()) if t0 is None else t0
    sealing = {"format": SEAL_KEY_FORMAT, "t0": start, "interval_s": interval_s, "epoch": 0,
               "key": seal_key0(seed).hex()}
    verification = {"format": SEAL_VERIFY_FORMAT, "t0": start, "interval_s": interval_s,
                    "seed": seed.hex()}
    return SealKeys(json.dumps(sealing, indent=1) + "\n",
                    json.dumps(verification, indent=1) + "\n")


def write_new(path: Path, text: str) -> None:
    """Write a key file that must not exist yet, readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class Sealer:
    """Seals events with the current epoch's key; thread-safe; one per Runtime."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            if doc.get("format") != SEAL_KEY_FORMAT:
                raise ValueError(f"not a {SEAL_KEY_FORMAT} file")
            self.t0, self.interval_s = int(doc["t0"]), int(doc["interval_s"])
            self._epoch, self._key = int(doc["epoch"]), bytes.fromhex(doc["key"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"CHARTER_AUDIT_SEAL_KEY: {path}: {exc}") from None
        if self.interval_s <= 0 or len(self._key) != 32:
            raise ConfigurationError(f"CHARTER_AUDIT_SEAL_KEY: {path}: malformed key")
        self._lock = threading.Lock()
        self._advance(self._epoch_now())

    def _epoch_now(self) -> int:
        return (int(time.time()) - self.t0) // self.interval_s

    @property
    def epoch(self) -> int:
        return self._epoch

    def _advance(self, epoch: int) -> None:
        """Move the key forward to `epoch`, forget the old ones, rewrite the file."""
        with self._lock:
            if epoch <= self._epoch:
                return
            key = self._key
            for _ in range(epoch - self._epoch):
                key = seal_evolve(key)
            self._key, self._epoch = key, epoch
        self._persist(epoch, key)

    def _persist(self, epoch: int, key: bytes) -> None:
        """Overwrite the file with the new epoch's key (atomically), unless a newer one is
        there already or the file is read-only."""
        try:
            current = json.loads(self.path.read_text(encoding="utf-8"))
            if int(current.get("epoch", -1)) >= epoch:
                return
            doc = {**current, "epoch": epoch, "key": key.hex()}
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(doc, indent=1) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except (OSError, ValueError, TypeError):
            pass  # read-only (a mounted Secret): the memory moves on all the same

    def seal(self, content: bytes) -> tuple[str, str]:
        """(event id, seal) for an event with this content (charter.audit.verify
        .sealed_content's bytes). The id starts with the clock, in milliseconds."""
        now_ms = int(time.time() * 1000)
        epoch = (now_ms // 1000 - self.t0) // self.interval_s
        if epoch > self._epoch:
            self._advance(epoch)
        with self._lock:
            key, held = self._key, self._epoch
        if held > epoch:  # the clock went back past an erased key: seal in the held epoch
            now_ms = (self.t0 + held * self.interval_s) * 1000
            epoch = held
        event_id = f"{now_ms:012x}{secrets.token_hex(10)}"
        return event_id, f"{epoch}.{seal_mac(key, event_id, epoch, content)}"


def verifier_from_file(path: str) -> SealVerifier:
    return SealVerifier.load(Path(path).read_text(encoding="utf-8"))
