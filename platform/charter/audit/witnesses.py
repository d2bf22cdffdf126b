"""Submitting checkpoints to witnesses (C2SP tlog-witness), and keeping their cosignatures.

After a checkpoint is signed, it goes to every configured witness (CHARTER_AUDIT_WITNESSES)
with a consistency proof from the size that witness last cosigned. A witness answers with
its cosignature (kept in `audit_cosignatures`, appended to the note in exports and in the
external copy), or 409 with the size it last cosigned (the proof is rebuilt from there and
sent once more), or 422: the checkpoint does not extend what it cosigned before. That, and
a witness that has cosigned a larger tree than the log now holds, raise the integrity
alarm: the log was rewritten or cut since the witness saw it. Anything else (unreachable,
misconfigured) is counted in `charter_audit_witness_failures_total` and logged; the next
checkpoint tries again.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
import structlog
from sqlalchemy import Connection, func, select

from charter import scope
from charter.audit.anchors import raise_alarm
from charter.audit.models import AuditCheckpoint, AuditCosignature, AuditEvent
from charter.audit.tree import Tree, TreeError
from charter.audit.verify import CheckpointError, CosignerKey, ProofError, cosignatures
from charter.db import table_of, utcnow
from charter.errors import ConfigurationError
from charter.settings import Settings
from charter.uow import refuse, unit_of_work

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class WitnessConfig:
    key: CosignerKey
    url: str  # the submission prefix; POST <url>/add-checkpoint

    @property
    def name(self) -> str:
        return self.key.name


def configured(settings: Settings) -> list[WitnessConfig]:
    out = []
    for key, url in settings.witnesses:
        try:
            out.append(WitnessConfig(CosignerKey.parse(key), url.rstrip("/")))
        except CheckpointError as exc:
            raise ConfigurationError(f"CHARTER_AUDIT_WITNESSES: {exc}") from None
    return out


# The size each witness last cosigned, as far as this process knows: the first guess of
# the next submission's old size (a wrong guess costs one 409 and a retry).
_known: dict[str, int] = {}


def submit(settings: Settings, checkpoint: AuditCheckpoint) -> list[str]:
    """Submit a signed checkpoint to every configured witness; the names of those that
    cosigned it. Raises the integrity alarm when a witness shows the log is not what it
    cosigned before."""
    witnesses = configured(settings)
    if not witnesses:
        return []
    cosigned = []
    with httpx.Client(timeout=settings.audit_witness_timeout_s) as client:
        for witness in witnesses:
            line = _submit_one(client, witness, checkpoint)
            if line is not None:
                cosigned.append((witness, line))
    if cosigned:
        now = utcnow()
        with unit_of_work() as session:
            session.add_all(AuditCosignature(checkpoint_id=checkpoint.id,
                                             witness=str(w.key), cosigned_at=now, line=line)
                            for w, line in cosigned)
    return [w.name for w, _ in cosigned]


def _submit_one(client: httpx.Client, witness: WitnessConfig,
                checkpoint: AuditCheckpoint) -> str | None:
    size = checkpoint.size
    old = _known.get(witness.name, 0)
    if old > size:
        old = 0  # a guess from another checkpoint: ask (the spec's way to learn the size)
    for _ in range(3):
        try:
            body = f"old {old}\n" + "".join(f"{_b64(h)}\n" for h in _proof(old, size))
        except (TreeError, ProofError) as exc:
            refuse(raise_alarm(f"no consistency proof for witness {witness.name}: {exc}",
                               _details(exc, size)))
        try:
            reply = client.post(f"{witness.url}/add-checkpoint",
                                content=(body + "\n" + checkpoint.note).encode())
        except httpx.HTTPError as exc:
            _failed(witness, "unreachable", repr(exc))
            return None
        _observe(witness, reply.status_code)
        if reply.status_code == 409 and reply.text.strip().isdigit():
            old = int(reply.text.strip())
            _known[witness.name] = old
            if old > size:
                _ahead(witness, old)
                return None
            continue
        if reply.status_code == 422:
            refuse(raise_alarm(
                f"witness {witness.name} refused the checkpoint of size {size}: it does not "
                f"extend the tree the witness cosigned before ({reply.text.strip()[:200]})",
                {"reason": "witness_refused", "checkpoint": size, "witness": witness.name}))
        if reply.status_code != 200:
            _failed(witness, f"http_{reply.status_code}", reply.text[:200])
            return None
        return _accept(witness, checkpoint, reply.text)
    _failed(witness, "conflict", "the witness's size kept changing")
    return None


def _accept(witness: WitnessConfig, checkpoint: AuditCheckpoint, text: str) -> str | None:
    lines = [ln + "\n" for ln in text.splitlines()
             if ln.startswith(f"\u2014 {witness.name} ")]
    for line in lines:
        try:
            if witness.name in cosignatures(checkpoint.note + line, [witness.key]):
                _known[witness.name] = checkpoint.size
                return line
        except CheckpointError as exc:
            _failed(witness, "bad_cosignature", str(exc))
            return None
    _failed(witness, "no_cosignature", "no cosignature by its key in the answer")
    return None


def _ahead(witness: WitnessConfig, witnessed: int) -> None:
    """The witness cosigned a larger tree than this checkpoint: a newer checkpoint got
    there first, or the log lost events it had."""
    with unit_of_work() as session:
        head = session.execute(select(func.max(table_of(AuditEvent).c.seq))).scalar() or 0
    if witnessed > head:
        refuse(raise_alarm(
            f"witness {witness.name} cosigned a tree of {witnessed} events; the log holds "
            f"{head}: it was cut", {"reason": "truncated", "checkpoint": witnessed,
                                    "witness": witness.name, "first_bad_seq": head + 1}))


def _proof(old: int, size: int) -> list[bytes]:
    if old in (0, size):
        return []
    with unit_of_work() as session:
        return Tree(session.connection()).consistency(old, size)


def cosignature_lines(conn: Connection, checkpoint_ids: Iterable[int]) -> dict[int, str]:
    """The cosignature lines of each checkpoint (to append to its note)."""
    t = table_of(AuditCosignature)
    out: dict[int, str] = {}
    ids = list(checkpoint_ids)
    if not ids:
        return out
    for cid, line in conn.execute(select(t.c.checkpoint_id, t.c.line)
                                  .where(t.c.checkpoint_id.in_(ids)).order_by(t.c.id)):
        out[cid] = out.get(cid, "") + line
    return out


def _details(exc: TreeError | ProofError, size: int) -> dict[str, object]:
    if isinstance(exc, TreeError):
        return exc.details(checkpoint=size)
    return {"reason": "tree", "checkpoint": size}


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _failed(witness: WitnessConfig, reason: str, message: str) -> None:
    runtime = scope.maybe_current()
    if runtime is not None:
        runtime.counter("charter_audit_witness_failures_total",
                        "Checkpoint submissions a witness did not cosign, for reasons other "
                        "than the log's integrity", ("witness", "reason")).labels(
            witness.name, reason).inc()
    log.error("audit witness failed", witness=witness.name, reason=reason, message=message)


def _observe(witness: WitnessConfig, status: int) -> None:
    runtime = scope.maybe_current()
    if runtime is not None:
        runtime.counter("charter_audit_witness_submissions_total",
                        "Checkpoint submissions to witnesses, by answer",
                        ("witness", "status")).labels(witness.name, str(status)).inc()
