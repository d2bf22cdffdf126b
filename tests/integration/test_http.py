"""HTTP plumbing: OpenAPI matches the routes, error shape, request ids, probes, metrics, auth."""

from __future__ import annotations

import re
from datetime import timedelta

from charter.db import utcnow


def test_openapi_matches_the_routes(app, client) -> None:  # type: ignore[no-untyped-def]
    doc = client.get("/api/v1/openapi.json").get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    routed = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1") or rule.rule == "/api/v1/openapi.json":
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routed.add((path, method))
    assert documented == routed
    for ops in doc["paths"].values():
        for op in ops.values():
            for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', str(op)):
                assert ref in doc["components"]["schemas"]


def test_request_id_is_echoed_or_generated(client) -> None:  # type: ignore[no-untyped-def]
    r = client.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    r = client.get("/healthz", headers={"X-Request-Id": "bad id <script>" + "x" * 80})
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])


def test_authentication_failures(client, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import revoke_api_key

    for headers, code in [
        ({}, "unauthenticated"),
        ({"Authorization": "Basic abc"}, "invalid_credentials"),
        ({"Authorization": "Bearer chk_0000000000000000_nope"}, "invalid_credentials"),
        ({"Authorization": "Bearer not-a-key"}, "invalid_credentials"),
    ]:
        r = client.get("/api/v1/models", headers=headers)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == code
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    person = make_person("user")
    assert client.get("/api/v1/me", headers=person.headers).get_json()["username"] == \
        person.actor.username
    key_id = person.token.split("_")[1]
    revoke_api_key(SYSTEM, key_id)
    r = client.get("/api/v1/me", headers=person.headers)
    assert r.get_json()["error"]["code"] == "invalid_credentials"


def test_api_keys_are_hashed_shown_once_and_expire(client, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    admin = make_person("admin")
    user = make_person("user")
    r = client.post(f"/api/v1/users/{user.actor.user_id}/api-keys", headers=admin.headers,
                    json={"name": "ci", "expires_at": (utcnow() + timedelta(days=1)).isoformat()})
    assert r.status_code == 201
    token = r.get_json()["token"]
    secret = token.split("_", 2)[2]
    stored = pg_conn.execute("SELECT secret_sha256 FROM api_keys WHERE id = %s",
                             (token.split("_")[1],)).fetchone()[0]
    assert secret not in stored and len(stored) == 64
    listed = client.get(f"/api/v1/users/{user.actor.user_id}/api-keys", headers=admin.headers)
    assert all("token" not in k for k in listed.get_json())
    pg_conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = %s",
                    (token.split("_")[1],))
    r = client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"})
    assert r.get_json()["error"]["code"] == "invalid_credentials"
    r = client.post(f"/api/v1/users/{user.actor.user_id}/api-keys", headers=user.headers,
                    json={"name": "old", "expires_at": "2001-01-01T00:00:00Z"})
    assert r.get_json()["error"]["code"] == "validation_failed"


def test_last_admin_keeps_the_role(client, make_person) -> None:  # type: ignore[no-untyped-def]
    admin = make_person("admin")
    me = client.get("/api/v1/me", headers=admin.headers).get_json()
    r = client.put(f"/api/v1/users/{me['id']}/roles", headers=admin.headers,
                   json={"row_version": me["row_version"], "roles": ["auditor"]})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "last_admin"
    other = make_person("user")
    o = client.get(f"/api/v1/users/{other.actor.user_id}", headers=admin.headers).get_json()
    r = client.put(f"/api/v1/users/{o['id']}/roles", headers=admin.headers,
                   json={"row_version": o["row_version"], "roles": ["steward", "admin"]})
    assert r.status_code == 200 and r.get_json()["roles"] == ["admin", "steward"]
    r = client.put(f"/api/v1/users/{o['id']}/roles", headers=admin.headers,
                   json={"row_version": o["row_version"], "roles": ["user"]})
    assert r.get_json()["error"]["code"] == "stale_version"


def test_metrics_and_health(client) -> None:  # type: ignore[no-untyped-def]
    client.get("/healthz")
    body = client.get("/metrics").get_data(as_text=True)
    assert "charter_http_requests_total" in body
    assert client.get("/healthz").get_json()["status"] == "ok"
