"""Receipts: a signed promise, handed to whoever made a lifecycle change, that the log holds
its event.

A receipt is a C2SP signed note by the log's checkpoint keys:

    charter-audit-receipt/1
    <origin>
    seq <N>
    hash <event hash, hex>
    action <action>
    time <when it was issued, UTC>

It says: the log holds event N with that hash, and every checkpoint of size N or more
includes it. It is issued only after the event's transaction committed. The caller keeps
it; later, `charter-verify --receipt FILE BUNDLE.zip` holds any export against it: an
exported event N with another hash is `receipt_broken`, a log that no longer reaches N is
`receipt_missing`. So the events no checkpoint covers yet (the tail) are still provable by
whoever has a stake in them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from charter.audit.checkpoint import sign_note
from charter.audit.keys import load_signers
from charter.audit.verify import RECEIPT_FORMAT
from charter.db import utcnow
from charter.settings import Settings
from charter.uow import Recorded


def issue(settings: Settings, recorded: Sequence[Recorded], action: str
          ) -> dict[str, Any] | None:
    """The receipt of the last event of `action` in `recorded` (events whose transaction
    committed); None without a signing key or such an event."""
    event = next((r for r in reversed(recorded) if r.action == action), None)
    signers = load_signers(settings)
    if event is None or not signers:
        return None
    issued_at = utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    text = (f"{RECEIPT_FORMAT}\n{settings.audit_log_origin}\nseq {event.seq}\n"
            f"hash {event.hash}\naction {event.action}\ntime {issued_at}\n")
    return {"seq": event.seq, "hash": event.hash, "action": event.action,
            "issued_at": issued_at, "note": sign_note(text, *signers)}
