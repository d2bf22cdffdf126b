"""SCIM 2.0 against a real `charter serve`: the `scim2-tester` compliance checker (RFC 7643,
7644; written elsewhere) passes every check it runs on Users and Groups, and skips none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
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


RECORDINGS = Path(__file__).resolve().parents[1] / "scim_recordings"


@pytest.mark.parametrize("provider", ["entra", "okta"])
def test_a_providers_recorded_sequence_replays_against_a_multi_worker_server(  # type: ignore[no-untyped-def]
        configured, make_person, provider: str) -> None:
    """Each step of the provider's recorded sequence gets the answer it expects from
    `charter serve` with two workers; the step that deactivates the user ends the access
    of the key the person was given, on the very next request to any worker."""
    import httpx

    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key, scim_credential

    recording = json.loads((RECORDINGS / f"{provider}.json").read_text())
    token = scim_credential(provider).token
    saved: dict[str, str] = {}

    def filled(value: Any) -> Any:
        text = json.dumps(value)
        for name, found in saved.items():
            text = text.replace("{" + name + "}", found)
        return json.loads(text)

    with charter_serve(configured.database_url, workers=2) as (url, _):
        auth = {"Authorization": f"Bearer {token}"}
        person_key = None
        for n, step in enumerate(recording["steps"]):
            r = httpx.request(step["method"], f"{url}/scim/v2{filled(step['path'])}",
                              headers=auth, json=filled(step.get("body")), timeout=10)
            assert r.status_code == step["status"], (provider, n, r.text)
            body = r.json() if r.content else {}
            for key, want in step.get("expect", {}).items():
                assert body.get(key) == want, (provider, n, key, body)
            if "save" in step:
                saved[step["save"]] = body["id"]
            if step.get("save") == "user":  # the person gets a key of their own
                person_key = create_api_key(SYSTEM, body["id"], name="laptop").token
                for _ in range(4):
                    assert httpx.get(f"{url}/api/v1/me", timeout=10, headers={
                        "Authorization": f"Bearer {person_key}"}).status_code == 200
            if step.get("deprovisions"):
                for _ in range(6):  # every worker, fresh connections
                    assert httpx.get(f"{url}/api/v1/me", timeout=10, headers={
                        "Authorization": f"Bearer {person_key}"}).status_code == 401
    assert person_key is not None
