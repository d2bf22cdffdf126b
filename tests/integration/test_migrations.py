"""Migrations up and down on PostgreSQL, models match migrations, old schemas refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from charter import migrate
from charter.db import Base
from charter.errors import SchemaOutdatedError
from charter.settings import Settings
from tests.conftest import SECRET

TABLES = {"audit_events", "models", "model_versions", "model_files", "approval_decisions",
          "users", "user_roles", "api_keys", "policy_exceptions", "teams", "team_members",
          "console_sessions", "nodes", "deployments", "deployment_nodes", "usage_counters",
          "change_generation", "files", "batches", "batch_lines", "audit_checkpoints",
          "audit_tree_nodes", "audit_keys", "audit_purged", "audit_cosignatures",
          "audit_shipments", "prices", "evaluations", "captures", "capture_records",
          "inspection_counts", "inspection_rollup", "scim_groups", "scim_group_members",
          "alembic_version"}


def test_every_revision_steps_down_and_up_again(empty_pg: str) -> None:
    from alembic.script import ScriptDirectory

    revisions = [r.revision for r in
                 reversed(list(ScriptDirectory(str(migrate.migrations_dir())).walk_revisions()))]
    assert revisions[0] == "0001" and len(revisions) >= 2
    engine = create_engine(empty_pg)
    try:
        for rev in revisions:
            migrate.upgrade(empty_pg, rev)
            before = set(inspect(engine).get_table_names())
            migrate.downgrade(empty_pg, "-1")
            migrate.upgrade(empty_pg, rev)
            assert set(inspect(engine).get_table_names()) == before, rev
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_pg: str) -> None:
    engine = create_engine(empty_pg)
    try:
        migrate.upgrade(empty_pg)
        assert set(inspect(engine).get_table_names()) == TABLES
        migrate.downgrade(empty_pg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        with engine.connect() as conn:
            functions = conn.exec_driver_sql(
                "SELECT proname FROM pg_proc WHERE proname = 'charter_audit_append_only'"
            ).all()
        assert functions == []
        migrate.upgrade(empty_pg)
        assert set(inspect(engine).get_table_names()) == TABLES
    finally:
        engine.dispose()


def test_models_match_migrations(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], "a model changed without an Alembic revision: " + repr(diff)
    finally:
        engine.dispose()


def test_app_refuses_an_old_schema(empty_pg: str) -> None:
    from tests.runtimes import app_for

    settings = Settings.from_env({}, database_url=empty_pg, secret_key=SECRET)
    with pytest.raises(SchemaOutdatedError) as info:
        app_for(settings)
    assert "charter db upgrade" in info.value.message
    assert info.value.details["fix"] == "charter db upgrade"


def test_readyz_reports_schema(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json()["checks"]["schema"]["current"] is True


def test_sqlite_upgrade_and_triggers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sqlite3

    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate.upgrade(url)
    conn = sqlite3.connect(tmp_path / "c.db")
    conn.execute(
        "INSERT INTO audit_events (seq, ts, actor, action, target_type, target_id, outcome,"
        " details, request_id, prev_hash, hash) VALUES (1, '2026-01-01', 'a', 'b', 'c', 'd',"
        " 'success', '{}', NULL, 'p', 'h')")
    conn.commit()
    for stmt in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(stmt)
    conn.close()
    migrate.downgrade(url, "base")


# Every table whose rows feed the read cache (migration 0005): each change must advance it.
CACHED = ("users", "user_roles", "api_keys", "teams", "team_members", "models",
          "model_versions", "approval_decisions", "policy_exceptions", "nodes",
          "deployments", "deployment_nodes")


def test_the_embedded_database_keeps_its_generation_triggers_at_every_revision(  # type: ignore[no-untyped-def]
        tmp_path) -> None:
    """SQLite's batch copies drop a table's triggers; a migration that uses one must make
    them again (0022 did not, until 0024), or the cache misses changes to that table."""
    import sqlite3

    from alembic.script import ScriptDirectory

    url = f"sqlite:///{tmp_path / 't.db'}"
    revisions = [r.revision for r in reversed(list(
        ScriptDirectory.from_config(migrate.alembic_config(url)).walk_revisions()))]
    for revision in revisions[revisions.index("0005"):]:
        migrate.upgrade(url, revision)
        with sqlite3.connect(tmp_path / "t.db") as conn:
            have = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        missing = [f"{t}_bump_{e}" for t in CACHED for e in ("insert", "update", "delete")
                   if f"{t}_bump_{e}" not in have]
        assert not missing, (revision, missing)
    migrate.downgrade(url, "0021")
    with sqlite3.connect(tmp_path / "t.db") as conn:
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = "
                                           "'trigger'")}
    assert {f"model_versions_bump_{e}" for e in ("insert", "update", "delete")} <= have


# Columns whose updates feed no cached read (migration 0006): they do not clear the cache.
BOOKKEEPING = {"api_keys": {"last_used_at"}, "nodes": {"last_probe_at", "last_error"}}


def test_every_other_column_of_keys_and_nodes_advances_the_generation(pg_conn) -> None:  # type: ignore[no-untyped-def]
    """A column added later must join the trigger's list, or the cache would miss it."""
    for table, skipped in BOOKKEEPING.items():
        watched = {r[0] for r in pg_conn.execute(
            "SELECT event_object_column FROM information_schema.triggered_update_columns "
            "WHERE event_object_table = %s AND trigger_name = %s",
            (table, f"{table}_bump_generation_update"))}
        columns = {c.name for c in Base.metadata.tables[table].columns}
        assert watched == columns - skipped, table


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_bookkeeping_updates_keep_the_generation(backend, database_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = database_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'g.db'}"
    if backend == "sqlite":
        migrate.upgrade(url)
    engine = create_engine(url)

    def generation(conn) -> int:  # type: ignore[no-untyped-def]
        return conn.exec_driver_sql("SELECT value FROM change_generation").scalar_one()

    try:
        with engine.begin() as conn:
            start = generation(conn)
            conn.exec_driver_sql("UPDATE api_keys SET last_used_at = CURRENT_TIMESTAMP")
            conn.exec_driver_sql("UPDATE nodes SET last_probe_at = CURRENT_TIMESTAMP, "
                                 "last_error = 'x'")
        with engine.begin() as conn:
            assert generation(conn) == start
            conn.exec_driver_sql("UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP")
            after_keys = generation(conn)
            conn.exec_driver_sql("UPDATE nodes SET healthy = healthy")
            after_nodes = generation(conn)
        if backend == "postgresql":  # statement triggers: they fire on empty tables too
            assert after_nodes == after_keys + 1 == start + 2
        else:  # row triggers fire on no row here: check what they watch instead
            with engine.connect() as conn:
                sql = dict(conn.exec_driver_sql(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'").all())
            for table, skipped in BOOKKEEPING.items():
                body = sql[f"{table}_bump_update"]
                watched = set(body.split(" UPDATE OF ")[1].split(" ON ")[0].split(", "))
                columns = {c.name for c in Base.metadata.tables[table].columns}
                assert watched == columns - skipped, table
    finally:
        engine.dispose()


def test_0013_fills_the_editors_of_existing_versions(client, make_person, database_url) -> None:  # type: ignore[no-untyped-def]
    """A database that had versions before 0013: their editors come back from what is
    known, the creator, the `version.update` events' actors and the submitter."""
    import psycopg

    from tests.integration.test_registry_api import _draft

    creator, editor, submitter = (make_person("steward"), make_person("steward"),
                                  make_person("steward"))
    v = _draft(client, creator)
    r = client.patch(f"/api/v1/versions/{v['id']}", headers=editor.headers,
                     json={"intended_use": "edited", "row_version": 1})
    assert r.status_code == 200
    # (the submitter edits nothing; submitting is its part)
    client.post(f"/api/v1/versions/{v['id']}/submit", headers=submitter.headers, json={})
    expected = [creator.actor.user_id, editor.actor.user_id, submitter.actor.user_id]
    url = make_url(database_url).set(drivername="postgresql").render_as_string(
        hide_password=False)

    def editors() -> list[str]:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT editor_user_ids FROM model_versions WHERE id = %s",
                               (v["id"],)).fetchone()
        assert row is not None
        return list(row[0])

    assert editors() == expected
    migrate.downgrade(database_url, "0012")
    migrate.upgrade(database_url)
    assert editors() == expected
