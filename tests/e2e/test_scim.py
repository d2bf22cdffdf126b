"""SCIM 2.0 against a real `charter serve`: the `scim2-tester` compliance checker (RFC 7643,
7644; written elsewhere) passes every check it runs on Users and Groups, and skips none."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.sites import charter_serve


@pytest.fixture
def scim_site(configured) -> Iterator[tuple[str, str]]:  # type: ignore[no-untyped-def]
    from charter.identity.service import scim_credential

    token = scim_credential("tester").token
    with charter_serve(configured.database_url) as (url, _):
        yield url, token


def _client(url: str, token: str) -> Any:
    from httpx2 import Client
    from scim2_client.engines.httpx2 import SyncSCIMClient

    return SyncSCIMClient(Client(base_url=f"{url}/scim/v2", timeout=10,
                                 headers={"Authorization": f"Bearer {token}"}))


def test_the_compliance_checker_passes(scim_site) -> None:  # type: ignore[no-untyped-def]
    from scim2_tester import Status, check_server

    url, token = scim_site
    results = check_server(_client(url, token))
    failed = [(r.status.name, r.title, r.reason) for r in results
              if r.status != Status.SUCCESS]
    assert not failed, failed  # nothing failed, and nothing skipped
    # discovery, refusals, and on Users and Groups: CRUD, attribute selection, PATCH
    assert len(results) >= 60
