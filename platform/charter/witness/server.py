"""The witness's HTTP interface: `POST /add-checkpoint`, as C2SP tlog-witness specifies.

Request: `old <size>`, up to 63 consistency proof lines (base64 hashes), an empty line,
then the checkpoint note. Answers, in the spec's order of checks:

    400  malformed request, or an old size above the checkpoint's size
    403  no good signature by a key the witness trusts for the origin (or a bad one)
    404  an origin the witness does not know
    409  the old size is not the size it last cosigned: the body is that size
         (`text/x.tlog.size`), so the log can retry with the right proof
    422  a size-0 checkpoint without the empty root; a proof where none is due; a
         consistency proof that does not verify; the same size with another root
    200  the cosignature lines (C2SP tlog-cosignature, Ed25519 cosignature/v1)

A 422 on a checkpoint the log did sign is kept as evidence: it proves the log forked or
rewrote itself. `GET /healthz` answers 200 while the state can be read.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit.verify import (
    DASH,
    EMPTY_ROOT,
    CheckpointError,
    CosignerKey,
    ProofError,
    Verifier,
    cosigned_message,
    open_note,
    parse,
    verify_consistency,
)
from charter.witness.state import Latest, WitnessState

MAX_BODY = 64 * 1024  # 63 proof lines and a note with its signatures fit many times over
MAX_PROOF = 63


class Refusal(Exception):
    def __init__(self, status: int, message: str, *, size: int | None = None,
                 evidence: str | None = None) -> None:
        super().__init__(message)
        self.status, self.size, self.evidence = status, size, evidence


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: str


class Witness:
    """Cosigns consistent extensions of the logs it knows, and nothing else."""

    def __init__(self, name: str, key: Ed25519PrivateKey,
                 logs: Mapping[str, Sequence[Verifier]], state: WitnessState, *,
                 clock: Callable[[], float] = time.time) -> None:
        if not name or any(c.isspace() or c == "+" for c in name):
            raise ValueError("a witness name has no spaces or '+' characters")
        self.name, self.key, self.logs, self.state, self.clock = name, key, logs, state, clock
        self.verifier = CosignerKey.of(name, key.public_key())

    def add_checkpoint(self, request: bytes) -> Reply:
        try:
            return Reply(200, "text/plain; charset=utf-8", self._add(request))
        except Refusal as refused:
            if refused.status == 409:
                return Reply(409, "text/x.tlog.size", f"{refused.size}\n")
            return Reply(refused.status, "text/plain; charset=utf-8", f"{refused}\n")

    def _add(self, request: bytes) -> str:
        old, proof, note = _parse_request(request)
        try:
            checkpoint = parse(note)[0]
        except CheckpointError as exc:
            raise Refusal(400, f"malformed checkpoint: {exc}") from None
        trusted = self.logs.get(checkpoint.origin)
        if trusted is None:
            raise Refusal(404, f"unknown log {checkpoint.origin!r}")
        try:
            open_note(note, trusted)
        except CheckpointError as exc:
            raise Refusal(403, f"not signed by the log: {exc}") from None
        size, root = checkpoint.size, checkpoint.root_hash
        if old > size:
            raise Refusal(400, f"old size {old} is above the checkpoint's size {size}")
        if size == 0 and root != EMPTY_ROOT:
            raise Refusal(422, "a checkpoint of size 0 must have the empty tree's root")

        def check(stored: Latest | None) -> None:
            known = stored.size if stored else 0
            if old != known:
                raise Refusal(409, "old size mismatch", size=known)
            if old == 0:
                if proof:
                    raise Refusal(422, "no consistency proof is due from the empty tree",
                                  evidence="proof_from_empty")
                return
            assert stored is not None
            try:
                verify_consistency(old, size, stored.root, root, proof)
            except ProofError as exc:
                raise Refusal(422, f"not a consistent extension of the checkpoint of size "
                                   f"{old} cosigned before: {exc}",
                              evidence="inconsistent") from None

        try:
            self.state.advance(checkpoint.origin, size, root, note, check)
        except Refusal as refused:
            if refused.evidence:
                self.state.keep_evidence(checkpoint.origin, refused.evidence, request)
            raise
        return self.cosign(checkpoint.body())

    def cosign(self, body: bytes) -> str:
        timestamp = int(self.clock())
        signature = self.key.sign(cosigned_message(body, timestamp))
        blob = self.verifier.key_id + timestamp.to_bytes(8, "big") + signature
        return f"{DASH} {self.name} {base64.b64encode(blob).decode()}\n"

    def wsgi(self, environ: dict[str, Any],
             start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        if path == "/healthz" and method == "GET":
            reply = Reply(200, "text/plain; charset=utf-8", "ok\n")
        elif path != "/add-checkpoint":
            reply = Reply(404, "text/plain; charset=utf-8", "not found\n")
        elif method != "POST":
            reply = Reply(405, "text/plain; charset=utf-8", "POST only\n")
        else:
            body = _read_body(environ)
            reply = (Reply(413, "text/plain; charset=utf-8", "request too large\n")
                     if body is None else self.add_checkpoint(body))
        data = reply.body.encode()
        start_response(f"{reply.status} {_REASONS[reply.status]}", [
            ("Content-Type", reply.content_type), ("Content-Length", str(len(data)))])
        return [data]


_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
            422: "Unprocessable Content"}


def _read_body(environ: dict[str, Any]) -> bytes | None:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > MAX_BODY:
        return None
    stream = environ["wsgi.input"]
    data = stream.read(length) if length else stream.read(MAX_BODY + 1)
    return None if len(data) > MAX_BODY else data


def _parse_request(request: bytes) -> tuple[int, list[bytes], str]:
    try:
        text = request.decode("utf-8")
    except UnicodeDecodeError:
        raise Refusal(400, "the request is not UTF-8") from None
    head, sep, note = text.partition("\n\n")
    if not sep:
        raise Refusal(400, "no empty line between the proof and the checkpoint")
    lines = head.split("\n")
    first = lines[0]
    digits = first[4:]
    if not first.startswith("old ") or not digits.isascii() or not digits.isdigit() or (
            digits != "0" and digits.startswith("0")):
        raise Refusal(400, "the first line must be `old <size>`")
    if len(lines) - 1 > MAX_PROOF:
        raise Refusal(400, f"more than {MAX_PROOF} consistency proof lines")
    proof = []
    for line in lines[1:]:
        try:
            node = base64.b64decode(line, validate=True)
        except binascii.Error:
            raise Refusal(400, "a consistency proof line is not base64") from None
        if len(node) != 32:
            raise Refusal(400, "a consistency proof line is not a 32-byte hash")
        proof.append(node)
    return int(digits), proof, note
