"""`charter ...` commands against PostgreSQL, run in-process through click's CliRunner."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import structlog
from alembic.script import ScriptDirectory
from click.testing import CliRunner, Result

from charter import migrate
from charter.audit.service import head
from charter.cli import main
from charter.devnode.tinymodel import build_tiny_model
from charter.identity.service import authenticate_api_key
from charter.registry import service
from charter.runtime import Runtime

REPO = Path(__file__).resolve().parents[2]
REVISION = "fe8a4ea1ffedaf415f4da2f062534de366a451e6"
Invoke = Callable[..., Result]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "charter-tiny-llama")


def _runner(monkeypatch: pytest.MonkeyPatch, url: str) -> Invoke:
    # Settings refuse unknown CHARTER_* variables, so the test's own ones must not leak in.
    for key in list(os.environ):
        if key.startswith("CHARTER_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CHARTER_DATABASE_URL", url)
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def cli(runtime: Runtime, database_url: str,
        monkeypatch: pytest.MonkeyPatch) -> Iterator[Invoke]:
    """The CLI on the test's database; the test's own checks run on `runtime`."""
    yield _runner(monkeypatch, database_url)
    structlog.reset_defaults()  # the CLI bound logging to CliRunner's (now closed) stderr


@pytest.fixture
def empty_cli(empty_pg: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Invoke]:
    yield _runner(monkeypatch, empty_pg)
    structlog.reset_defaults()


def _head_revision() -> str:
    rev = ScriptDirectory(str(migrate.migrations_dir())).get_current_head()
    assert rev
    return rev


# --- db -------------------------------------------------------------------------------
def test_db_current_on_migrated_database(cli: Invoke, pg_conn: psycopg.Connection) -> None:
    stored = pg_conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert stored is not None and stored[0] == _head_revision()
    result = cli("db", "current")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"database: {stored[0]}", f"code:     {stored[0]}"]


def test_db_current_on_empty_database(empty_cli: Invoke) -> None:
    result = empty_cli("db", "current")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[:2] == ["database: (empty)", f"code:     {_head_revision()}"]
    assert "`charter db upgrade`" in lines[2]


def test_commands_refuse_an_outdated_schema(empty_cli: Invoke) -> None:
    result = empty_cli("users", "bootstrap", "admin")
    assert result.exit_code == 2, result.output
    assert "schema_outdated" in result.output
    assert "charter db upgrade" in result.output
    assert "chk_" not in result.stdout


# --- users ----------------------------------------------------------------------------
def test_bootstrap_prints_a_working_admin_key(cli: Invoke) -> None:
    result = cli("users", "bootstrap", "admin")
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    assert re.fullmatch(r"chk_[0-9a-f]{16}_\S+", token), result.stdout
    actor = authenticate_api_key(token)
    assert actor.username == "admin" and actor.roles == frozenset({"admin"})
    assert "shown once" in result.stderr

    again = cli("users", "bootstrap", "second-admin")
    assert again.exit_code == 2
    assert "already_bootstrapped" in again.output and "chk_" not in again.stdout


def test_scim_credential_issues_and_rotates_the_providers_key(cli: Invoke) -> None:
    first = cli("scim", "credential", "--name", "okta")
    assert first.exit_code == 0, first.output
    actor = authenticate_api_key(first.stdout.strip())
    assert (actor.username, actor.kind, actor.roles) == ("scim-okta", "provisioner",
                                                         frozenset())
    assert "opens /scim/v2 only" in first.stderr
    second = cli("scim", "credential", "--name", "okta")  # rotation: a second key
    assert second.exit_code == 0 and second.stdout.strip() != first.stdout.strip()
    assert authenticate_api_key(second.stdout.strip()).user_id == actor.user_id
    bad = cli("scim", "credential", "--name", "Not Valid")
    assert bad.exit_code != 0 and "chk_" not in bad.stdout


# --- models ---------------------------------------------------------------------------
def _import(cli: Invoke, directory: Path, as_user: str, *extra: str) -> Result:
    return cli("models", "import", str(directory), "--as", as_user, "--model", "m",
               "--label", "1", *extra)


NEW_MODEL = ("--publisher", "p", "--source-repo", "p/m", "--revision", REVISION,
             "--license", "apache-2.0")


def test_models_import_creates_a_draft(cli: Invoke, tiny: Path, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    result = _import(cli, tiny, steward.actor.username, *NEW_MODEL)
    assert result.exit_code == 0, result.output
    version_id = result.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", version_id), result.stdout

    version = service.get_version(version_id)
    files = sorted(tiny.iterdir())
    assert version.state == "draft" and version.model_name == "m"
    assert version.model.publisher == "p" and version.model.source_repo == "p/m"
    assert version.source_revision == REVISION
    assert version.license_declared == "apache-2.0" and version.license_card == "apache-2.0"
    assert len(version.files) == len(files) == 6
    assert {f.path: f.sha256 for f in version.files} == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }
    assert version.created_by_user_id == steward.actor.user_id
    assert f"draft m 1: 6 files, {version.total_bytes} bytes" in result.stderr


def test_models_attach_evaluation(cli: Invoke, tiny: Path, make_person, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A results file attached from the command line: its id on stdout, the metrics shown;
    one about another model refused with its code and exit status 2."""
    import json

    steward = make_person("steward")
    version_id = _import(cli, tiny, steward.actor.username, *NEW_MODEL).stdout.strip()
    results = tmp_path / "results_2026-12-06T10-00-00.json"
    results.write_text(json.dumps({
        "results": {"arc_easy": {"acc,none": 0.61, "acc_stderr,none": 0.01}},
        "config": {"model": "hf", "model_args": f"pretrained=p/m,revision={REVISION}"}}))
    result = cli("models", "attach-evaluation", version_id, str(results),
                 "--as", steward.actor.username)
    assert result.exit_code == 0, result.output
    [evaluation] = service.list_evaluations(version_id)
    assert result.stdout.strip() == evaluation.id
    assert evaluation.file_name == results.name and "0.6100" in result.stderr
    results.write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.61}},
                                   "model_name": "other/model"}))
    result = cli("models", "attach-evaluation", version_id, str(results),
                 "--as", steward.actor.username)
    assert result.exit_code == 2 and "evaluation_model_mismatch" in result.output


def test_models_import_as_unknown_user(cli: Invoke, tiny: Path, configured) -> None:  # type: ignore[no-untyped-def]
    before = head()
    result = _import(cli, tiny, "nobody", *NEW_MODEL)
    assert result.exit_code == 2, result.output
    assert "user_not_found" in result.output and "nobody" in result.output
    assert result.stdout == ""
    assert service.list_models() == [] and head() == before


def test_models_import_refusals_leave_nothing(cli: Invoke, tiny: Path, make_person) -> None:  # type: ignore[no-untyped-def]
    steward = make_person("steward")
    before = head()
    result = _import(cli, tiny, steward.actor.username)  # new model, no publisher
    assert result.exit_code == 2, result.output
    assert "model_details_missing" in result.output

    result = _import(cli, tiny, steward.actor.username, "--publisher", "p",
                     "--source-repo", "p/m", "--license", "Apache 2.0")
    assert result.exit_code == 2, result.output
    assert "validation_failed" in result.output and "license_declared" in result.output
    assert service.list_models() == [] and head() == before


# --- audit ----------------------------------------------------------------------------
def test_audit_verify_and_tampering(cli: Invoke, pg_conn: psycopg.Connection) -> None:
    assert cli("users", "bootstrap", "admin").exit_code == 0  # user.create, api_key.create
    last = pg_conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
    seq, head_hash = last.fetchone()  # type: ignore[misc]
    assert seq == 2

    result = cli("audit", "verify")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: 2 events, head {head_hash}\n"
    assert re.fullmatch(r"ok: \d+ events, head [0-9a-f]{64}\n", result.stdout)

    pg_conn.execute("SET session_replication_role = replica")
    pg_conn.execute("""UPDATE audit_events SET details = '{"x":1}' WHERE seq = 2""")
    pg_conn.execute("SET session_replication_role = DEFAULT")

    result = cli("audit", "verify")
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("BROKEN at event 2 (edited): ")
    assert lines[1] == "1 events verified before it"


# --- config ---------------------------------------------------------------------------
def test_config_docs_match_the_committed_file() -> None:
    committed = REPO / "docs" / "configuration.md"
    assert committed.is_file(), "run `charter config docs > docs/configuration.md`"
    result = CliRunner().invoke(main, ["config", "docs"], catch_exceptions=False)
    assert result.exit_code == 0
    assert result.stdout == committed.read_text(encoding="utf-8"), (
        "docs/configuration.md is stale: run `charter config docs > docs/configuration.md`"
    )
