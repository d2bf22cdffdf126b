"""`charter demo`: embedded SQLite, seeded users and models, a tiny real model, local API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.console import Console

from charter import migrate, scope
from charter.actor import SYSTEM, Actor
from charter.audit.checkpoints import generate_key
from charter.audit.seal import make_seal_keys, write_new
from charter.boot import build_runtime
from charter.db import utcnow
from charter.errors import ConfigurationError, NotFoundError
from charter.identity import service as identity
from charter.identity.service import actor_of, create_api_key, create_user
from charter.identity.teams import create_service_account, create_team
from charter.nodes import service as nodes
from charter.policy.bundle import default_policy_dir
from charter.registry import service as registry
from charter.registry.importer import ImportOptions, content_revision, import_directory
from charter.registry.schemas import (
    ApprovalConditions,
    EvaluationIn,
    ExceptionCreate,
    ModelCreate,
    Transition,
    VersionSpec,
)
from charter.serving import check_address_free
from charter.settings import Settings

DEMO_USERS = [
    ("admin", "Demo Admin", "user", ["admin"]),
    ("sam.steward", "Sam Steward", "user", ["steward"]),
    ("ava.approver", "Ava Approver", "user", ["approver"]),
    ("oli.operator", "Oli Operator", "user", ["operator"]),
    ("aud.auditor", "Aud Auditor", "user", ["auditor"]),
    ("svc-helpdesk", "Help-desk assistant", "service", ["user"]),
]

# Public model-card metadata of the models Charter's users start with (metadata only:
# no weights here, so no file digests and no pinned revision until a steward adds them).
SEED_MODELS: list[dict[str, Any]] = [
    {
        "model": {"name": "TinyLlama-1.1B-Chat-v1.0", "publisher": "TinyLlama",
                  "source_repo": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
        "version": {"label": "v1.0", "architecture": "LlamaForCausalLM",
                    "parameter_count": 1_100_048_384, "context_length": 2048,
                    "license_declared": "apache-2.0", "license_card": "apache-2.0",
                    "datasets": ["cerebras/SlimPajama-627B", "bigcode/starcoderdata",
                                 "HuggingFaceH4/ultrachat_200k",
                                 "HuggingFaceH4/ultrafeedback_binarized"],
                    "derivation": "fine_tune",
                    "base_model": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
                    "weight_format": "safetensors"},
        # Metadata only, so admission denies it; an admin's exception lets it through.
        "state": "approved",
        "exception": "metadata-only registration while the weights are transferred into the "
                     "sovereign store; pinning follows the transfer",
    },
    {
        "model": {"name": "Phi-3-mini-4k-instruct", "publisher": "microsoft",
                  "source_repo": "microsoft/Phi-3-mini-4k-instruct"},
        "version": {"label": "2024-07", "architecture": "Phi3ForCausalLM",
                    "parameter_count": 3_821_079_552, "context_length": 4096,
                    "license_declared": "mit", "license_card": "mit",
                    "derivation": "original", "weight_format": "safetensors"},
        "state": "draft",
    },
    {
        "model": {"name": "gemma-2b-it", "publisher": "google",
                  "source_repo": "google/gemma-2b-it"},
        "version": {"label": "1.0", "architecture": "GemmaForCausalLM",
                    "parameter_count": 2_506_172_416, "context_length": 8192,
                    # Declared carelessly: the card says `gemma`. Admission denies it.
                    "license_declared": "apache-2.0", "license_card": "gemma",
                    "derivation": "fine_tune", "base_model": "google/gemma-2b",
                    "weight_format": "safetensors"},
        "state": "submitted",
    },
    {
        "model": {"name": "Mistral-7B-Instruct-v0.3", "publisher": "mistralai",
                  "source_repo": "mistralai/Mistral-7B-Instruct-v0.3"},
        "version": {"label": "v0.3", "architecture": "MistralForCausalLM",
                    "parameter_count": 7_248_023_552, "context_length": 32768,
                    "license_declared": "apache-2.0", "license_card": "apache-2.0",
                    "base_model": "mistralai/Mistral-7B-v0.3", "derivation": "fine_tune",
                    "weight_format": "safetensors",
                    # High risk in the demo's register: it needs an evaluation, has none.
                    "risk_tier": "high"},
        "state": "submitted",
    },
    {
        "model": {"name": "Qwen2-1.5B-Instruct", "publisher": "Qwen",
                  "source_repo": "Qwen/Qwen2-1.5B-Instruct"},
        "version": {"label": "1.0", "architecture": "Qwen2ForCausalLM",
                    "parameter_count": 1_543_714_304, "context_length": 32768,
                    "license_declared": "apache-2.0", "license_card": "apache-2.0",
                    "derivation": "fine_tune", "base_model": "Qwen/Qwen2-1.5B",
                    "weight_format": "safetensors"},
        "state": "submitted",
    },
]
REGIONS: dict[str, Any] = {"storage_region": "eu-central",
                           "hosting_regions": ["eu-central", "eu-west"]}

# The demo organisation's evidence rule, in place of the bundled one (arc_easy, which no
# tiny model passes): a high-risk version needs a recorded evaluation on its help-desk QA
# set. Any score passes: the tiny model answers gibberish (0.0); what is shown is that the
# evidence must be there, attached, current and about this model.
DEMO_EVIDENCE = {"requirements": [{
    "id": "demo-helpdesk-qa", "risk_tiers": ["high"], "task": "charter_qa",
    "metric": "exact_match", "filter": "none", "min_ppm": 0, "max_age_days": 3650}]}
# A real lm-eval-harness run (0.4, `charter models evaluate --tasks charter_qa`) of the
# tiny model, built byte for byte as the demo builds it, through a Charter gateway.
TINY_EVALUATION = Path(__file__).parent / "demo_data" / "charter_qa.lm-eval.json"


def demo_policies(data_dir: Path) -> Path:
    """The bundled policies with the demo organisation's evidence rule, in the data dir
    (made again on each run, so they follow the installed Charter)."""
    target = data_dir / "policies"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(default_policy_dir(), target)
    (target / "data" / "evidence.json").write_text(json.dumps(DEMO_EVIDENCE, indent=2) + "\n")
    return target


def _conditions() -> ApprovalConditions:
    return ApprovalConditions(
        allowed_regions=["eu-central", "eu-west"],
        allowed_data_classes=["public", "internal"],
        allowed_purposes=["assistant", "summarisation"],
        expires_at=utcnow() + timedelta(days=180),
        reason="demo approval: license and lineage reviewed",
    )


def _advance(version_id: str, state: str, steward: Actor, approver: Actor,
             admin: Actor | None = None, exception: str | None = None) -> None:
    if state in ("submitted", "approved"):
        version = registry.submit_version(steward, version_id, Transition())
        if admin is not None and exception and version.admission:
            codes = [v["code"] for v in version.admission["violations"]]
            registry.grant_exception(admin, version_id, ExceptionCreate(
                codes=codes, justification=exception,
                expires_at=utcnow() + timedelta(days=30)))
    if state == "approved":
        registry.approve_version(approver, version_id, _conditions())


def seed(data_dir: Path, console: Console) -> dict[str, str]:
    """Create the demo users, keys and models once; returns username -> API key."""
    keys_file = data_dir / "demo-keys.json"
    try:
        identity.user_id_by_name("admin")
        seeded = True
    except NotFoundError:
        seeded = False
    if seeded:
        return json.loads(keys_file.read_text()) if keys_file.exists() else {}

    actors: dict[str, Actor] = {}
    keys: dict[str, str] = {}
    team = create_team(SYSTEM, name="helpdesk", description="The help-desk assistant team",
                       entitlements={"models": ["*"], "data_classes": ["public", "internal"],
                                     "regions": ["*"]},
                       requests_per_day=10_000, default_data_class="internal")
    for username, display, kind, roles in DEMO_USERS:
        if kind == "service":  # a service account belongs to its team
            user = create_service_account(SYSTEM, team.id, username=username,
                                          display_name=display)
        else:
            user = create_user(SYSTEM, username=username, display_name=display, kind=kind,
                               roles=roles)
        actors[username] = actor_of(user)
        keys[username] = create_api_key(SYSTEM, user.id, name="demo",
                                        expires_at=utcnow() + timedelta(days=30)).token
    steward, approver = actors["sam.steward"], actors["ava.approver"]

    for entry in SEED_MODELS:
        model = registry.create_model(steward, ModelCreate(**entry["model"]))
        spec = VersionSpec(**entry["version"], **REGIONS,
                           intended_use="internal assistants and document summarisation")
        version = registry.create_version(steward, model.id, spec)
        _advance(version.id, entry["state"], steward, approver, actors["admin"],
                 entry.get("exception"))
        version = registry.get_version(version.id)
        verdict = ""
        if version.admission is not None:
            codes = [v["code"] for v in version.admission["violations"]]
            verdict = ", admission: " + ("allowed" if not codes else "denied " + ", ".join(codes))
        console.print(f"  seeded {model.name} {version.label} ({entry['state']}{verdict})")
        for finding in (version.admission or {}).get("violations", []):
            if finding["code"].startswith("evaluation_"):
                console.print(f"    refused for its evidence: {finding['msg']}")

    tiny_dir = data_dir / "models" / "charter-tiny-llama"
    if not (tiny_dir / "model.safetensors").exists():
        from charter.devnode.tinymodel import build_tiny_model

        build_tiny_model(tiny_dir)
    version, _ = import_directory(steward, tiny_dir, ImportOptions(
        model_name="charter-tiny-llama", label="0.1", publisher="charter",
        source_repo="charter/tiny-llama", source_revision=content_revision(tiny_dir),
        license_declared="apache-2.0",
        intended_use="the help desk's answers (high risk in the demo's register)",
        risk_tier="high", derivation="original", **REGIONS))
    console.print(f"  built and imported charter-tiny-llama 0.1 ({len(version.files)} files)")
    evaluation = registry.attach_evaluation(steward, version.id, EvaluationIn(
        content=TINY_EVALUATION.read_text(encoding="utf-8"), file_name=TINY_EVALUATION.name))
    _advance(version.id, "approved", steward, approver)
    shown = ", ".join(f"{m['task']} {m['metric']} {m['value']:g}" for m in evaluation.metrics)
    console.print(f"  charter-tiny-llama 0.1 approved on evidence: lm-eval {shown} "
                  f"(sha256:{evaluation.sha256[:12]}), as the high-risk rule requires")

    # Private from the first byte: write_text-then-chmod left the keys world-readable between.
    fd = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a file left from an earlier run
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(keys, indent=2))
    return keys


TINY = "charter-tiny-llama"
DEMO_NODES = (("node-central", "eu-central", 1), ("node-west", "eu-west", 2))


def start_nodes(data_dir: Path, settings: Settings, port: int, console: Console,
                procs: list[subprocess.Popen[bytes]]) -> None:
    """Two dev nodes in two regions serving the tiny model, registered, attested, deployed
    (each process goes into `procs` as it starts: the caller stops them, whatever fails)."""
    tiny_dir = data_dir / "models" / TINY
    revision = content_revision(tiny_dir)
    started = len(procs)
    for name, region, offset in DEMO_NODES:
        node_port = port + offset
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "charter.cli", "node", "serve", "--model", str(tiny_dir),
             "--region", region, "--port", str(node_port), "--model-id", "charter/tiny-llama",
             "--revision", revision],
            stdout=subprocess.DEVNULL, stderr=(data_dir / f"{name}.log").open("ab"),
            preexec_fn=_die_with_parent))
    operator = _demo_actor("oli.operator")
    known = {n.name: n for n in nodes.list_nodes()}
    ids = []
    for (name, region, offset), proc in zip(DEMO_NODES, procs[started:], strict=True):
        url = f"http://127.0.0.1:{port + offset}"
        _wait_health(url, proc, revision, region)
        node = known.get(name) or nodes.register_node(
            operator, settings, name=name, base_url=url, region=region, engine="tgi",
            labels={"demo": "true"}, capacity=4)
        ids.append(nodes.probe_node(settings, node.id).id)
        console.print(f"  node {name} ({region}) on {url}: attested")
    if TINY not in {d.serving_name for d in nodes.list_deployments()}:
        version = registry.list_versions(registry.find_model(TINY).id)[0]  # type: ignore[union-attr]
        nodes.create_deployment(operator, serving_name=TINY, version_id=version.id,
                                node_ids=ids)


def _demo_actor(username: str) -> Actor:
    return identity.active_user_named(username)


def _wait_health(url: str, proc: subprocess.Popen[bytes], revision: str, region: str,
                 timeout: float = 120) -> None:
    """Until the dev node this demo started answers as itself: healthy, and its /info the
    tiny model at this revision in this region (another process on the port is never
    taken for it)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigurationError(f"the dev node for {url} exited with {proc.returncode}; "
                                     "see its log in the data dir", code="demo_failed")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                info = httpx.get(url + "/info", timeout=5).json()
                said = (info.get("model_id"), info.get("model_sha"), info.get("region"))
                if said != ("charter/tiny-llama", revision, region):
                    raise ConfigurationError(
                        f"{url} answers as another node ({said[0]} at {said[1]}, "
                        f"{said[2]}), not the demo's", code="address_in_use")
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    raise ConfigurationError(f"the dev node at {url} did not become healthy within "
                             f"{timeout:g} s", code="demo_failed")


# What each demo key is for (people belong to no team: the gateway refuses their chats).
KEY_USES = {
    "admin": "users, keys, teams and policies (API and console)",
    "sam.steward": "registers, imports and submits model versions",
    "ava.approver": "approves or rejects them (four eyes: never what they edited)",
    "oli.operator": "nodes and deployments",
    "aud.auditor": "reads the audit log, verifies and exports evidence",
    "svc-helpdesk": "the help-desk team's service account: the key that chats; the "
                    "people above belong to no team, so the gateway refuses their chats "
                    "(caller_without_team)",
}


def _ports(host: str, port: int) -> list[str]:
    """The addresses the demo serves on: the API, and one dev node a region."""
    return [f"{host}:{port}", *(f"127.0.0.1:{port + offset}" for _, _, offset in DEMO_NODES)]


def run_demo(*, host: str, port: int, data_dir: Path, serve: bool, console: Console) -> None:
    """Seed the embedded database; with `serve`, start the dev nodes and `charter serve`
    (the production server) and supervise them until a stop signal, which stops them all."""
    if serve:
        busy = [found for bind in _ports(host, port) if (found := check_address_free(bind))]
        if busy:
            raise ConfigurationError(
                f"the demo needs ports {port} to {port + len(DEMO_NODES)} free (the API and "
                f"its dev nodes), but cannot listen on {'; '.join(busy)}: stop what uses "
                f"them, or choose another with --port (make demo PORT=...)",
                code="address_in_use", details={"busy": busy})
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{data_dir / 'charter.db'}"
    key = data_dir / "audit-signing-key.pem"
    if not key.exists():
        generate_key(key)  # the demo's own; production keys come from a Secret
    seal_key, seal_verify = data_dir / "seal-key.json", data_dir / "seal-verify.json"
    if not seal_key.exists():  # the demo keeps both; production gives auditors the second
        seal = make_seal_keys()
        write_new(seal_key, seal.sealing)
        if not seal_verify.exists():
            write_new(seal_verify, seal.verification)
    demo_settings: dict[str, Any] = {
        "demo": True, "database_url": url, "log_format": "console",
        "node_allowed_networks": "127.0.0.0/8", "policy_dir": str(demo_policies(data_dir)),
        "audit_signing_keys": str(key), "audit_seal_key": str(seal_key),
        "audit_checkpoint_dir": str(data_dir / "checkpoints")}
    settings = Settings.from_env(**demo_settings)
    console.print(f"[bold]Charter demo[/] - data in {data_dir}")
    migrate.upgrade(url)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = _Stop()
    try:
        runtime = build_runtime(settings)
        with scope.bound(runtime):
            try:
                with stopping.held():
                    keys = seed(data_dir, console)
                _show_keys(keys, host, port, console)
                if serve:
                    start_nodes(data_dir, settings, port, console, procs)
            finally:
                runtime.close()
        if not serve:
            return
        procs.append(_serve(host, port, data_dir, demo_settings))
        _wait_ready(f"http://{host}:{port}", procs[-1], data_dir)
        _show_serving(keys, host, port, console)
        _supervise(procs, stopping, console)
    finally:
        _stop(procs)


def _show_keys(keys: dict[str, str], host: str, port: int, console: Console) -> None:
    """One key a line, never wrapped, so each copies whole; what each is for."""
    console.print("Demo users and their API keys (also in demo-keys.json):")
    width = max((len(u) for u in keys), default=0)
    for username, token in keys.items():  # 78 columns: whole in an 80-column terminal
        console.print(f"{username:<{width}}  {token}", soft_wrap=True, markup=False,
                      highlight=False)
    console.print("What each is for:")
    for username, use in KEY_USES.items():
        if username in keys:
            console.print(f"  {username}: {use}", soft_wrap=True, markup=False,
                          highlight=False)
    base = f"http://{host}:{port}"
    console.print(
        f"Try:  curl -H 'Authorization: Bearer {keys.get('aud.auditor', '<key>')}' "
        f"{base}/api/v1/audit/events\n"
        f"      curl -H 'Authorization: Bearer {keys.get('admin', '<key>')}' "
        f"{base}/api/v1/versions\n"
        f"API reference: {base}/api/v1/openapi.json",
        soft_wrap=True, markup=False, highlight=False,
    )


def _show_serving(keys: dict[str, str], host: str, port: int, console: Console) -> None:
    base = f"http://{host}:{port}"
    key = keys.get("svc-helpdesk", "<the svc-helpdesk key in demo-keys.json>")
    console.print(
        f"Stream a chat completion through the governed path (svc-helpdesk's key):\n"
        f"  curl -N {base}/v1/chat/completions -H 'Authorization: Bearer {key}' "
        f"-H 'Content-Type: application/json' -d '{{\"model\": \"{TINY}\", "
        f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
        f"\"stream\": true, \"max_tokens\": 20}}'\n"
        f"  (or the openai client with base_url={base}/v1; TGI clients: {base}/tgi/{TINY})",
        soft_wrap=True, markup=False, highlight=False,
    )
    console.print(f"Console: {base}/console/ (the demo signs you in as any seeded person; "
                  f"audit bundles verify offline with `charter-verify`)", soft_wrap=True,
                  markup=False, highlight=False)
    console.print(f"serving on {base} with `charter serve` (Ctrl-C or any stop signal "
                  f"stops it and the dev nodes)", soft_wrap=True, markup=False,
                  highlight=False)


def _serve(host: str, port: int, data_dir: Path,
           demo_settings: dict[str, Any]) -> subprocess.Popen[bytes]:
    """`charter serve`, as production runs it (gunicorn), on the demo's settings."""
    env = dict(os.environ)
    for name, value in demo_settings.items():
        env[f"CHARTER_{name.upper()}"] = ("true" if value else "false") if isinstance(
            value, bool) else str(value)
    log = (data_dir / "charter-serve.log").open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "charter.cli", "serve", "--bind", f"{host}:{port}",
         "--workers", "1", "--threads", "32"],
        env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def _parent_death_signal() -> Callable[[], None]:
    """What a child runs before it execs (resolved here, in the parent: nothing is loaded
    or imported between fork and exec): the kernel sends it SIGTERM when the demo dies,
    even killed; a demo already gone by then (the fork raced its death) ends it at once."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return arm


_die_with_parent = _parent_death_signal()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], data_dir: Path,
                timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigurationError(
                f"`charter serve` exited with {proc.returncode}; see "
                f"{data_dir / 'charter-serve.log'}", code="demo_failed")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise ConfigurationError(f"`charter serve` was not ready at {url} within {timeout:g} s",
                             code="demo_failed")


class _Stop:
    """SIGTERM, SIGINT and SIGHUP end the demo, whatever it is doing: while it sets up,
    the signal unwinds it (KeyboardInterrupt); while it supervises, the loop ends. Either
    way run_demo stops every child it started."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.supervising = False
        self.holding = False
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self)

    def __call__(self, _signum: int, _frame: Any) -> None:
        self.event.set()
        if not self.supervising and not self.holding:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A signal waits for the block's end: seeding is never left half done (its
        API keys are shown once and kept only as digests)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.event.is_set():
            raise KeyboardInterrupt


def _supervise(procs: list[subprocess.Popen[bytes]], stopping: _Stop,
               console: Console) -> None:
    """Until a stop signal, or until a child ends by itself (said)."""
    stopping.supervising = True
    while not stopping.event.wait(0.5):
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            args = ended[0].args
            shown = " ".join(map(str, args[:5])) if isinstance(args, list) else str(args)
            console.print(f"a demo process exited ({shown} ...: {ended[0].returncode}); "
                          f"stopping the rest",
                          markup=False, highlight=False)
            return


def _stop(procs: list[subprocess.Popen[bytes]], grace_s: float = 20) -> None:
    """Stop every child: SIGTERM (gunicorn drains), then SIGKILL what is left."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in reversed(procs):
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
