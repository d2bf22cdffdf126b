"""Limits per team and per API key: requests and tokens per minute, token budgets per day
and per month, concurrent streams.

One rule set, two stores with the same semantics: Redis (atomic Lua scripts, so a limit
holds across every worker and pod sharing it) and this process's memory (the demo, one
process). Time is passed in (milliseconds since the epoch), so both are tested alike.

- Requests per minute: GCRA (the generic cell rate algorithm): one request every
  60/N seconds, up to N at once; a refusal says to the millisecond when the next fits.
- Tokens per minute: the same bucket charged after the answer with the tokens it used
  (they are not known before); a request is refused while a whole minute's tokens are
  owed.
- Tokens per day and per month (UTC): counters of the period, charged after the answer;
  refused once used up, until the period turns.
- Concurrent streams: leases in a sorted set, taken by a streaming request when it is
  admitted and given back with its outcome; a lease a crashed worker never gave back
  lapses after `lease_s`.

A request is checked against every rule of its team and its key at once: either all
admit it (and the request-side counts move), or none moves and the first refusal is
named.
"""

from __future__ import annotations

import calendar
import functools
import hashlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog

log = structlog.get_logger("charter.metering")

KINDS = ("requests_per_minute", "tokens_per_minute", "tokens_per_day", "tokens_per_month",
         "concurrent_streams")
MINUTE_MS = 60_000


@dataclass(frozen=True, slots=True)
class Limits:
    """A team's or a key's limits; None: no limit of that kind."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    concurrent_streams: int | None = None

    @classmethod
    def of(cls, doc: dict[str, Any] | None) -> Limits:
        if not doc:
            return NO_LIMITS
        return cls(**{f.name: doc.get(f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


NO_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit of one subject: `name` is how refusals and metrics say it
    (`team.tokens_per_day`), `key` where the store keeps its state."""

    name: str
    kind: str
    limit: int
    key: str
    ends_ms: int = 0  # when a day's or a month's budget starts again; 0 for the other kinds


def rules_for(team_id: str, team: Limits, key_id: str | None, key: Limits,
              now_ms: int) -> list[Rule]:
    """The rules a request is checked against: its team's, then its key's."""
    day, month = periods(now_ms)
    out: list[Rule] = []
    for scope_name, subject, limits in (("team", team_id, team), ("key", key_id, key)):
        if not subject or not limits:
            continue
        for kind in KINDS:
            value = getattr(limits, kind)
            if value is None:
                continue
            suffix = {"tokens_per_day": f":{day}", "tokens_per_month": f":{month}"}.get(kind, "")
            ends = period_end_ms(kind, now_ms) if suffix else 0
            out.append(Rule(f"{scope_name}.{kind}", kind, value,
                            f"charter:limit:{scope_name}:{subject}:{kind}{suffix}", ends))
    return out


def periods(now_ms: int) -> tuple[str, str]:
    """The UTC day and month of `now_ms`, as the counters' keys name them."""
    t = datetime.fromtimestamp(now_ms / 1000, UTC)
    return t.strftime("%Y-%m-%d"), t.strftime("%Y-%m")


def period_end_ms(kind: str, now_ms: int) -> int:
    """When the day's or the month's budget starts again (UTC)."""
    t = datetime.fromtimestamp(now_ms / 1000, UTC)
    if kind == "tokens_per_day":
        start = calendar.timegm((t.year, t.month, t.day, 0, 0, 0))
        return (start + 86_400) * 1000
    year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


@dataclass(frozen=True, slots=True)
class Refusal:
    rule: Rule
    retry_after_ms: int

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.retry_after_ms / 1000))


class LimitsUnavailableError(Exception):
    """The store could not be asked (Redis away): the setting decides what happens."""


class Pending(Protocol):
    def result(self) -> Refusal | None:
        """The admission's answer (read once). Raises LimitsUnavailableError."""
        ...


class Store(Protocol):
    def admit(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Refusal | None:
        """Refuse (nothing moves) or admit (request counts move; a lease is taken for a
        stream). Raises LimitsUnavailableError when it cannot tell."""
        ...

    def begin(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Pending:
        """admit(), its answer read later (Pending.result()): the caller works meanwhile.
        Raises LimitsUnavailableError when it cannot even ask."""
        ...

    def settle(self, rules: list[Rule], now_ms: int, tokens: int, lease: str | None) -> None:
        """Charge an answer's tokens and give its lease back (Redis: queued, see
        RedisStore; never raises)."""
        ...

    def flush(self) -> None:
        """Apply the charges still queued. Raises LimitsUnavailableError when it cannot."""
        ...

    def close(self) -> None:
        """Stop what the store runs for itself."""
        ...


# --- Redis ---------------------------------------------------------------------------------

# One script, two arguments of words separated by spaces (one packed string costs the
# client a third of what two dozen arguments do). ARGV[1]: charges to apply first, each
# `now_ms lease tokens n` and n rules; ARGV[2]: the request to admit (empty: only the
# charges), `now_ms lease lease_until_ms` and its rules. A rule is its kind, limit, key and
# (day and month budgets) when the period ends in ms. So the keys are not declared: one
# Redis (with replicas), not Redis Cluster.
# Returns 0, or {rule index (1-based), retry after ms; -1: when the period ends}.
_SCRIPT = """
local function words(text)
  local w = {}
  for word in string.gmatch(text, '%S+') do w[#w + 1] = word end
  return w
end
local c, p = words(ARGV[1]), 1
while p <= #c do
  local now, lease, tokens, n = tonumber(c[p]), c[p + 1], tonumber(c[p + 2]), tonumber(c[p + 3])
  p = p + 4
  for _ = 1, n do
    local kind, limit, key, ends = c[p], tonumber(c[p + 1]), c[p + 2], tonumber(c[p + 3])
    p = p + 4
    if kind == 'tokens_per_minute' and tokens > 0 then
      local tat = math.max(tonumber(redis.call('GET', key) or now), now) + tokens * 60000 / limit
      redis.call('SET', key, tat, 'PX', math.ceil(tat - now) + 1000)
    elseif (kind == 'tokens_per_day' or kind == 'tokens_per_month') and tokens > 0 then
      redis.call('INCRBY', key, tokens)
      redis.call('PEXPIREAT', key, ends + 86400000)
    elseif kind == 'concurrent_streams' and lease ~= '-' then
      redis.call('ZREM', key, lease)
    end
  end
end
local w = words(ARGV[2])
if #w == 0 then return 0 end
local now, lease, lease_until = tonumber(w[1]), w[2], tonumber(w[3])
local n = (#w - 3) / 4
local tats = {}
for i = 1, n do
  local kind, limit, key = w[4 * i], tonumber(w[4 * i + 1]), w[4 * i + 2]
  if kind == 'requests_per_minute' then
    local tat = math.max(tonumber(redis.call('GET', key) or now), now)
    local new_tat = tat + 60000 / limit
    if new_tat - now > 60000 then return {i, math.ceil(new_tat - 60000 - now)} end
    tats[i] = new_tat
  elseif kind == 'tokens_per_minute' then
    local tat = tonumber(redis.call('GET', key) or now)
    if tat - now >= 60000 then return {i, math.ceil(tat - 60000 - now) + 1} end
  elseif kind == 'tokens_per_day' or kind == 'tokens_per_month' then
    if tonumber(redis.call('GET', key) or 0) >= limit then return {i, -1} end
  elseif kind == 'concurrent_streams' and lease ~= '-' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZCARD', key) >= limit then return {i, 1000} end
  end
end
for i = 1, n do
  local kind, key = w[4 * i], w[4 * i + 2]
  if tats[i] then
    redis.call('SET', key, tats[i], 'PX', math.ceil(tats[i] - now) + 1000)
  elseif kind == 'concurrent_streams' and lease ~= '-' then
    redis.call('ZADD', key, lease_until, lease)
    redis.call('PEXPIREAT', key, lease_until + 1000)
  end
end
return 0
"""
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()

MAX_PENDING = 10_000  # charges kept while Redis is away; beyond, the oldest are dropped


@functools.lru_cache(maxsize=4096)
def _words(rules: tuple[Rule, ...]) -> str:
    """The rules as the script reads them (made once per rule set: a day's rules are the
    same rules all day)."""
    return " ".join(f"{r.kind} {r.limit} {r.key} {r.ends_ms}" for r in rules)


class RedisStore:
    """The limits' state in Redis: each check one atomic script (EVALSHA; the script is
    loaded again when the server has forgotten it).

    Charges are not a round trip of their own: `settle` queues them, and the next
    request this process admits carries them in the same script, applied before its own
    check (so one process's requests see each other's charges in order). A charge no
    request picks up within `linger_s` is sent by a thread of the store's. So a request
    costs one round trip to Redis, not two, and none after its answer; another replica
    sees a charge within `linger_s`. While Redis is away charges wait (up to MAX_PENDING;
    the oldest beyond are dropped and passed to `on_uncharged`)."""

    def __init__(self, url: str, *, timeout_s: float = 0.25, linger_s: float = 0.05,
                 on_uncharged: Callable[[int], None] | None = None) -> None:
        import redis

        self._lost: tuple[type[BaseException], ...] = (redis.ConnectionError,
                                                       redis.TimeoutError, OSError)
        self._answered = redis.ResponseError  # the server said no: the connection is fine
        self._failed = (*self._lost, redis.RedisError)
        self._noscript = redis.exceptions.NoScriptError
        # redis-py makes and sets up each connection (TLS, AUTH, the database); the store
        # keeps them itself, a stack per process: redis-py's pool and client cost a
        # request twice the CPU of the round trip itself (bench/gateway.py --limits).
        self._pool = redis.ConnectionPool.from_url(url, socket_timeout=timeout_s,
                                                   socket_connect_timeout=timeout_s)
        self._idle: list[Any] = []
        self._pid = os.getpid()
        self.linger_s = linger_s
        self.on_uncharged = on_uncharged
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._flusher_pid = 0  # the process whose flusher thread runs (none after a fork)
        self._closed = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _run(self, charges: str, request: str) -> Any:
        """The script, sent and its answer read."""
        args = ("EVALSHA", _SHA, 0, charges, request)
        try:
            return self._answer(args, *self._send(args))
        except self._failed as exc:
            raise LimitsUnavailableError(f"redis: {exc}") from None

    def _send(self, args: tuple[Any, ...]) -> tuple[Any, bool]:
        """Send a command on an idle connection of this process (a new one if none is);
        returns it, and whether it was one kept from before."""
        if self._pid != os.getpid():  # forked: the parent's connections are not ours
            self._idle, self._pid = [], os.getpid()
        try:
            conn, reused = self._idle.pop(), True
        except IndexError:
            conn, reused = self._pool.connection_class(**self._pool.connection_kwargs), False
        try:
            conn.send_packed_command(conn.pack_command(*args), check_health=False)
        except self._lost:
            conn.disconnect()
            if not reused:
                raise
            return self._send(args)  # a kept connection Redis had closed: a new one
        return conn, reused

    def _read(self, args: tuple[Any, ...], conn: Any, reused: bool) -> Any:
        """The answer to what was sent on `conn`; a kept connection found dead is tried
        once more, anew (Redis restarted)."""
        try:
            reply = conn.read_response()
        except self._answered:
            self._idle.append(conn)
            raise
        except self._lost:
            conn.disconnect()
            if not reused:
                raise
            return self._read(args, *self._send(args))
        self._idle.append(conn)
        return reply

    def _answer(self, args: tuple[Any, ...], conn: Any, reused: bool) -> Any:
        """The script's answer, given again in full when Redis had forgotten it."""
        try:
            return self._read(args, conn, reused)
        except self._noscript:
            full = ("EVAL", _SCRIPT, *args[2:])
            return self._read(full, *self._send(full))

    def _take(self) -> list[str]:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    def _put_back(self, taken: list[str]) -> None:
        """Charges whose script failed wait for the next one, the oldest dropped first."""
        with self._lock:
            self._pending[:0] = taken
            over = len(self._pending) - MAX_PENDING
            if over > 0:
                del self._pending[:over]
        if over > 0 and self.on_uncharged is not None:
            self.on_uncharged(over)

    def admit(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Refusal | None:
        return self.begin(rules, now_ms, lease, lease_s).result()

    def begin(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Pending:
        """Send the admission (and the charges queued) now; its answer is read when
        asked for, so the caller works while Redis does."""
        taken = self._take() if self._pending else []
        args = ("EVALSHA", _SHA, 0, " ".join(taken),
                f"{now_ms} {lease or '-'} {now_ms + int(lease_s * 1000)} "
                f"{_words(tuple(rules))}")
        try:
            conn, reused = self._send(args)
        except self._failed as exc:
            if taken:
                self._put_back(taken)
            raise LimitsUnavailableError(f"redis: {exc}") from None
        return _Admission(self, args, conn, reused, taken, rules, now_ms)

    def settle(self, rules: list[Rule], now_ms: int, tokens: int, lease: str | None) -> None:
        charge = f"{now_ms} {lease or '-'} {max(0, tokens)} {len(rules)} {_words(tuple(rules))}"
        with self._lock:
            self._pending.append(charge)
        if self._flusher_pid != os.getpid():
            self._start_flusher()
        self._wake.set()

    def flush(self) -> None:
        """Send the charges still queued (a worker on its way out; the flusher)."""
        taken = self._take()
        if not taken:
            return
        try:
            self._run(" ".join(taken), "")
        except LimitsUnavailableError:
            self._put_back(taken)
            raise

    def _start_flusher(self) -> None:
        with self._lock:
            if self._flusher_pid == os.getpid():
                return
            self._flusher_pid = os.getpid()
        threading.Thread(target=self._flush_lingering, name="charter-limits-flusher",
                         daemon=True).start()

    def close(self) -> None:
        """Stop the flusher (what is still queued stays: flush() first)."""
        self._closed = True
        self._wake.set()

    def _flush_lingering(self) -> None:
        failures = 0
        while True:
            self._wake.wait()
            if self._closed:
                return
            # The requests of this process may take them first; after a failure, back off.
            time.sleep(min(5.0, self.linger_s * 2 ** failures))
            self._wake.clear()
            if not self._pending:
                continue
            try:
                self.flush()
            except LimitsUnavailableError as exc:
                if not failures:
                    log.warning("limits: charges wait for Redis", error=str(exc),
                                pending=len(self._pending))
                failures += 1
                self._wake.set()  # tried again after the back-off
            else:
                if failures:
                    log.info("limits: the charges that waited are sent", tries=failures + 1)
                failures = 0


class _Admission:
    """An admission sent to Redis, its answer read once, when first asked for."""

    def __init__(self, store: RedisStore, args: tuple[Any, ...], conn: Any, reused: bool,
                 taken: list[str], rules: list[Rule], now_ms: int) -> None:
        self.store, self.args, self.conn, self.reused = store, args, conn, reused
        self.taken, self.rules, self.now_ms = taken, rules, now_ms
        self._outcome: Refusal | LimitsUnavailableError | None = None
        self._read = False

    def result(self) -> Refusal | None:
        if not self._read:
            self._read = True
            store = self.store
            try:
                found = store._answer(self.args, self.conn, self.reused)
            except store._failed as exc:
                if self.taken:
                    store._put_back(self.taken)
                self._outcome = LimitsUnavailableError(f"redis: {exc}")
            else:
                if found:
                    rule = self.rules[int(found[0]) - 1]
                    wait = int(found[1])
                    self._outcome = Refusal(
                        rule, rule.ends_ms - self.now_ms if wait < 0 else wait)
        if isinstance(self._outcome, LimitsUnavailableError):
            raise self._outcome
        return self._outcome


class Answered:
    """An admission a store decided at once."""

    def __init__(self, refusal: Refusal | None) -> None:
        self.refusal = refusal

    def result(self) -> Refusal | None:
        return self.refusal


# --- this process ------------------------------------------------------------------------------

class MemoryStore:
    """The same rules in this process's memory: exact for one process (the demo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = {}  # GCRA times and period counters
        self._leases: dict[str, dict[str, int]] = {}

    def admit(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Refusal | None:
        with self._lock:
            tats: dict[str, float] = {}
            for r in rules:
                if r.kind == "requests_per_minute":
                    new_tat = max(self._values.get(r.key, now_ms), now_ms) + MINUTE_MS / r.limit
                    if new_tat - now_ms > MINUTE_MS:
                        return Refusal(r, math.ceil(new_tat - MINUTE_MS - now_ms))
                    tats[r.key] = new_tat
                elif r.kind == "tokens_per_minute":
                    tat = self._values.get(r.key, now_ms)
                    if tat - now_ms >= MINUTE_MS:
                        return Refusal(r, math.ceil(tat - MINUTE_MS - now_ms) + 1)
                elif r.kind in ("tokens_per_day", "tokens_per_month"):
                    if self._values.get(r.key, 0) >= r.limit:
                        return Refusal(r, period_end_ms(r.kind, now_ms) - now_ms)
                elif r.kind == "concurrent_streams" and lease:
                    held = self._leases.setdefault(r.key, {})
                    for k in [k for k, until in held.items() if until <= now_ms]:
                        del held[k]
                    if len(held) >= r.limit:
                        return Refusal(r, 1000)
            self._values.update(tats)
            if lease:
                for r in rules:
                    if r.kind == "concurrent_streams":
                        self._leases[r.key][lease] = now_ms + int(lease_s * 1000)
            return None

    def begin(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Pending:
        return Answered(self.admit(rules, now_ms, lease, lease_s))

    def settle(self, rules: list[Rule], now_ms: int, tokens: int, lease: str | None) -> None:
        with self._lock:
            for r in rules:
                if r.kind == "tokens_per_minute" and tokens > 0:
                    self._values[r.key] = (max(self._values.get(r.key, now_ms), now_ms)
                                           + tokens * MINUTE_MS / r.limit)
                elif r.kind in ("tokens_per_day", "tokens_per_month") and tokens > 0:
                    self._values[r.key] = self._values.get(r.key, 0) + tokens
                elif r.kind == "concurrent_streams" and lease:
                    self._leases.get(r.key, {}).pop(lease, None)

    def flush(self) -> None:
        """Nothing waits: charges are applied as they come."""

    def close(self) -> None:
        """Nothing runs."""
