"""The console in a real browser: Debian's Chromium driven by Playwright, against Charter
under `charter serve`, a real OIDC provider process (`oidc-provider-mock`, logged in through
its own form), PostgreSQL, a real HTTP node and the gateway.

The journey: a steward submits a version and cannot approve it (four-eyes, said on the
page); a second person approves it with conditions through the form, after a forged post
of that form without its CSRF token is refused; an operator attests a node and deploys the
version (API); an admin makes an API key in the console (shown once), calls the model
through the gateway and sends a batch; the request shows on the overview's chart and in the
audit search; an auditor downloads a signed bundle that verifies with the published key; a
person without the auditor role is not offered the audit page and is refused it.
Full-page screenshots of every main page are left in test-output/screenshots/.

The session cookie is `__Host-` and Secure. Chromium treats http://localhost (and
127.0.0.1) as a secure context and keeps Secure cookies from it (checked below on the
cookie itself), so Charter is served over plain http on localhost: no certificate, and
`charter serve` runs exactly as configured in production but for TLS, which a proxy ends.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from charter.actor import SYSTEM
from charter.audit.checkpoints import generate_key
from charter.audit.verify import Verifier, verify_bundle
from charter.db import utcnow
from charter.identity.models import User
from charter.identity.service import actor_of
from charter.identity.teams import create_team
from charter.registry import service as registry
from charter.registry.schemas import FileSpec, ModelCreate, VersionSpec
from charter.uow import unit_of_work
from tests.batch_support import FakeNode, jsonl_lines, to_jsonl
from tests.conftest import SECRET
from tests.e2e import browser_support as bs

pytestmark = pytest.mark.timeout(180)

SERVING = "tiny-chat"
SESSION_COOKIE = "__Host-charter_session"


@dataclass
class World:
    base: str  # what the browser uses: http://localhost:PORT
    api: str  # the same server for API clients: http://127.0.0.1:PORT
    provider: bs.Provider
    browser: Any
    csp_errors: list[str]

    def tab(self, sub: str, *, viewport: tuple[int, int] = (1280, 900)) -> Any:
        """A fresh browser context (empty cookie jar) signed in as `sub`."""
        context = self.browser.new_context(viewport={"width": viewport[0],
                                                     "height": viewport[1]})
        context.set_default_timeout(bs.WAIT_MS)
        context.set_default_navigation_timeout(bs.WAIT_MS)
        context.route("**/*", bs.local_only)
        page = context.new_page()
        page.on("console", lambda m: self.csp_errors.append(f"{page.url}: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text
                and page.url.startswith(self.base) else None)
        bs.sign_in(page, self.base, sub)
        return page


@pytest.fixture
def world(configured, tmp_path) -> Iterator[World]:  # type: ignore[no-untyped-def]
    chromium = bs.chromium_or_fail()
    from playwright.sync_api import sync_playwright

    key = tmp_path / "audit.pem"
    generate_key(key)
    create_team(SYSTEM, name="apps", description="Internal apps", requests_per_day=100,
                entitlements={"models": ["*"], "data_classes": ["*"], "regions": ["*"]},
                default_data_class="internal")
    port = bs.free_port()
    base = f"http://localhost:{port}"
    with bs.provider(f"{base}/console/callback") as provider, bs.charter(
        port, database_url=configured.database_url, secret_key=SECRET, public_url=base,
        oidc_issuer=provider.issuer, oidc_client_id=provider.client_id,
        oidc_client_secret=provider.client_secret, oidc_audience=provider.client_id,
        oidc_role_map=bs.role_map(), oidc_team_map=json.dumps({"apps-devs": "apps"}),
        audit_signing_keys=str(key), audit_log_origin="charter.test/browser",
        node_allowed_networks="127.0.0.0/8", log_level="WARNING",
    ), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=bs.CHROMIUM_ARGS,
                                     timeout=bs.WAIT_MS)
        try:
            yield World(base, f"http://127.0.0.1:{port}", provider, browser, [])
        finally:
            browser.close()


def _user(sub: str) -> User:
    with unit_of_work() as session:
        user = session.scalar(select(User).where(User.external_subject == sub))
        assert user is not None, sub
        return user


def _draft(owner: User) -> Any:
    actor = actor_of(owner)
    model = registry.create_model(actor, ModelCreate(
        name="helpdesk-llm", publisher="TinyLlama", source_repo="TinyLlama/helpdesk-llm"))
    return registry.create_version(actor, model.id, VersionSpec(
        label="1.0", source_revision="c" * 40, weight_format="safetensors",
        files=[FileSpec(path="model.safetensors", size=10, sha256="d" * 64)],
        license_declared="apache-2.0", license_card="apache-2.0", derivation="original",
        datasets=["slimpajama"], storage_region="eu-central", hosting_regions=["eu-central"],
        intended_use="helpdesk answers"))


def _notice(page: Any, kind: str) -> str:
    """The notices of `kind` on the page a form's post led to: waits for the first (a
    click returns before the answer's page has loaded; on a busy machine the old page was
    read)."""
    notices = page.locator(f".notice.{kind}")
    notices.first.wait_for(timeout=15_000)
    return " ".join(notices.all_inner_texts())


def _until(check: Any, what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_the_console_journey_in_a_browser(world: World, make_person) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    p = world.provider
    steward_sub = p.add_user("ai-stewards", "ai-approvers", name="sam-steward")
    approver_sub = p.add_user("ai-approvers", name="ada-approver")
    admin_sub = p.add_user("ai-admins", "apps-devs", name="alan-admin")
    auditor_sub = p.add_user("ai-auditors", name="grace-auditor")
    plain_sub = p.add_user(name="una-user")

    # --- the steward submits; their own approval is not offered, and the page says why --
    steward = world.tab(steward_sub)
    (cookie,) = [c for c in steward.context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["secure"] and cookie["httpOnly"] and cookie["path"] == "/"
    assert cookie["domain"] == "localhost" and cookie["sameSite"] == "Lax"
    version = _draft(_user(steward_sub))
    version_url = f"{world.base}/console/versions/{version.id}"
    steward.goto(version_url)
    steward.click("form[action$='/submit'] button[type=submit]")
    assert "Submitted helpdesk-llm 1.0 for approval." in _notice(steward, "ok")
    assert "four-eyes rule" in steward.locator("#four-eyes").inner_text()
    assert steward.locator("#approve-form").count() == 0

    # --- the approver: a forged post without the token is refused; the real one approves -
    approver = world.tab(approver_sub)
    approver.goto(version_url)
    until = (utcnow() + timedelta(days=60)).date().isoformat()
    form = approver.locator("#approve-form")
    assert form.locator("input[name=allowed_regions][value=eu-central]").is_checked()
    form.locator("input[name=allowed_data_classes][value=internal]").check()
    form.locator("input[name=allowed_purposes]").fill("assistant")
    form.locator("input[name=expires_at]").fill(until)
    form.locator("textarea[name=reason]").fill("Reviewed the card and the findings")
    approver.evaluate("document.querySelector('#approve-form input[name=csrf_token]')"
                      ".remove()")
    with approver.expect_response(lambda r: r.url.endswith("/approve")) as answer:
        form.locator("button[type=submit]").click()
    assert answer.value.status == 403
    assert approver.locator("[data-code]").get_attribute("data-code") == "csrf_failed"
    assert registry.get_version(version.id).state == "submitted"
    approver.goto(version_url)
    form.locator("input[name=allowed_data_classes][value=internal]").check()
    form.locator("input[name=allowed_purposes]").fill("assistant")
    form.locator("input[name=expires_at]").fill(until)
    form.locator("textarea[name=reason]").fill("Reviewed the card and the findings")
    form.locator("button[type=submit]").click()
    assert f"Approved helpdesk-llm 1.0 until {until}." in _notice(approver, "ok")
    assert registry.get_version(version.id).state == "approved"
    decisions = approver.locator("#decisions").inner_text()
    assert "ada-approver" in decisions and "assistant" in decisions

    # --- an operator attests a real HTTP node and deploys the version (the API) ----------
    node = FakeNode("TinyLlama/helpdesk-llm", "c" * 40).start()
    try:
        operator = make_person("operator")
        api = httpx.Client(base_url=world.api, headers=operator.headers, timeout=10)
        r = api.post("/api/v1/nodes", json={"name": "fra-1", "base_url": node.url,
                                            "region": "eu-central", "capacity": 4})
        assert r.status_code == 201, r.text
        r = api.post(f"/api/v1/nodes/{r.json()['id']}/probe")
        assert r.status_code == 200 and r.json()["attestation"] == "attested", r.text
        r = api.post("/api/v1/deployments", json={
            "serving_name": SERVING, "version_id": version.id, "node_ids": [r.json()["id"]]})
        assert r.status_code == 201, r.text

        # --- the admin makes an API key: shown once, on the answer page only -------------
        admin = world.tab(admin_sub)
        admin.goto(f"{world.base}/console/access")
        admin.fill("#key-form input[name=name]", "journey")
        admin.click("#key-form button[type=submit]")
        token = admin.input_value("#token")
        assert re.fullmatch(r"chk_[0-9a-f]{16}_\S+", token)
        admin.goto(f"{world.base}/console/access")
        assert token not in admin.content() and "journey" in admin.content()

        # --- a chat request and a batch through the gateway with that key ---------------
        gateway = httpx.Client(base_url=world.api, timeout=20, headers={
            "Authorization": f"Bearer {token}", "X-Charter-Purpose": "assistant",
            "X-Charter-Data-Class": "internal"})
        r = gateway.post("/v1/chat/completions", json={
            "model": SERVING, "max_tokens": 8,
            "messages": [{"role": "user", "content": "Where is my parcel?"}]})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "echo: Where is my parcel?"
        request_id = r.headers["X-Request-Id"]
        r = gateway.post("/v1/files", data={"purpose": "batch"}, files={
            "file": ("questions.jsonl", to_jsonl(jsonl_lines(3, model=SERVING)))})
        assert r.status_code == 200, r.text
        r = gateway.post("/v1/batches", json={
            "input_file_id": r.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h", "metadata": {"case": "browser"}})
        assert r.status_code == 200, r.text
        batch_id = r.json()["id"]
        _until(lambda: gateway.get(f"/v1/batches/{batch_id}").json()["status"] == "completed",
               "the batch to complete")
    finally:
        node.stop()

    # --- the overview's chart counts the request (SVG and the table of its numbers) -----
    def served() -> int:
        admin.goto(f"{world.base}/console/")
        cell = admin.locator(f"#chart-models tr:has(th:text-is('{SERVING}')) "
                             "td[data-series=served]")
        return int(cell.inner_text()) if cell.count() else 0

    _until(lambda: served() >= 4, "the overview to count the chat and the batch's 3 lines")
    bar = admin.locator("#chart-models svg rect.seg-served title").first.text_content() or ""
    assert bar.startswith(f"{SERVING}: ")

    # --- every main page, as the admin sees it ------------------------------------------
    bs.shoot(admin, "overview")
    admin.goto(f"{world.base}/console/models")
    assert "helpdesk-llm" in admin.locator("main").inner_text()
    bs.shoot(admin, "models")
    admin.goto(version_url)
    bs.shoot(admin, "version")
    admin.goto(f"{world.base}/console/nodes")
    assert "fra-1" in admin.locator("main").inner_text()
    bs.shoot(admin, "nodes")
    admin.goto(f"{world.base}/console/policies?policy=dispatch")
    admin.click("#evaluate-form button[type=submit]")
    admin.wait_for_selector("#decision")
    # htmx (vendored, under the CSP) swapped the result in: the address did not change.
    assert admin.url.endswith("/console/policies?policy=dispatch")
    assert admin.locator("#decision [data-allow]").get_attribute("data-allow") == "true"
    assert bs.unlabelled(admin) == []
    bs.shoot(admin, "policies")
    admin.goto(f"{world.base}/console/audit")
    bs.shoot(admin, "audit")
    admin.goto(f"{world.base}/console/access")
    bs.shoot(admin, "access")
    assert bs.unlabelled(admin) == []
    admin.click("#teams a:text-is('apps')")
    assert "4 of 100 requests today" in admin.locator("#entitlements").inner_text()
    assert bs.unlabelled(admin) == []
    bs.shoot(admin, "access-team")
    admin.goto(f"{world.base}/console/access/users")
    sso_row = admin.locator("tr[id='user-ada-approver']")
    assert "from the identity provider" in sso_row.inner_text()  # the role map decides
    assert sso_row.locator("button").count() == 0
    assert admin.locator(f"tr[id='user-{operator.actor.username}'] button").count() == 1
    assert bs.unlabelled(admin) == []
    bs.shoot(admin, "access-users")
    admin.goto(f"{world.base}/console/batches")
    row = admin.locator(f"tr[id='{batch_id}']").inner_text()
    assert "3 of 3 done (100%)" in row and "completed" in row.lower()
    assert bs.unlabelled(admin) == []
    bs.shoot(admin, "batches")
    tablet = world.tab(admin_sub, viewport=(820, 1180))
    bs.shoot(tablet, "tablet-overview")
    tablet.goto(version_url)
    bs.shoot(tablet, "tablet-version")

    # --- the auditor finds the request and downloads a bundle that verifies -------------
    auditor = world.tab(auditor_sub)
    auditor.goto(f"{world.base}/console/audit")
    auditor.fill("form[role=search] input[name=request_id]", request_id)
    auditor.fill("form[role=search] input[name=action]", "dispatch.outcome")
    auditor.click("form[role=search] button[type=submit]")
    events = auditor.locator("#events tbody").inner_text()
    assert SERVING in events and "dispatch.outcome" in events, events
    with auditor.expect_download(timeout=bs.WAIT_MS) as download:
        auditor.click("#export-form button[type=submit]")
    bundle = Path(download.value.path()).read_bytes()
    published = httpx.get(f"{world.api}/api/v1/audit/keys", timeout=10).json()
    keys = [Verifier.parse(k["verifier"]) for k in published["keys"]]
    report = verify_bundle(bundle, keys)
    assert report.ok and report.events >= 1, report

    # --- someone without the auditor role: no Audit in the nav, and the page refuses -----
    plain = world.tab(plain_sub)
    plain.keyboard.press("Tab")  # the first stop skips the navigation
    assert plain.evaluate("document.activeElement.className") == "skip"
    nav = plain.locator("nav[aria-label=Sections]")
    assert nav.locator("a[href='/console/audit']").count() == 0
    assert nav.locator("a[href='/console/access']").count() == 1
    answer = plain.goto(f"{world.base}/console/audit")
    assert answer is not None and answer.status == 403
    assert plain.locator("[data-code]").get_attribute("data-code") == "forbidden"

    assert world.csp_errors == []
    assert time.monotonic() - started < 150
