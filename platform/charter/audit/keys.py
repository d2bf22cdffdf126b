"""The log's signing keys: loaded from the configured PEM files (cached while the files do
not change), and made by `charter audit keygen`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.checkpoint import Signer
from charter.errors import ConfigurationError
from charter.settings import Settings


def load_signers(settings: Settings) -> list[Signer]:
    paths = tuple(settings.signing_key_paths)
    stamps = tuple(_mtime(p) for p in paths)
    return list(_signers(settings.audit_log_origin, paths, stamps))


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0


@lru_cache(maxsize=8)
def _signers(origin: str, paths: tuple[str, ...], _stamps: tuple[float, ...]
             ) -> tuple[Signer, ...]:
    out = []
    for path in paths:
        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(f"CHARTER_AUDIT_SIGNING_KEYS: {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigurationError(f"CHARTER_AUDIT_SIGNING_KEYS: {path} is not an Ed25519 "
                                     "private key")
        out.append(Signer(origin, key))
    return tuple(out)


def generate_key(path: Path) -> None:
    """A new Ed25519 private key as PKCS#8 PEM, readable by its owner only."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
