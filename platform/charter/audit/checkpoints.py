"""Signed checkpoints of the audit log: when one is due, what is checked before signing,
where copies go, and which keys are published.

A checkpoint is issued every `audit_checkpoint_every` events, or `audit_checkpoint_interval_s`
after the last one when events were written, and every `audit_checkpoint_idle_s` even when
none were. Before it signs, the issuer walks the hash chain of the events since the last
checkpoint and checks that the stored tree still leads to the last signed root: it never
signs a log that was altered underneath it. Issuing is serialized (an advisory lock), so
several workers and beats can try at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import structlog
from sqlalchemy import Connection, select

from charter.audit import anchors, witnesses
from charter.audit.anchors import AuditIntegrityError as AuditIntegrityError
from charter.audit.anchors import raise_alarm
from charter.audit.chain import GENESIS_HASH, ChainRow, verify_rows
from charter.audit.checkpoint import Checkpoint, sign
from charter.audit.keys import generate_key as generate_key
from charter.audit.keys import load_signers as load_signers
from charter.audit.models import AuditCheckpoint, AuditEvent, AuditKey, AuditPurged
from charter.audit.tree import Tree, TreeError
from charter.audit.verify import ProofError, parse, verify_consistency
from charter.db import table_of, utcnow
from charter.errors import (
    NotFoundError,
    ValidationFailedError,
)
from charter.settings import Settings
from charter.uow import unit_of_work

log = structlog.get_logger(__name__)
CHECKPOINT_LOCK_KEY = 0x43484B50_54  # "CHKPT"


# --- keys -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PublishedKey:
    verifier: str
    name: str
    key_id: str
    first_used_at: datetime | None
    last_used_at: datetime | None
    signing: bool  # configured now


def published_keys(settings: Settings) -> list[PublishedKey]:
    """Every key that ever signed a checkpoint, and the ones configured now."""
    current = {str(s.verifier): s for s in load_signers(settings)}
    with unit_of_work() as session:
        rows = list(session.scalars(select(AuditKey).order_by(AuditKey.first_used_at)))
    out = [PublishedKey(r.verifier, r.name, r.key_id, r.first_used_at, r.last_used_at,
                        r.verifier in current) for r in rows]
    known = {r.verifier for r in rows}
    out += [PublishedKey(v, s.name, s.verifier.key_id.hex(), None, None, True)
            for v, s in current.items() if v not in known]
    return out


# --- issuing --------------------------------------------------------------------------------

def hash_at(conn: Connection, seq: int) -> str | None:
    """The hash of event `seq`, from the event or from its tombstone."""
    t, p = table_of(AuditEvent), table_of(AuditPurged)
    return (conn.execute(select(t.c.hash).where(t.c.seq == seq)).scalar()
            or conn.execute(select(p.c.hash).where(p.c.seq == seq)).scalar())


def _head(conn: Connection) -> int:
    t = table_of(AuditEvent)
    return conn.execute(select(t.c.seq).order_by(t.c.seq.desc()).limit(1)).scalar() or 0


def _due(settings: Settings, last: AuditCheckpoint | None, size: int, now: datetime) -> bool:
    if last is None:
        return True
    age = (now - last.issued_at).total_seconds()
    new = size - last.size
    return (new >= settings.audit_checkpoint_every
            or (new > 0 and age >= settings.audit_checkpoint_interval_s)
            or age >= settings.audit_checkpoint_idle_s)


def _chain_rows(conn: Connection, after: int, upto: int) -> Iterator[ChainRow]:
    t = table_of(AuditEvent)
    cols = [t.c[name] for name in ChainRow.__slots__]
    for row in conn.execute(select(*cols).where(t.c.seq > after, t.c.seq <= upto)
                            .order_by(t.c.seq)):
        yield ChainRow(*row)


def _seals_from(conn: Connection, last: AuditCheckpoint | None) -> int | None:
    """The first sealed event: carried from the last checkpoint's note once it says, found
    in the log until then. Signed into every checkpoint, so removing seals is caught."""
    if last is not None:
        carried = anchors.seals_from(parse(last.note)[0].extensions)
        if carried is not None:
            return carried
    t = table_of(AuditEvent)
    found = conn.execute(select(t.c.seq).where(t.c.seal.is_not(None)).order_by(t.c.seq)
                         .limit(1)).scalar()
    return int(found) if found is not None else None


def _extends(tree: Tree, old_size: int, old_root: bytes, size: int, root: bytes,
             source: str) -> None:
    """Refuse (the integrity alarm) unless the tree of `size` is a consistent extension
    of the signed tree of `old_size`."""
    try:
        if old_size == size:
            if old_root != root:
                raise ProofError(f"the root at size {size} changed")
        elif old_size:
            verify_consistency(old_size, size, old_root, root,
                               tree.consistency(old_size, size))
    except (ProofError, TreeError) as exc:
        raise raise_alarm(
            f"refusing to sign: the log no longer extends checkpoint {old_size} "
            f"({source}): {exc}",
            {"reason": "rewritten", "checkpoint": old_size, "source": source}) from None


def issue(settings: Settings, *, force: bool = False) -> AuditCheckpoint | None:
    """Sign a checkpoint of the log as it is now, if one is due (or `force`); None when
    none was due or no signing key is configured."""
    signers = load_signers(settings)
    if not signers:
        return None
    with unit_of_work() as session:
        conn = session.connection()
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({CHECKPOINT_LOCK_KEY})")
        last = session.scalars(select(AuditCheckpoint).order_by(
            AuditCheckpoint.id.desc()).limit(1)).first()
        size = _head(conn)
        now = utcnow()
        if not (force or _due(settings, last, size, now)):
            return None
        before = last.size if last else 0
        if size < before:
            raise raise_alarm(
                f"refusing to sign: the log holds {size} events, fewer than the {before} "
                "its last checkpoint signed",
                {"reason": "truncated", "checkpoint": before, "first_bad_seq": size + 1})
        anchor = GENESIS_HASH
        if before:
            anchor = hash_at(conn, before) or ""
        verdict = verify_rows(_chain_rows(conn, before, size), after=before,
                              after_hash=anchor)
        if not verdict.ok or verdict.count != size - before:
            raise raise_alarm(
                "refusing to sign: the events since the last checkpoint do not verify: "
                f"{verdict.message or 'events are missing'}",
                {"reason": verdict.reason or "missing", "first_bad_seq": verdict.first_bad_seq})
        tree = Tree(conn)
        try:
            tree.extend(size)
            root = tree.root(size)
        except TreeError as exc:
            raise raise_alarm(f"refusing to sign: {exc}", exc.details()) from None
        if last is not None and before:
            _extends(tree, before, bytes.fromhex(last.root_hash), size, root,
                     f"database:{last.id}")
        elif last is not None and size == 0 and bytes.fromhex(last.root_hash) != root:
            raise raise_alarm("refusing to sign: the empty log's root changed",
                              {"reason": "rewritten", "checkpoint": 0})
        # The copy outside the database: what an insider who rewrote the database (its
        # rows, its tree and its checkpoint table alike) cannot make agree.
        outside = anchors.newest_external(settings)
        link: tuple[int, list[bytes]] | None = None
        for problem in outside.problems:
            raise raise_alarm(f"refusing to sign: {problem['message']}", problem)
        external = outside.newest
        if external is not None:
            if size < external.size:
                raise raise_alarm(
                    f"refusing to sign: the log holds {size} events, fewer than the "
                    f"{external.size} of the checkpoint kept outside the database "
                    f"({external.source})",
                    {"reason": "truncated", "checkpoint": external.size,
                     "source": external.source, "first_bad_seq": size + 1})
            _extends(tree, external.size, external.root, size, root, external.source)
            if 0 < external.size < size:  # the folder's chain: a proof from its newest
                link = (external.size, tree.consistency(external.size, size))
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        extensions = [f"time {stamp}"]
        known = [n for n in (_seals_from(conn, last), outside.seals_from) if n is not None]
        sealed = min(known) if known else None
        if sealed is not None:
            t = table_of(AuditEvent)
            bare = conn.execute(select(t.c.seq).where(
                t.c.seq > max(before, sealed - 1), t.c.seq <= size, t.c.seal.is_(None))
                .order_by(t.c.seq).limit(1)).scalar()
            if bare is not None:
                raise raise_alarm(
                    f"refusing to sign: event {bare} has no seal, but every event from "
                    f"{sealed} on was sealed", {"reason": "unsealed", "first_bad_seq": bare})
        if sealed is not None and sealed <= size:
            extensions.append(f"{anchors.SEALS_FROM}{sealed}")
        note = sign(Checkpoint(settings.audit_log_origin, size, root, tuple(extensions)),
                    *signers)
        row = AuditCheckpoint(size=size, root_hash=root.hex(), issued_at=now, note=note,
                              keys="\n".join(str(s.verifier) for s in signers))
        session.add(row)
        for signer in signers:
            text = str(signer.verifier)
            key = session.get(AuditKey, text)
            if key is None:
                session.add(AuditKey(verifier=text, name=signer.name,
                                     key_id=signer.verifier.key_id.hex(), first_used_at=now,
                                     last_used_at=now))
            else:
                key.last_used_at = now
        session.flush()
        session.expunge(row)
    log.info("audit checkpoint", size=size, root=root.hex()[:16], forced=force)
    copy_out(settings, row, link=link)
    if witnesses.submit(settings, row):
        with unit_of_work() as session:
            lines = witnesses.cosignature_lines(session.connection(), [row.id])
        copy_out(settings, row, row.note + lines.get(row.id, ""))
    return row


PROOF_FORMAT = "charter-consistency/1"


def copy_out(settings: Settings, row: AuditCheckpoint, note: str | None = None, *,
             link: tuple[int, list[bytes]] | None = None) -> None:
    """Write the checkpoint (`note`: with its cosignatures) to the external folder
    (atomically), and beside it (`<name>.proof`) the consistency proof from the folder's
    newest checkpoint before it, when there is one: the folder's notes then verify as a
    chain, and a bundle needs no proof for each of them. A failure is logged; the
    checkpoint stays valid and the next one is copied again."""
    if not settings.audit_checkpoint_dir:
        return
    folder = Path(settings.audit_checkpoint_dir)
    name = f"{row.size:012d}-{row.issued_at:%Y%m%dT%H%M%S%f}Z"
    files = {f"{name}.note": note or row.note, "latest.note": note or row.note}
    if link is not None:
        files[f"{name}.proof"] = json.dumps({
            "format": PROOF_FORMAT, "from": link[0], "to": row.size,
            "path": [h.hex() for h in link[1]]}) + "\n"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for target_name, text in files.items():
            target = folder / target_name
            tmp = target.with_suffix(".tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
    except OSError as exc:
        log.error("audit checkpoint not copied", folder=str(folder), error=repr(exc))


def list_checkpoints(*, after_id: int = 0, limit: int = 100) -> list[AuditCheckpoint]:
    with unit_of_work() as session:
        return list(session.scalars(select(AuditCheckpoint).where(
            AuditCheckpoint.id > after_id).order_by(AuditCheckpoint.id).limit(limit)))


def checkpoint_at(size: int) -> AuditCheckpoint | None:
    """The first checkpoint signed at this tree size."""
    with unit_of_work() as session:
        return session.scalars(select(AuditCheckpoint).where(
            AuditCheckpoint.size == size).order_by(AuditCheckpoint.id).limit(1)).first()


def covering(seq: int) -> AuditCheckpoint | None:
    """The first checkpoint whose tree holds event `seq`."""
    with unit_of_work() as session:
        return session.scalars(select(AuditCheckpoint).where(
            AuditCheckpoint.size >= seq).order_by(AuditCheckpoint.size, AuditCheckpoint.id)
            .limit(1)).first()


def newest() -> AuditCheckpoint | None:
    with unit_of_work() as session:
        return session.scalars(select(AuditCheckpoint).order_by(
            AuditCheckpoint.id.desc()).limit(1)).first()


def inclusion(seq: int, size: int | None = None) -> tuple[AuditCheckpoint, str, list[bytes]]:
    """(checkpoint, event hash, audit path) proving event `seq` is in the tree that
    checkpoint signed: the one of `size`, or the event's covering checkpoint."""
    cp = covering(seq) if size is None else checkpoint_at(size)
    if cp is None:
        raise NotFoundError(
            f"no checkpoint of size {size} has been signed" if size is not None
            else f"event {seq} is not under a signed checkpoint yet",
            code="no_checkpoint")
    if seq > cp.size:
        raise NotFoundError(f"event {seq} is not in the tree of size {cp.size}",
                            code="not_in_tree")
    with unit_of_work() as session:
        conn = session.connection()
        event_hash = hash_at(conn, seq)
        if event_hash is None:
            raise NotFoundError(f"event {seq} is not in the log", code="not_in_tree")
        try:
            return cp, event_hash, Tree(conn).inclusion(seq - 1, cp.size)
        except TreeError as exc:
            raise raise_alarm(f"no proof: {exc}", exc.details(checkpoint=cp.size)) from None


def consistency(first: int, second: int
                ) -> tuple[AuditCheckpoint, AuditCheckpoint, list[bytes]]:
    if not 0 < first <= second:
        raise ValidationFailedError("`first` must be at most `second`", details={
            "errors": [{"field": "first", "code": "range", "message": "above second"}]})
    a, b = checkpoint_at(first), checkpoint_at(second)
    if a is None or b is None:
        raise NotFoundError(f"no checkpoint of size {first if a is None else second} has "
                            "been signed", code="no_checkpoint")
    with unit_of_work() as session:
        try:
            return a, b, Tree(session.connection()).consistency(first, second)
        except TreeError as exc:
            raise raise_alarm(f"no proof: {exc}", exc.details(checkpoint=second)) from None
