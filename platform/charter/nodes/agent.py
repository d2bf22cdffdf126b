"""`charter node agent`: beside an inference engine (same pod or host), it hashes the
model directory the engine serves (and each LoRA adapter directory it loads, by the name
the engine knows it by) and answers Charter's challenges with signed statements
(charter.nodes.statement). Standalone: no database, no Charter settings, no network
beyond answering; the model directory is best mounted read-only into both containers.

Hashing is streamed (1 MiB at a time) and cached by (path, inode, size, mtime): a file is
hashed again only when it changed, so a challenge costs a `stat` a file once the model
has been read once (at start).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from charter.nodes.statement import STATEMENT_TYPE, sign

CHUNK = 1 << 20
MAX_BODY = 4096


def new_key(path: Path) -> Ed25519PrivateKey:
    """A new Ed25519 key in `path` (PEM, PKCS#8, mode 0600); refuses to overwrite."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    key = load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds no Ed25519 private key")
    return key


@dataclass(frozen=True)
class _Seen:
    inode: int
    size: int
    mtime_ns: int
    sha256: str


class ModelFiles:
    """The files of a model directory with their digests (hidden entries skipped; links
    followed, as the engine follows them: a Hugging Face snapshot is links to blobs)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()
        self.hashed_bytes = 0  # how much was read (tests and the log: the cache works)

    def listing(self) -> list[dict[str, Any]]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = Path(dirpath) / name
                rel = path.relative_to(self.root).as_posix()
                st = path.stat()
                found.append({"path": rel, "size": st.st_size,
                              "sha256": self._digest(rel, path, st)})
        return found

    def _digest(self, rel: str, path: Path, st: os.stat_result) -> str:
        with self._lock:
            seen = self._seen.get(rel)
            if seen is not None and (seen.inode, seen.size, seen.mtime_ns) == (
                    st.st_ino, st.st_size, st.st_mtime_ns):
                return seen.sha256
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        with self._lock:
            self.hashed_bytes += st.st_size
            self._seen[rel] = _Seen(st.st_ino, st.st_size, st.st_mtime_ns, digest.hexdigest())
        return digest.hexdigest()


class Agent:
    def __init__(self, key: Ed25519PrivateKey, files: ModelFiles, *, node: str,
                 engine: str, engine_version: str,
                 adapters: dict[str, ModelFiles] | None = None) -> None:
        self.key, self.files, self.adapters = key, files, adapters or {}
        self.node, self.engine, self.engine_version = node, engine, engine_version

    def answer(self, nonce: str) -> dict[str, Any]:
        statement: dict[str, Any] = {
            "type": STATEMENT_TYPE, "nonce": nonce, "node": self.node,
            "engine": {"kind": self.engine, "version": self.engine_version},
            "issued_at": int(time.time()), "files": self.files.listing()}
        if self.adapters:
            statement["adapters"] = {name: files.listing()
                                     for name, files in sorted(self.adapters.items())}
        return sign(self.key, statement)


def make_server(agent: Agent, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _json(self, status: int, value: Any) -> None:
            body = json.dumps(value).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if self.path != "/attest":
                self._json(404, {"error": "not found"})
                return
            if length > MAX_BODY:
                self._json(413, {"error": "the challenge is too large"})
                return
            try:
                nonce = json.loads(self.rfile.read(length)).get("nonce")
            except (ValueError, AttributeError):
                nonce = None
            if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
                self._json(400, {"error": "send {\"nonce\": <16 to 128 characters>}"})
                return
            try:
                self._json(200, agent.answer(nonce))
            except OSError as exc:  # a file vanished or is unreadable: say so
                self._json(500, {"error": f"the model directory could not be read: {exc}"})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server
