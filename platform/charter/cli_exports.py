"""`charter exports ...`: the same exports as the API, as a named auditor or admin."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import IO

import click

from charter.clikit import actor_named, command_runtime
from charter.errors import CharterError, ValidationFailedError
from charter.exports import service


def _write(chunks: Iterable[str], output: Path | None) -> None:
    out: IO[str]
    if output is None:
        out = sys.stdout
        for chunk in chunks:
            out.write(chunk)
        out.flush()
        return
    with output.open("w", encoding="utf-8", newline="") as out:
        for chunk in chunks:
            out.write(chunk)


def _moment(value: str, field: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailedError(f"--{field} is not an ISO 8601 time", details={
            "errors": [{"field": field, "code": "datetime", "message": value}]}) from None
    return moment


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CharterError as exc:
            click.echo(f"error ({exc.code}): {exc.message}", err=True)
            for key, value in exc.details.items():
                click.echo(f"  {key}: {value}", err=True)
            sys.exit(2)


AS_USER = click.option("--as", "as_user", required=True,
                       help="Username of the auditor or admin exporting (audited).")
OUTPUT = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                      help="Write to FILE instead of standard output.")


@click.group(cls=_Group)
def exports() -> None:
    """Compliance exports: ML-BOM, evidence packs, dispatch records."""


@exports.command("ml-bom")
@AS_USER
@OUTPUT
@click.option("--include-retired", is_flag=True,
              help="Also list versions whose approval ended (expired, revoked).")
def ml_bom(as_user: str, output: Path | None, include_retired: bool) -> None:
    """The model inventory as a validated CycloneDX 1.6 ML-BOM (JSON)."""

    command_runtime()
    text = service.export_ml_bom(actor_named(as_user), include_retired=include_retired)
    _write([text, "\n"], output)


@exports.command("evidence")
@click.argument("version_id")
@AS_USER
@OUTPUT
@click.option("--html", "as_html", is_flag=True, help="A self-contained HTML page.")
def evidence(version_id: str, as_user: str, output: Path | None, as_html: bool) -> None:
    """The approval evidence pack of VERSION_ID (JSON, or --html)."""

    command_runtime()
    pack = service.export_evidence(actor_named(as_user), version_id,
                                   fmt="html" if as_html else "json")
    _write([service.evidence_html(pack) if as_html else json.dumps(pack, indent=2) + "\n"],
           output)


@exports.command("records")
@AS_USER
@OUTPUT
@click.option("--since", required=True, help="Start of the period (ISO 8601, with a zone).")
@click.option("--until", required=True, help="End of the period, exclusive.")
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl"]), default="csv",
              show_default=True)
def records(as_user: str, output: Path | None, since: str, until: str, fmt: str) -> None:
    """Dispatch records (decisions, outcomes, refusals) of a period, streamed."""

    command_runtime()
    export = service.export_records(actor_named(as_user), since=_moment(since, "since"),
                                    until=_moment(until, "until"), fmt=fmt)
    _write(export.chunks, output)
    click.echo(f"records through audit event {export.through_seq}", err=True)
