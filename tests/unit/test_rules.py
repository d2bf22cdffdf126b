"""The pure rules, without a database: lifecycle, four eyes, region order, quota,
read-cache freshness and verdict-cache validity."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from charter.dispatch.balance import only_regional, regions_in_order
from charter.identifiers import epoch
from charter.metering.quota import admits, quota_day, seconds_until_reset
from charter.policy.cache import VerdictCache
from charter.policy.engine import Finding, Verdict
from charter.readcache import ReadCache, still_current
from charter.registry.rules import (
    EXPIRABLE,
    SYSTEM_ACTIONS,
    TRANSITIONS,
    allowed_actions,
    four_eyes_ok,
    next_state,
)

STATES = ("draft", "submitted", "approved", "rejected", "deprecated", "revoked", "expired")
ACTIONS = ("submit", "approve", "reject", "deprecate", "revoke", "expire")


# --- lifecycle ---------------------------------------------------------------------------

def test_the_lifecycle_is_exactly_its_table() -> None:
    allowed = {(s, a): next_state(s, a) for s in STATES for a in ACTIONS
               if next_state(s, a) is not None}
    assert allowed == {
        ("draft", "submit"): "submitted",
        ("submitted", "approve"): "approved",
        ("submitted", "reject"): "rejected",
        ("approved", "deprecate"): "deprecated",
        ("approved", "revoke"): "revoked",
        ("approved", "expire"): "expired",
        ("deprecated", "expire"): "expired",
    }
    with pytest.raises(TypeError):
        TRANSITIONS[("draft", "approve")] = "approved"  # type: ignore[index]


@pytest.mark.parametrize("state", ["rejected", "revoked", "expired"])
def test_final_states_lead_nowhere(state: str) -> None:
    assert all(next_state(state, a) is None for a in ACTIONS)
    assert allowed_actions(state) == []


def test_callers_are_never_offered_the_systems_actions() -> None:
    assert allowed_actions("approved") == ["deprecate", "revoke"]
    assert allowed_actions("deprecated") == []
    assert allowed_actions("submitted") == ["approve", "reject"]
    assert SYSTEM_ACTIONS == {"expire"} and EXPIRABLE == ("approved", "deprecated")


def test_nothing_reaches_approved_but_an_approval() -> None:
    assert [k for k, v in TRANSITIONS.items() if v == "approved"] == [("submitted", "approve")]


# --- four eyes ---------------------------------------------------------------------------

def test_four_eyes() -> None:
    assert four_eyes_ok("carol", "alice", "bob")
    assert not four_eyes_ok("alice", "alice", "bob")  # the author
    assert not four_eyes_ok("bob", "alice", "bob")  # the submitter
    assert four_eyes_ok("carol", "alice", None)  # not submitted yet
    assert not four_eyes_ok("alice", "alice", None)


# --- region order ------------------------------------------------------------------------

@dataclass(frozen=True)
class N:
    id: str
    region: str


def test_regions_least_busy_first_nodes_least_busy_first() -> None:
    nodes = [N("a1", "eu-central"), N("a2", "eu-central"), N("b1", "eu-west"),
             N("c1", "eu-north")]
    busy = {"a1": 5, "a2": 3, "b1": 1, "c1": 4}.__getitem__
    assert [(r, [n.id for n in ns]) for r, ns in regions_in_order(nodes, busy)] == [
        ("eu-west", ["b1"]), ("eu-central", ["a2", "a1"]), ("eu-north", ["c1"])]


def test_ties_keep_the_order_given_without_a_tie_breaker() -> None:
    nodes = [N("x", "r2"), N("y", "r1"), N("z", "r2")]
    order = regions_in_order(nodes, lambda _id: 0, tie=None)
    assert [(r, [n.id for n in ns]) for r, ns in order] == [("r2", ["x", "z"]), ("r1", ["y"])]


def test_ties_are_broken_at_random_so_idle_nodes_share_sequential_traffic() -> None:
    nodes = [N("x", "r1"), N("y", "r1"), N("z", "r2")]
    firsts = [regions_in_order(nodes, lambda _id: 0)[0][1][0].id for _ in range(3000)]
    shares = {n: firsts.count(n) / len(firsts) for n in ("x", "y", "z")}
    assert all(0.25 < share < 0.42 for share in shares.values()), shares
    busy = {"x": 1, "y": 0, "z": 1}  # but never ahead of a less busy node
    assert {regions_in_order(nodes, busy.__getitem__)[0][1][0].id for _ in range(200)} == {"y"}


def test_only_regional_violations_allow_another_region() -> None:
    regional = frozenset({"residency_violation", "node_not_attested"})
    assert only_regional(["residency_violation"], regional)
    assert only_regional(["node_not_attested", "residency_violation"], regional)
    assert not only_regional(["residency_violation", "approval_expired"], regional)
    assert not only_regional(["residency_violation"], frozenset())  # no data: no fallback


def test_the_bundled_policy_data_names_the_regional_violations() -> None:
    from charter.policy.bundle import PolicyBundle, default_policy_dir
    from charter.policy.engine import InProcessEngine
    from charter.policy.service import Policies

    policies = Policies(InProcessEngine(PolicyBundle.load(default_policy_dir())))
    assert policies.regional_violations == {"residency_violation", "region_not_approved",
                                            "team_region_not_entitled", "node_not_attested",
                                            "content_residency_violation"}


# --- quota -------------------------------------------------------------------------------

@given(used=st.integers(0, 10**6), asked=st.integers(0, 10**3), limit=st.integers(0, 10**6))
def test_quota_admits_exactly_up_to_the_limit(used: int, asked: int, limit: int) -> None:
    assert admits(used, asked, limit) == (used + asked <= limit)
    assert admits(used, asked, None)


def test_a_quota_day_is_a_utc_day() -> None:
    late = datetime(2026, 12, 6, 23, 59, 59, 500_000, tzinfo=UTC)
    assert seconds_until_reset(late) == 1
    assert seconds_until_reset(datetime(2026, 12, 6, tzinfo=UTC)) == 86_401
    paris_morning = datetime(2026, 12, 7, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert quota_day(paris_morning).isoformat() == "2026-12-06"  # still the 6th in UTC


# --- read-cache freshness ----------------------------------------------------------------

def test_a_decision_commits_only_on_the_generation_it_was_made_on() -> None:
    assert still_current(7, 7)
    assert not still_current(6, 7)
    assert not still_current(8, 7)
    assert still_current(None, 7)  # nothing was read through the cache


def test_the_cache_never_serves_an_older_generation() -> None:
    cache = ReadCache()
    assert cache.cached(3, "k", lambda: "three") == "three"
    assert cache.cached(2, "k", lambda: "two") == "two"  # an older reader: not cached
    assert cache.cached(3, "k", lambda: "again") == "three"
    assert cache.cached(4, "k", lambda: "four") == "four"
    assert cache.latest == 4


# --- verdict-cache validity --------------------------------------------------------------

EXPIRES = datetime(2027, 1, 1, tzinfo=UTC)


def _doc(now: datetime, expires: object = epoch(EXPIRES)) -> dict[str, object]:
    return {"now": epoch(now),
            "version": {"id": "v", "approval": {"expires_at": expires}},
            "request": {"data_class": "internal"}}


def test_a_verdict_holds_on_its_side_of_the_expiry_only() -> None:
    cache = VerdictCache()
    verdict = Verdict(True, (), (), 0.1)
    before = _doc(EXPIRES - timedelta(days=2))
    key = VerdictCache.key("rev", "dispatch", before)
    assert key is not None
    cache.put(key, before, verdict)
    assert cache.get(key, _doc(EXPIRES - timedelta(seconds=1))) is verdict
    assert cache.get(key, _doc(EXPIRES)) is None  # at the expiry: decided again
    assert cache.get(key, _doc(EXPIRES + timedelta(days=1))) is None


def test_a_verdict_after_the_expiry_holds_after_it_only() -> None:
    cache = VerdictCache()
    denied = Verdict(False, (Finding("approval_expired", "expired"),), (), 0.1)
    after = _doc(EXPIRES + timedelta(days=1))
    key = VerdictCache.key("rev", "dispatch", after)
    assert key is not None
    cache.put(key, after, denied)
    assert cache.get(key, _doc(EXPIRES)) is denied
    assert cache.get(key, _doc(EXPIRES - timedelta(seconds=1))) is None


def test_what_cannot_be_read_as_the_policy_reads_it_is_never_cached() -> None:
    cache = VerdictCache()
    odd = _doc(EXPIRES - timedelta(days=1), expires="2027-01-01T00:00:00Z")  # not seconds
    key = VerdictCache.key("rev", "dispatch", odd)
    assert key is not None
    cache.put(key, odd, Verdict(True, (), (), 0.1))
    assert cache.get(key, odd) is None
    assert VerdictCache.key("rev", "admission", odd) is None  # only dispatch reads the clock
    for now in ("2026-12-31T00:00:00Z", 1.5e9, True, -1, 253402300800):
        assert VerdictCache.key("rev", "dispatch", {**odd, "now": now}) is None, now


def test_the_key_names_the_revision_and_everything_but_the_clock() -> None:
    now = EXPIRES - timedelta(days=1)
    a = VerdictCache.key("rev", "dispatch", _doc(now))
    assert a == VerdictCache.key("rev", "dispatch", _doc(now + timedelta(hours=1)))
    assert a != VerdictCache.key("rev2", "dispatch", _doc(now))
    assert a != VerdictCache.key("rev", "dispatch", {**_doc(now), "request": {"data_class": "x"}})
