"""Group commit for the gateway: the audit events of concurrent requests in one transaction.

Every gateway request must have its decision committed to the hash chain before anything
is sent to a node (fail closed). Writing each request's events in a transaction of its own
costs a lock wait, a head read and a durable commit per request; here the requests of one
process that arrive while a commit is in flight wait for the next one together: the first
to find the writer idle writes everything queued (leader/follower, no hand-off at c=1).

One transaction does, under the chain lock:
- read the change generation (charter.readcache) and refuse, as `stale`, any entry whose
  content was decided on an older one: the caller reloads and decides again, so a decision
  is always valid as of its place in the chain;
- count the day's requests of the teams with a quota and refuse, as `over_quota`, an entry
  that would pass it (its refusal events are written instead): quotas are exact across
  processes, because every count changes under the same lock;
- stamp, chain and append the events and add the usage counters.

Outcome events are `defer`red: they ride with the next commit, or a background flusher
writes them after `linger_s`; a process killed in that window loses them (its decisions
are committed), which `dispose()` and a clean shutdown avoid by flushing.

PostgreSQL: the transaction is one call of the database function charter_audit_append
(migration 0010) on a plain psycopg connection in autocommit mode: one round trip, the
commit included, and the chain lock is never held across the network. The events' times
come from the database's clock, under the lock. SQLite (the demo): the same decisions in
Python (plan_batch) on an ordinary session.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import psycopg
import psycopg.errors
import structlog
from psycopg import pq
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert

from charter.audit.chain import joined_hash
from charter.audit.journal import Event, lock_head
from charter.audit.models import AuditEvent
from charter.db import table_of, utcnow
from charter.errors import CharterError, DatabaseUnavailableError
from charter.metering import quota as quotas
from charter.metering.service import UsageDelta, add_sqlite, requests_on
from charter.readcache import read_generation, still_current

log = structlog.get_logger("charter.audit.writer")
MAX_DEFERRED = 100_000  # outcomes kept for retry while the database is away
BACKPRESSURE_WAIT_S = 5.0  # how long `defer` waits for room in a full backlog
MAX_ATTEMPTS = 20


@dataclass(eq=False)
class Entry:
    """What one request writes, and the conditions under which it may."""

    events: Sequence[Event]
    usage: Sequence[UsageDelta] = ()
    generation: int | None = None  # content decided on this generation (charter.readcache)
    quota: tuple[str, int] | None = None  # (team_id, requests_per_day)
    over_quota: Sequence[Event] = ()  # written instead of `events` past the quota
    # Filled in by the writer:
    result: str = ""  # written | stale | over_quota | failed
    generation_seen: int | None = None
    seqs: list[int] = field(default_factory=list)
    error: CharterError | None = None
    attempts: int = 0
    queued_at: float = field(default_factory=time.monotonic)
    _done: bool = False
    _wake: threading.Lock | None = None  # held while a committing thread sleeps

    @property
    def committed(self) -> bool:
        """Its events are in the log (a deferred entry: once its transaction committed;
        `result` is set while the transaction is still being written)."""
        return self._done and self.result == "written"

    @property
    def refused(self) -> bool:
        """The writer gave up on it (`error` says why)."""
        return self._done and self.result == "failed"


@dataclass
class _Head:
    generation: int
    seq: int  # the last written
    hash: str
    used: dict[str, int]  # today's requests of the quota teams in this batch


class _Backend:
    def append(self, batch: list[Entry], day: date) -> None:
        """One transaction for the batch: set every entry's `result`, `generation_seen`
        and `seqs`, and write what it decided; raise (nothing written) on failure."""
        raise NotImplementedError

    def abort(self) -> None:
        """After a failure: drop the connection or session, half done or broken."""

    def close(self) -> None:
        self.abort()


_APPEND = (b"SELECT generation, results, seqs FROM "
           b"charter_audit_append($1::json, $2::json, $3::json, $4::date)")
_APPEND_NAME = b"charter_audit_append"
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


class _PostgresBackend(_Backend):
    """One psycopg connection in autocommit mode; a batch is one call of the database
    function charter_audit_append (migration 0010): one round trip, the commit included,
    the chain lock held only while the database does the work, never across the network.
    The batch travels as three JSON texts (encoded in C), and the statement is the same
    whatever the batch's size: prepared once a connection and executed on libpq directly
    (`pgconn.exec_prepared`, which lets go of the GIL while it waits), which costs about a
    third of psycopg's execute (~60 us of CPU a transaction here); its errors are
    psycopg's own exceptions, as execute raises them."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None

    def _call(self, params: list[bytes]) -> tuple[int, list[str], list[int | None]]:
        if self._conn is None or self._conn.closed:
            conn = self._connect()
            _ok(conn, conn.pgconn.prepare(_APPEND_NAME, _APPEND))
            self._conn = conn
        conn = self._conn
        result = conn.pgconn.exec_prepared(_APPEND_NAME, params)
        _ok(conn, result)
        return (int(result.get_value(0, 0)), _text_array(result.get_value(0, 1)),
                [None if v == "NULL" else int(v) for v in _text_array(result.get_value(0, 2))])

    def append(self, batch: list[Entry], day: date) -> None:
        entries: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        counters: list[dict[str, Any]] = []
        for i, e in enumerate(batch, 1):
            quota = e.quota or (None, None)
            entries.append({"g": e.generation, "q": quota[0], "l": quota[1],
                            "n": sum(u.requests for u in e.usage)})
            for alt, evs in ((False, e.events), (True, e.over_quota)):
                for ev in evs:
                    pre, post, mid, tail = ev.parts
                    events.append({
                        "e": i, "x": alt, "actor": ev.actor, "action": ev.action,
                        "target_type": ev.target_type, "target_id": ev.target_id,
                        "outcome": ev.outcome, "details": ev.details_json.decode(),
                        "request_id": ev.request_id, "pre": pre, "post": post, "mid": mid,
                        "tail": tail, "id": ev.event_id, "seal": ev.seal})
            for u in e.usage:
                counters.append({"e": i, "team": u.team_id, "key": u.key_id,
                                 "serving": u.serving_name, "day": u.day.isoformat(),
                                 "requests": u.requests, "tokens_in": u.tokens_in,
                                 "tokens_out": u.tokens_out, "est": u.tokens_estimated})
        generation, results, seqs = self._call([
            _JSON.encode(entries).encode(), _JSON.encode(events).encode(),
            _JSON.encode(counters).encode(), day.isoformat().encode()])
        j = 0
        for i, e in enumerate(batch):
            e.generation_seen = generation
            e.result = results[i]
            e.seqs = []
            for evs in (e.events, e.over_quota):
                for _ in evs:
                    seq = seqs[j]
                    if seq is not None:
                        e.seqs.append(seq)
                    j += 1

    def abort(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # broken or half done: start over, anew
                conn.close()


def _ok(conn: Any, result: Any) -> None:
    """Raise what psycopg's execute would have raised for this result."""
    if result.status in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
        return
    if conn.pgconn.status != pq.ConnStatus.OK:
        raise psycopg.OperationalError(
            f"the connection was lost: {conn.pgconn.error_message.decode(errors='replace')}")
    raise psycopg.errors.error_from_result(result, encoding="utf-8")


def _text_array(value: bytes | None) -> list[str]:
    """A one-dimensional array of words or numbers in PostgreSQL's text form."""
    if value is None or value == b"{}":
        return []
    return value.decode()[1:-1].split(",")


class _SessionBackend(_Backend):
    """The ordinary session (SQLite: BEGIN IMMEDIATE holds the write lock throughout);
    the same decisions as charter_audit_append, made in Python (plan_batch)."""

    def __init__(self, sessions: Callable[[], Any]) -> None:
        self._sessions = sessions
        self._session: Any = None

    def append(self, batch: list[Entry], day: date) -> None:
        self._session = session = self._sessions()
        next_seq, prev_hash = lock_head(session)  # takes the chain's lock where one is needed
        conn = session.connection()
        generation = read_generation(session)
        teams = sorted({e.quota[0] for e in batch if e.quota is not None})
        used = requests_on(conn, teams, day)
        rows, usage = plan_batch(batch, _Head(generation, next_seq - 1, prev_hash, used))
        if rows:
            session.execute(insert(table_of(AuditEvent)), rows)
        add_sqlite(conn, usage)
        session.commit()
        session.close()
        self._session = None

    def abort(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                session.rollback()
                session.close()


def plan_batch(batch: list[Entry], head: _Head) -> tuple[list[dict[str, Any]], list[UsageDelta]]:
    """Decide each entry (written, stale, over_quota) and chain the events it writes:
    what charter_audit_append does in the database, for SQLite."""
    rows: list[dict[str, Any]] = []
    usage: dict[tuple[str, str, str, date], list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    seq, prev = head.seq, head.hash
    for e in batch:
        e.generation_seen = head.generation
        e.seqs = []
        if not still_current(e.generation, head.generation):
            e.result = "stale"
            continue
        events, deltas = e.events, e.usage
        e.result = "written"
        if e.quota is not None:
            team, limit = e.quota
            asked = sum(u.requests for u in deltas)
            if not quotas.admits(head.used.get(team, 0), asked, limit):
                e.result, events, deltas = "over_quota", e.over_quota, ()
            else:
                head.used[team] = head.used.get(team, 0) + asked
        for ev in events:
            seq += 1
            ts = utcnow()
            digest = joined_hash(ev.parts, ev.details_json, seq=seq, ts=ts, prev_hash=prev)
            rows.append({"seq": seq, "ts": ts, "actor": ev.actor, "action": ev.action,
                         "target_type": ev.target_type, "target_id": ev.target_id,
                         "outcome": ev.outcome, "details": ev.details,
                         "request_id": ev.request_id, "prev_hash": prev, "hash": digest,
                         "event_id": ev.event_id, "seal": ev.seal})
            e.seqs.append(seq)
            prev = digest
        for u in deltas:
            acc = usage[(u.team_id, u.key_id, u.serving_name, u.day)]
            acc[0] += u.requests
            acc[1] += u.tokens_in
            acc[2] += u.tokens_out
            acc[3] += u.tokens_estimated
    return rows, [UsageDelta(t, s, d, req, tin, tout, k, est)
                  for (t, k, s, d), (req, tin, tout, est) in sorted(usage.items())]


class GroupWriter:
    """Leader/follower group commit. A follower sleeps on its own entry's lock until its
    entry is written, or until the leader hands the writer over to it; nothing is woken
    that has nothing to do (one shared condition woke every waiter on every commit)."""

    def __init__(self, backend: _Backend, *, linger_s: float = 0.2,
                 max_deferred: int = MAX_DEFERRED,
                 on_drop: Callable[[Entry, str], None] | None = None,
                 on_commit: Callable[[float, int], None] | None = None) -> None:
        self._backend = backend
        self.linger_s = linger_s
        self.max_deferred = max_deferred
        self._on_drop = on_drop
        self._on_commit = on_commit  # (seconds, entries) of each committed transaction
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # flush() waits for the writer
        self._kick = threading.Condition(self._lock)  # the flusher waits for deferred work
        self._room = threading.Condition(self._lock)  # defer() waits for room in the backlog
        self._pending: list[Entry] = []
        self._writing = False
        self._closed = False
        self._flusher: threading.Thread | None = None
        self.batches = 0  # transactions written (for tests and the benchmark)
        self.dropped = 0  # deferred entries given up on (counted, alarmed: `on_drop`)
        self._count_lock = threading.Lock()

    # --- what callers use ------------------------------------------------------------------

    def commit(self, entry: Entry) -> Entry:
        """Write `entry` (or decide it stale / over quota) and return it; waits for the
        commit. A database failure sets `result = "failed"` and `error`."""
        wake = entry._wake = threading.Lock()
        wake.acquire()
        with self._lock:
            if self._closed:
                raise DatabaseUnavailableError("the audit writer is closed")
            self._pending.append(entry)
            lead = not self._writing
            self._writing = True
        if not lead:
            wake.acquire()  # released when written, or when the writer is handed to us
            if entry._done:
                return entry
        self._lead()
        return entry

    def defer(self, entry: Entry, *, wait_s: float = BACKPRESSURE_WAIT_S) -> bool:
        """Write `entry` with the next commit, or within `linger_s`; returns at once while
        the backlog has room. A full backlog (the database has been away that long) is
        back-pressure: the caller waits up to `wait_s` for room. If none frees, the entry
        is dropped, counted and alarmed (`on_drop`, an error in the log); False then."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while len(self._pending) >= self.max_deferred:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    self._drop(entry, "backlog_full")
                    return False
                self._room.wait(left)
            self._pending.append(entry)
            if self._flusher is None and not self._closed:
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                 name="charter-audit-flush")
                self._flusher.start()
            if len(self._pending) == 1 and not self._writing:
                # Only the first entry wakes the flusher (to time its linger); a writer
                # at work takes everything queued, and kicks the flusher when it is done.
                self._kick.notify()
        return True

    def _drop(self, entry: Entry, reason: str) -> None:
        """Give up on a deferred entry: never silently."""
        with self._count_lock:
            self.dropped += 1
        entry.result = "failed"
        entry._done = True
        log.error("audit events dropped", reason=reason, events=len(entry.events),
                  actions=sorted({e.action for e in entry.events}), dropped=self.dropped)
        if self._on_drop is not None:
            self._on_drop(entry, reason)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write everything queued now; True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                while self._writing:
                    if not self._idle.wait(max(0.0, deadline - time.monotonic())):
                        return False
                if not self._pending:
                    return True
                if time.monotonic() > deadline:
                    return False
                before = len(self._pending)
                self._writing = True
            self._lead()
            with self._lock:
                if len(self._pending) >= before and not self._writing:
                    return not self._pending  # nothing could be written: the database is away

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._closed = True
            self._kick.notify_all()
        self._backend.close()

    # --- inside ------------------------------------------------------------------------------

    def _lead(self) -> None:
        """Holding the writer (`_writing` set by the caller): write what is queued, then hand
        the writer to a waiting entry's thread, or set it idle."""
        with self._lock:
            batch, self._pending = self._pending, []
        try:
            retry = self._write(batch)
        except BaseException:
            retry = []
            raise
        finally:
            with self._lock:
                self._pending[:0] = retry  # deferred entries that could not be written yet
                self._room.notify_all()
                for e in batch:
                    if e._done and e._wake is not None:
                        e._wake.release()
                nxt = next((e for e in self._pending if e._wake is not None), None)
                if nxt is not None and nxt._wake is not None:
                    nxt._wake.release()  # its thread leads the next transaction
                else:
                    self._writing = False
                    self._idle.notify_all()
                    if self._pending:
                        self._kick.notify()

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                if not self._pending or self._writing:
                    self._kick.wait(None if not self._pending else 0.05)
                    continue
                wait = self._pending[0].queued_at + self.linger_s - time.monotonic()
                if wait > 0:
                    self._kick.wait(wait)
                    continue
                before = len(self._pending)
                self._writing = True
            self._lead()
            with self._lock:
                stuck = len(self._pending) >= before
            if stuck:  # the database is away: back off before trying again
                with self._lock:
                    self._kick.wait(min(5.0, self.linger_s * 10 + 0.5))

    def _write(self, batch: list[Entry]) -> list[Entry]:
        """One transaction for the batch; returns deferred entries to try again later."""
        started = time.perf_counter()
        try:
            self._backend.append(batch, utcnow().date())
        except Exception as exc:  # noqa: BLE001 - every entry learns of it; nothing is written
            self._backend.abort()
            kind = _failure_kind(exc)
            log.warning("audit group commit failed", error=f"{type(exc).__name__}: {exc}",
                        entries=len(batch))
            for e in batch:
                e.seqs = []
            if kind != "connection" and len(batch) > 1:
                # One entry may be what the database refused: do not let it sink the others.
                # Each goes again in a transaction of its own.
                return [r for e in batch for r in self._write([e])]
            retry = []
            for e in batch:
                if e._wake is None:  # a deferred outcome: nobody waits for it
                    if kind != "values" and e.attempts + 1 < MAX_ATTEMPTS:
                        e.attempts += 1  # kept for the next try
                        retry.append(e)
                        continue
                    self._drop(e, "refused_by_database" if kind == "values"
                               else "attempts_exhausted")
                e.result = "failed"
                e.error = DatabaseUnavailableError(
                    "the audit log could not be written; nothing was dispatched",
                    code="audit_unavailable")
                e._done = True
            return retry
        self.batches += 1
        if self._on_commit is not None:
            self._on_commit(time.perf_counter() - started, len(batch))
        for e in batch:
            e._done = True
        return []


def _failure_kind(exc: Exception) -> str:
    """`connection`: the database is unreachable or busy (try again later, all together);
    `values`: a value the columns cannot hold (it fails however often it is sent);
    `statement`: refused otherwise (a constraint, a permission), perhaps until an operator
    acts: kept like a connection failure, but not allowed to sink other entries."""
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | sa_exc.OperationalError
                  | sa_exc.InterfaceError | sa_exc.TimeoutError):
        return "connection"
    if isinstance(exc, psycopg.DataError | sa_exc.DataError):
        return "values"
    return "statement" if isinstance(exc, psycopg.Error | sa_exc.DBAPIError) else "connection"


def make_writer(database: Any, *, linger_s: float = 0.2,
                on_drop: Callable[[Entry, str], None] | None = None,
                on_commit: Callable[[float, int], None] | None = None) -> GroupWriter:
    """The writer for a charter.db.Database (PostgreSQL: its own psycopg connection)."""
    engine = database.engine
    if engine.dialect.name == "postgresql":
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        cparams.setdefault("connect_timeout", 5)

        def connect() -> Any:
            return psycopg.connect(*cargs, **cparams, autocommit=True)

        return GroupWriter(_PostgresBackend(connect), linger_s=linger_s, on_drop=on_drop,
                           on_commit=on_commit)
    return GroupWriter(_SessionBackend(database.sessions), linger_s=linger_s, on_drop=on_drop,
                       on_commit=on_commit)
