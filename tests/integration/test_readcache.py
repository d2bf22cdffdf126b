"""The per-process read cache: any committed change to a cached table invalidates it."""

from __future__ import annotations

from charter.readcache import ReadCache
from charter.readcache import current_generation as read_generation


def test_triggers_advance_the_generation_on_every_change(configured, make_person,  # type: ignore[no-untyped-def]
                                                         pg_conn) -> None:
    before = read_generation()
    person = make_person("user")
    after_create = read_generation()
    assert after_create > before
    pg_conn.execute("UPDATE users SET display_name = 'x' WHERE id = %s",
                    (person.actor.user_id,))  # even a change made behind Charter's back
    assert read_generation() > after_create
    pg_conn.execute("SELECT 1 FROM audit_events LIMIT 1")  # reads change nothing
    assert read_generation() == after_create + 1


def test_entries_live_for_one_generation_only() -> None:
    snap = ReadCache()
    calls = []

    def load(value: str) -> str:
        calls.append(value)
        return value

    assert snap.cached(5, "k", lambda: load("a")) == "a"
    assert snap.cached(5, "k", lambda: load("b")) == "a"  # same generation: cached
    assert snap.cached(6, "k", lambda: load("c")) == "c"  # newer generation: reloaded
    assert snap.cached(5, "k", lambda: load("d")) == "d"  # an older reader never caches
    assert snap.cached(6, "k", lambda: load("e")) == "c"
    assert snap.cached(None, "k", lambda: load("f")) == "f"  # no generation: always fresh
    assert calls == ["a", "c", "d", "f"]
