"""Fail closed when the audit log cannot be written: the app's database role loses INSERT on
audit_events (as an administrator might do by mistake, or an attacker to act unrecorded).
Nothing is dispatched and nothing changes; when the right comes back, so does service."""

from __future__ import annotations

import dataclasses

from charter.identity.models import Team
from tests.audit_support import role_without_audit_insert
from tests.batch_support import make_world


def test_no_audit_write_no_service_and_no_change(configured, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from charter.uow import unit_of_work
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    admin = make_person("admin")
    with role_without_audit_insert(pg_conn, world.settings.database_url) as (role, url):
        app = app_for(dataclasses.replace(world.settings, database_url=url))
        client = app.test_client()
        try:
            chat = {"model": "m", "max_tokens": 4,
                    "messages": [{"role": "user", "content": "unrecorded?"}]}
            r = client.post("/v1/chat/completions", headers=world.headers, json=chat)
            assert r.status_code == 503
            assert r.get_json()["error"]["code"] == "audit_unavailable"
            r = client.post("/generate", headers=world.headers,
                            json={"inputs": "unrecorded?", "parameters": {"max_new_tokens": 4}})
            assert r.status_code == 503 and "error" in r.get_json()
            assert world.node.hits == {}  # nothing reached the node
            r = client.post("/api/v1/teams", headers=admin.headers, json={"name": "ghost-team"})
            assert r.status_code == 503
            assert r.get_json()["error"]["code"] == "database_unavailable"
            with unit_of_work() as session:
                assert session.query(Team).filter_by(name="ghost-team").count() == 0

            pg_conn.execute(f"GRANT INSERT ON audit_events TO {role}")
            r = client.post("/v1/chat/completions", headers=world.headers, json=chat)
            assert r.status_code == 200, r.get_json()
            assert world.node.hits["unrecorded?"] == 1
        finally:
            world.node.stop()
            app.extensions["charter.runtime"].close()  # its connections, as the role, end
