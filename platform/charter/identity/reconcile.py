"""Reconciliation with the identity provider, for providers that do not push over SCIM.

A directory export (CHARTER_DIRECTORY_FILE: who is still here, as the provider exports
it) is compared with Charter's people who came from the provider (`sso` and `scim`
users; local accounts are an admin's to end): an active one the export no longer lists is
deprovisioned (charter.identity.lifecycle, `via: reconcile`). A person matches by
username, e-mail address or the provider's id (SCIM externalId, or the SSO subject),
without case.

The export is CSV with a header (`userPrincipalName`, `userName`, `username`, `mail`,
`email`, `id`, `externalId` or `sub` columns; an `accountEnabled` or `active` column, when
there, keeps only the enabled rows) or JSON (an array of such objects, or one a line).

A brake, because a truncated or empty export must not end everyone's access: when the
export would end more than CHARTER_DIRECTORY_MAX_REMOVALS of the provider's people (a
fraction, 0.1 by default), or lists nobody, nothing is changed, the run is refused and
raised (`directory.reconcile`, outcome `failure`). Every run is audited with the export's
SHA-256 and what it did.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import select

from charter.actor import SYSTEM
from charter.errors import ConfigurationError, ConflictError
from charter.identity import lifecycle
from charter.identity.models import User
from charter.uow import record, unit_of_work

log = structlog.get_logger("charter.identity")

ID_COLUMNS = ("userprincipalname", "username", "mail", "email", "id", "externalid", "sub")
ENABLED_COLUMNS = ("accountenabled", "active", "enabled")


@dataclass
class Reconciled:
    listed: int  # identifiers the export holds
    checked: int  # the provider's people Charter has, active
    ended: list[str] = field(default_factory=list)  # usernames deprovisioned (or, dry: would be)
    refused: str | None = None  # why nothing was changed
    sha256: str = ""


def _present(raw: bytes) -> set[str]:
    """The identifiers of the enabled people an export lists, lower case."""
    text = raw.decode("utf-8-sig")
    stripped = text.lstrip()
    rows: list[dict[str, Any]]
    if stripped.startswith("["):
        loaded = json.loads(text)
        rows = [r for r in loaded if isinstance(r, dict)] if isinstance(loaded, list) else []
    elif stripped.startswith("{"):
        rows = [r for line in text.splitlines() if line.strip()
                if isinstance(r := json.loads(line), dict)]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    out: set[str] = set()
    for row in rows:
        fields = {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        enabled = next((fields[c] for c in ENABLED_COLUMNS if c in fields), True)
        if str(enabled).strip().lower() in ("false", "0", "no", "disabled"):
            continue
        for column in ID_COLUMNS:
            value = fields.get(column)
            if isinstance(value, str | int) and str(value).strip():
                out.add(str(value).strip().lower())
    return out


def reconcile(path: str, *, max_removals: float, dry_run: bool = False) -> Reconciled:
    """Compare the export at `path` with Charter's people from the provider; deprovision
    those gone unless the brake holds (see the module). `dry_run`: say, change nothing."""
    if not path:
        raise ConfigurationError("no directory export is configured (CHARTER_DIRECTORY_FILE)",
                                 code="directory_missing")
    try:
        raw = Path(path).read_bytes()
        present = _present(raw)
    except (OSError, ValueError, csv.Error) as exc:
        raise ConfigurationError(f"the directory export cannot be read: {exc}",
                                 code="directory_unreadable", details={"file": path}) from None
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    with unit_of_work() as session:
        people = session.execute(select(
            User.id, User.username, User.email, User.external_id, User.external_subject).where(
            User.kind == "user", User.active.is_(True), User.source.in_(("sso", "scim")))).all()
    gone = [(uid, name) for uid, name, email, ext, sub in people
            if not {v.lower() for v in (name, email, ext, sub) if v} & present]
    done = Reconciled(len(present), len(people), sha256=digest)
    if not present:
        done.refused = "the export lists nobody"
    elif people and len(gone) > max_removals * len(people):
        done.refused = (f"the export would end {len(gone)} of {len(people)} people's access, "
                        f"more than {max_removals:.0%}")
    if done.refused or dry_run:
        done.ended = sorted(name for _, name in gone)
        with unit_of_work() as session:
            record(session, actor=SYSTEM.ref, action="directory.reconcile",
                   target_type="directory", target_id="export",
                   outcome="failure" if done.refused else "success",
                   details={"sha256": digest, "listed": done.listed, "checked": done.checked,
                            "gone": done.ended[:200], "dry_run": dry_run,
                            "refused": done.refused})
        if done.refused:
            log.warning("directory reconciliation refused: nothing changed",
                        reason=done.refused)
        return done
    for user_id, name in gone:
        try:
            lifecycle.deprovision(SYSTEM, user_id, via="reconcile",
                                  reason=f"not in the directory export {digest[:19]}")
        except ConflictError:
            continue
        done.ended.append(name)
    with unit_of_work() as session:
        record(session, actor=SYSTEM.ref, action="directory.reconcile", target_type="directory",
               target_id="export", details={"sha256": digest, "listed": done.listed,
                                            "checked": done.checked,
                                            "ended": done.ended[:200], "dry_run": False})
    return done
