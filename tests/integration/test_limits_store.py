"""The limits' two stores, one table of behaviour: Redis (atomic scripts, a real server of
this test's own) and this process's memory. Time is given, so every figure is exact."""

from __future__ import annotations

import multiprocessing
import uuid
from typing import Any

import pytest

from charter.metering.limits import (
    Limits,
    LimitsUnavailableError,
    MemoryStore,
    RedisStore,
    Store,
    period_end_ms,
    rules_for,
)

NOON = 1_922_788_800_000  # 2030-12-06T12:00:00Z, in ms (Redis expires keys by its own clock)




@pytest.fixture(params=["redis", "memory"])
def store(request: Any, redis_url: str) -> Store:
    return RedisStore(redis_url) if request.param == "redis" else MemoryStore()


def team(**limits: int) -> tuple[str, Limits]:
    return str(uuid.uuid4()), Limits(**limits)  # type: ignore[arg-type]


def test_requests_per_minute_let_a_burst_through_then_one_every_interval(store: Store) -> None:
    tid, limits = team(requests_per_minute=3)
    rules = rules_for(tid, limits, None, Limits(), NOON)
    assert [store.admit(rules, NOON, None, 60) for _ in range(3)] == [None] * 3
    refused = store.admit(rules, NOON, None, 60)
    assert refused is not None and refused.rule.name == "team.requests_per_minute"
    assert refused.retry_after_ms == 20_000 and refused.retry_after_s == 20  # 60 s / 3
    assert store.admit(rules, NOON + 19_999, None, 60) is not None
    assert store.admit(rules, NOON + 20_000, None, 60) is None
    assert store.admit(rules, NOON + 20_000, None, 60) is not None


def test_tokens_per_minute_are_charged_after_and_refuse_while_a_minute_is_owed(
        store: Store) -> None:
    tid, limits = team(tokens_per_minute=600)
    rules = rules_for(tid, limits, None, Limits(), NOON)
    assert store.admit(rules, NOON, None, 60) is None
    store.settle(rules, NOON, 599, None)  # 59.9 s owed: one more may go
    assert store.admit(rules, NOON, None, 60) is None
    store.settle(rules, NOON, 301, None)  # 90 s owed: refused until 30 s have passed
    refused = store.admit(rules, NOON, None, 60)
    assert refused is not None and refused.rule.name == "team.tokens_per_minute"
    assert 30_000 <= refused.retry_after_ms <= 30_001
    assert store.admit(rules, NOON + 30_001, None, 60) is None


def test_a_day_budget_refuses_until_the_day_turns_and_a_month_until_the_month_does(
        store: Store) -> None:
    _, nothing = team()
    kid, key = str(uuid.uuid4()), Limits(tokens_per_day=100, tokens_per_month=150)
    rules = rules_for("", nothing, kid, key, NOON)
    assert [r.name for r in rules] == ["key.tokens_per_day", "key.tokens_per_month"]
    assert store.admit(rules, NOON, None, 60) is None
    store.settle(rules, NOON, 100, None)
    refused = store.admit(rules, NOON, None, 60)
    assert refused is not None and refused.rule.name == "key.tokens_per_day"
    assert refused.retry_after_s == 12 * 3600  # noon to midnight, UTC
    tomorrow = NOON + 86_400_000
    rules = rules_for("", nothing, kid, key, tomorrow)
    assert store.admit(rules, tomorrow, None, 60) is None
    store.settle(rules, tomorrow, 50, None)
    refused = store.admit(rules, tomorrow, None, 60)
    assert refused is not None and refused.rule.name == "key.tokens_per_month"
    assert refused.retry_after_ms == period_end_ms("tokens_per_month", tomorrow) - tomorrow
    assert period_end_ms("tokens_per_month", tomorrow) == 1_924_992_000_000  # 2031-01-01


def test_concurrent_streams_hold_a_lease_until_given_back_or_lapsed(store: Store) -> None:
    tid, limits = team(concurrent_streams=2)
    rules = rules_for(tid, limits, None, Limits(), NOON)
    assert store.admit(rules, NOON, "a", 300) is None
    assert store.admit(rules, NOON, "b", 300) is None
    assert store.admit(rules, NOON, None, 300) is None  # not a stream: takes no lease
    refused = store.admit(rules, NOON, "c", 300)
    assert refused is not None and refused.rule.name == "team.concurrent_streams"
    store.settle(rules, NOON, 0, "a")
    store.settle(rules, NOON, 0, "a")  # given back twice: harmless
    assert store.admit(rules, NOON, "c", 300) is None
    assert store.admit(rules, NOON + 299_999, "d", 300) is not None
    assert store.admit(rules, NOON + 300_001, "d", 300) is None  # b and c lapsed


def test_a_refusal_moves_nothing(store: Store) -> None:
    """Team and key rules together: the key's budget refuses, so the team's requests per
    minute and streams do not move."""
    tid, kid = str(uuid.uuid4()), str(uuid.uuid4())
    rules = rules_for(tid, Limits(requests_per_minute=1, concurrent_streams=1), kid,
                      Limits(tokens_per_day=10), NOON)
    assert store.admit(rules, NOON, "s1", 60) is None
    store.settle(rules, NOON, 10, "s1")
    for _ in range(5):
        refused = store.admit(rules, NOON + 60_000, "s2", 60)
        assert refused is not None and refused.rule.name == "key.tokens_per_day"
    team_only = [r for r in rules if r.name.startswith("team.")]
    assert store.admit(team_only, NOON + 60_000, "s3", 60) is None  # nothing was taken


def _admit_many(url: str, tid: str, n: int, out: Any) -> None:
    store = RedisStore(url)
    rules = rules_for(tid, Limits(requests_per_minute=100), None, Limits(), NOON)
    out.put(sum(store.admit(rules, NOON, None, 60) is None for _ in range(n)))


def test_a_limit_holds_across_processes(redis_url: str) -> None:
    """Four processes (as four workers or pods would) ask 60 times each at one instant:
    exactly the 100 the limit allows get through."""
    tid = str(uuid.uuid4())
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_admit_many, args=(redis_url, tid, 60, out)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(admitted) == 100, admitted


def test_a_redis_that_is_away_is_said_so() -> None:
    from tests.processes import free_port

    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    rules = rules_for("t", Limits(requests_per_minute=1), None, Limits(), NOON)
    with pytest.raises(LimitsUnavailableError, match="redis"):
        store.admit(rules, NOON, None, 60)
    store.settle(rules, NOON, 5, "x")  # queued, never raised to a served request
    with pytest.raises(LimitsUnavailableError):
        store.flush()
    assert store.pending == 1  # kept for when Redis is back


def test_a_redis_that_forgot_the_scripts_is_given_them_again(redis_url: str) -> None:
    import redis

    store = RedisStore(redis_url)
    tid, limits = team(requests_per_minute=1)
    rules = rules_for(tid, limits, None, Limits(), NOON)
    redis.Redis.from_url(redis_url).script_flush()  # a restarted server keeps no scripts
    assert store.admit(rules, NOON, None, 60) is None
    assert store.admit(rules, NOON, None, 60) is not None


def test_a_charge_rides_on_the_next_admission_or_is_sent_after_a_linger(redis_url: str) -> None:
    """One round trip a request: a process's charges go with its next admission, applied
    before that request's own check; one no request picks up reaches Redis (and so every
    other replica) after `linger_s`, sent by the store's own thread."""
    import time

    import redis

    kid = str(uuid.uuid4())
    rules = rules_for("", Limits(), kid, Limits(tokens_per_day=10), NOON)
    pod_a, pod_b = RedisStore(redis_url, linger_s=0.05), RedisStore(redis_url, linger_s=60)
    server = redis.Redis.from_url(redis_url)
    pod_a.settle(rules, NOON, 6, None)
    pod_a.settle(rules, NOON, 6, None)
    assert pod_a.pending == 2
    deadline = time.monotonic() + 10
    while pod_b.admit(rules, NOON, None, 60) is None:  # until pod A's thread sent them
        assert time.monotonic() < deadline, "the charges never reached Redis"
        time.sleep(0.01)
    assert pod_a.pending == 0 and int(server.get(rules[0].key) or 0) == 12
    # Pod B's own charge is not sent by a thread for a minute, but its next check has it.
    kid = str(uuid.uuid4())
    rules = rules_for("", Limits(), kid, Limits(tokens_per_day=10), NOON)
    pod_b.settle(rules, NOON, 10, None)
    assert server.get(rules[0].key) is None
    refused = pod_b.admit(rules, NOON, None, 60)
    assert refused is not None and refused.rule.name == "key.tokens_per_day"
    assert pod_b.pending == 0 and int(server.get(rules[0].key)) == 10


def test_charges_wait_for_a_redis_that_is_away_and_only_the_oldest_are_dropped(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis

    from charter.metering import limits
    from tests.processes import RedisServer

    monkeypatch.setattr(limits, "MAX_PENDING", 3)
    dropped: list[int] = []
    server = RedisServer()  # not started yet: away
    store = RedisStore(server.url, timeout_s=0.2, linger_s=60, on_uncharged=dropped.append)
    kid = str(uuid.uuid4())
    rules = rules_for("", Limits(), kid, Limits(tokens_per_day=10**6), NOON)
    for tokens in (1, 2, 3, 4, 5):
        store.settle(rules, NOON, tokens, None)
    with pytest.raises(LimitsUnavailableError):
        store.admit(rules, NOON, None, 60)  # the request is refused or served unchecked
    assert store.pending == 3 and dropped == [2]  # 1 and 2 dropped, and said so
    server.start()  # Redis is back
    try:
        store.flush()
        assert store.pending == 0
        assert int(redis.Redis.from_url(server.url).get(rules[0].key)) == 3 + 4 + 5
        server.kill()  # a connection the store kept dies with its server: a new one is made
        server.start()
        assert store.admit(rules, NOON, None, 60) is None
    finally:
        server.kill()
