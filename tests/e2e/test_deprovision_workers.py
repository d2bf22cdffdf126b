"""A deprovisioned person's API key is refused on the very next gateway request, by every
worker of a multi-worker `charter serve`: each worker reads keys through its read cache,
and the revocation's commit advances the change generation every read checks."""

from __future__ import annotations

import httpx

from tests.batch_support import make_world
from tests.e2e.sites import charter_serve

WORKERS = 3
ROUNDS = 30  # fresh connections: the kernel spreads them over the workers' sockets
# After the revocation: fewer than the failed authentications one client may make before
# it is throttled (429), which would hide whether a worker still accepted the key.
AFTER = 20


def _ask(url: str, token: str) -> int:
    with httpx.Client(timeout=10) as client:  # a new connection each time
        return client.post(f"{url}/v1/chat/completions",
                           headers={"Authorization": f"Bearer {token}"},
                           json={"model": "m", "max_tokens": 2, "messages": [
                               {"role": "user", "content": "hello"}]}).status_code


def test_every_worker_refuses_the_key_on_the_next_request(configured, make_person) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.teams import set_member

    world = make_world(configured, make_person)
    try:
        leaver, admin = make_person("user"), make_person("admin")
        set_member(SYSTEM, world.team_id, leaver.actor.user_id, "member")
        with charter_serve(world.settings.database_url, workers=WORKERS) as (url, _):
            assert [_ask(url, leaver.token) for _ in range(ROUNDS)] == [200] * ROUNDS
            r = httpx.post(f"{url}/api/v1/users/{leaver.actor.user_id}/deprovision",
                           headers=admin.headers, json={"reason": "left"}, timeout=10)
            assert r.status_code == 200, r.text
            answers = [_ask(url, leaver.token) for _ in range(AFTER)]
        assert answers == [401] * AFTER
    finally:
        world.node.stop()
