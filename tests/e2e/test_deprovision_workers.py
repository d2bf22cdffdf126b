"""A deprovisioned person's API key is refused on the very next gateway request, by every
worker of a multi-worker `charter serve`: each worker reads keys through its read cache,
and the revocation's commit advances the change generation every read checks."""

from __future__ import annotations

import httpx

from tests.batch_support import make_world
from tests.e2e.sites import charter_serve

WORKERS = 3
ROUNDS = 30  # fresh connections: the kernel spreads them over the workers' sockets
# After the revocation, each from an address of its own (127.0.0.2, .3, ...): a client
# that fails to authenticate more than CHARTER_AUTH_FAILURE_LIMIT (10) times a minute at
# one worker is throttled (429), which would hide whether that worker still accepted the
# key (20 from one address had a worker see 11 of them about one run in ten).
AFTER = 30


def _ask(url: str, token: str, source: str = "127.0.0.1") -> int:
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(timeout=10, transport=transport) as client:  # a new connection each
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
            answers = [_ask(url, leaver.token, f"127.0.0.{2 + i}") for i in range(AFTER)]
        assert answers == [401] * AFTER
    finally:
        world.node.stop()
