"""The request context: who asks, under which request id, on which read-cache generation.

An explicit frozen value that the web layer makes per request (and the batch runner per
line) and hands to the services on the request path; never read from ambient state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from charter.actor import Actor


@dataclass(frozen=True, slots=True)
class RequestContext:
    request_id: str | None
    generation: int | None = None  # the read cache's (charter.readcache); None: read fresh
    actor: Actor | None = None
    client: str = "unknown"  # the caller's address, for failed-authentication limits

    def with_actor(self, actor: Actor | None, generation: int | None) -> RequestContext:
        return dataclasses.replace(self, actor=actor, generation=generation)
