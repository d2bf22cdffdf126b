"""Receipts: lifecycle changes answer with a signed promise that the log holds their event;
whoever keeps it can hold any later export against it, which catches what no checkpoint
covered yet (the tail an insider could otherwise cut unseen)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from charter.audit.bundle import Selection
from charter.audit.keys import load_signers
from charter.audit.service import export_bundle
from charter.audit.verify import CheckpointError, Receipt, verify_bundle
from charter.audit.verify import main as charter_verify
from charter.runtime import Runtime
from charter.settings import Settings
from tests.audit_support import append_many, as_insider, signing
from tests.integration.test_registry_api import CONDITIONS, _draft
from tests.runtimes import app_for, bound_runtime


@pytest.fixture
def signed(configured: Settings, tmp_path: Path) -> Iterator[Runtime]:
    (tmp_path / "keys").mkdir()
    with bound_runtime(signing(configured, tmp_path / "keys")) as runtime:
        yield runtime


def _approved(runtime: Runtime, make_person) -> dict:  # type: ignore[no-untyped-def,type-arg]
    client = app_for(runtime.settings).test_client()
    steward, approver = make_person("steward"), make_person("approver")
    v = _draft(client, steward)
    r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers, json={})
    assert r.get_json()["receipt"]["action"] == "version.submit"
    r = client.post(f"/api/v1/versions/{v['id']}/approve", headers=approver.headers,
                    json=CONDITIONS)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["state"] == "approved"
    return body["receipt"]  # type: ignore[no-any-return]


def _bundle(settings: Settings) -> bytes:
    out = io.BytesIO()
    export_bundle(settings, Selection(), out, actor_ref="user:auditor")
    return out.getvalue()


def test_an_approval_answers_with_a_receipt_of_its_event(
        signed: Runtime, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    receipt = _approved(signed, make_person)
    keys = [s.verifier for s in load_signers(signed.settings)]
    opened = Receipt.open(json.dumps(receipt), keys)
    assert (opened.seq, opened.hash.hex(), opened.action) == (
        receipt["seq"], receipt["hash"], "version.approve")
    row = pg_conn.execute("SELECT action, hash FROM audit_events WHERE seq = %s",
                          (opened.seq,)).fetchone()
    assert row == ("version.approve", receipt["hash"])
    report = verify_bundle(_bundle(signed.settings), keys, receipts=[opened])
    assert report.ok and report.receipts == [{"seq": opened.seq, "status": "held"}]
    with pytest.raises(CheckpointError, match="no signature by a trusted key"):
        Receipt.open(receipt["note"], [])
    forged = receipt["note"].replace(f"seq {opened.seq}\n", f"seq {opened.seq + 1}\n")
    with pytest.raises(CheckpointError, match="does not verify"):
        Receipt.open(forged, keys)


def test_a_receipt_catches_the_tail_cut_before_any_checkpoint(
        signed: Runtime, make_person, pg_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    receipt = _approved(signed, make_person)
    keys = [s.verifier for s in load_signers(signed.settings)]
    seq = receipt["seq"]
    # No checkpoint covers the approval yet: the insider cuts the log before it.
    as_insider(pg_conn, f"DELETE FROM audit_events WHERE seq >= {seq}")
    bundle = _bundle(signed.settings)
    assert verify_bundle(bundle, keys).ok  # nothing else can tell
    report = verify_bundle(bundle, keys, receipts=[Receipt.open(receipt["note"], keys)])
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "receipt_missing",
                                                                seq)
    # The log grew again over the cut: another event now holds that seq.
    append_many(5)
    bundle = _bundle(signed.settings)
    report = verify_bundle(bundle, keys, receipts=[Receipt.open(receipt["note"], keys)])
    assert (report.ok, report.reason, report.first_bad_seq) == (False, "receipt_broken", seq)
    (tmp_path / "b.zip").write_bytes(bundle)
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    args = [str(tmp_path / "b.zip"), "--key", str(keys[0]), "--receipt",
            str(tmp_path / "receipt.json")]
    assert charter_verify(args) == 1
    assert charter_verify(args[:1] + args[3:]) == 2  # a receipt needs the log's keys


def test_every_lifecycle_change_answers_with_the_receipt_of_its_own_event(
        signed: Runtime, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from charter.db import utcnow
    from tests.integration.test_registry_api import VERSION

    client = app_for(signed.settings).test_client()
    keys = [s.verifier for s in load_signers(signed.settings)]
    steward, approver, admin = (make_person("steward"), make_person("approver"),
                                make_person("admin"))
    model = client.post("/api/v1/models", headers=steward.headers, json={
        "name": "TinyLlama", "publisher": "TinyLlama",
        "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"}).get_json()

    def _submitted(client, steward, **changes) -> dict:  # type: ignore[no-untyped-def,type-arg]
        v = client.post(f"/api/v1/models/{model['id']}/versions", headers=steward.headers,
                        json={**VERSION, "label": f"v{len(labels)}", **changes}).get_json()
        labels.append(v["id"])
        r = client.post(f"/api/v1/versions/{v['id']}/submit", headers=steward.headers,
                        json={})
        return r.get_json()  # type: ignore[no-any-return]

    labels: list[str] = []

    def receipt_of(r, action: str) -> None:  # type: ignore[no-untyped-def]
        assert r.status_code in (200, 201), r.get_json()
        opened = Receipt.open(json.dumps(r.get_json()["receipt"]), keys)
        row = pg_conn.execute("SELECT action, hash FROM audit_events WHERE seq = %s",
                              (opened.seq,)).fetchone()
        assert opened.action == action and row == (action, opened.hash.hex())

    waived = _submitted(client, steward, license_card="gemma")  # a finding to waive
    receipt_of(client.post(f"/api/v1/versions/{waived['id']}/exceptions",
                           headers=admin.headers, json={
                               "codes": ["license_mismatch"],
                               "justification": "legal confirmed the card is stale",
                               "expires_at": (utcnow() + timedelta(days=7)).isoformat()}),
               "version.exception")
    receipt_of(client.post(f"/api/v1/versions/{waived['id']}/reject",
                           headers=approver.headers, json={"reason": "not this one"}),
               "version.reject")
    for action in ("deprecate", "revoke"):
        v = _submitted(client, steward)
        assert client.post(f"/api/v1/versions/{v['id']}/approve", headers=approver.headers,
                           json=CONDITIONS).status_code == 200
        receipt_of(client.post(f"/api/v1/versions/{v['id']}/{action}",
                               headers=approver.headers, json={"reason": f"{action} it"}),
                   f"version.{action}")
