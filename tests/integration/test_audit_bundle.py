"""Export bundles verified offline: round trips (whole log, filtered), the API and the CLI,
and the tamper matrix on a bundle of 10,000+ events: every kind of tampering is found at
the right sequence number, and an untouched bundle raises no alarm."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charter.audit import checkpoints
from charter.audit.bundle import Selection
from charter.audit.checkpoint import Checkpoint, Signer, Verifier, parse, sign
from charter.audit.service import EventFilter, export_bundle, list_events
from charter.audit.verify import main as verify_main
from charter.audit.verify import verify_bundle
from tests.audit_support import ORIGIN, append_many, signing

EVENTS = 10_400
EVERY = 1_000  # a checkpoint every this many events while the log grows


def _export(settings, **selection) -> bytes:  # type: ignore[no-untyped-def]
    out = io.BytesIO()
    export_bundle(settings, Selection(**selection), out, actor_ref="user:auditor")
    return out.getvalue()


def _members(bundle: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(bundle)) as z:
        return {n: z.read(n) for n in z.namelist()}


def _pack(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def world(pg_template, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One log of 10,400 events with a checkpoint every 1,000, and its full export."""
    import uuid

    from charter.settings import Settings
    from tests.conftest import SECRET, _admin, pg_url
    from tests.runtimes import bind_runtime, release_runtime

    name = f"charter_t_{uuid.uuid4().hex[:10]}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"')
    folder = tmp_path_factory.mktemp("keys")
    base = Settings.from_env({}, database_url=pg_url(name), secret_key=SECRET)
    settings = signing(base, folder)
    bind_runtime(settings)
    for start in range(0, EVENTS, EVERY):
        append_many(min(EVERY, EVENTS - start), start=start)
        checkpoints.issue(settings, force=True)
    append_many(37, start=EVENTS)  # past the last checkpoint: the export signs one
    bundle = _export(settings)
    key = checkpoints.load_signers(settings)[0]
    yield {"settings": settings, "bundle": bundle, "key": key, "folder": folder}
    release_runtime()
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _lines(members: dict[str, bytes]) -> list[bytes]:
    return members["events.jsonl"].split(b"\n")[:-1]


def _with_lines(members: dict[str, bytes], lines: list[bytes]) -> dict[str, bytes]:
    return {**members, "events.jsonl": b"".join(line + b"\n" for line in lines)}


def _checkpoint_files(members: dict[str, bytes]) -> list[str]:
    return sorted(n for n in members if n.startswith("checkpoints/"))


def _first_covered(members: dict[str, bytes], index: int) -> int:
    """The first sequence number the index-th checkpoint of the bundle covers."""
    sizes = [json.loads(members["manifest.json"])["checkpoints"][i]["size"]
             for i in range(index + 1)]
    return sizes[index - 1] + 1 if index else 1


def test_an_untouched_bundle_verifies(world) -> None:  # type: ignore[no-untyped-def]
    report = verify_bundle(world["bundle"], [world["key"].verifier])
    assert report.ok, report.findings
    assert report.events == EVENTS + 37 and report.checkpoints == 12
    assert not report.keys_from_bundle
    # The same bundle repacked (another zip writer, other compression) is still fine.
    assert verify_bundle(_pack(_members(world["bundle"])), [world["key"].verifier]).ok
    own = verify_bundle(world["bundle"])
    assert own.ok and own.keys_from_bundle and own.keys == [str(world["key"].verifier)]


def test_a_filtered_export_proves_its_events_and_reveals_no_others(world) -> None:  # type: ignore[no-untyped-def]
    bundle = _export(world["settings"], actor="user:bob", team="analytics")
    members = _members(bundle)
    lines = [json.loads(line) for line in _lines(members)]
    assert lines and {(e["actor"], e["details"]["team"]) for e in lines} == {
        ("user:bob", "analytics")}
    report = verify_bundle(bundle, [world["key"].verifier])
    assert report.ok, report.findings
    assert report.events == len(lines)
    manifest = json.loads(members["manifest.json"])
    assert manifest["selection"] == {"actor": "user:bob", "team": "analytics"}
    # Only hashes of what was left out travel with it: no other event's content.
    blob = b"".join(members.values())
    assert b"user:alice" not in blob


def test_every_export_is_audited_and_a_refused_one_too(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import dataclasses

    before = len(list_events(EventFilter(action="audit.export", limit=1000)))
    _export(world["settings"], first_seq=5, last_seq=9)
    unsigned = dataclasses.replace(world["settings"], audit_signing_keys="")
    with pytest.raises(Exception, match="configure CHARTER_AUDIT_SIGNING_KEYS"):
        _export(unsigned)
    events = list_events(EventFilter(action="audit.export", limit=1000))[before:]
    assert [(e.outcome, e.details.get("events"), e.details.get("code")) for e in events] == [
        ("success", 5, None), ("denied", None, "no_signing_key")]


# --- the tamper matrix ----------------------------------------------------------------------

K = 4321  # the event most tampering aims at


def _edit(m: dict[str, bytes]) -> dict[str, bytes]:
    lines = _lines(m)
    lines[K - 1] = lines[K - 1].replace(b'"actor":"user:', b'"actor":"user:x')
    return _with_lines(m, lines)


def _delete(m: dict[str, bytes]) -> dict[str, bytes]:
    lines = _lines(m)
    del lines[K - 1]
    return _with_lines(m, lines)


def _insert(m: dict[str, bytes]) -> dict[str, bytes]:
    lines = _lines(m)
    forged = json.loads(lines[K - 1])
    forged.update(seq=K + 1, actor="user:mallory")
    lines.insert(K, json.dumps(forged, sort_keys=True, separators=(",", ":")).encode())
    return _with_lines(m, lines)


def _reorder(m: dict[str, bytes]) -> dict[str, bytes]:
    lines = _lines(m)
    lines[K - 1], lines[K] = lines[K], lines[K - 1]
    return _with_lines(m, lines)


def _duplicate(m: dict[str, bytes]) -> dict[str, bytes]:
    lines = _lines(m)
    lines.insert(K, lines[K - 1])
    return _with_lines(m, lines)


def _truncate(m: dict[str, bytes]) -> dict[str, bytes]:
    return _with_lines(m, _lines(m)[:-100])


def _drop_checkpoint(m: dict[str, bytes]) -> dict[str, bytes]:
    name = _checkpoint_files(m)[4]
    return {n: b for n, b in m.items() if n != name}


def _bad_signature(m: dict[str, bytes]) -> dict[str, bytes]:
    name = _checkpoint_files(m)[4]
    body, sig = m[name].decode().split("\n\n")
    prefix, b64 = sig.rsplit(" ", 1)
    blob = bytearray(base64.b64decode(b64))
    blob[10] ^= 0x01
    return {**m, name: f"{body}\n\n{prefix} {base64.b64encode(blob).decode()}\n".encode()}


def _swapped_key_id(m: dict[str, bytes]) -> dict[str, bytes]:
    name = _checkpoint_files(m)[4]
    body, sig = m[name].decode().split("\n\n")
    prefix, b64 = sig.rsplit(" ", 1)
    blob = base64.b64decode(b64)
    other = Signer(ORIGIN, __import__("cryptography.hazmat.primitives.asymmetric.ed25519",
                                      fromlist=["x"]).Ed25519PrivateKey.generate())
    blob = other.verifier.key_id + blob[4:]
    return {**m, name: f"{body}\n\n{prefix} {base64.b64encode(blob).decode()}\n".encode()}


def _forged_proof(m: dict[str, bytes]) -> dict[str, bytes]:
    proofs = json.loads(m["proofs.json"])
    entry = proofs["inclusion"][4]
    lo, hi, h = entry["nodes"][0]
    entry["nodes"][0] = [lo, hi, ("0" if h[0] != "0" else "1") + h[1:]]
    return {**m, "proofs.json": json.dumps(proofs).encode()}


def _manifest_edit(m: dict[str, bytes]) -> dict[str, bytes]:
    manifest = json.loads(m["manifest.json"])
    manifest["selection"] = {"actor": "user:someone-else"}
    return {**m, "manifest.json": json.dumps(manifest).encode()}


def _fork(key: Signer) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    """A checkpoint signed with the real key (an insider, or a stolen key) over a different
    tree of the same size."""
    def tamper(m: dict[str, bytes]) -> dict[str, bytes]:
        name = _checkpoint_files(m)[4]
        cp, _ = parse(m[name].decode())
        forked = Checkpoint(cp.origin, cp.size, bytes(32), cp.extensions)
        return {**m, name: sign(forked, key).encode()}
    return tamper


CASES: list[tuple[str, Callable[..., dict[str, bytes]], int | str, str]] = [
    ("edit", _edit, K, "edited"),
    ("delete", _delete, K, "missing"),
    ("insert", _insert, K + 1, "inserted"),
    ("reorder", _reorder, K, "reordered"),
    ("duplicate", _duplicate, K + 1, "duplicated"),
    ("truncate the tail", _truncate, EVENTS + 37 - 99, "missing"),
    ("drop a checkpoint", _drop_checkpoint, "cp4", "checkpoint_missing"),
    ("bad signature", _bad_signature, "cp4", "checkpoint_signature"),
    ("swapped key id", _swapped_key_id, "cp4", "checkpoint_signature"),
    ("forged inclusion proof", _forged_proof, "cp4", "inclusion"),
]


@pytest.mark.parametrize(("kind", "tamper", "seq", "reason"), CASES, ids=[c[0] for c in CASES])
def test_tampering_is_found_at_the_right_sequence_number(world, kind, tamper, seq, reason) -> None:  # type: ignore[no-untyped-def]
    members = _members(world["bundle"])
    expected = _first_covered(members, 4) if seq == "cp4" else seq
    report = verify_bundle(_pack(tamper(members)), [world["key"].verifier])
    assert not report.ok
    assert (report.first_bad_seq, report.reason) == (expected, reason), report.findings


def test_a_forked_checkpoint_is_found_by_its_proofs_and_by_the_copies_kept_elsewhere(world) -> None:  # type: ignore[no-untyped-def]
    members = _members(world["bundle"])
    tampered = _pack(_fork(world["key"])(members))
    report = verify_bundle(tampered, [world["key"].verifier])
    assert (report.first_bad_seq, report.reason) == (_first_covered(members, 4),
                                                     "checkpoint_fork")
    kept = {}
    for name in _checkpoint_files(members):
        note = members[name].decode()
        kept.setdefault(parse(note)[0].size, []).append(note)
    report = verify_bundle(tampered, [world["key"].verifier], kept)
    assert any(f.reason == "checkpoint_fork" and "kept elsewhere" in f.message
               for f in report.findings)
    assert verify_bundle(world["bundle"], [world["key"].verifier], kept).ok


def test_a_changed_manifest_or_a_stranger_key_is_refused(world) -> None:  # type: ignore[no-untyped-def]
    members = _members(world["bundle"])
    report = verify_bundle(_pack(_manifest_edit(members)), [world["key"].verifier])
    assert (report.first_bad_seq, report.reason) == (None, "manifest_signature")
    stranger = Signer(ORIGIN, __import__("cryptography.hazmat.primitives.asymmetric.ed25519",
                                         fromlist=["x"]).Ed25519PrivateKey.generate())
    report = verify_bundle(world["bundle"], [stranger.verifier])
    assert not report.ok and report.first_bad_seq == 1
    assert report.reason == "checkpoint_signature"


def test_the_cli_and_the_module_copied_on_its_own(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bundle.zip"
    path.write_bytes(world["bundle"])
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{world['key'].verifier}\n")
    assert verify_main([str(path), "--keys", str(keys)]) == 0
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_pack(_edit(_members(world["bundle"]))))
    assert verify_main([str(bad), "--key", str(world["key"].verifier)]) == 1
    # The verifier as one file in an empty folder, no charter package importable, -I.
    import charter.audit.verify as module

    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "verify.py").write_text(Path(module.__file__).read_text())
    run = subprocess.run([sys.executable, "-I", str(alone / "verify.py"), str(bad),
                          "--keys", str(keys)], capture_output=True, text=True, cwd=alone,
                         timeout=120)
    assert run.returncode == 1, run.stderr
    assert f"first bad sequence number: {K} (edited)" in run.stdout
    run = subprocess.run([sys.executable, "-I", str(alone / "verify.py"), str(path),
                          "--keys", str(keys), "--json"], capture_output=True, text=True,
                         cwd=alone, timeout=120)
    assert run.returncode == 0 and json.loads(run.stdout)["ok"] is True


def test_exports_over_the_api(world, make_person_for) -> None:  # type: ignore[no-untyped-def]
    client, auditor, user = make_person_for(world["settings"])
    r = client.post("/api/v1/audit/exports", headers=auditor.headers,
                    json={"first_seq": 100, "last_seq": 199})
    assert r.status_code == 200 and r.mimetype == "application/zip"
    report = verify_bundle(r.data, [world["key"].verifier])
    assert report.ok and report.events == 100
    r = client.post("/api/v1/audit/exports", headers=user.headers, json={})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
    r = client.post("/api/v1/audit/exports", headers=auditor.headers,
                    json={"since": "2026-12-02T00:00:00Z", "until": "2026-12-01T00:00:00Z"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_failed"
    keys = client.get("/api/v1/audit/keys").get_json()
    assert keys["origin"] == ORIGIN and [k["verifier"] for k in keys["keys"]] == [
        str(world["key"].verifier)]
    latest = client.get("/api/v1/audit/checkpoints/latest", headers=auditor.headers).get_json()
    size = latest["size"]
    proof = client.get(f"/api/v1/audit/proofs/inclusion?seq=1234&size={size}",
                       headers=auditor.headers).get_json()
    from charter.audit.verify import leaf_hash, verify, verify_consistency, verify_inclusion

    trusted = [Verifier.parse(keys["keys"][0]["verifier"])]
    root = verify(proof["checkpoint"]["note"], trusted).root_hash
    verify_inclusion(leaf_hash(bytes.fromhex(proof["event_hash"])), 1233, size,
                     [bytes.fromhex(h) for h in proof["path"]], root)
    covering = client.get("/api/v1/audit/proofs/inclusion?seq=1234",
                          headers=auditor.headers).get_json()
    assert covering["tree_size"] == 2000
    c = client.get(f"/api/v1/audit/proofs/consistency?first=2000&second={size}",
                   headers=auditor.headers).get_json()
    verify_consistency(2000, size, verify(c["first"]["note"], trusted).root_hash, root,
                       [bytes.fromhex(h) for h in c["path"]])
    r = client.get("/api/v1/audit/proofs/consistency?first=2001&second=3000",
                   headers=auditor.headers)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "no_checkpoint"
    r = client.get("/api/v1/audit/proofs/inclusion", headers=auditor.headers)
    assert r.status_code == 422 and r.get_json()["error"]["details"]["errors"][0][
        "field"] == "seq"
    page = client.get("/api/v1/audit/checkpoints?limit=5", headers=auditor.headers).get_json()
    assert [c["size"] for c in page["checkpoints"]] == [1000, 2000, 3000, 4000, 5000]
    assert page["next_after_id"] is not None


@pytest.fixture
def make_person_for():  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import actor_of, create_api_key, create_user
    from tests.conftest import Person
    from tests.runtimes import app_for

    def make(settings):  # type: ignore[no-untyped-def]
        import uuid

        people = []
        for role in ("auditor", "user"):
            user = create_user(SYSTEM, username=f"{role}-{uuid.uuid4().hex[:6]}",
                               roles=[role])
            people.append(Person(actor_of(user), create_api_key(SYSTEM, user.id,
                                                                name="t").token))
        return app_for(settings).test_client(), *people

    return make


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(index=st.integers(min_value=0, max_value=EVENTS + 36), byte=st.integers(0, 400),
       flip=st.integers(1, 255))
def test_any_changed_byte_of_any_event_is_found_there(world, index: int, byte: int,  # type: ignore[no-untyped-def]
                                                      flip: int) -> None:
    members = _members(world["bundle"])
    lines = _lines(members)
    line = bytearray(lines[index])
    line[byte % len(line)] ^= flip
    lines[index] = bytes(line)
    report = verify_bundle(_pack(_with_lines(members, lines)), [world["key"].verifier])
    assert not report.ok and report.first_bad_seq == index + 1
    assert report.reason in ("edited", "inserted")  # "inserted" when the seq itself changed
