"""Charter's image, built and run here as the Helm chart runs it.

`scripts/build-image` builds the Dockerfile with podman on a Debian base made from the apt
mirror (no container registry is reachable). The image is pushed to a local registry
(Debian's docker-registry) and pulled back by digest; the chart is rendered with that
digest, and its own containers are run from the render: the migrations Job's container
against an empty PostgreSQL database, then the API's, with the render's arguments,
environment (secrets filled in), mounts (the policies ConfigMap by subPath, the signing
key Secret, /tmp as tmpfs) and security context (user 10001, read-only root, every
capability dropped, no new privileges). The OPA sidecar is a real OPA holding the files
the sidecar's own mounts would hold. One governed chat completion goes through the
container to a dev node; the audit chain verifies; SIGTERM stops the container within
its grace period.

The machine needs podman, runc and debootstrap (scripts/services-up installs them); the
tests skip, saying why, only where containers cannot run at all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import SECRET
from tests.opa_server import OpaTestServer
from tests.processes import free_port, wait_until_up

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "charter"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "scripts" / "containers.conf")}
BIN = Path(sys.executable).parent


def podman(*args: str, timeout: float = 300, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}: {done.stderr[-2000:]}")
    return done.stdout


def _why_not() -> str | None:
    if not shutil.which("podman"):
        return "podman is not installed (scripts/services-up installs it from Debian)"
    try:
        subprocess.run(["podman", "info"], env=ENV, capture_output=True, check=True,
                       timeout=60)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"containers cannot run on this machine: podman info failed ({exc})"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=str(_why_not()))


@dataclass
class Built:
    tag: str
    seconds: float
    size: int


@pytest.fixture(scope="module")
def built() -> Built:
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-image")], env=ENV,
                          capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    tag = "localhost/charter:dev"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).strip())
    return Built(tag, time.monotonic() - started, size)


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Debian's docker-registry on 127.0.0.1, no auth, storage in a temporary folder."""
    folder = tmp_path_factory.mktemp("registry")
    port = free_port()
    config = folder / "config.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"},
        "storage": {"filesystem": {"rootdirectory": str(folder / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    log = folder / "registry.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        wait_until_up(proc, f"http://127.0.0.1:{port}/v2/", log, "docker-registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def pulled(built: Built, registry: str, tmp_path_factory) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(repository, digest): pushed to the local registry, pulled back by digest."""
    digest_file = tmp_path_factory.mktemp("push") / "digest"
    repository = f"{registry}/charter"
    podman("push", "--tls-verify=false", "--digestfile", str(digest_file), built.tag,
           f"{repository}:test")
    digest = digest_file.read_text().strip()
    assert digest.startswith("sha256:")
    podman("pull", "--tls-verify=false", f"{repository}@{digest}")
    return repository, digest


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    import helm_python as helm

    base = yaml.safe_load((CHART / "ci" / "minimal-values.yaml").read_text())
    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=_merged(base, values), name="charter", namespace="charter",
                           is_install=True, is_upgrade=False)
    return [doc for name, text in out.items() if name.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


def _pod(objects: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(
        suffix)]
    return found["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def _run_args(pod: dict[str, Any], name: str, objects: list[dict[str, Any]],
              secrets: dict[tuple[str, str], str], files: Path,
              env_over: dict[str, str]) -> tuple[list[str], str, list[str]]:
    """podman run's options for one of the render's containers: (options, image, args)."""
    [ctr] = [c for c in pod["containers"] if c["name"] == name]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sc = ctr["securityContext"]
    opts = ["--init", "--network", "host", "--user", f"{sc['runAsUser']}:{sc['runAsGroup']}"]
    if sc.get("readOnlyRootFilesystem"):
        opts += ["--read-only", "--read-only-tmpfs=false"]
    if "ALL" in sc.get("capabilities", {}).get("drop", []):
        opts.append("--cap-drop=ALL")
    if sc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    for item in ctr.get("env") or []:
        if "value" in item:
            value = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secrets[(ref["name"], ref["key"])]
        opts += ["-e", f"{item['name']}={env_over.get(item['name'], value)}"]
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    for mount in ctr.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "emptyDir" in volume:
            opts += ["--tmpfs", f"{target}:rw,size=256m,mode=1777"]
        elif "configMap" in volume:
            source = files / "cm" / mount["subPath"]
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_text(configmaps[volume["configMap"]["name"]][mount["subPath"]])
            opts += ["-v", f"{source}:{target}:ro"]
        elif "secret" in volume:
            folder = files / "secret" / mount["name"]
            folder.mkdir(parents=True, exist_ok=True)
            for item in volume["secret"]["items"]:
                path = folder / item["path"]
                path.write_text(secrets[(volume["secret"]["secretName"], item["key"])])
                path.chmod(0o444)
            opts += ["-v", f"{folder}:{target}:ro"]
        else:
            raise AssertionError(f"a volume the test does not know: {volume}")
    return opts, ctr["image"], ctr.get("args") or []


@pytest.mark.timeout(1800)  # a cold build makes the Debian base first (about 2 minutes)
def test_the_image_inspects_content_offline(built: Built) -> None:
    """Content inspection works in the image as the chart runs it: no network, a read-only
    root, the non-root user; Presidio finds, and replaces, without fetching anything."""
    script = ("from charter.inspection.detect import Detector; d = Detector(); "
              "print(d.findings(['mail jane@example.com, card 4111 1111 1111 1111'])); "
              "print(d.redact('key AKIAIOSFODNN7EXAMPLE', ['AWS_ACCESS_KEY'])[0])")
    out = podman("run", "--rm", "--network", "none", "--read-only", "--tmpfs",
                 "/tmp",  # noqa: S108 - a tmpfs of the container's own, as the chart mounts
                 "--user", "10001:10001", "--entrypoint", "python", built.tag, "-c", script,
                 timeout=120)
    assert out.splitlines() == ["{'CREDIT_CARD': 1, 'EMAIL_ADDRESS': 1}",
                                "key <AWS_ACCESS_KEY>"]


def test_the_image_runs_as_the_chart_runs_it(pulled, built, empty_pg, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from charter import migrate, scope
    from charter.actor import SYSTEM
    from charter.audit.checkpoints import generate_key
    from charter.boot import build_runtime
    from charter.db import utcnow
    from charter.devnode.tinymodel import build_tiny_model
    from charter.identity.service import create_api_key
    from charter.identity.teams import create_service_account, create_team
    from charter.nodes import service as nodes
    from charter.registry import service as registry
    from charter.registry.importer import ImportOptions, content_revision, import_directory
    from charter.registry.schemas import ApprovalConditions, Transition
    from charter.settings import Settings
    from tests.helm.conftest import Rendered
    from tests.helm.test_policies import materialise, opa_data

    repository, digest = pulled
    port = free_port()
    objects = _render({"image": {"repository": repository, "digest": digest},
                       "config": {"nodeAllowedNetworks": ["127.0.0.0/8"]},
                       "api": {"port": port, "workers": 1}})
    api = _pod(objects, "Deployment", "-api")
    job = _pod(objects, "Job", "-migrations")
    image = f"{repository}@{digest}"
    assert {c["image"] for c in (*api["containers"], *job["containers"])
            if c["name"] != "opa"} == {image}  # the render names exactly what was pulled

    key_path = tmp_path / "signing-key.pem"
    generate_key(key_path)
    secrets = {("charter-database", "database-url"): empty_pg,
               ("charter-secret-key", "secret-key"): SECRET,
               ("charter-broker", "broker-url"): "redis://127.0.0.1:6379/14",
               ("charter-audit-keys", "signing-key.pem"): key_path.read_text()}

    # The migrations Job's container, as rendered, on an empty database.
    opts, ran, args = _run_args(job, "migrations", objects, secrets, tmp_path / "job", {})
    assert ran == image
    started = time.monotonic()
    podman("run", "--rm", *opts, image, *args, timeout=300)
    migrated_s = time.monotonic() - started
    from sqlalchemy import create_engine

    engine = create_engine(empty_pg)
    assert migrate.schema_status(engine).current  # at the head the code expects
    engine.dispose()

    # The OPA sidecar: real OPA, holding what the sidecar's mounts hold.
    rendered = Rendered({"x.yaml": yaml.safe_dump_all(objects)})
    opa_root = materialise(rendered, "opa", tmp_path / "opa") / "policies"
    opa = OpaTestServer()
    opa.policies = {p.relative_to(opa_root).as_posix(): p.read_text()
                    for p in sorted(opa_root.rglob("*.rego"))}
    opa.data = {"charter": opa_data(opa_root)["charter"]}
    opa.rebuild()

    settings = Settings.from_env({}, database_url=empty_pg, secret_key=SECRET,
                                 node_allowed_networks="127.0.0.0/8")
    runtime = build_runtime(settings)
    model_dir = build_tiny_model(tmp_path / "tiny")
    node_port = free_port()
    node_log = tmp_path / "node.log"
    with node_log.open("wb") as out:
        node = subprocess.Popen(
            [str(BIN / "charter"), "node", "serve", "--model", str(model_dir), "--region",
             "eu-central", "--port", str(node_port), "--model-id", "charter/tiny-llama"],
            stdout=out, stderr=subprocess.STDOUT)
    container = None
    try:
        with opa, scope.bound(runtime):
            steward, approver = _people()
            version, _ = import_directory(steward, model_dir, ImportOptions(
                model_name="charter-tiny-llama", label="0.1", publisher="charter",
                source_repo="charter/tiny-llama", source_revision=content_revision(model_dir),
                license_declared="apache-2.0", derivation="original",
                storage_region="eu-central", hosting_regions=("eu-central",)))
            registry.submit_version(steward, version.id, Transition())
            registry.approve_version(approver, version.id, ApprovalConditions.model_validate({
                "allowed_regions": ["eu-central"], "allowed_data_classes": ["internal"],
                "allowed_purposes": ["assistant"], "expires_at": utcnow() + timedelta(days=9)}))
            wait_until_up(node, f"http://127.0.0.1:{node_port}/health", node_log, "dev node",
                          timeout_s=120)
            registered = nodes.register_node(SYSTEM, settings, name="n1", region="eu-central",
                                             base_url=f"http://127.0.0.1:{node_port}",
                                             engine="tgi", labels={}, capacity=4)
            assert nodes.probe_node(settings, registered.id).routable
            nodes.create_deployment(SYSTEM, serving_name="tiny", version_id=version.id,
                                    node_ids=[registered.id])
            team = create_team(SYSTEM, name="apps", description="", requests_per_day=None,
                               entitlements={"models": ["*"], "data_classes": ["*"],
                                             "regions": ["*"]}, default_data_class="internal")
            bot = create_service_account(SYSTEM, team.id, username="bot")
            key = create_api_key(SYSTEM, bot.id, name="k").token

            # The API's container, as rendered; only OPA's address differs (the sidecar
            # shares the pod's 127.0.0.1:8181; here it listens where it could).
            opts, ran, args = _run_args(api, "api", objects, secrets, tmp_path / "api",
                                        {"CHARTER_OPA_URL": opa.url})
            assert ran == image and args[0] == "serve"
            container = podman("run", "-d", *opts, image, *args).strip()
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, podman("logs", container)[-3000:]
                time.sleep(0.5)
            user = podman("exec", container, "id", "-u").strip()
            assert user == "10001"
            touched = subprocess.run(["podman", "exec", container, "touch", "/opt/x"], env=ENV,
                                     capture_output=True, text=True)
            assert touched.returncode != 0 and "Read-only file system" in touched.stderr
            r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                           headers={"Authorization": f"Bearer {key}"},
                           json={"model": "tiny", "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "Hello"}]})
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "tiny" and r.headers["X-Charter-Decision-Id"]
            assert any(p.startswith("/v1/data/charter/dispatch") for _, p in opa.requests)
            rest = _memory_mib(container)

            stop_started = time.monotonic()
            podman("stop", "--time", "45", container, timeout=120)
            stop_s = time.monotonic() - stop_started
            state = json.loads(podman("inspect", container))[0]["State"]
            assert state["ExitCode"] == 0 and stop_s < 45, (state, stop_s)
            from charter.audit.service import verify_chain

            assert verify_chain().ok
            runtime_events = _outcomes()
            assert runtime_events == ["completed"]
        print(f"\nimage: {built.size / 1e6:.0f} MB, built in {built.seconds:.0f} s "
              f"(this run); migrations {migrated_s:.1f} s; memory at rest {rest:.0f} MiB; "
              f"SIGTERM to exit {stop_s:.1f} s")
    finally:
        if container:
            podman("rm", "-f", container, check=False)
        node.kill()
        node.wait(timeout=10)
        runtime.close()


def _people() -> tuple[Any, Any]:
    from charter.actor import SYSTEM
    from charter.identity.service import actor_of, create_user

    steward = create_user(SYSTEM, username="sam", display_name="", kind="user",
                          roles=["steward"])
    approver = create_user(SYSTEM, username="ava", display_name="", kind="user",
                           roles=["approver"])
    return actor_of(steward), actor_of(approver)


def _outcomes() -> list[str]:
    from charter.audit.service import EventFilter, list_events

    return [e.details["outcome"] for e in list_events(EventFilter(action="dispatch.outcome"))]


def _memory_mib(container: str) -> float:
    stats = json.loads(podman("stats", "--no-stream", "--format", "json", container))
    used = stats[0].get("mem_usage") or stats[0].get("MemUsage") or "0MB / 0"
    amount = used.split("/")[0].strip()
    for unit, factor in (("GiB", 1024), ("MiB", 1), ("KiB", 1 / 1024), ("GB", 953.67),
                         ("MB", 0.9537), ("kB", 0.000954), ("B", 1 / 2**20)):
        if amount.endswith(unit):
            return float(amount[: -len(unit)]) * factor
    return float("nan")
