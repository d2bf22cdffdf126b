"""The per-process read cache: any committed change to a cached table invalidates it."""

from __future__ import annotations

from charter.snapshot import Snapshot, generation_var, read_generation


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
    snap = Snapshot()
    calls = []

    def load(value: str) -> str:
        calls.append(value)
        return value

    token = generation_var.set(5)
    try:
        assert snap.cached("k", lambda: load("a")) == "a"
        assert snap.cached("k", lambda: load("b")) == "a"  # same generation: cached
        generation_var.set(6)
        assert snap.cached("k", lambda: load("c")) == "c"  # newer generation: reloaded
        generation_var.set(5)
        assert snap.cached("k", lambda: load("d")) == "d"  # an older reader never caches
        generation_var.set(6)
        assert snap.cached("k", lambda: load("e")) == "c"
    finally:
        generation_var.reset(token)
    assert snap.cached("k", lambda: load("f")) == "f"  # outside a request: always fresh
    assert calls == ["a", "c", "d", "f"]
