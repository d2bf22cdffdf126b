"""Helpers for the audit evidence tests: signing keys, many events at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from charter.audit.checkpoints import generate_key
from charter.settings import Settings
from charter.uow import record, unit_of_work

ORIGIN = "charter.test/audit"


def signing(settings: Settings, folder: Path, *names: str, **extra: Any) -> Settings:
    """Settings that sign checkpoints with new keys made in `folder`."""
    paths = []
    for name in names or ("primary",):
        path = folder / f"{name}.pem"
        if not path.exists():
            generate_key(path)
        paths.append(str(path))
    return dataclasses.replace(settings, audit_log_origin=ORIGIN,
                               audit_signing_keys=",".join(paths), **extra)


def append_many(n: int, *, start: int = 0, actor: str = "user:alice",
                team: str = "analytics", action: str = "dispatch.outcome") -> None:
    """`n` events in one transaction (one commit), with a little variety."""
    with unit_of_work() as session:
        for i in range(start, start + n):
            record(session, actor=actor if i % 3 else "user:bob", action=action,
                   target_type="deployment", target_id=f"chat-{i % 4}",
                   details={"i": i, "team": team if i % 2 else "support",
                                  "tokens_out": i % 50, "note": "é \u2028 <x>"})
