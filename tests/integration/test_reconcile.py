"""Reconciliation with a directory export, for providers without SCIM: the provider's
people the export no longer lists are deprovisioned, local accounts are left alone, a dry
run changes nothing, and a truncated export changes nothing and is raised."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from charter.audit.service import EventFilter, list_events


def _people(n: int) -> list[Any]:
    """`n` people as a first SSO sign-in makes them (source sso)."""
    from charter.identity.sso import provision
    from charter.settings import Settings

    settings = Settings.from_env({}, secret_key="x" * 40)
    return [provision(settings, {"iss": "https://idp.example", "sub": f"sub-{i}",
                                 "preferred_username": f"person{i}@example.com",
                                 "email": f"person{i}@example.com"}, via="api")
            for i in range(n)]


def _active(pg_conn: Any) -> set[str]:
    return {r[0] for r in pg_conn.execute("SELECT username FROM users WHERE active")}


def test_those_gone_from_the_export_lose_access(configured, make_person, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                pg_conn) -> None:
    from charter.identity.reconcile import reconcile

    people = _people(12)
    local = make_person("admin")  # an account an admin made: not the provider's to end
    export = tmp_path / "users.csv"
    lines = ["userPrincipalName,displayName,accountEnabled"]
    lines += [f"{p.username},Person,TRUE" for p in people[:10]]
    lines.append(f"{people[10].username},Person,FALSE")  # disabled in the directory
    export.write_text("\n".join(lines) + "\n")  # people[11] is gone altogether

    dry = reconcile(str(export), max_removals=0.2, dry_run=True)
    assert dry.ended == sorted([people[10].username, people[11].username])
    assert {p.username for p in people} <= _active(pg_conn)  # nothing changed

    done = reconcile(str(export), max_removals=0.2)
    assert sorted(done.ended) == sorted([people[10].username, people[11].username])
    assert (done.listed, done.checked) == (10, 12)
    active = _active(pg_conn)
    assert people[11].username not in active and people[0].username in active
    assert local.actor.username in active
    ended = [e for e in list_events(EventFilter(action="user.deprovision"))
             if e.details["via"] == "reconcile"]
    assert len(ended) == 2 and ended[0].actor == "system:charter"
    run = list_events(EventFilter(action="directory.reconcile"))[-1]
    assert run.details["ended"] == done.ended and run.details["sha256"].startswith("sha256:")
    assert reconcile(str(export), max_removals=0.2).ended == []  # again: nothing more


@pytest.mark.parametrize("content", ["userPrincipalName\n", "[]", ""])
def test_an_export_that_would_end_too_many_changes_nothing(configured, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                           pg_conn, content: str) -> None:
    from charter.identity.reconcile import reconcile

    people = _people(5)
    export = tmp_path / "users.json"
    export.write_text(content)
    done = reconcile(str(export), max_removals=0.1)
    assert done.refused is not None and done.ended  # said who, changed nothing
    assert {p.username for p in people} <= _active(pg_conn)
    raised = list_events(EventFilter(action="directory.reconcile"))[-1]
    assert raised.outcome == "failure" and raised.details["refused"] == done.refused
    # Over the brake, not empty: one of five gone is 20% > 10%.
    export.write_text(json.dumps([{"mail": p.username} for p in people[:4]]))
    assert "more than 10%" in (reconcile(str(export), max_removals=0.1).refused or "")
    assert {p.username for p in people} <= _active(pg_conn)


def test_the_cli_runs_it_by_hand(configured, tmp_path: Path, pg_conn, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from charter.cli import main
    from tests.conftest import SECRET

    people = _people(3)
    export = tmp_path / "users.jsonl"
    export.write_text("\n".join(json.dumps({"userName": p.username}) for p in people[:2]))
    monkeypatch.setenv("CHARTER_DATABASE_URL", configured.database_url)
    monkeypatch.setenv("CHARTER_SECRET_KEY", SECRET)
    runner = CliRunner()
    dry = runner.invoke(main, ["users", "reconcile", "--file", str(export), "--dry-run"])
    assert dry.exit_code == 3, dry.output  # one of three is over the default 10% brake
    assert people[2].username in dry.stdout and "REFUSED" in dry.output
    monkeypatch.setenv("CHARTER_DIRECTORY_MAX_REMOVALS", "0.5")
    done = runner.invoke(main, ["users", "reconcile", "--file", str(export)])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == people[2].username
    assert people[2].username not in _active(pg_conn)
