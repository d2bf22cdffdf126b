"""The endpoint x role access matrix, kept as code.

Every route in the app's url_map must appear in MATRIX; each is called as anonymous, with
an expired key, as each role, and as a member of another team. Allowed callers must not be
refused (401/403); others must get exactly the refusal the matrix names.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest

from charter.db import utcnow

ROLES = ("admin", "steward", "approver", "operator", "auditor", "user")
ALL = frozenset(ROLES)
CALLERS = ("anonymous", "expired", *ROLES, "other_team")
PUBLIC = "public"


@dataclasses.dataclass(frozen=True)
class Rule:
    allow: frozenset[str] | str  # roles allowed, PUBLIC, or CONSOLE
    body: Callable[[dict[str, Any]], Any] | None = None
    team_scoped: bool = False  # another team's member gets 404 instead of 403
    other_team_allowed: bool = False  # the route is not team-scoped and open to any user


def R(*roles: str, **kw: Any) -> Rule:  # noqa: N802 - reads like the table it builds
    return Rule(frozenset(roles) if roles else ALL, **kw)


def _version_body(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"label": f"m{ctx['n']}", "files": []}


def _conditions(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
            "allowed_purposes": ["assistant"],
            "expires_at": (utcnow() + timedelta(days=30)).isoformat()}


def _fresh_team(name: str) -> str:
    from charter.actor import SYSTEM
    from charter.identity.teams import create_team

    return create_team(SYSTEM, name=name, description="", entitlements={},
                       requests_per_day=None, default_data_class="internal").id


def _capture_body(ctx: dict[str, Any]) -> dict[str, Any]:
    """A capture of a team of its own (a team has one asked-for capture at a time)."""
    return {"team_id": _fresh_team(f"cap-body-{ctx['n']}"), "hours": 1, "retain_days": 1,
            "reason": "an investigation into the matrix's callers"}


def _capture(n: int, asker: Any) -> str:
    """A capture asked for by `asker` (an admin no caller is), for the routes on one."""
    from charter.inspection.captures import request_capture

    return request_capture(asker.actor, team_id=_fresh_team(f"cap-{n}"), hours=1,
                           retain_days=1, reason="an investigation into the matrix").id


ANY = dict(other_team_allowed=True)
NODE_URL = "http://127.0.0.1:9"  # loopback, and nothing listens on the discard port
MATRIX: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule(PUBLIC),
    ("GET", "/readyz"): Rule(PUBLIC),
    ("GET", "/metrics"): Rule(PUBLIC),
    ("GET", "/api/v1/openapi.json"): Rule(PUBLIC),
    ("GET", "/api/v1/models"): R(**ANY),
    ("POST", "/api/v1/models"): R("admin", "steward", body=lambda c: {
        "name": f"model-{c['n']}", "publisher": "TinyLlama", "source_repo": "x/y"}),
    ("GET", "/api/v1/models/<model_id>"): R(**ANY),
    ("GET", "/api/v1/models/<model_id>/versions"): R(**ANY),
    ("POST", "/api/v1/models/<model_id>/versions"): R("admin", "steward", body=_version_body),
    ("GET", "/api/v1/versions"): R(**ANY),
    ("GET", "/api/v1/versions/<version_id>"): R(**ANY),
    ("PATCH", "/api/v1/versions/<version_id>"): R("admin", "steward", body=lambda c: {
        "row_version": 1, "intended_use": "x"}),
    ("POST", "/api/v1/versions/<version_id>/submit"): R("admin", "steward", body=lambda c: {}),
    ("POST", "/api/v1/versions/<version_id>/approve"): R("admin", "approver", body=_conditions),
    ("POST", "/api/v1/versions/<version_id>/reject"): R("admin", "approver",
                                                        body=lambda c: {"reason": "no way"}),
    ("POST", "/api/v1/versions/<version_id>/deprecate"): R("admin", "approver",
                                                           body=lambda c: {"reason": "old"}),
    ("POST", "/api/v1/versions/<version_id>/revoke"): R("admin", "approver",
                                                        body=lambda c: {"reason": "bad"}),
    ("POST", "/api/v1/versions/<version_id>/admission"): R("admin", "steward", "approver"),
    ("POST", "/api/v1/versions/<version_id>/evaluations"): R("admin", "steward", body=lambda c: {
        "content": "{}"}),
    ("GET", "/api/v1/versions/<version_id>/evaluations"): R(**ANY),
    ("POST", "/api/v1/versions/<version_id>/exceptions"): R("admin", body=lambda c: {
        "codes": ["no_weight_files"], "justification": "a justification that is long enough",
        "expires_at": (utcnow() + timedelta(days=3)).isoformat()}),
    ("GET", "/api/v1/me"): R(**ANY),
    ("GET", "/api/v1/users"): R("admin", "auditor"),
    ("POST", "/api/v1/users"): R("admin", body=lambda c: {"username": f"new-{c['n']}"}),
    ("GET", "/api/v1/users/<user_id>"): R(team_scoped=True),
    ("GET", "/api/v1/exports/users/<user_id>/offboarding"): R("admin", "auditor"),
    ("POST", "/api/v1/users/<user_id>/deprovision"): R("admin", body=lambda c: {
        "reason": "left the company"}),
    ("PUT", "/api/v1/users/<user_id>/roles"): R("admin", body=lambda c: {
        "row_version": 1, "roles": ["user"]}),
    ("GET", "/api/v1/users/<user_id>/api-keys"): R(team_scoped=True),
    ("POST", "/api/v1/users/<user_id>/api-keys"): R("admin", team_scoped=True,
                                                    body=lambda c: {"name": "k"}),
    ("POST", "/api/v1/api-keys/<key_id>/revoke"): R("admin", team_scoped=True),
    ("PUT", "/api/v1/api-keys/<key_id>/limits"): R("admin", team_scoped=True, body=lambda c: {
        "limits": {"requests_per_minute": 5}}),
    ("GET", "/api/v1/audit/events"): R("admin", "auditor"),
    ("POST", "/api/v1/audit/verify"): R("admin", "auditor"),
    ("GET", "/api/v1/audit/keys"): Rule(PUBLIC),
    ("GET", "/api/v1/audit/checkpoints"): R("admin", "auditor"),
    ("GET", "/api/v1/audit/checkpoints/latest"): R("admin", "auditor"),
    # Without `seq` (or sizes) an allowed caller gets 422; without a key an export 409.
    ("GET", "/api/v1/audit/proofs/inclusion"): R("admin", "auditor"),
    ("GET", "/api/v1/audit/proofs/consistency"): R("admin", "auditor"),
    ("POST", "/api/v1/audit/exports"): R("admin", "auditor", body=lambda c: {}),
    ("GET", "/api/v1/exports/ml-bom"): R("admin", "auditor"),
    ("GET", "/api/v1/exports/versions/<version_id>/evidence"): R("admin", "auditor"),
    # Without a period an allowed caller gets 422; everyone else 403 before that.
    ("GET", "/api/v1/exports/records"): R("admin", "auditor"),
    ("GET", "/api/v1/policy"): R(**ANY),
    ("POST", "/api/v1/policy/evaluate"): R("admin", "steward", "approver", body=lambda c: {
        "policy": "dispatch", "input": {}}),
    ("GET", "/api/v1/teams"): R(**ANY),
    ("POST", "/api/v1/teams"): R("admin", body=lambda c: {"name": f"team-{c['n']}"}),
    ("GET", "/api/v1/teams/<team_id>"): R(team_scoped=True),
    ("PATCH", "/api/v1/teams/<team_id>"): R("admin", team_scoped=True,
                                            body=lambda c: {"row_version": 1}),
    ("GET", "/api/v1/teams/<team_id>/members"): R(team_scoped=True),
    ("PUT", "/api/v1/teams/<team_id>/members/<user_id>"): R(
        "admin", team_scoped=True, body=lambda c: {"team_role": "member"}),
    ("DELETE", "/api/v1/teams/<team_id>/members/<user_id>"): R("admin", team_scoped=True),
    ("GET", "/api/v1/nodes"): R("admin", "operator", "auditor"),
    ("POST", "/api/v1/nodes"): R("admin", "operator", body=lambda c: {
        "name": f"node-{c['n']}", "base_url": NODE_URL, "region": "eu-central"}),
    ("GET", "/api/v1/nodes/<node_id>"): R("admin", "operator", "auditor"),
    ("POST", "/api/v1/nodes/<node_id>/probe"): R("admin", "operator"),
    ("POST", "/api/v1/nodes/<node_id>/agent"): R("admin", "operator", body=lambda c: {
        "agent_url": NODE_URL, "agent_key": "A" * 43 + "=", "row_version": 1}),
    ("POST", "/api/v1/nodes/<node_id>/drain"): R("admin", "operator",
                                                 body=lambda c: {"reason": "maintenance"}),
    ("POST", "/api/v1/nodes/<node_id>/restore"): R("admin", "operator",
                                                   body=lambda c: {"reason": "back"}),
    ("GET", "/api/v1/deployments"): R(**ANY),
    ("GET", "/api/v1/usage"): R(**ANY),
    ("GET", "/api/v1/chargeback"): R(**ANY),
    ("GET", "/api/v1/inspection/counts"): R("admin", "auditor"),
    ("GET", "/api/v1/captures"): R("admin", "auditor"),
    ("POST", "/api/v1/captures"): R("admin", body=_capture_body),
    ("GET", "/api/v1/captures/<capture_id>"): R("admin", "auditor"),
    ("POST", "/api/v1/captures/<capture_id>/approve"): R("auditor", body=lambda c: {
        "row_version": 1}),
    ("POST", "/api/v1/captures/<capture_id>/reject"): R("auditor", body=lambda c: {
        "row_version": 1}),
    ("POST", "/api/v1/captures/<capture_id>/revoke"): R("admin", "auditor", body=lambda c: {
        "row_version": 1}),
    ("GET", "/api/v1/captures/<capture_id>/records"): R("auditor"),
    ("GET", "/api/v1/prices"): R("admin", "auditor"),
    ("PUT", "/api/v1/prices/<version_id>"): R("admin", body=lambda c: {
        "currency": "EUR", "input_per_million": "1", "output_per_million": "2"}),
    ("POST", "/api/v1/deployments"): R("admin", "operator", body=lambda c: {
        "serving_name": f"dep-{c['n']}", "version_id": c["version_id"],
        "node_ids": [c["node_id"]]}),
    ("POST", "/api/v1/deployments/<deployment_id>/deactivate"): R("admin", "operator"),
    ("POST", "/api/v1/deployments/<deployment_id>/activate"): R("admin", "operator"),
    # The gateway: any authenticated caller; the dispatch policy decides per request.
    ("POST", "/v1/chat/completions"): R(**ANY, body=lambda c: {
        "model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
    ("POST", "/v1/completions"): R(**ANY, body=lambda c: {"model": "nope", "prompt": "hi"}),
    ("GET", "/v1/models"): R(**ANY),
    ("POST", "/generate"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/generate_stream"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("GET", "/info"): R(**ANY),
    ("POST", "/tgi/<name>/generate"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tgi/<name>/generate_stream"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tgi/<name>/"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tgi/<name>"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("GET", "/tgi/<name>/info"): R(**ANY),
    ("POST", "/v1/embeddings"): R(**ANY, body=lambda c: {"model": "nope", "input": "hi"}),
    ("POST", "/embed"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tei/<name>/embed"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tei/<name>/"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("POST", "/tei/<name>"): R(**ANY, body=lambda c: {"inputs": "hi"}),
    ("GET", "/tei/<name>/info"): R(**ANY),
    # Files and batches: any authenticated caller; each sees its own (404 for others').
    ("POST", "/v1/files"): R(**ANY),
    ("GET", "/v1/files"): R(**ANY),
    ("GET", "/v1/files/<file_id>"): R(**ANY),
    ("GET", "/v1/files/<file_id>/content"): R(**ANY),
    ("DELETE", "/v1/files/<file_id>"): R(**ANY),
    ("POST", "/v1/batches"): R(**ANY, body=lambda c: {
        "input_file_id": "file-nope", "endpoint": "/v1/chat/completions",
        "completion_window": "24h"}),
    ("GET", "/v1/batches"): R(**ANY),
    ("GET", "/v1/batches/<batch_id>"): R(**ANY),
    ("POST", "/v1/batches/<batch_id>/cancel"): R(**ANY),
    ("GET", "/api/v1/teams/<team_id>/service-accounts"): R(team_scoped=True),
    ("POST", "/api/v1/teams/<team_id>/service-accounts"): R(
        "admin", team_scoped=True, body=lambda c: {"username": f"bot-{c['n']}"}),
}
# The console is a browser surface with its own sessions (tests/e2e drive it): a bearer
# credential must change nothing there, so every caller gets what an anonymous one gets.
CONSOLE = "console"
SCIM = "scim"  # /scim/v2: only an identity provider's credential (none of the callers here)
MATRIX.update({
    ("GET", "/static/<path:filename>"): Rule(PUBLIC),
    ("GET", "/console/static/<path:filename>"): Rule(PUBLIC),
    ("GET", "/console/login"): Rule(CONSOLE),
    ("GET", "/console/callback"): Rule(CONSOLE),
    ("GET", "/console/"): Rule(CONSOLE),
    ("POST", "/console/logout"): Rule(CONSOLE),
})


@pytest.fixture
def matrix_app(configured):  # type: ignore[no-untyped-def]
    from tests.runtimes import app_for

    # Hundreds of deliberate 401s from one address must not trip the failure limit here;
    # nodes live on loopback (the probe route really connects: never a private network).
    return app_for(dataclasses.replace(configured, auth_failure_limit=100_000,
                                          node_allowed_networks="127.0.0.0/8"))


def _approved_version(owner, n: int, *, name: str | None = None,  # type: ignore[no-untyped-def]
                      files: list[tuple[str, int, str]] | None = None) -> str:
    """A version approved for real: pinned, digests, admission allows, a second approver.
    `files`: (path, size, sha256) to pin instead of one made-up weights file."""
    from charter.actor import SYSTEM
    from charter.registry import service as registry
    from charter.registry.schemas import (
        ApprovalConditions,
        FileSpec,
        ModelCreate,
        Transition,
        VersionSpec,
    )

    name = name or f"approved-{n}"
    model = registry.create_model(owner.actor, ModelCreate(
        name=name, publisher="TinyLlama", source_repo=f"x/{name}"))
    version = registry.create_version(owner.actor, model.id, VersionSpec(
        label="1", source_revision="a" * 40, weight_format="safetensors",
        files=[FileSpec(path=p, size=size, sha256=digest) for p, size, digest in
               files or [("model.safetensors", 1, "b" * 64)]],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["d"], storage_region="eu-central", hosting_regions=["eu-central"]))
    registry.submit_version(owner.actor, version.id, Transition())
    conditions = ApprovalConditions.model_validate_json(json.dumps(_conditions({})))
    registry.approve_version(SYSTEM, version.id, conditions)
    return version.id


def _routes(app) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """Flask's routes, and the dispatch routes answered in front of Flask."""
    from charter.dispatch.wsgi import PATHS

    out = {("POST", path) for path in PATHS}
    for rule in app.url_map.iter_rules():
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            out.add((method, rule.rule))
    return out


def _matrix(app) -> dict[tuple[str, str], Rule]:  # type: ignore[no-untyped-def]
    """MATRIX, with every other console page as a console route: a bearer credential must
    change nothing there (the pages' own role checks: tests/integration/test_console_*)."""
    console = {r: Rule(CONSOLE) for r in _routes(app) if r[1].startswith("/console/")}
    scim = {r: Rule(SCIM) for r in _routes(app) if r[1].startswith("/scim/v2/")}
    return {**console, **scim, **MATRIX}


def test_every_route_is_in_the_matrix(matrix_app) -> None:  # type: ignore[no-untyped-def]
    routes = _routes(matrix_app)
    matrix = _matrix(matrix_app)
    assert routes - set(matrix) == set(), "routes missing from the access matrix"
    assert set(matrix) - routes == set(), "matrix entries for routes that do not exist"


def test_access_matrix(matrix_app, make_person, pg_conn) -> None:  # type: ignore[no-untyped-def]
    from charter.actor import SYSTEM
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team, set_member
    from charter.nodes.service import create_deployment, register_node
    from charter.registry import service as registry
    from charter.registry.schemas import ModelCreate, VersionSpec

    client = matrix_app.test_client()
    people = {role: make_person(role) for role in ROLES}
    other = make_person("user")
    owner = make_person("steward")
    team = create_team(SYSTEM, name="home", description="", entitlements={},
                       requests_per_day=None, default_data_class="internal")
    away = create_team(SYSTEM, name="away", description="", entitlements={},
                       requests_per_day=None, default_data_class="internal")
    for p in people.values():
        set_member(SYSTEM, team.id, p.actor.user_id, "member")
    set_member(SYSTEM, away.id, other.actor.user_id, "member")
    bot = create_service_account(SYSTEM, team.id, username="home-bot")
    target = make_person("user")  # whose membership the member routes change
    asker = make_person("admin")  # who asks for the captures the capture routes act on
    expired = make_person("admin")
    pg_conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' "
                    "WHERE id = %s", (expired.token.split("_")[1],))

    counter = iter(range(10**6))
    failures = []
    for (method, rule), spec in sorted(_matrix(matrix_app).items()):
        for caller in CALLERS:
            n = next(counter)
            model = registry.create_model(owner.actor, ModelCreate(
                name=f"m-{n}", publisher="TinyLlama", source_repo="x/y"))
            version = registry.create_version(owner.actor, model.id, VersionSpec(label="1"))
            if rule.endswith(("/approve", "/reject", "/exceptions")):
                from charter.registry.schemas import Transition

                registry.submit_version(owner.actor, version.id, Transition())
            key = create_api_key(SYSTEM, bot.id, name=f"k{n}").key
            node = register_node(SYSTEM, matrix_app.extensions["charter.settings"],
                                 name=f"n-{n}", base_url=NODE_URL,
                                 region="eu-central", engine="tgi", labels={}, capacity=1)
            dep = None
            if "<deployment_id>" in rule or rule == "/api/v1/deployments":
                approved = _approved_version(owner, n)
                dep = create_deployment(SYSTEM, serving_name=f"d-{n}", version_id=approved,
                                        node_ids=[node.id])
            set_member(SYSTEM, team.id, target.actor.user_id, "member")
            capture = _capture(n, asker) if "<capture_id>" in rule else "x"
            path = (rule.replace("<model_id>", model.id).replace("<version_id>", version.id)
                    .replace("<capture_id>", capture)
                    .replace("<node_id>", node.id).replace("<name>", "nope")
                    .replace("<path:filename>", "console.css")
                    .replace("<deployment_id>", dep.id if dep else "x")
                    .replace("<key_id>", key.id).replace("<team_id>", team.id)
                    .replace("<file_id>", "file-nope").replace("<batch_id>", "batch_nope")
                    .replace("<user_id>", bot.id if "/teams/" not in rule
                             else target.actor.user_id))
            headers = {}
            if caller == "expired":
                headers = expired.headers
            elif caller == "other_team":
                headers = other.headers
            elif caller != "anonymous":
                headers = people[caller].headers
            body = spec.body({"n": n, "node_id": node.id,
                              "version_id": dep.version_id if dep else ""}) if spec.body else None
            r = client.open(path, method=method, headers=headers,
                            json=body if body is not None else None)
            got = r.status_code
            if spec.allow == CONSOLE:
                anonymous = client.open(path, method=method)
                if (got, r.headers.get("Location")) != (anonymous.status_code,
                                                        anonymous.headers.get("Location")) \
                        or 200 <= got < 300 and rule != "/console/login":
                    failures.append(f"{method} {rule} as {caller}: {got}, expected what an "
                                    f"anonymous caller gets ({anonymous.status_code})")
                continue
            payload = r.get_json(silent=True)
            if spec.allow == SCIM:  # the identity provider's credential only, SCIM's errors
                want = 401 if caller in ("anonymous", "expired") else 403
                if got != want or not isinstance(payload, dict) or payload.get(
                        "schemas") != ["urn:ietf:params:scim:api:messages:2.0:Error"]:
                    failures.append(f"{method} {rule} as {caller}: {got}, expected {want} "
                                    "in SCIM's error shape")
                continue
            error = payload.get("error") if isinstance(payload, dict) else None
            code = (error.get("code") if isinstance(error, dict)  # ours and OpenAI's shape
                    else payload.get("error_type") if error else None)  # TGI's shape
            if spec.allow == PUBLIC:
                ok = got not in (401, 403)
                expect = "not refused"
            elif caller in ("anonymous", "expired"):
                ok = got == 401 and code in ("unauthenticated", "invalid_credentials")
                expect = "401"
            elif caller == "other_team":
                if spec.team_scoped:
                    ok, expect = got == 404, "404"
                elif spec.other_team_allowed:
                    ok, expect = got not in (401, 403) or code == "model_not_found", \
                        "not refused"
                else:
                    ok, expect = got == 403 and code == "forbidden", "403 forbidden"
            elif caller in spec.allow:
                # Files and batches are their owner's (tests/integration/test_batches.py):
                # an id of nobody's answers 404 to every caller the route is open to.
                ok, expect = got not in (401, 403, 404) or (got == 404 and code in (
                    "member_not_found", "model_not_found", "file_not_found",
                    "batch_not_found", "no_checkpoint")), "not refused"
            else:
                ok, expect = got == 403 and code == "forbidden", "403 forbidden"
            if not ok:
                failures.append(f"{method} {rule} as {caller}: {got} {code}, expected {expect}")
    assert not failures, "\n".join(failures)
