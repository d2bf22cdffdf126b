"""Export bundles: a selection of audit events with what proves them, in one zip archive that
`charter-verify` (charter.audit.verify, which documents the format) checks offline.

A filtered export proves its events belong to the signed log without revealing the others:
the batch inclusion proofs hold only node hashes of the subtrees it leaves out.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import zipfile
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

from sqlalchemy import Connection, func, select

from charter import scope
from charter.audit import anchors, checkpoints, witnesses
from charter.audit.anchors import raise_alarm
from charter.audit.chain import canonical_json, event_body
from charter.audit.checkpoint import sign_note
from charter.audit.models import AuditCheckpoint, AuditEvent
from charter.audit.tree import Tree, TreeError
from charter.audit.verify import FORMAT, MANIFEST_NOTE, ProofError
from charter.db import table_of, utcnow
from charter.errors import CharterError
from charter.settings import Settings

README = """\
Charter audit export ({format}).

Verify it offline with the standalone verifier (Python 3.11+ and `cryptography` only):

    charter-verify {name} --keys KEYS.txt
    python verify.py {name} --keys KEYS.txt        (the same module, copied on its own)

KEYS.txt: the log's verifier keys from GET /api/v1/audit/keys, or a copy you keep; without
--keys the verifier uses keys.txt from this archive and says so. Add --checkpoints DIR to
compare the checkpoints with the copies kept outside Charter, and --seal-key FILE (the
auditors' seal verification key) to check every event's seal.

events.jsonl holds each event exactly as it was hashed (RFC 8785 canonical JSON);
seals.jsonl each event's id and seal.
"""


class ExportError(CharterError):
    status = 409
    code = "export_unavailable"


@dataclass(frozen=True)
class Selection:
    since: datetime | None = None
    until: datetime | None = None
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    team: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat() if isinstance(value, datetime) else value
        return out


@dataclass(frozen=True)
class ExportResult:
    events: int
    checkpoints: int
    first_seq: int | None
    last_seq: int | None
    tree_size: int
    manifest_sha256: str


def _where(sel: Selection, size: int) -> list[Any]:
    t = table_of(AuditEvent)
    clauses: list[Any] = [t.c.seq <= size]
    if sel.first_seq is not None:
        clauses.append(t.c.seq >= sel.first_seq)
    if sel.last_seq is not None:
        clauses.append(t.c.seq <= sel.last_seq)
    if sel.since is not None:
        clauses.append(t.c.ts >= sel.since)
    if sel.until is not None:
        clauses.append(t.c.ts < sel.until)
    for column, value in (("actor", sel.actor), ("action", sel.action),
                          ("target_type", sel.target_type), ("target_id", sel.target_id)):
        if value is not None:
            clauses.append(t.c[column] == value)
    if sel.team is not None:
        clauses.append(AuditEvent.details["team"].as_string() == sel.team)
    return clauses


def _lines(conn: Connection, sel: Selection, size: int
           ) -> Iterator[tuple[int, bytes, bytes, bytes]]:
    """(seq, canonical bytes, event hash, seals.jsonl line) of the selected events, each
    checked against the hash stored with it: an export of an altered log is refused, not
    signed."""
    t = table_of(AuditEvent)
    cols = [t.c.seq, t.c.ts, t.c.actor, t.c.action, t.c.target_type, t.c.target_id,
            t.c.outcome, t.c.details, t.c.request_id, t.c.prev_hash, t.c.hash,
            t.c.event_id, t.c.seal]
    result = conn.execution_options(stream_results=True, yield_per=5000).execute(
        select(*cols).where(*_where(sel, size)).order_by(t.c.seq))
    for (seq, ts, actor, action, target_type, target_id, outcome, details, request_id,
         prev_hash, stored, event_id, seal) in result:
        line = canonical_json(event_body(
            seq=seq, ts=ts, actor=actor, action=action, target_type=target_type,
            target_id=target_id, outcome=outcome, details=details, request_id=request_id,
            prev_hash=prev_hash))
        digest = hashlib.sha256(line).digest()
        if digest.hex() != stored:
            raise raise_alarm(
                f"refusing to export: event {seq} does not match its stored hash",
                {"first_bad_seq": seq, "reason": "edited"})
        yield seq, line, digest, json.dumps({"seq": seq, "id": event_id,
                                             "seal": seal}).encode()


def _runs(seqs: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for s in seqs:
        if runs and runs[-1][1] == s - 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    return runs


def _covering(conn: Connection, first: int, last: int) -> list[AuditCheckpoint]:
    """The first checkpoint of each size from the one covering `first` to the one covering
    `last`."""
    t = table_of(AuditCheckpoint)
    top = conn.execute(select(func.min(t.c.size)).where(t.c.size >= last)).scalar()
    ids = select(func.min(t.c.id)).where(t.c.size >= first, t.c.size <= top).group_by(t.c.size)
    rows = conn.execute(select(t).where(t.c.id.in_(ids)).order_by(t.c.size)).all()
    return [AuditCheckpoint(**row._mapping) for row in rows]


def _best_witnessed(conn: Connection, used: list[AuditCheckpoint]
                    ) -> tuple[list[AuditCheckpoint], dict[int, str]]:
    """Of the checkpoints signed at each size, the one most witnesses cosigned (the first
    on a tie), and the cosignature lines of each."""
    t = table_of(AuditCheckpoint)
    sizes = [cp.size for cp in used]
    if not sizes:
        return used, {}
    rows = [AuditCheckpoint(**r._mapping) for r in conn.execute(
        select(t).where(t.c.size.in_(sizes)).order_by(t.c.id))]
    lines = witnesses.cosignature_lines(conn, [r.id for r in rows])
    best: dict[int, AuditCheckpoint] = {}
    for row in rows:
        known = best.get(row.size)
        if known is None or (lines.get(row.id, "").count("\n")
                             > lines.get(known.id, "").count("\n")):
            best[row.size] = row
    return [best[s] for s in sizes], lines


def _links(settings: Settings, conn: Connection, tree: Tree, used: list[int],
           size: int) -> list[dict[str, Any]]:
    """A consistency proof from each other checkpoint the log signed (in its table or in
    the external copy, up to `size`) that the external copy does not already chain to a
    larger one (its `.proof` files), to the nearest checkpoint of the bundle: what lets an
    auditor hold the bundle against checkpoints kept elsewhere, of any size. With a
    complete external copy that is a handful, however long the history."""
    if not used:
        return []
    t = table_of(AuditCheckpoint)
    sizes = set(conn.execute(select(t.c.size).distinct().where(t.c.size <= size)).scalars())
    sizes |= anchors.external_sizes(settings)
    chained = {a for a, _, _ in anchors.external_proofs(settings)}
    links = []
    for m in sorted(s for s in sizes - set(used) - chained if 0 < s <= size):
        k = bisect_left(used, m)
        to = used[k] if k < len(used) else used[-1]
        try:
            path = tree.consistency(min(m, to), max(m, to))
        except (TreeError, ProofError) as exc:
            raise raise_alarm(f"refusing to export: {exc}",
                              (exc.details(checkpoint=m) if isinstance(exc, TreeError)
                               else {"reason": "tree", "checkpoint": m})) from None
        links.append({"size": m, "to": to, "path": [h.hex() for h in path]})
    return links


def export(settings: Settings, sel: Selection, out: IO[bytes], *,
           compress: bool = True) -> ExportResult:
    """Write the bundle of the selected events to `out`."""
    signers = checkpoints.load_signers(settings)
    if not signers:
        raise ExportError("exports are signed: configure CHARTER_AUDIT_SIGNING_KEYS",
                          code="no_signing_key")
    checkpoints.issue(settings, force=False)
    database = scope.current().database
    with database.engine.connect() as conn:
        newest = conn.execute(select(func.max(AuditEvent.seq))).scalar() or 0
        signed = conn.execute(select(func.max(AuditCheckpoint.size))).scalar()
    if signed is None or newest != signed:
        # Every exported event under a checkpoint; and a log shorter than what was signed
        # is refused (truncated) by the issuer, before anything is exported.
        checkpoints.issue(settings, force=True)
    keys = "".join(f"{k.verifier}\n" for k in checkpoints.published_keys(settings))
    with (database.engine.connect() as conn, tempfile.TemporaryFile() as events_file,
          tempfile.TemporaryFile() as seals_file):
        size = conn.execute(select(func.max(AuditCheckpoint.size))).scalar() or 0
        seqs: list[int] = []
        hashes: list[str] = []
        events_digest = hashlib.sha256()
        seals_digest = hashlib.sha256()
        for seq, line, digest, seal_line in _lines(conn, sel, size):
            seqs.append(seq)
            hashes.append(digest.hex())
            events_file.write(line + b"\n")
            events_digest.update(line + b"\n")
            seals_file.write(seal_line + b"\n")
            seals_digest.update(seal_line + b"\n")
        # Each event's covering checkpoint: the first that signed a tree holding it. Only
        # those go in, chained by consistency proofs.
        used, ranges, done = [], [], 0
        for cp in _covering(conn, seqs[0], seqs[-1]) if seqs else []:
            lo, hi = done, bisect_left(seqs, cp.size + 1)
            if hi > lo:
                used.append(cp)
                ranges.append((lo, hi))
                done = hi
        used, cosigned = _best_witnessed(conn, used)
        tree = Tree(conn)
        inclusion, consistency = [], []
        previous: AuditCheckpoint | None = None
        for cp, (lo, hi) in zip(used, ranges, strict=True):
            try:
                nodes = tree.batch_proof(cp.size, [s - 1 for s in seqs[lo:hi]],
                                         bytes.fromhex(cp.root_hash))
                path = (tree.consistency(previous.size, cp.size) if previous is not None
                        else [])
            except TreeError as exc:  # a row or a tree node is not what was signed
                raise raise_alarm(f"refusing to export: {exc}",
                                  exc.details(checkpoint=cp.size)) from None
            inclusion.append({"size": cp.size, "first_seq": seqs[lo],
                              "nodes": [[a, b, h.hex()] for a, b, h in nodes]})
            if previous is not None:
                consistency.append({"from": previous.size, "to": cp.size,
                                    "path": [h.hex() for h in path]})
            previous = cp
        links = _links(settings, conn, tree, [cp.size for cp in used], size)
        proofs = json.dumps({"inclusion": inclusion, "consistency": consistency,
                             "links": links}, indent=1).encode()
        files: dict[str, bytes] = {"proofs.json": proofs, "keys.txt": keys.encode()}
        listed = []
        for cp in used:
            name = f"checkpoints/{cp.size:012d}.note"
            files[name] = (cp.note + cosigned.get(cp.id, "")).encode()
            listed.append({"size": cp.size, "file": name, "issued_at": cp.issued_at.isoformat(),
                           "root_hash": cp.root_hash})
        manifest = {
            "format": FORMAT,
            "origin": settings.audit_log_origin,
            "created_at": utcnow().isoformat(),
            "selection": sel.describe(),
            "tree_size": size,
            "events": {"file": "events.jsonl", "count": len(seqs), "seqs": _runs(seqs),
                       "hashes": hashes},
            "checkpoints": listed,
            "files": {"events.jsonl": {"sha256": events_digest.hexdigest()},
                      "seals.jsonl": {"sha256": seals_digest.hexdigest()},
                      **{n: {"sha256": hashlib.sha256(b).hexdigest()}
                         for n, b in files.items()}},
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        manifest_sha = hashlib.sha256(manifest_bytes).hexdigest()
        signature = sign_note(f"{MANIFEST_NOTE}\n{manifest_sha}\n", *signers)
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(out, "w", compression=method) as archive:
            archive.writestr("README.txt", README.format(format=FORMAT, name="BUNDLE.zip"))
            archive.writestr("manifest.json", manifest_bytes)
            archive.writestr("manifest.sig", signature)
            events_file.seek(0)
            with archive.open("events.jsonl", "w", force_zip64=True) as dest:
                while chunk := events_file.read(1 << 20):
                    dest.write(chunk)
            seals_file.seek(0)
            with archive.open("seals.jsonl", "w", force_zip64=True) as dest:
                while chunk := seals_file.read(1 << 20):
                    dest.write(chunk)
            for name, data in files.items():
                archive.writestr(name, data)
    return ExportResult(len(seqs), len(used), seqs[0] if seqs else None,
                        seqs[-1] if seqs else None, size, manifest_sha)
