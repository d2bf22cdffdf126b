"""What the console's browser test needs: Debian's Chromium driven by Playwright (no browser
download), a real OIDC provider process, and Charter under `charter serve`.

A machine without Chromium fails the test with the reason; it is never skipped, because
CI installs the browser from the project's own files (scripts/services-up).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

import httpx
import pytest

# Playwright drives the system browser; it must never fetch one of its own.
os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("CHARTER_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
WAIT_MS = 15_000  # every Playwright wait: navigation, selectors, downloads


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: IO[bytes], what: str,
              timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"{what} exited with {proc.returncode}: "
                        f"{log.read().decode(errors='replace')[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.2)


@contextmanager
def process(args: list[str], what: str, ready_url: str,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A child process whose output is kept for the failure message; killed at the end."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_http(ready_url, proc, log, what)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def chromium_or_fail() -> Path:
    """The system browser, or a failure that says how to get it (not a skip)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        pytest.fail(f"Chromium is not installed at {CHROMIUM}"
                    f"{f' (one is at {found}: set CHARTER_TEST_CHROMIUM)' if found else ''}; "
                    "the console's browser test needs it: run scripts/services-up "
                    "(apt-get install -y chromium)", pytrace=False)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[dev]'", pytrace=False)
    return CHROMIUM


# --- the identity provider -----------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    issuer: str
    client_id: str
    client_secret: str

    def add_user(self, *groups: str, name: str) -> str:
        """A person at the provider; their `sub`."""
        sub = f"sub-{uuid.uuid4().hex[:10]}"
        r = httpx.put(f"{self.issuer}/users/{quote(sub, safe='')}", timeout=5, json={
            "email": f"{name}@example.org", "preferred_username": name,
            "name": name.replace("-", " ").title(), "groups": list(groups)})
        assert r.status_code == 204, r.text
        return sub


@contextmanager
def provider(redirect_uri: str) -> Iterator[Provider]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    with process([str(BIN / "python"), "-m", "oidc_provider_mock", "--host", "127.0.0.1",
                  "--port", str(port), "--require-registration", "true",
                  "--require-nonce", "true"], "the OIDC provider",
                 f"{issuer}/.well-known/openid-configuration"):
        r = httpx.post(f"{issuer}/oauth2/clients", timeout=5, json={
            "redirect_uris": [redirect_uri],
            "token_endpoint_auth_method": "client_secret_basic"})
        assert r.status_code == 201, r.text
        yield Provider(issuer, r.json()["client_id"], r.json()["client_secret"])


# --- Charter ---------------------------------------------------------------------------------

def charter_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARTER_")}
    env.update({f"CHARTER_{k.upper()}": v for k, v in values.items()})
    return env


@contextmanager
def charter(port: int, **settings: str) -> Iterator[str]:
    base = f"http://localhost:{port}"
    with process([str(BIN / "charter"), "serve", "--bind", f"127.0.0.1:{port}",
                  "--workers", "1", "--threads", "16"], "charter serve",
                 f"http://127.0.0.1:{port}/healthz", env=charter_env(**settings)):
        yield base


# --- the browser -------------------------------------------------------------------------------

def local_only(route: Any) -> None:
    """Nothing leaves the machine: the provider's page links a CDN stylesheet; refuse it
    at once rather than wait for a network that is not there."""
    host = urlsplit(route.request.url).hostname
    if host in ("127.0.0.1", "localhost"):
        route.continue_()
    else:
        route.abort()


def sign_in(page: Any, base: str, sub: str) -> None:
    """The real flow: the console sends the browser to the provider, whose form takes the
    subject; the provider sends it back to the callback, which lands on the overview."""
    page.goto(f"{base}/console/")
    page.wait_for_url("**/oauth2/authorize**")
    page.fill("input[name=sub]", sub)
    page.click("button[type=submit]:has-text('Authorize')")
    page.wait_for_url(f"{base}/console/")


def shoot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter(el => el.type !== 'hidden')
  .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !(el.tagName === 'BUTTON' && el.textContent.trim()))
  .map(el => el.outerHTML.slice(0, 120))"""


def unlabelled(page: Any) -> list[str]:
    """Form controls a screen reader could not name (no label, no aria-label, no text)."""
    found: list[str] = page.evaluate(UNLABELLED)
    return found


def role_map() -> str:
    return json.dumps({"ai-admins": ["admin"], "ai-stewards": ["steward"],
                       "ai-approvers": ["approver"], "ai-auditors": ["auditor"]})
