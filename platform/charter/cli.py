"""`charter ...` commands."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import click
import structlog
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from charter import migrate
from charter.audit.bundle import Selection
from charter.audit.checkpoint import Signer
from charter.audit.checkpoints import generate_key, issue, load_signers
from charter.audit.seal import DEFAULT_INTERVAL_S, make_seal_keys, verifier_from_file, write_new
from charter.audit.service import export_bundle, verify_chain
from charter.audit.verify import SealError
from charter.clikit import (
    CharterGroup,
    actor_named,
    command_runtime,
    console,
    settings_from_env,
)
from charter.db import Database
from charter.devnode.server import create_node_app, serve_node
from charter.errors import CharterError, ConfigurationError
from charter.identity.service import bootstrap_admin
from charter.migrate import schema_status
from charter.policy.bundle import PolicyBundle, default_policy_dir
from charter.policy.testing import run_rego_tests
from charter.registry.importer import ImportOptions, import_directory
from charter.runtime import Runtime
from charter.settings import settings_markdown


@click.group(cls=CharterGroup)
def main() -> None:
    """Charter: govern which open models serve requests, and prove it."""


# --- database -----------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Migrate the database up to REVISION."""
    settings = settings_from_env()
    migrate.upgrade(settings.database_url, revision)
    console.print(f"database at {revision}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION (`base` removes everything)."""
    settings = settings_from_env()
    migrate.downgrade(settings.database_url, revision)
    console.print(f"database at {revision}")


@db.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this code expects."""
    database = Database.from_settings(settings_from_env())
    try:
        status = schema_status(database.engine)
    finally:
        database.dispose()
    click.echo(f"database: {status.database_revision or '(empty)'}")
    click.echo(f"code:     {status.code_revision}")
    if not status.current:
        click.echo(status.message)
        sys.exit(1)


# --- users ----------------------------------------------------------------------------
@main.group()
def users() -> None:
    """Users and API keys."""


@users.command("bootstrap")
@click.argument("username")
def users_bootstrap(username: str) -> None:
    """Create the first admin and print its API key (shown once)."""
    command_runtime()
    issued = bootstrap_admin(username)
    click.echo(issued.token)
    console.print(f"admin {username!r} created; the key above is shown once")


@main.group()
def scim() -> None:
    """The identity provider's SCIM provisioning (/scim/v2)."""


@scim.command("credential")
@click.option("--name", required=True, help="The identity provider (e.g. okta, entra).")
def scim_credential(name: str) -> None:
    """Issue the provider's SCIM bearer credential (shown once); run again to rotate it."""
    from charter.identity.service import scim_credential as issue

    command_runtime()
    issued = issue(name)
    click.echo(issued.token)
    console.print(f"SCIM credential for {name!r} (user scim-{name}): the key above is shown "
                  "once and opens /scim/v2 only; revoke the previous one once the provider "
                  "uses this")


@users.command("reconcile")
@click.option("--file", "path", default=None,
              help="The directory export (default: CHARTER_DIRECTORY_FILE).")
@click.option("--dry-run", is_flag=True, help="Say who would be deprovisioned; change nothing.")
def users_reconcile(path: str | None, dry_run: bool) -> None:
    """Deprovision the identity provider's people its directory export no longer lists."""
    from charter.identity.reconcile import reconcile

    settings = command_runtime().settings
    done = reconcile(path or settings.directory_file,
                     max_removals=settings.directory_max_removals, dry_run=dry_run)
    for name in done.ended:
        click.echo(name)
    verb = "would end" if dry_run else "ended"
    console.print(f"{done.listed} listed, {done.checked} of the provider's people checked; "
                  f"{verb} {len(done.ended)}" + (f"; REFUSED: {done.refused}"
                                                  if done.refused else ""))
    if done.refused:
        raise SystemExit(3)


# --- models ---------------------------------------------------------------------------
@main.group()
def models() -> None:
    """The model registry."""


@models.command("import")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--as", "as_user", required=True, help="Username of the steward importing it.")
@click.option("--model", "model_name", required=True, help="Model family name.")
@click.option("--label", required=True, help="Version label, e.g. 1.0.")
@click.option("--publisher", help="Publisher (needed when the model is new).")
@click.option("--source-repo", help="Source repository id (needed when the model is new).")
@click.option("--revision", "source_revision", help="Pinned source revision (commit hash).")
@click.option("--license", "license_declared", help="License as the submitter declares it.")
@click.option("--intended-use", default="", help="What the model will be used for.")
@click.option("--risk-tier", type=click.Choice(["minimal", "limited", "high"]),
              default="limited", show_default=True)
@click.option("--storage-region", help="Region where the weights are stored.")
@click.option("--hosting-region", "hosting_regions", multiple=True,
              help="Region allowed to host the model (repeatable).")
@click.option("--base-version", "base_version_id",
              help="The registered version it derives from (an adapter's base, a "
                   "quantization's source): its id.")
@click.option("--task", type=click.Choice(["generation", "embedding"]),
              help="What it serves (default: its card's pipeline_tag says).")
def models_import(directory: Path, as_user: str, **options: object) -> None:
    """Describe DIRECTORY offline (config, card, digests) and create a draft version."""
    command_runtime()
    actor = actor_named(as_user)
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    with Progress(TextColumn("hashing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console) as bar:
        task = bar.add_task("hash", total=total)
        version, info = import_directory(
            actor, directory, ImportOptions(**options),  # type: ignore[arg-type]
            progress=lambda _path, n: bar.advance(task, n),
        )
    for warning in info.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    click.echo(version.id)
    console.print(
        f"draft {version.model_name} {version.label}: {len(version.files)} files, "
        f"{version.total_bytes} bytes, format {version.weight_format}"
        + (" [bold red](UNSAFE: pickle)[/]" if version.unsafe_weights else "")
        + (" [bold red](ships code its loaders would run)[/]" if version.custom_code else "")
    )


@models.command("evaluate")
@click.argument("version_id")
@click.option("--tasks", required=True,
              help="lm-eval-harness tasks, comma-separated (its registry or --include-path).")
@click.option("--as", "as_user", required=True, help="Username of the steward attaching it.")
@click.option("--gateway", default="http://127.0.0.1:8000", show_default=True,
              help="Charter's base URL: every prompt goes through its gateway.")
@click.option("--key", "api_key", envvar="OPENAI_API_KEY", required=True,
              help="The API key the evaluation runs as (env OPENAI_API_KEY, as OpenAI "
                   "clients read it); its team's entitlements, limits and audit apply.")
@click.option("--serving-name", help="Default: the version's active deployment.")
@click.option("--tokenizer", help="Default: CHARTER_TOKENIZERS_DIR/<model>/<label>.")
@click.option("--include-path", type=click.Path(exists=True, file_okay=False),
              help="A folder of task YAML files (local datasets).")
@click.option("--limit", type=float, help="Documents per task (a count, or a fraction < 1).")
@click.option("--num-fewshot", type=int)
def models_evaluate(version_id: str, tasks: str, as_user: str, **options: object) -> None:
    """Run lm-eval-harness on VERSION through Charter's own gateway (a governed, audited
    workload) and attach its results as evaluation evidence."""
    from charter.evaluate import EvaluateOptions, evaluate

    command_runtime()
    opts = EvaluateOptions(tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                           **options)  # type: ignore[arg-type]
    evaluation = evaluate(actor_named(as_user), version_id, opts)
    click.echo(evaluation.id)
    for m in evaluation.metrics:
        console.print(f"{m['task']} {m['metric']} ({m['filter']}): {m['value']:.4f}")


@models.command("attach-evaluation")
@click.argument("version_id")
@click.argument("results", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--as", "as_user", required=True, help="Username of the steward attaching it.")
@click.option("--format", "fmt", type=click.Choice(["lm-eval", "opencompass"]),
              help="The file's format (default: told by its content).")
@click.option("--column", help="An OpenCompass summary of several models: this version's.")
def models_attach_evaluation(version_id: str, results: Path, as_user: str, fmt: str | None,
                             column: str | None) -> None:
    """Attach RESULTS (lm-eval-harness's results JSON, an OpenCompass summary CSV) to a
    version as evaluation evidence; prints its id and the metrics read."""
    from pydantic import ValidationError
    from rich.table import Table

    from charter.errors import validation_failed
    from charter.registry.schemas import EvaluationIn
    from charter.registry.service import attach_evaluation

    command_runtime()
    try:
        given = EvaluationIn.model_validate(
            {"content": results.read_text(encoding="utf-8"), "file_name": results.name,
             "format": fmt, "column": column})
    except (ValidationError, UnicodeDecodeError) as exc:
        if isinstance(exc, UnicodeDecodeError):
            raise CharterError(f"{results} is not UTF-8 text", code="evaluation_malformed",
                               status=422) from None
        raise validation_failed(exc, "results file") from None
    evaluation = attach_evaluation(actor_named(as_user), version_id, given)
    click.echo(evaluation.id)
    table = Table(title=f"{evaluation.format} results of {', '.join(evaluation.model_named)}, "
                        f"sha256 {evaluation.sha256[:16]}...")
    for col in ("task", "metric", "filter", "value", "stderr"):
        table.add_column(col, justify="right" if col in ("value", "stderr") else "left")
    for m in evaluation.metrics:
        table.add_row(m["task"], m["metric"], m["filter"], f"{m['value']:.4f}",
                      "" if m["stderr"] is None else f"{m['stderr']:.4f}")
    console.print(table)


# --- audit ----------------------------------------------------------------------------
@main.group()
def audit() -> None:
    """The tamper-evident audit log."""


@audit.command("verify")
@click.option("--seal-key", "seal_key", type=click.Path(exists=True, dir_okay=False),
              help="The auditors' seal verification key: check every event's seal too.")
def audit_verify(seal_key: str | None) -> None:
    """Walk the hash chain, hold it against the signed checkpoints (and, with --seal-key,
    check every seal); print the count and head hash, or the first bad event and why."""
    command_runtime()
    try:
        verifier = verifier_from_file(seal_key) if seal_key else None
    except SealError as exc:
        raise ConfigurationError(f"--seal-key: {exc}", code="seal_key_invalid") from None
    verdict = verify_chain(seal_key=verifier)
    if verdict.ok:
        click.echo(f"ok: {verdict.count} events, head {verdict.head_hash}")
        return
    click.echo(f"BROKEN at event {verdict.first_bad_seq} ({verdict.reason}): {verdict.message}")
    click.echo(f"{verdict.count} events verified before it")
    sys.exit(1)


@audit.command("sealkey")
@click.option("--sealing", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the sealing key file (CHARTER_AUDIT_SEAL_KEY).")
@click.option("--verify", "verify_path", type=click.Path(dir_okay=False, path_type=Path),
              required=True, help="Where to write the verification key (for the auditors).")
@click.option("--epoch-s", default=DEFAULT_INTERVAL_S, show_default=True, type=int,
              help="Seconds an epoch's key lives before it evolves and is erased.")
def audit_sealkey(sealing: Path, verify_path: Path, epoch_s: int) -> None:
    """Make a seal seed: the servers' sealing key file and the auditors' verification key.
    Give the verification key to the auditors and keep it off every server: with it, any
    epoch could be sealed."""
    if epoch_s < 1:
        raise ConfigurationError("--epoch-s must be at least 1", code="invalid_epoch")
    keys = make_seal_keys(epoch_s)
    for path in (sealing, verify_path):
        if path.exists():
            raise ConfigurationError(f"{path} exists: a key file is never overwritten",
                                     code="key_exists")
    write_new(sealing, keys.sealing)
    write_new(verify_path, keys.verification)
    click.echo(f"wrote {sealing} (set CHARTER_AUDIT_SEAL_KEY to it, on writable storage) "
               f"and {verify_path} (for the auditors only: `charter audit verify "
               f"--seal-key`, `charter-verify --seal-key`)")


@audit.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def audit_keygen(path: Path) -> None:
    """Make an Ed25519 signing key for checkpoints and exports (PKCS#8 PEM, mode 0600)."""
    try:
        generate_key(path)
    except FileExistsError:
        raise ConfigurationError(f"{path} exists: a signing key is never overwritten",
                                 code="key_exists") from None
    settings = settings_from_env(audit_signing_keys=str(path))
    signer: Signer = load_signers(settings)[0]
    click.echo(f"wrote {path}; its verifier key (publish it): {signer.verifier}")


@audit.command("checkpoint")
def audit_checkpoint() -> None:
    """Sign a checkpoint of the log now."""
    settings = command_runtime().settings
    row = issue(settings, force=True)
    if row is None:
        raise ConfigurationError("no signing key: set CHARTER_AUDIT_SIGNING_KEYS",
                                 code="no_signing_key")
    click.echo(row.note, nl=False)


@audit.command("ship")
@click.option("--status", is_flag=True, help="Only show where each destination stands.")
def audit_ship(status: bool) -> None:
    """Send the events committed since the last shipment to the SIEM destinations now
    (CHARTER_AUDIT_SIEM_SYSLOG, CHARTER_AUDIT_SIEM_OTLP); the periodic task does the same."""
    from charter.audit import ship

    settings = command_runtime().settings
    if not ship.destinations(settings):
        raise ConfigurationError("no SIEM destination: set CHARTER_AUDIT_SIEM_SYSLOG or "
                                 "CHARTER_AUDIT_SIEM_OTLP", code="no_siem_destination")
    if not status:
        failed = False
        for done in ship.ship(settings):
            click.echo(f"{done.destination}: sent {done.sent}, shipped up to event "
                       f"{done.cursor}" + (f"; failed: {done.error}" if done.error else ""))
            failed = failed or done.error is not None
        if failed:
            raise SystemExit(1)
        return
    for row in ship.shipment_state():
        error = f"; last error: {row['last_error']}" if row["last_error"] else ""
        click.echo(f"{row['destination']}: up to event {row['seq']} (at {row['updated_at']})"
                   f"{error}")


@audit.command("export")
@click.option("--out", "-o", "out", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="the bundle to write")
@click.option("--since", type=click.DateTime(), help="events at or after (UTC)")
@click.option("--until", type=click.DateTime(), help="events before (UTC)")
@click.option("--actor", help="one actor, e.g. user:alice or key:svc-helpdesk")
@click.option("--action", help="one action, e.g. dispatch.outcome")
@click.option("--target-type", help="e.g. deployment, version, model, node, team")
@click.option("--target-id", help="one target (a model's serving name, a version id...)")
@click.option("--team", help="events recorded for one team")
@click.option("--store", is_flag=True, help="do not compress (faster to verify)")
def audit_export(out: Path, since: object, until: object, actor: str | None,
                 action: str | None, target_type: str | None, target_id: str | None,
                 team: str | None, store: bool) -> None:
    """Export selected events with their proofs as a bundle charter-verify checks offline."""


    settings = command_runtime().settings
    selection = Selection(
        since=since.replace(tzinfo=UTC) if since else None,  # type: ignore[attr-defined]
        until=until.replace(tzinfo=UTC) if until else None,  # type: ignore[attr-defined]
        actor=actor, action=action, target_type=target_type, target_id=target_id, team=team)
    tmp = out.with_name(out.name + ".part")
    with tmp.open("wb") as fh:
        result = export_bundle(settings, selection, fh, actor_ref="system:cli",
                               compress=not store)
    tmp.replace(out)
    click.echo(f"wrote {out}: {result.events} events, {result.checkpoints} checkpoints, "
               f"tree size {result.tree_size}, manifest sha256 {result.manifest_sha256}")


# --- policy ---------------------------------------------------------------------------
@main.group()
def policy() -> None:
    """Rego policies (admission, dispatch) and their data."""


@policy.command("test")
@click.option("--dir", "policy_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Policy directory (default: the bundled policies/).")
def policy_test(policy_dir: Path | None) -> None:
    """Run the `*_test.rego` tests with the in-process engine and print line coverage."""
    bundle = PolicyBundle.load(policy_dir or default_policy_dir())
    report = run_rego_tests(bundle)
    for r in report.results:
        mark = "PASS" if r.passed else "FAIL"
        click.echo(f"{mark} {r.package}.{r.name} ({r.duration_ms} ms)"
                   + (f": {r.error}" if r.error else ""))
    for path, percent in sorted(report.coverage.items()):
        click.echo(f"coverage {path}: {percent}%")
    click.echo(f"revision {bundle.revision}")
    click.echo(f"{report.passed} passed, {report.failed} failed")
    if report.failed or not report.results:
        sys.exit(1)


@policy.command("show")
def policy_show() -> None:
    """Print the policy revision, files and data that Charter would load."""


    settings = settings_from_env()
    bundle = PolicyBundle.load(Path(settings.policy_dir) if settings.policy_dir
                               else default_policy_dir())
    click.echo(json.dumps({"revision": bundle.revision,
                           "files": [f.path for f in bundle.policies],
                           "data": bundle.data["charter"]}, indent=2))


# --- config ---------------------------------------------------------------------------
@main.group()
def config() -> None:
    """Configuration."""


@config.command("docs")
def config_docs() -> None:
    """Print docs/configuration.md, generated from the Settings class."""
    click.echo(settings_markdown(), nl=False)


# --- serve ----------------------------------------------------------------------------
@main.command()
@click.option("--bind", default="127.0.0.1:8080", show_default=True)
@click.option("--workers", default=(os.cpu_count() or 1) + 1, show_default="cores + 1",
              type=int, help="Worker processes. One more than the cores: a worker waiting on "
              "the database or a node leaves its core to another.")
@click.option("--threads", default=256, show_default=True, type=int,
              help="Threads per worker serving requests (a stream only until its first "
              "byte: each worker's relay carries open streams).")
def serve(bind: str, workers: int, threads: int) -> None:
    """Run the API and gateway under gunicorn (threaded workers, one stream relay each)."""
    # A program of its own: the app and the server are imported here, not by every
    # `charter ...` command (importing the app costs ~2 s of start-up).
    from gunicorn.app.base import BaseApplication

    from charter.app import create_app
    from charter.boot import build_runtime
    from charter.dispatch.service import warm_inspection
    from charter.serving import (
        HEADER_FIELD_LIMIT,
        check_address_free,
        forget_worker_metrics,
        share_metrics_between_workers,
    )



    settings = settings_from_env()
    settings.require_secret()
    if workers > 1 and not settings.limits_redis_url:
        structlog.get_logger("charter.serve").warning(
            "limits: no CHARTER_LIMITS_REDIS_URL, so each worker keeps its own counts: a "
            "team's or key's limits hold per worker, not across them", workers=workers)
    busy = check_address_free(bind)
    if busy is not None:
        raise ConfigurationError(f"cannot listen on {busy}", code="address_in_use",
                                 details={"bind": bind})

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in {"bind": bind, "workers": workers, "threads": threads,
                               "worker_class": "charter.serving.KeepAliveThreadWorker",
                               "timeout": 30,
                               "graceful_timeout": 30, "keepalive": 5, "reuse_port": True,
                               # Long tokens reach Charter, which answers token_too_large
                               # in the caller's shape (charter.serving for longer ones).
                               "limit_request_field_size": HEADER_FIELD_LIMIT,
                               "accesslog": None, "worker_exit": _flush_on_exit,
                               "child_exit": forget_worker_metrics}.items():
                self.cfg.set(key, value)

        def load(self):  # type: ignore[no-untyped-def]
            # In each worker: its own runtime (pools, engines, writer), kept for its life
            # and flushed by worker_exit.
            runtime = build_runtime(settings)
            app = create_app(runtime)
            runtime.tasks.start_scheduler()
            warm_inspection(runtime)
            return app

    share_metrics_between_workers()
    Server().run()


def _celery_runtime() -> Runtime:
    settings = settings_from_env()
    if settings.task_backend != "celery":
        raise ConfigurationError(
            "set CHARTER_TASK_BACKEND=celery and CHARTER_BROKER_URL to run Celery processes",
            details={"problems": ["CHARTER_TASK_BACKEND: not celery"]})
    return command_runtime(settings)


@main.command()
@click.option("--concurrency", default=16, show_default=True, type=int,
              help="Threads running tasks; a batch line holds one while its node answers.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(concurrency: int, loglevel: str) -> None:
    """Run a Celery worker for Charter's tasks (batch lines, probes, sweeps, maintenance)."""
    from charter.dispatch.service import warm_inspection

    runtime = _celery_runtime()
    settings = runtime.settings
    warm_inspection(runtime)  # batch lines are inspected like the gateway's requests
    runtime.tasks.celery.worker_main(["worker", "--pool", "threads", "--concurrency",
                                  str(concurrency), "--queues", settings.task_queue,
                                  "--loglevel", loglevel, "--without-gossip",
                                  "--without-mingle", "--hostname", f"charter@{os.uname()[1]}"])


@main.command()
@click.option("--schedule-file", default="", help="Where beat keeps its state "
              "(default: a file in the temporary directory).")
@click.option("--loglevel", default="INFO", show_default=True)
def beat(schedule_file: str, loglevel: str) -> None:
    """Run Celery beat: sends the periodic tasks (run exactly one per installation)."""
    runtime = _celery_runtime()
    path = schedule_file or os.path.join(tempfile.gettempdir(), "charter-beat-schedule")
    runtime.tasks.celery.start(["beat", "--schedule", path, "--loglevel", loglevel])


def _flush_on_exit(_server: object, worker: object) -> None:
    """A stopping worker writes the outcome events it still holds (gunicorn's worker_exit)."""
    app = getattr(worker, "application", None) or getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("charter.runtime")
    if runtime is not None:
        runtime.close()


# --- demo -----------------------------------------------------------------------------
@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--data-dir", default=".charter-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-serve", is_flag=True, help="Set up and seed, then exit.")
def demo(host: str, port: int, data_dir: Path, no_serve: bool) -> None:
    """Embedded demo: SQLite, seeded registry, a tiny local model, API on HOST:PORT."""
    from charter.demo import run_demo  # a program of its own, like `serve`

    run_demo(host=host, port=port, data_dir=data_dir, serve=not no_serve, console=console)


# --- dev inference node -----------------------------------------------------------------
@main.group()
def node() -> None:
    """The local dev inference node (TGI protocol, CPU; needs the `node` extra)."""


@node.command("serve")
@click.option("--model", "model_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Local model directory (config, tokenizer, weights).")
@click.option("--region", required=True, help="Region this node reports in /info.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8081, show_default=True, type=int)
@click.option("--model-id", help="model_id in /info (default: the directory's name).")
@click.option("--revision", help="model_sha in /info (default: SHA-256 over the file digests).")
@click.option("--no-counts", is_flag=True,
              help="Report no token counts (no usage, details or count headers), like some "
                   "engines: to see Charter count them itself.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="NAME=DIR",
              help="A PEFT LoRA adapter to serve beside the model, selected by NAME (TGI's "
                   "parameters.adapter_id, OpenAI's model); repeatable.")
def node_serve(model_dir: Path, region: str, host: str, port: int, model_id: str | None,
               revision: str | None, no_counts: bool, adapter_specs: tuple[str, ...]) -> None:
    """Serve the model in MODEL on HOST:PORT with TGI's and OpenAI's HTTP protocols."""
    from charter.devnode.lora import AdapterError

    adapters: dict[str, Path] = {}
    for spec in adapter_specs:
        name, _, folder = spec.partition("=")
        if not (name and folder and Path(folder).is_dir()) or name in adapters:
            raise click.BadParameter(f"{spec!r}: give NAME=DIR, DIR an adapter's directory, "
                                     "each NAME once", param_hint="--adapter")
        adapters[name] = Path(folder)
    try:
        app = create_node_app(model_dir, region=region, model_id=model_id, revision=revision,
                              counts=not no_counts, adapters=adapters)
    except AdapterError as exc:
        raise click.ClickException(f"adapter refused: {exc}") from None
    loras = f", adapters {', '.join(adapters)}" if adapters else ""
    console.print(f"dev node {app.config['NODE_MODEL_ID']} @ {app.config['NODE_MODEL_SHA'][:12]} "
                  f"({region}){loras} on http://{host}:{port}")
    serve_node(app, host, port)


@node.group("agent")
def node_agent() -> None:
    """The attestation agent beside an engine: hashes the model it serves, signs statements."""


@node_agent.command("keygen")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="Where to write the new Ed25519 private key (PEM, mode 0600).")
def node_agent_keygen(key_path: Path) -> None:
    """Make the node's key; prints the public key to enroll with Charter."""
    from charter.nodes.agent import new_key
    from charter.nodes.statement import public_key_text

    try:
        key = new_key(key_path)
    except FileExistsError:
        raise click.ClickException(f"{key_path} exists; a key is never overwritten") from None
    click.echo(public_key_text(key))


@node_agent.command("serve")
@click.option("--model", "model_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The model directory the engine serves (mount it read-only).")
@click.option("--key", "key_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The node's Ed25519 private key (from `charter node agent keygen`).")
@click.option("--node", "node_name", required=True, help="The node's name in Charter.")
@click.option("--engine", required=True, help="The engine beside it: tgi, vllm, llama.cpp...")
@click.option("--engine-version", default="", help="The engine's version, as stated.")
@click.option("--adapter", "adapter_dirs", multiple=True, metavar="NAME=DIR",
              help="A LoRA adapter the engine loads, by the name it knows it by (TGI's "
                   "adapter_id, vLLM's LoRA module name) and its directory; repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8090, show_default=True, type=int)
def node_agent_serve(model_dir: Path, key_path: Path, node_name: str, engine: str,
                     engine_version: str, adapter_dirs: tuple[str, ...], host: str,
                     port: int) -> None:
    """Answer Charter's challenges on HOST:PORT (`POST /attest`)."""
    from charter.nodes.agent import Agent, ModelFiles, load_key, make_server
    from charter.nodes.statement import ADAPTER_NAME, public_key_text

    key = load_key(key_path)
    files = ModelFiles(model_dir)
    adapters: dict[str, ModelFiles] = {}
    for given in adapter_dirs:
        name, _, folder = given.partition("=")
        if not ADAPTER_NAME.fullmatch(name) or not Path(folder).is_dir():
            raise click.BadParameter(f"{given!r}: give NAME=DIR, DIR an adapter's directory",
                                     param_hint="--adapter")
        adapters[name] = ModelFiles(Path(folder))
    started = time.perf_counter()
    listing = files.listing()  # hash everything once, before the first challenge
    for adapter in adapters.values():
        listing += adapter.listing()
    console.print(f"agent for {node_name}: {len(listing)} files, "
                  f"{sum(f.hashed_bytes for f in (files, *adapters.values())) / 2**20:.1f} "
                  f"MiB hashed in "
                  f"{time.perf_counter() - started:.1f} s; key {public_key_text(key)}; "
                  f"http://{host}:{port}/attest")
    server = make_server(Agent(key, files, node=node_name, engine=engine,
                               engine_version=engine_version, adapters=adapters), host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


from charter.cli_exports import exports  # noqa: E402 - its commands need main's group only

main.add_command(exports)

from charter.witness.cli import witness  # noqa: E402 - a service of its own

main.add_command(witness)

if __name__ == "__main__":
    main()
