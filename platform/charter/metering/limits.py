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
import hashlib
import math
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Protocol

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

    def ends_ms(self, now_ms: int) -> int:
        """When a day's or a month's budget starts again; 0 for the other kinds."""
        if self.kind in ("tokens_per_day", "tokens_per_month"):
            return period_end_ms(self.kind, now_ms)
        return 0


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
            out.append(Rule(f"{scope_name}.{kind}", kind, value,
                            f"charter:limit:{scope_name}:{subject}:{kind}{suffix}"))
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


class Store(Protocol):
    def admit(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Refusal | None:
        """Refuse (nothing moves) or admit (request counts move; a lease is taken for a
        stream). Raises LimitsUnavailableError when it cannot tell."""
        ...

    def settle(self, rules: list[Rule], now_ms: int, tokens: int, lease: str | None) -> None:
        """Charge an answer's tokens and give its lease back."""
        ...


# --- Redis ------------------------------------------------------------------------------------

# One argument, words separated by spaces (one packed string costs the client a third of
# what two dozen arguments do): now_ms, the lease id ("-" for none), the lease's expiry
# in ms, then per rule its kind, limit, key and (day and month budgets) when the period
# ends in ms. So the keys are not declared: one Redis (with replicas), not Redis Cluster.
_PARSE = """
local w = {}
for word in string.gmatch(ARGV[1], '%S+') do w[#w + 1] = word end
local now, lease, lease_until = tonumber(w[1]), w[2], tonumber(w[3])
"""

# Returns 0, or {rule index (1-based), retry after ms; -1: when the period ends}.
_ADMIT = _PARSE + """
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

# The same words; the tokens to charge in place of the lease's expiry.
_SETTLE = _PARSE + """
local tokens = lease_until
for i = 1, (#w - 3) / 4 do
  local kind, limit, key, ends = w[4 * i], tonumber(w[4 * i + 1]), w[4 * i + 2], w[4 * i + 3]
  if kind == 'tokens_per_minute' and tokens > 0 then
    local tat = math.max(tonumber(redis.call('GET', key) or now), now) + tokens * 60000 / limit
    redis.call('SET', key, tat, 'PX', math.ceil(tat - now) + 1000)
  elseif (kind == 'tokens_per_day' or kind == 'tokens_per_month') and tokens > 0 then
    redis.call('INCRBY', key, tokens)
    redis.call('PEXPIREAT', key, tonumber(ends) + 86400000)
  elseif kind == 'concurrent_streams' and lease ~= '-' then
    redis.call('ZREM', key, lease)
  end
end
return 0
"""


def _words(rules: list[Rule], now_ms: int) -> str:
    return " ".join(f"{r.kind} {r.limit} {r.key} {r.ends_ms(now_ms)}" for r in rules)


class RedisStore:
    """The limits' state in Redis, each check and charge one atomic script (EVALSHA; the
    script is loaded again when the server has forgotten it)."""

    def __init__(self, url: str, *, timeout_s: float = 0.25) -> None:
        import redis

        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._noscript = redis.exceptions.NoScriptError
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self._sha = {name: hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
                     for name, text in (("admit", _ADMIT), ("settle", _SETTLE))}

    def _run(self, name: str, payload: str) -> Any:
        run = self.client.execute_command
        try:
            try:
                return run("EVALSHA", self._sha[name], 0, payload)  # type: ignore[no-untyped-call]
            except self._noscript:
                return run("EVAL", _ADMIT if name == "admit" else _SETTLE, 0,  # type: ignore[no-untyped-call]
                           payload)
        except self._errors as exc:
            raise LimitsUnavailableError(f"redis: {exc}") from None

    def admit(self, rules: list[Rule], now_ms: int, lease: str | None,
              lease_s: float) -> Refusal | None:
        found = self._run("admit", f"{now_ms} {lease or '-'} {now_ms + int(lease_s * 1000)} "
                                   f"{_words(rules, now_ms)}")
        if not found:
            return None
        rule = rules[int(found[0]) - 1]
        wait = int(found[1])
        return Refusal(rule, rule.ends_ms(now_ms) - now_ms if wait < 0 else wait)

    def settle(self, rules: list[Rule], now_ms: int, tokens: int, lease: str | None) -> None:
        self._run("settle", f"{now_ms} {lease or '-'} {max(0, tokens)} "
                            f"{_words(rules, now_ms)}")


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
