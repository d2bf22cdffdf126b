"""What schemathesis found, pinned: text a database cannot store and numbers JSON cannot carry
exactly are refused with 422 and the field, never a 500."""

from __future__ import annotations


def test_nul_and_lone_surrogates_are_refused(client, make_person) -> None:  # type: ignore[no-untyped-def]
    auditor, admin = make_person("auditor"), make_person("admin")
    r = client.get("/api/v1/audit/events?action=a%00b", headers=auditor.headers)
    assert r.status_code == 422
    assert r.get_json()["error"]["details"]["errors"] == [
        {"field": "action", "code": "unstorable_text", "message": "NUL or an unpaired surrogate"}]
    r = client.post("/api/v1/teams", headers={**admin.headers,
                                              "Content-Type": "application/json"},
                    data=b'{"name": "x\\udc80y"}')
    assert r.status_code == 422
    assert r.get_json()["error"]["details"]["errors"][0]["field"] == "body.name"
    r = client.post("/api/v1/teams", headers={**admin.headers,
                                              "Content-Type": "application/json"},
                    data=b'{"name": "ok\\ud83d\\ude00"}')  # a pair passes this check
    assert all(e["code"] != "unstorable_text"
               for e in r.get_json()["error"]["details"]["errors"])


def test_numbers_beyond_exact_json_are_refused(client, make_person) -> None:  # type: ignore[no-untyped-def]
    admin = make_person("admin")
    r = client.post("/api/v1/policy/evaluate", headers=admin.headers,
                    json={"policy": "dispatch", "input": {"n": 2**60}})
    assert r.status_code == 422 and r.get_json()["error"]["details"]["errors"][0][
        "code"] == "not_canonical"
    r = client.get(f"/api/v1/audit/proofs/inclusion?seq={2**60}", headers=admin.headers)
    assert r.status_code == 422
