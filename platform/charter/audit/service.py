"""Audit service: query the log, verify the chain, export bundles. (Events are written
through charter.uow's doors, by charter.audit.journal.)"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import hmac
import json
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from json.encoder import encode_basestring
from typing import IO, TYPE_CHECKING, Any

import rfc8785
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from charter import scope
from charter.audit import anchors
from charter.audit.anchors import raise_alarm
from charter.audit.chain import (
    GENESIS_HASH,
    ChainRow,
    Tombstone,
    Verdict,
    canonical_json,
    event_hash,
    hash_parts,
    verify_rows,
)
from charter.audit.models import AuditCheckpoint, AuditEvent, AuditPurged
from charter.audit.verify import (
    EVENT_ID,
    Frontier,
    SealError,
    SealVerifier,
    event_id_ms,
)
from charter.db import table_of
from charter.errors import CharterError, ValidationFailedError
from charter.uow import record, refuse, unit_of_work

if TYPE_CHECKING:
    from charter.audit.bundle import ExportResult, Selection
    from charter.settings import Settings

@dataclass(frozen=True, slots=True)
class EventFilter:
    actor: str | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    outcome: str | None = None
    request_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_seq: int = 0
    limit: int = 100


def list_events(flt: EventFilter) -> list[AuditEvent]:
    """Events matching the filter in sequence order, after `after_seq` (keyset paging)."""
    if flt.since and flt.until and flt.since > flt.until:
        raise ValidationFailedError(
            "`since` is after `until`",
            details={"errors": [{"field": "since", "code": "range", "message": "after until"}]},
        )
    stmt = select(AuditEvent).where(AuditEvent.seq > flt.after_seq)
    for column, value in (
        (AuditEvent.actor, flt.actor),
        (AuditEvent.action, flt.action),
        (AuditEvent.target_type, flt.target_type),
        (AuditEvent.target_id, flt.target_id),
        (AuditEvent.outcome, flt.outcome),
        (AuditEvent.request_id, flt.request_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if flt.since is not None:
        stmt = stmt.where(AuditEvent.ts >= flt.since)
    if flt.until is not None:
        stmt = stmt.where(AuditEvent.ts < flt.until)
    stmt = stmt.order_by(AuditEvent.seq).limit(flt.limit)
    with unit_of_work() as session:
        return list(session.scalars(stmt))


def iter_events(flt: EventFilter, *, through_seq: int | None = None) -> Iterator[AuditEvent]:
    """Every event matching the filter from `flt.after_seq` on, in seq order, read in
    keyset pages of `flt.limit`, stopping after `through_seq`."""
    after = flt.after_seq
    while True:
        page = list_events(dataclasses.replace(flt, after_seq=after))
        for event in page:
            if through_seq is not None and event.seq > through_seq:
                return
            yield event
        if len(page) < flt.limit:
            return
        after = page[-1].seq


def head() -> tuple[int, str]:
    """(number of events, head hash) as stored, without verifying."""
    with unit_of_work() as session:
        seq, prev = _peek_head(session)
        return seq, prev


def _peek_head(session: Session) -> tuple[int, str]:
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS_HASH) if row is None else (row.seq, row.hash)


@dataclass(frozen=True, slots=True)
class _Row(ChainRow):
    event_id: str | None = None
    seal: str | None = None


class _Checked:
    """An event row that checked its own hash (the PostgreSQL walk): the canonical bytes
    are rebuilt from the stored columns as they are, details as stored (canonical since
    0011); only a row that does not match is parsed and re-encoded (older rows)."""

    __slots__ = ("seq", "prev_hash", "hash", "ok", "event_id", "seal", "ts_s", "content")

    def __init__(self, seq: int, prev_hash: str, digest: str, ok: bool, event_id: str | None,
                 seal: str | None, ts_s: float, content: bytes) -> None:
        self.seq, self.prev_hash, self.hash, self.ok = seq, prev_hash, digest, ok
        self.event_id, self.seal, self.ts_s, self.content = event_id, seal, ts_s, content


_PG_WALK = (
    "SELECT seq, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), "
    "{epoch}, actor, action, target_type, target_id, outcome, details::text, request_id, "
    "prev_hash, hash, event_id, seal FROM audit_events ORDER BY seq")


def _pg_pages(conn: Any, batch: int, want_content: bool) -> Iterator[list[Any]]:
    """The events straight from psycopg (a server-side cursor), a page at a time: the
    walk's hot path, ~3x SQLAlchemy's row path."""
    raw = conn.connection.driver_connection
    with raw.cursor(name=f"charter_walk_{secrets.token_hex(4)}") as cur:
        cur.execute(_PG_WALK.format(  # the time in seconds only for the seals' check
            epoch="extract(epoch FROM ts)::float8" if want_content else "0::float8"))
        yield from _prefetched(lambda: cur.fetchmany(batch))


def _prefetched(fetch: Callable[[], list[Any]]) -> Iterator[list[Any]]:
    """fetch()'s pages up to the first empty one, each next page fetched by a thread
    while the caller checks this one: the server and the driver work while the walk does
    (the driver waits for the server without the GIL). Stopping early stops the thread
    before the cursor closes; an error in fetch() is raised here."""
    ready: queue.Queue[list[Any] | BaseException] = queue.Queue(maxsize=2)
    stop = threading.Event()

    def run() -> None:
        try:
            while not stop.is_set():
                page = fetch()
                ready.put(page)
                if not page:
                    return
        except BaseException as exc:  # handed to the caller, raised there
            ready.put(exc)

    thread = threading.Thread(target=run, name="charter-walk-fetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a put() the caller will never take
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


def _checked(page: list[Any], want_content: bool) -> Iterator[_Checked]:
    """Each row of a page checked against its own hash."""
    enc = encode_basestring
    sha = hashlib.sha256
    for (seq, ts_text, ts_s, actor, action, target_type, target_id, outcome, details,
         request_id, prev_hash, digest, event_id, seal) in page:
        pre = f'{{"action":{enc(action)},"actor":{enc(actor)},"details":'
        post = f',"outcome":{enc(outcome)},"prev_hash":"'
        mid = ('","request_id":' + ("null" if request_id is None else enc(request_id))
               + ',"seq":')
        tail = f',"target_id":{enc(target_id)},"target_type":{enc(target_type)},"ts":"'
        ok = sha(f"{pre}{details}{post}{prev_hash}{mid}{seq}{tail}{ts_text}\"}}".encode()
                 ).hexdigest() == digest
        if not ok:  # an older row's details, stored as json.dumps wrote them
            try:
                canonical = canonical_json(json.loads(details)).decode()
            except (ValueError, rfc8785.CanonicalizationError):
                canonical = details
            if canonical != details:
                ok = sha(f"{pre}{canonical}{post}{prev_hash}{mid}{seq}{tail}{ts_text}"
                         '"}'.encode()).hexdigest() == digest
            details = canonical
        # A row that matched its hash holds canonical details: they are what was sealed.
        content = f"{pre}{details}{post}{mid}{tail}".encode() if want_content else b""
        yield _Checked(seq, prev_hash, digest, ok, event_id, seal, ts_s, content)


def _page_leaves(page: list[Any], seq0: int, prev: str, sealed_from: int | None,
                 seal_key: SealVerifier | None) -> list[bytes] | None:
    """The Merkle leaves of a page of the walk when every row in it is whole: numbered
    from seq0 on without a gap, each linked to the one before (the first to `prev`), each
    matching its own hash, each sealed where seals are due (and, with the key, sealed
    right). None when any row is not: the row-by-row walk then names it and says why.
    The common case, a comprehension at a time (C speed, not a loop of Python)."""
    enc, sha = encode_basestring, hashlib.sha256
    n = len(page)
    if [r[0] for r in page] != list(range(seq0, seq0 + n)):
        return None
    hashes = [r[11] for r in page]
    if [r[10] for r in page] != [prev, *hashes[:-1]]:
        return None
    if [sha(f'{{"action":{enc(action)},"actor":{enc(actor)},"details":{details},'
            f'"outcome":{enc(outcome)},"prev_hash":"{prev_hash}","request_id":'
            f'{"null" if request_id is None else enc(request_id)},"seq":{seq},'
            f'"target_id":{enc(target_id)},"target_type":{enc(target_type)},"ts":"'
            f'{ts_text}"}}'.encode()).hexdigest()
        for (seq, ts_text, _, actor, action, target_type, target_id, outcome, details,
             request_id, prev_hash, _, _, _) in page] != hashes:
        return None
    if sealed_from is not None and seq0 + n - 1 >= sealed_from and not all(
            r[12] is not None and r[13] is not None for r in page[max(0, sealed_from - seq0):]):
        return None
    if seal_key is not None and not _seals_hold(page, seal_key):
        return None
    try:
        return [sha(b"\x00" + bytes.fromhex(h)).digest() for h in hashes]
    except ValueError:
        return None


def _seals_hold(page: list[Any], seal_key: SealVerifier) -> bool:
    """Whether every sealed row of a page of the walk (its hashes checked) carries the
    seal its content was sealed with, from an id whose clock is near its time."""
    enc, compare, is_event_id = encode_basestring, hmac.compare_digest, EVENT_ID.fullmatch
    epoch_of, pads_of = seal_key.epoch_of, seal_key.pads
    for (_, _, ts_s, actor, action, target_type, target_id, outcome, details, request_id,
         _, _, event_id, seal) in page:
        if event_id is None or seal is None:
            continue  # before seals-from (the caller checked where they are due)
        if not is_event_id(event_id):
            return False
        ms = int(event_id[:12], 16)
        epoch_text, sep, mac = seal.partition(".")
        if (abs(ms / 1000 - ts_s) > SEAL_CLOCK_SKEW_S or not sep
                or not epoch_text.isdigit() or int(epoch_text) != epoch_of(ms)):
            return False
        inner0, outer0, prefix = pads_of(int(epoch_text))
        inner, outer = inner0.copy(), outer0.copy()
        inner.update(prefix + (  # sealed_text(): the content stops at the time's quote
            f'{event_id}\n{{"action":{enc(action)},"actor":{enc(actor)},"details":'
            f'{details},"outcome":{enc(outcome)},"prev_hash":"","request_id":'
            f'{"null" if request_id is None else enc(request_id)},"seq":,"target_id":'
            f'{enc(target_id)},"target_type":{enc(target_type)},"ts":"').encode())
        outer.update(inner.digest())
        if not compare(mac, outer.hexdigest()):
            return False
    return True


SEAL_CLOCK_SKEW_S = 3600  # how far an event's time may be from its id's clock


def scheduled_walk() -> Verdict:
    """The walk as a periodic task (CHARTER_AUDIT_WALK_INTERVAL_S): a broken log is also
    recorded as an `audit.integrity_alarm` event (a walk on demand writes nothing), so an
    edit under an old checkpoint, which the issuer does not re-read, is raised unasked."""
    verdict = verify_chain()
    if not verdict.ok:
        message = (f"the scheduled walk found the log broken at event "
                   f"{verdict.first_bad_seq} ({verdict.reason}): {verdict.message}")
        details: dict[str, object] = {"reason": verdict.reason,
                                      "first_bad_seq": verdict.first_bad_seq,
                                      "checkpoint": verdict.checkpoint}
        alarm: CharterError
        if verdict.reason in CHAIN_REASONS:  # the walk counts only what it holds against
            alarm = raise_alarm(message, details)  # the checkpoints: count this one
        else:
            alarm = anchors.AuditIntegrityError(message, details=details).audited(
                "system:charter", anchors.ALARM, "audit", "log")
        try:
            refuse(alarm)
        except anchors.AuditIntegrityError:
            pass  # recorded as an event, counted and logged
    return verdict


CHAIN_REASONS = ("missing", "edited", "reordered")


def verify_chain(batch: int = 5000, *, seal_key: SealVerifier | None = None) -> Verdict:
    """Walk the whole chain in the database, streaming rows in seq order (purged events by
    their tombstones), and hold it against every signed checkpoint a trusted key made: the
    external copy's and the checkpoint table's (charter.audit.anchors). A log shorter than
    a signed tree is `truncated`; one whose root at a signed size differs, `rewritten`; two
    signed roots of one size, `forked`; a checkpoint row nobody with the keys signed,
    `checkpoint_forged`. Each of those raises the integrity alarm too.

    Seals: from the event the checkpoints name (`seals-from`) on, an event without a seal
    is `unsealed`, and a duplicated event id `replayed`, whoever verifies. With the
    auditors' verification key (`seal_key`) every seal is checked too: a row nobody with
    the sealing key made, even with a correct chain hash, is `forged`."""
    rt = scope.current()
    database, settings = rt.database, rt.settings
    with database.engine.connect() as conn:
        table = table_of(AuditEvent)
        purged = table_of(AuditPurged)
        cols = [table.c[name] for name in ChainRow.__slots__] + [table.c.event_id,
                                                                  table.c.seal]
        checkpoints = table_of(AuditCheckpoint)
        found = anchors.gather(settings, conn.execute(
            select(checkpoints.c.id, checkpoints.c.note).order_by(checkpoints.c.id)).all())
        sizes = sorted(found.by_size)
        frontier = Frontier()
        held: list[int] = []  # signed sizes the walk has matched so far
        mismatch: list[int] = []
        sealed_from = found.seals_from
        seal_problem: list[dict[str, Any]] = []
        replayed = conn.execute(
            select(table.c.event_id, func.min(table.c.seq), func.max(table.c.seq))
            .where(table.c.event_id.is_not(None)).group_by(table.c.event_id)
            .having(func.count() > 1).order_by(func.max(table.c.seq)).limit(1)).first()
        if replayed is not None:
            seal_problem.append({"reason": "replayed", "first_bad_seq": replayed[2],
                                 "message": f"event {replayed[2]} repeats event "
                                            f"{replayed[1]} (the same event id): a sealed "
                                            "row was copied"})

        fast = conn.dialect.name == "postgresql"
        want_content = seal_key is not None
        any_purged = conn.execute(select(purged.c.seq).limit(1)).first() is not None
        pending = iter(s for s in sizes if s > 0)
        due = next(pending, None)

        def rows(first: list[Any] | None, pages: Iterator[list[Any]] | None
                 ) -> Iterator[ChainRow | _Checked]:
            if pages is not None:
                if first is not None:
                    yield from _checked(first, want_content)
                for page in pages:
                    yield from _checked(page, want_content)
                return
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(
                select(*cols).order_by(table.c.seq)
            )
            for r in result:
                yield _Row(*r)

        def tombstones() -> Iterator[Tombstone]:
            after = 0
            while True:  # pages on the same connection, beside the events' stream
                page = conn.execute(select(purged.c.seq, purged.c.prev_hash, purged.c.hash)
                                    .where(purged.c.seq > after).order_by(purged.c.seq)
                                    .limit(batch)).all()
                yield from (Tombstone(*r) for r in page)
                if len(page) < batch:
                    return
                after = page[-1][0]

        def seq_of_hash(h: str) -> int | None:
            return conn.execute(select(table.c.seq).where(table.c.hash == h)).scalar()

        def against_anchors(merged: Iterator[Any]) -> Iterator[Any]:
            """Feed the tree as rows pass; stop at the first signed size it contradicts."""
            nonlocal due
            append, fromhex, sha = frontier.append, bytes.fromhex, hashlib.sha256
            check_seals = sealed_from is not None or seal_key is not None
            for row in merged:
                yield row
                if check_seals and not seal_problem and not isinstance(row, Tombstone):
                    problem = _check_seal(row, sealed_from, seal_key)
                    if problem is not None:
                        seal_problem.append(problem)
                        return
                try:
                    append(sha(b"\x00" + fromhex(row.hash)).digest())
                except ValueError:
                    return  # a malformed hash: the chain walk names it
                if frontier.size == due:
                    if frontier.root() != found.by_size[due].root:
                        mismatch.append(due)
                        return
                    held.append(due)
                    due = next(pending, None)

        # Whole pages first, at C speed (no purged events: their tombstones interleave);
        # from the first page that does not check whole on, row by row, which names why.
        done, head_hash, first = 0, GENESIS_HASH, None
        pages = _pg_pages(conn, batch, want_content) if fast else None
        if pages is not None and not any_purged:
            for page in pages:
                leaves = _page_leaves(page, done + 1, head_hash, sealed_from, seal_key)
                if leaves is None:
                    first = page
                    break
                at = 0
                while due is not None and due <= done + len(leaves):
                    frontier.extend(leaves[at:due - done])
                    at = due - done
                    if frontier.root() != found.by_size[due].root:
                        mismatch.append(due)
                        break
                    held.append(due)
                    due = next(pending, None)
                if mismatch:  # the walk stops at the signed size it contradicts
                    done, head_hash = done + at, page[at - 1][11]
                    break
                frontier.extend(leaves[at:])
                done, head_hash = done + len(page), page[-1][11]
        if first is None and (pages is not None and not any_purged):
            verdict = Verdict(True, done, head_hash)
        else:
            stream = rows(first, pages)
            merged: Iterator[Any] = (heapq.merge(stream, tombstones(), key=lambda r: r.seq)
                                     if any_purged else stream)
            verdict = verify_rows(against_anchors(merged), seq_of_hash=seq_of_hash,
                                  consistent=_consistent, after=done, after_hash=head_hash)
            verdict = dataclasses.replace(verdict, count=verdict.count + done)
    return _judge(verdict, found, held, mismatch, seal_problem)


def _consistent(row: Any) -> bool:
    return bool(row.ok) if isinstance(row, _Checked) else event_hash(row.body()) == row.hash


def _check_seal(row: _Row | _Checked, sealed_from: int | None,
                seal_key: SealVerifier | None) -> dict[str, Any] | None:
    """What is wrong with one event's seal, if anything."""
    if row.seal is None or row.event_id is None:
        if sealed_from is not None and row.seq >= sealed_from:
            return {"reason": "unsealed", "first_bad_seq": row.seq,
                    "message": f"event {row.seq} has no seal, but every event from "
                               f"{sealed_from} on was sealed (signed checkpoints say so)"}
        return None
    if seal_key is None:
        return None
    try:
        if isinstance(row, _Checked):
            ts_s, content = row.ts_s, row.content
        else:
            pre, post, mid, tail = hash_parts(
                actor=row.actor, action=row.action, target_type=row.target_type,
                target_id=row.target_id, outcome=row.outcome, request_id=row.request_id)
            ts_s = row.ts.timestamp()
            content = b"".join((pre.encode(), canonical_json(row.details), post.encode(),
                                mid.encode(), tail.encode()))
        if abs(event_id_ms(row.event_id) / 1000 - ts_s) > SEAL_CLOCK_SKEW_S:
            raise SealError("its id's clock is far from its time: moved from elsewhere")
        seal_key.check(row.event_id, row.seal, content)
    except SealError as exc:
        return {"reason": "forged", "first_bad_seq": row.seq,
                "message": f"event {row.seq}: {exc}"}
    return None


def _judge(verdict: Verdict, found: anchors.Anchors, held: list[int],
           mismatch: list[int], seal_problem: list[dict[str, Any]]) -> Verdict:
    """The chain's own verdict, then what the seals and the signed checkpoints say."""
    if not verdict.ok and not (seal_problem and seal_problem[0]["first_bad_seq"]
                               <= (verdict.first_bad_seq or 0)):
        return verdict
    problem: dict[str, Any] | None = None
    forks = [p for p in found.problems if p.get("reason") == "forked"]
    if seal_problem:
        problem = dict(seal_problem[0])
    elif forks:
        problem = dict(forks[0])
    elif mismatch:
        size, since = mismatch[0], (held[-1] if held else 0)
        source = found.by_size[size].source
        problem = {"reason": "rewritten", "checkpoint": size, "first_bad_seq": since + 1,
                   "message": f"the log's tree at size {size} is not the one signed "
                              f"({source}): an event among {since + 1}..{size} was changed "
                              "and the chain recomputed"}
    elif found.by_size and max(found.by_size) > verdict.count:
        newest = found.by_size[max(found.by_size)]
        problem = {"reason": "truncated", "checkpoint": newest.size,
                   "first_bad_seq": verdict.count + 1,
                   "message": f"the log holds {verdict.count} events, fewer than the "
                              f"{newest.size} signed ({newest.source}): events from "
                              f"{verdict.count + 1} on were removed"}
    elif found.problems:
        problem = dict(found.problems[0])
    if problem is None:
        return verdict
    raise_alarm(str(problem["message"]), problem)  # counted and logged; the verdict says
    return Verdict(False, verdict.count, verdict.head_hash, problem.get("first_bad_seq"),
                   str(problem["reason"]), str(problem["message"]), problem.get("checkpoint"))


def export_bundle(settings: Settings, selection: Selection, out: IO[bytes], *,
                  actor_ref: str, compress: bool = True) -> ExportResult:
    """Write an export bundle and record who exported what (`audit.export`); a refused
    export is recorded too."""
    from charter.audit import bundle

    try:
        result = bundle.export(settings, selection, out, compress=compress)
    except CharterError as exc:
        exc.details.setdefault("selection", selection.describe())
        refuse(exc.audited(actor_ref, "audit.export", "audit", "bundle"))
    with unit_of_work() as session:
        record(session, actor=actor_ref, action="audit.export", target_type="audit",
                     target_id="bundle",
                     details={"selection": selection.describe(), "events": result.events,
                              "checkpoints": result.checkpoints,
                              "tree_size": result.tree_size,
                              "manifest_sha256": result.manifest_sha256})
    return result
