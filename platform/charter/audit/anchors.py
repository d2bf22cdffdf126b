"""Anchors: the signed checkpoints a database insider cannot rewrite.

The database holds the log, its tree and its checkpoint table; someone with full control
of PostgreSQL can rewrite all three consistently. They cannot sign (the keys are Charter's,
not the database's), and they cannot write the external copy of the checkpoints
(`CHARTER_AUDIT_CHECKPOINT_DIR`, storage the database's administrators cannot write). So
the issuer and the database walk hold the log against:

- the external copy: every note there, verified with the trusted keys (the configured
  signers' and `CHARTER_AUDIT_VERIFIER_KEYS`, never keys read from the database);
- the checkpoint table's notes, verified the same way (a row whose note does not verify is
  itself a finding: nobody with the keys wrote it).

Two valid notes of one size with different roots are a fork. A log shorter than a signed
checkpoint was truncated; a log whose root at a signed size differs was rewritten. Every
finding raises the integrity alarm: an `audit.integrity_alarm` event, the
`charter_audit_integrity_alarms_total` metric, an error in the log, a non-zero exit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from charter import scope
from charter.audit.checkpoint import Verifier
from charter.audit.keys import load_signers
from charter.audit.verify import (
    CheckpointError,
    load_kept_proofs,
    seals_from_extensions,
    verify,
)
from charter.errors import CharterError, ConfigurationError
from charter.settings import Settings

log = structlog.get_logger(__name__)
ALARM = "audit.integrity_alarm"


class AuditIntegrityError(CharterError):
    """The log, or what proves it, is not what was signed: refused, never served as good.
    `details` names the first bad sequence number or the checkpoint."""

    status = 409
    code = "audit_integrity"


@dataclass(frozen=True, slots=True)
class Anchor:
    size: int
    root: bytes
    source: str  # "external:<file name>" or "database:<checkpoint id>"
    seals_from: int | None = None  # its `seals-from N` line: events from N on are sealed


@dataclass
class Anchors:
    """The verified signed checkpoints, by size (one root a size), and what was wrong."""

    by_size: dict[int, Anchor] = field(default_factory=dict)
    problems: list[dict[str, object]] = field(default_factory=list)

    @property
    def newest(self) -> Anchor | None:
        return self.by_size[max(self.by_size)] if self.by_size else None

    @property
    def seals_from(self) -> int | None:
        """From which event on the signed checkpoints say every event is sealed."""
        found = [a.seals_from for a in self.by_size.values() if a.seals_from is not None]
        return min(found) if found else None

    def add(self, anchor: Anchor) -> None:
        known = self.by_size.get(anchor.size)
        if known is None:
            self.by_size[anchor.size] = anchor
        elif known.root != anchor.root:
            self.problems.append({
                "reason": "forked", "size": anchor.size,
                "message": f"two signed checkpoints of size {anchor.size} have different "
                           f"roots ({known.source}, {anchor.source}): the log was forked"})
            # An external note outranks the database's: keep it as the reference.
            if anchor.source.startswith("external:") and not known.source.startswith(
                    "external:"):
                self.by_size[anchor.size] = anchor


def trusted_verifiers(settings: Settings) -> list[Verifier]:
    """The keys an anchor must be signed with: the configured signers' and the extra
    verifier keys (e.g. retired signing keys); never keys read from the database."""
    keys = [s.verifier for s in load_signers(settings)]
    for text in settings.verifier_keys:
        try:
            keys.append(Verifier.parse(text))
        except CheckpointError as exc:
            raise ConfigurationError(f"CHARTER_AUDIT_VERIFIER_KEYS: {exc}") from None
    return keys


def external_notes(settings: Settings) -> list[tuple[str, str]]:
    """(file name, note) of every checkpoint in the external copy (latest.note is a copy of
    one of them). Empty without a folder."""
    if not settings.audit_checkpoint_dir:
        return []
    folder = Path(settings.audit_checkpoint_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.note")):
        if path.name == "latest.note":
            continue
        try:
            out.append((path.name, path.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            out.append((path.name, f"unreadable: {exc}"))
    return out


def external_sizes(settings: Settings) -> set[int]:
    """The tree sizes of the external copy's notes, from their names (`<size>-<time>.note`):
    no note is read. What a name claims, the auditor's check holds against the note."""
    if not settings.audit_checkpoint_dir or not Path(settings.audit_checkpoint_dir).is_dir():
        return set()
    heads = (p.name.split("-", 1)[0] for p in Path(settings.audit_checkpoint_dir).glob(
        "*-*.note"))
    return {int(h) for h in heads if h.isdigit()}


def external_proofs(settings: Settings) -> list[tuple[int, int, list[str]]]:
    """The consistency proofs kept beside the external copy's notes (from, to, path)."""
    if not settings.audit_checkpoint_dir or not Path(settings.audit_checkpoint_dir).is_dir():
        return []
    return load_kept_proofs(settings.audit_checkpoint_dir)


def newest_external(settings: Settings) -> Anchors:
    """The newest checkpoint of the external copy (its `latest.note` and its
    highest-numbered note, which agree unless someone touched the folder), verified: what
    the issuer anchors each new checkpoint to. Reads two files however long the folder."""
    anchors = Anchors()
    if not settings.audit_checkpoint_dir:
        return anchors
    folder = Path(settings.audit_checkpoint_dir)
    if not folder.is_dir():
        return anchors
    trusted = trusted_verifiers(settings)
    names = [p.name for p in folder.glob("*.note") if p.name != "latest.note"]
    for name in (["latest.note"] if (folder / "latest.note").exists() else []) + (
            [max(names)] if names else []):
        try:
            note = (folder / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            anchors.problems.append({"reason": "checkpoint_unreadable",
                                     "source": f"external:{name}",
                                     "message": f"external:{name} cannot be read: {exc}"})
            continue
        _take(anchors, note, f"external:{name}", settings, trusted)
    return anchors


def gather(settings: Settings, database_notes: Iterable[tuple[int, str]] = ()) -> Anchors:
    """The verified anchors: the external copy first, then the database's notes."""
    trusted = trusted_verifiers(settings)
    anchors = Anchors()
    if not trusted:
        return anchors
    for name, note in external_notes(settings):
        _take(anchors, note, f"external:{name}", settings, trusted)
    for checkpoint_id, note in database_notes:
        _take(anchors, note, f"database:{checkpoint_id}", settings, trusted)
    return anchors


def _take(anchors: Anchors, note: str, source: str, settings: Settings,
          trusted: list[Verifier]) -> None:
    try:
        checkpoint = verify(note, trusted)
    except CheckpointError as exc:
        anchors.problems.append({"reason": "checkpoint_forged", "source": source,
                                 "message": f"{source} is not a checkpoint signed by a "
                                            f"trusted key: {exc}"})
        return
    if checkpoint.origin != settings.audit_log_origin:
        anchors.problems.append({"reason": "checkpoint_forged", "source": source,
                                 "message": f"{source} names another log "
                                            f"({checkpoint.origin!r})"})
        return
    anchors.add(Anchor(checkpoint.size, checkpoint.root_hash, source,
                       seals_from(checkpoint.extensions)))


SEALS_FROM = "seals-from "
seals_from = seals_from_extensions  # one definition, in the standalone verifier


def raise_alarm(message: str, details: dict[str, object]) -> AuditIntegrityError:
    """The integrity alarm: counted, logged as an error, and returned as the refusal to
    raise (recorded as an `audit.integrity_alarm` event after the rollback)."""
    runtime = scope.maybe_current()
    if runtime is not None:
        runtime.counter("charter_audit_integrity_alarms_total",
                        "Integrity alarms: the audit log or its checkpoints are not what "
                        "was signed (alert on any)", ("reason",)).labels(
            str(details.get("reason", "unknown"))).inc()
    log.error("audit integrity alarm", message=message, **{k: v for k, v in details.items()
                                                            if k != "message"})
    return AuditIntegrityError(message, details=details).audited(  # type: ignore[return-value]
        "system:charter", ALARM, "audit", str(details.get("checkpoint") or "log"))
