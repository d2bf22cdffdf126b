"""The tamper suite: every attack of the threat model (docs/audit.md), done to a real log as
a PostgreSQL superuser would do it (triggers bypassed) by someone who knows the algorithm,
first with the external checkpoint folder untouched, then with it wiped too (the insider
also controls Charter's folder). For each, what each tool says, and the sequence number
or checkpoint it names:

- `verify`: `charter audit verify --seal-key` (the database walk, with the auditors' key);
- `issue`: the next checkpoint (the issuer, then its witness);
- `audit`: an export, checked by `charter-verify` with the log's keys, the auditor's own
  copy of the checkpoints, the seal verification key and one witness's key (quorum 1).

The log: events 1..40 under checkpoint 40, 41..65 under checkpoint 65, 66..70 not yet
under one, all sealed, both checkpoints cosigned by a witness over real HTTP.
The table below is the one in docs/audit.md.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from charter.audit import checkpoints, witnesses
from charter.audit.bundle import Selection
from charter.audit.chain import event_body, event_hash
from charter.audit.keys import load_signers
from charter.audit.seal import make_seal_keys, verifier_from_file, write_new
from charter.audit.service import export_bundle, verify_chain
from charter.audit.verify import _load_external, load_kept_proofs, verify_bundle
from charter.settings import Settings
from charter.witness.server import Witness
from charter.witness.state import WitnessState
from tests.audit_support import (
    ORIGIN,
    append_forged,
    append_many,
    as_insider,
    insider_row,
    rechain,
    signing,
)
from tests.runtimes import bound_runtime

Attack = Callable[[Any], None]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def witness_url(tmp_path: Path) -> Iterator[tuple[Witness, str]]:
    """A real witness over real HTTP, in a thread: its log keys are added per test."""
    w = Witness("witness.test/tamper", Ed25519PrivateKey.generate(), {},
                WitnessState(tmp_path / "witness.db"))
    server = make_server("127.0.0.1", 0, w.wsgi, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    witnesses._known.clear()
    yield w, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


_row = insider_row


# --- the attacks --------------------------------------------------------------------------

def edit_field(pg: Any) -> None:
    as_insider(pg, "UPDATE audit_events SET actor = 'user:mallory' WHERE seq = 17")


def delete_middle(pg: Any) -> None:
    as_insider(pg, "DELETE FROM audit_events WHERE seq = 30")


def swap_seqs(pg: Any) -> None:
    as_insider(pg, "UPDATE audit_events SET seq = -20 WHERE seq = 20",
               "UPDATE audit_events SET seq = 20 WHERE seq = 21",
               "UPDATE audit_events SET seq = 21 WHERE seq = -20")


def cut_tail_unanchored(pg: Any) -> None:
    as_insider(pg, "DELETE FROM audit_events WHERE seq > 65")


def cut_tail_anchored(pg: Any) -> None:
    as_insider(pg, "DELETE FROM audit_events WHERE seq > 50")


def rehash_one(pg: Any) -> None:
    row = _row(pg, 17)
    row["actor"] = "user:mallory"
    body = {k: row[k] for k in ("seq", "ts", "actor", "action", "target_type", "target_id",
                                "outcome", "details", "request_id", "prev_hash")}
    as_insider(pg, "UPDATE audit_events SET actor = %s, hash = %s WHERE seq = 17",
               params=("user:mallory", event_hash(event_body(**body))))


def rehash_suffix(pg: Any) -> None:
    edit_field(pg)
    rechain(pg, 17)


def drop_and_resign(pg: Any) -> None:
    rehash_suffix(pg)
    as_insider(pg, "DELETE FROM audit_tree_nodes", "DELETE FROM audit_checkpoints",
               "DELETE FROM audit_cosignatures")


def forged_append(pg: Any) -> None:
    assert append_forged(pg) == 71  # a copied seal


ATTACKS: dict[str, Attack] = {
    "edit_field": edit_field, "delete_middle": delete_middle, "swap_seqs": swap_seqs,
    "cut_tail_unanchored": cut_tail_unanchored, "cut_tail_anchored": cut_tail_anchored,
    "rehash_one": rehash_one, "rehash_suffix": rehash_suffix,
    "drop_and_resign": drop_and_resign, "forged_append": forged_append,
}


# --- the tools --------------------------------------------------------------------------------

def _verify(verifier: Any) -> str:
    """The walk's answer; the same whatever its page size (pages that check whole are
    folded in at once, the first that does not is walked row by row: a page of 7 puts
    checkpoints and the attacked rows inside pages and between them), and without the
    auditors' key the same unless the seal is what finds it."""
    def said(batch: int, key: Any) -> str:
        v = verify_chain(batch, seal_key=key)
        if v.ok:
            return "ok"
        named = v.checkpoint if v.reason in ("rewritten", "truncated", "forked") else None
        return f"{v.reason}@{named or v.first_bad_seq}"

    answer = said(5000, verifier)
    assert {said(batch, verifier) for batch in (1, 7, 40)} == {answer}
    keyless = {said(batch, None) for batch in (7, 5000)}
    assert len(keyless) == 1
    assert keyless == {answer} or answer.startswith("forged@")
    return answer


def _issue(settings: Settings) -> str:
    try:
        checkpoints.issue(settings, force=True)
    except checkpoints.AuditIntegrityError as exc:
        d = exc.details
        return f"{d['reason']}@{d.get('checkpoint') or d.get('first_bad_seq')}"
    return "signed"


def _audit(settings: Settings, kept: Path, verifier: Any, witness: Any) -> str:
    out = io.BytesIO()
    try:
        export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    except checkpoints.AuditIntegrityError as exc:
        return f"refused:{exc.details['reason']}"
    report = verify_bundle(out.getvalue(), [s.verifier for s in load_signers(settings)],
                           _load_external(str(kept)), verifier, [witness.verifier], 1,
                           kept_proofs=load_kept_proofs(str(kept)))
    return "ok" if report.ok else f"{report.reason}@{report.first_bad_seq}"


def run_case(name: str, wipe_folder: bool, configured: Settings, tmp_path: Path, pg: Any,
             witness: tuple[Witness, str]) -> tuple[str, str, str]:
    the_witness, url = witness
    keys = make_seal_keys(3600)
    write_new(tmp_path / "seal.json", keys.sealing)
    write_new(tmp_path / "verify.json", keys.verification)
    verifier = verifier_from_file(str(tmp_path / "verify.json"))
    (tmp_path / "keys").mkdir()
    settings = signing(configured, tmp_path / "keys", audit_seal_key=str(tmp_path / "seal.json"),
                       audit_checkpoint_dir=str(tmp_path / "outside"))
    the_witness.logs = {ORIGIN: [s.verifier for s in load_signers(settings)]}  # type: ignore[misc]
    settings = dataclasses.replace(settings,
                                   audit_witnesses=f"{the_witness.verifier} {url}")
    with bound_runtime(settings):
        append_many(40)
        assert checkpoints.issue(settings, force=True) is not None
        append_many(25, start=40)
        assert checkpoints.issue(settings, force=True) is not None
        append_many(5, start=65)
        kept = tmp_path / "auditors-copy"
        shutil.copytree(settings.audit_checkpoint_dir, kept)
        ATTACKS[name](pg)
        if wipe_folder:
            shutil.rmtree(settings.audit_checkpoint_dir)
        return (_verify(verifier), _issue(settings), _audit(settings, kept, verifier,
                                                            the_witness))


# (attack, folder wiped too) -> (verify, issue, audit): "<reason>@<seq or checkpoint>",
# "ok" (nothing found), "signed" (the issuer signed), "refused:<reason>" (no export).
EXPECTED: dict[tuple[str, bool], tuple[str, str, str]] = {
    **{(name, wiped): row for name, row in {
        # Under a checkpoint, an edit in place leaves the stored hashes, so the tree the
        # issuer signs is still the true one; the walk and every export find the row.
        "edit_field": ("edited@17", "signed", "refused:edited"),
        "delete_middle": ("missing@30", "missing@30", "refused:missing"),
        "swap_seqs": ("reordered@20", "rewritten@65", "refused:rewritten"),
        # The window no checkpoint covers yet: what the short tail bounds, and what a
        # receipt (test_audit_receipts) proves afterwards.
        "cut_tail_unanchored": ("ok", "signed", "ok"),
        "cut_tail_anchored": ("truncated@65", "truncated@65", "refused:truncated"),
        "rehash_one": ("forged@17", "rewritten@65", "refused:rewritten"),
        "rehash_suffix": ("forged@17", "rewritten@65", "refused:rewritten"),
        # The seal finds the exact event; the issuer cannot tell (it holds no
        # verification key), the auditor's check can.
        "forged_append": ("forged@71", "signed", "forged@71"),
    }.items() for wiped in (False, True)},
    ("drop_and_resign", False): ("forged@17", "rewritten@65", "refused:rewritten"),
    # Nothing of the log's own is left to hold it against: the issuer signs the rewritten
    # tree (size 70), and the witness, which cosigned size 65, refuses it.
    ("drop_and_resign", True): ("forged@17", "witness_refused@70",
                                "refused:witness_refused"),
}


@pytest.mark.parametrize("wipe_folder", [False, True], ids=["folder-kept", "folder-wiped"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_each_attack_is_found_by_the_tools_the_threat_model_says(
        name: str, wipe_folder: bool, configured: Settings, tmp_path: Path, pg_conn,  # type: ignore[no-untyped-def]
        witness_url) -> None:
    got = run_case(name, wipe_folder, configured, tmp_path, pg_conn, witness_url)
    assert got == EXPECTED[(name, wipe_folder)]
