"""Fail closed when the audit log cannot be written: the app's database role loses INSERT on
audit_events (as an administrator might do by mistake, or an attacker to act unrecorded).
Nothing is dispatched and nothing changes; when the right comes back, so does service."""

from __future__ import annotations

import dataclasses
import uuid

from sqlalchemy.engine import make_url

from charter.identity.models import Team
from tests.batch_support import make_world


def test_no_audit_write_no_service_and_no_change(configured, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from charter.uow import unit_of_work
    from tests.runtimes import app_for

    world = make_world(configured, make_person)
    admin = make_person("admin")
    role = f"charter_app_{uuid.uuid4().hex[:8]}"
    pg_conn.execute(f"CREATE ROLE {role} LOGIN")
    pg_conn.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    pg_conn.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public "
                    f"TO {role}")
    pg_conn.execute(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}")
    pg_conn.execute(f"REVOKE INSERT ON audit_events FROM {role}")
    url = make_url(world.settings.database_url).set(username=role)
    app = app_for(dataclasses.replace(
        world.settings, database_url=url.render_as_string(hide_password=False)))
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
        pg_conn.execute(f"DROP OWNED BY {role}")
        pg_conn.execute(f"DROP ROLE {role}")
