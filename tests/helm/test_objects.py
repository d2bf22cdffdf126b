"""Assertions on the rendered objects: hooks, security, secrets, labels, images, network."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

import helm_python as helm
import pytest

from tests.helm.conftest import VALUE_SETS, Rendered, merged, value_set

LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
          "app.kubernetes.io/managed-by", "app.kubernetes.io/part-of", "helm.sh/chart")
SECRET_SETTINGS = {"CHARTER_DATABASE_URL", "CHARTER_BROKER_URL", "CHARTER_SECRET_KEY",
                   "CHARTER_OIDC_CLIENT_SECRET"}


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_migrations_job_is_the_only_hook(rendered: dict[str, Rendered]) -> None:
    for out in rendered.values():
        job = out.one("Job", "-migrations")
        notes = job["metadata"]["annotations"]
        assert notes["helm.sh/hook"] == "pre-install,pre-upgrade"
        assert notes["helm.sh/hook-weight"] == "-5"
        assert notes["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        assert pod["containers"][0]["args"] == ["db", "upgrade"]
        # At pre-install nothing of the release exists yet: only pre-existing objects.
        assert "serviceAccountName" not in pod
        assert all("configMap" not in v and "persistentVolumeClaim" not in v
                   for v in pod["volumes"])
        hooks = [o for o in out.objects if "helm.sh/hook" in o["metadata"].get("annotations", {})]
        assert hooks == [job]


def test_hook_renders_on_upgrade(render: Callable[..., Rendered]) -> None:
    job = render(value_set("minimal"), upgrade=True).one("Job", "-migrations")
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_security_contexts(rendered: dict[str, Rendered], name: str) -> None:
    for where, spec in rendered[name].pod_specs():
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for c in containers(spec):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["privileged"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, (where, c["name"])
            assert set(c["resources"]) == {"requests", "limits"}, (where, c["name"])
            assert set(c["resources"]["limits"]) == {"cpu", "memory"}, (where, c["name"])
        charter = [c for c in spec["containers"] if c["name"] != "opa"]
        for c in charter:  # a read-only root needs a writable /tmp
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]  # noqa: S108
            volume = next(v for v in spec["volumes"] if v["name"] == tmp[0]["name"])
            assert "emptyDir" in volume, where
    sa = rendered[name].kind("ServiceAccount")
    assert all(s["automountServiceAccountToken"] is False for s in sa)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_no_secret_in_the_chart(rendered: dict[str, Rendered], name: str) -> None:
    out = rendered[name]
    assert out.kind("Secret") == []
    for where, spec in out.pod_specs():
        for c in containers(spec):
            env = env_of(c)
            for setting in SECRET_SETTINGS & set(env):
                assert "value" not in env[setting], (where, setting)
                assert env[setting]["valueFrom"]["secretKeyRef"]["name"], (where, setting)
            for e in env.values():  # no credential in a URL either
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", e.get("value", "")), (where, e)
        for volume in spec["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] & 0o077 == volume["secret"][
                    "defaultMode"] & 0o040, where  # group-readable at most, never world
    configmaps = " ".join(str(cm["data"]) for cm in out.kind("ConfigMap"))
    assert "PRIVATE KEY" not in configmaps


@pytest.mark.parametrize("missing", ["database", "broker", "secretKey", "audit.signingKeys"])
def test_missing_secret_name_fails(render: Callable[..., Rendered], missing: str) -> None:
    values = value_set("minimal")
    node = values
    *parents, last = missing.split(".")
    for key in parents:
        node = node[key]
    node[last]["existingSecret"] = ""
    with pytest.raises(helm.HelmRenderError, match=re.escape(f"{missing}.existingSecret is "
                                                             "required")):
        render(values)


def test_oidc_needs_its_secret(render: Callable[..., Rendered]) -> None:
    values = merged(value_set("production"), {"oidc": {"existingSecret": ""}})
    with pytest.raises(helm.HelmRenderError, match="oidc.existingSecret is required"):
        render(values)


@pytest.mark.parametrize("name", VALUE_SETS)
def test_labels_on_every_object(rendered: dict[str, Rendered], name: str) -> None:
    for obj in rendered[name].objects:
        labels = obj["metadata"].get("labels", {})
        assert all(labels.get(k) for k in LABELS), (obj["kind"], obj["metadata"]["name"])
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        template = obj.get("spec", {}).get("template")
        if template:
            assert all(template["metadata"]["labels"].get(k) for k in LABELS)


@pytest.mark.parametrize("extra", [{"bogus": 1}, {"api": {"replica": 3}},
                                   {"networkPolicy": {"egress": {"ftp": {}}}}],
                         ids=["top-level", "nested", "deep"])
def test_schema_rejects_unknown_keys(render: Callable[..., Rendered],
                                     extra: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="additional properties"):
        render(merged(value_set("minimal"), extra))


@pytest.mark.parametrize("extra", [{"api": {"replicas": "two"}}, {"ingress": {"enabled": "yes"}},
                                   {"global": {"imagePullSecrets": "mirror"}},
                                   {"image": {"digest": "sha256:abc"}},
                                   {"config": {"extraEnv": {"CHARTER_SECRET_KEY": "x" * 40}}}],
                         ids=["int", "bool", "list", "digest", "secret-as-env"])
def test_schema_rejects_wrong_values(render: Callable[..., Rendered],
                                     extra: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(merged(value_set("minimal"), extra))


def images(out: Rendered) -> dict[str, str]:
    return {f"{where}/{c['name']}": c["image"] for where, spec in out.pod_specs()
            for c in containers(spec)}


def test_digest_wins_over_tag(render: Callable[..., Rendered]) -> None:
    digest = "sha256:" + "ab" * 32
    out = render(merged(value_set("minimal"), {"image": {"tag": "9.9.9", "digest": digest},
                                               "opa": {"image": {"digest": digest}}}))
    for where, image in images(out).items():
        assert image.endswith("@" + digest) and "9.9.9" not in image, where
        assert ":1.20.2" not in image, where
    tagged = images(render(value_set("minimal")))
    assert tagged["Deployment/charter-api/api"] == "charter:0.1.0"  # the appVersion
    assert tagged["Deployment/charter-api/opa"] == "docker.io/openpolicyagent/opa:1.20.2-static"


def test_private_registry_on_every_image(rendered: dict[str, Rendered]) -> None:
    out = rendered["airgapped"]
    prefix = value_set("airgapped")["global"]["imageRegistry"] + "/"
    found = images(out)
    assert {k.rsplit("/", 1)[1] for k in found} == {"api", "opa", "worker", "beat", "migrations"}
    for where, image in found.items():
        assert image.startswith(prefix), where
        assert "docker.io" not in image and "@sha256:" in image, where
    for where, spec in out.pod_specs():
        assert spec["imagePullSecrets"] == [{"name": "mirror-pull"}], where


def egress_rules(policy: dict[str, Any]) -> list[tuple[set[str], set[tuple[int, str]]]]:
    return [({p["ipBlock"]["cidr"] if "ipBlock" in p else "kube-dns" for p in rule["to"]},
             {(p["port"], p["protocol"]) for p in rule["ports"]})
            for rule in policy["spec"]["egress"]]


@pytest.mark.parametrize("name", ["production", "airgapped"])
def test_network_policy_egress_is_exactly_the_values(rendered: dict[str, Rendered],
                                                     name: str) -> None:
    policy = rendered[name].one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "charter", "app.kubernetes.io/instance": "charter"}
    egress = value_set(name)["networkPolicy"]["egress"]
    dns_ports = {(53, "UDP"), (53, "TCP")}
    expected = [(set(egress.get("dns", {}).get("cidrs") or ["kube-dns"]), dns_ports)]
    for key in ("database", "broker", "identityProvider", "nodes", "siem", "telemetry"):
        if egress.get(key, {}).get("cidrs"):
            expected.append((set(egress[key]["cidrs"]), {(p, "TCP") for p in egress[key]["ports"]}))
    assert egress_rules(policy) == expected
    for cidrs, _ in expected:
        for cidr in cidrs - {"kube-dns"}:
            ipaddress.ip_network(cidr)
    ingress = policy["spec"]["ingress"]
    assert [p["port"] for p in ingress[0]["ports"]] == [8080]


def test_network_policy_uses_kube_dns_by_default(rendered: dict[str, Rendered]) -> None:
    rule = rendered["production"].one("NetworkPolicy")["spec"]["egress"][0]
    assert rule["to"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}]


def test_network_policy_refuses_to_cut_off_the_database(render: Callable[..., Rendered]) -> None:
    with pytest.raises(helm.HelmRenderError, match="database.cidrs is empty"):
        render(merged(value_set("minimal"), {"networkPolicy": {"enabled": True}}))


def test_optional_objects(rendered: dict[str, Rendered]) -> None:
    minimal, production = rendered["minimal"], rendered["production"]
    for kind in ("Ingress", "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceMonitor"):
        assert minimal.kind(kind) == [], kind
        assert len(production.kind(kind)) == 1, kind
    assert "replicas" not in production.one("Deployment", "-api")["spec"]  # the HPA owns it
    assert minimal.one("Deployment", "-api")["spec"]["replicas"] == 2
    assert {p["metadata"]["name"] for p in production.kind("PodDisruptionBudget")} == {
        "charter-api", "charter-worker"}
    hops = {name: env_of(out.one("Deployment", "-api")["spec"]["template"]["spec"][
        "containers"][0])["CHARTER_TRUSTED_PROXY_HOPS"]["value"]
        for name, out in rendered.items() if name in ("minimal", "production")}
    assert hops == {"minimal": "0", "production": "1"}  # one hop: the chart's ingress
    ingress = production.one("Ingress")
    assert ingress["spec"]["tls"] == [{"hosts": ["charter.example.org"],
                                       "secretName": "charter-tls"}]
    monitor = production.one("ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"


def test_workloads(rendered: dict[str, Rendered]) -> None:
    out = rendered["production"]
    api = out.one("Deployment", "-api")["spec"]["template"]["spec"]
    assert [c["name"] for c in api["containers"]] == ["api", "opa"]
    probes = api["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker = out.one("Deployment", "-worker")["spec"]["template"]["spec"]
    assert [c["name"] for c in worker["containers"]] == ["worker", "opa"]
    beat = out.one("Deployment", "-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"] == {"type": "Recreate"}
    env = env_of(api["containers"][0])
    assert env["CHARTER_TASK_BACKEND"]["value"] == "celery"
    assert env["CHARTER_POLICY_BACKEND"]["value"] == "remote"
    assert env["CHARTER_OPA_URL"]["value"] == "http://127.0.0.1:8181"
    assert env["CHARTER_AUDIT_SIGNING_KEYS"]["value"] == (
        "/etc/charter/audit-keys/signing-key-2025.pem,/etc/charter/audit-keys/signing-key-2026.pem")
    assert env["CHARTER_AUDIT_CHECKPOINT_DIR"]["value"] == "/var/lib/charter/checkpoints"
    assert env["CHARTER_OIDC_ROLE_MAP"]["value"] == (
        '{"ai-approvers":["approver"],"ai-auditors":["auditor"]}')
    keys = next(v for v in api["volumes"] if v["name"] == "signing-keys")
    assert keys["secret"]["secretName"] == "charter-audit-keys"
    mount = next(m for m in api["containers"][0]["volumeMounts"] if m["name"] == "signing-keys")
    assert mount["readOnly"] is True
    claim = next(v for v in api["volumes"] if v["name"] == "checkpoints")
    assert claim["persistentVolumeClaim"] == {"claimName": "charter-checkpoints"}
    # The sealing key evolves in place: a writable claim, never a read-only Secret.
    assert env["CHARTER_AUDIT_SEAL_KEY"]["value"] == "/var/lib/charter/seal/seal-key.json"
    seal = next(m for m in api["containers"][0]["volumeMounts"] if m["name"] == "seal-key")
    assert not seal.get("readOnly")
    assert next(v for v in api["volumes"] if v["name"] == "seal-key")[
        "persistentVolumeClaim"] == {"claimName": "charter-seal-key"}
    opa = api["containers"][1]
    assert "--addr=127.0.0.1:8181" in opa["args"] and "--disable-telemetry" in opa["args"]
    # The input contracts go to Charter's containers, not to OPA (they are not its data).
    app_paths = {m["mountPath"] for m in api["containers"][0]["volumeMounts"]}
    assert {"/etc/charter/policies/schemas/admission.input.json",
            "/etc/charter/policies/schemas/dispatch.input.json"} <= app_paths
    assert not any("schemas" in m["mountPath"] for m in opa["volumeMounts"])


def test_settings_accept_the_environment(rendered: dict[str, Rendered]) -> None:
    """Charter's own Settings parse what the chart sets (secrets filled in by hand)."""
    from charter.settings import Settings

    fill = {"CHARTER_DATABASE_URL": "postgresql+psycopg://charter@db/charter",
            "CHARTER_BROKER_URL": "redis://redis:6379/0", "CHARTER_SECRET_KEY": "k" * 40,
            "CHARTER_OIDC_CLIENT_SECRET": "s" * 20}
    for out in rendered.values():
        for _where, spec in out.pod_specs():
            for c in spec["containers"]:
                if c["name"] == "opa":
                    continue
                env = {name: e.get("value", fill.get(name)) for name, e in env_of(c).items()
                       if name.startswith("CHARTER_")}
                Settings.from_env(env).validate()  # raises on an unknown or bad setting


def test_commands_parse(rendered: dict[str, Rendered]) -> None:
    """Every container's arguments are options the `charter` command line accepts."""
    from charter.cli import main

    for out in rendered.values():
        for where, spec in out.pod_specs():
            for c in spec["containers"]:
                if c["name"] == "opa":
                    continue
                group, args = main, list(c["args"])
                while hasattr(group, "commands") and args and args[0] in group.commands:
                    group = group.commands[args.pop(0)]
                assert not hasattr(group, "commands"), (where, c["args"])
                group.make_context(group.name, args)  # raises on an unknown option


def test_a_witness_in_its_own_namespace(rendered: dict[str, Rendered],
                                        render: Callable[..., Rendered]) -> None:
    out = rendered["production"]
    deployment = out.one("Deployment", "-witness")
    assert deployment["metadata"]["namespace"] == "charter-witness"
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    args = spec["containers"][0]["args"]
    assert args[:2] == ["witness", "serve"] and "--state=/var/lib/charter/witness/state.db" in args
    log_key = value_set("production")["witness"]["logKeys"][0]
    assert f"--log=charter.example.org/audit={log_key}" in args
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["key"]["secret"]["secretName"] == "charter-witness-key"
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "charter-witness"}
    claim = out.one("PersistentVolumeClaim", "-witness")
    assert claim["metadata"]["namespace"] == "charter-witness"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert out.one("Service", "-witness")["spec"]["ports"][0]["port"] == 7380
    api = out.one("Deployment", "-api")["spec"]["template"]["spec"]["containers"][0]
    witness = value_set("production")["audit"]["witnesses"][0]
    assert env_of(api)["CHARTER_AUDIT_WITNESSES"]["value"] == (
        f"{witness['key']} {witness['url']}")
    assert rendered["minimal"].kind("PersistentVolumeClaim") == []
    with pytest.raises(helm.HelmRenderError, match="witness.logKeys is required"):
        render(merged(value_set("production"), {"witness": {"logKeys": []}}))


def test_limits_share_a_redis_only_when_given_one(rendered: dict[str, Rendered]) -> None:
    """With a Secret, every API and worker pod reads the limits' Redis URL from it; without
    one, each process keeps its own (no URL at all); fail closed either way by default."""
    envs = {name: env_of(out.one("Deployment", "-api")["spec"]["template"]["spec"][
        "containers"][0]) for name, out in rendered.items() if name in ("minimal", "production")}
    assert envs["production"]["CHARTER_LIMITS_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "charter-limits", "key": "limits-redis-url"}
    assert "CHARTER_LIMITS_REDIS_URL" not in envs["minimal"]
    assert {e["CHARTER_LIMITS_UNAVAILABLE"]["value"] for e in envs.values()} == {"refuse"}


def test_siem_and_tracing_reach_the_settings_only_when_set(rendered: dict[str, Rendered]) -> None:
    """The SIEM destinations, its CA bundle (a ConfigMap, mounted read-only) and the
    traces endpoint become CHARTER_* settings; unset, none of them is there."""
    production = rendered["production"].one("Deployment", "-api")["spec"]["template"]["spec"]
    env = env_of(production["containers"][0])
    assert env["CHARTER_AUDIT_SIEM_SYSLOG"]["value"] == "tls://siem.example.org:6514"
    assert env["CHARTER_AUDIT_SIEM_CA_FILE"]["value"] == "/etc/charter/siem-ca/ca.crt"
    assert env["CHARTER_OTEL_ENDPOINT"]["value"] == (
        "http://otel-collector.observability.svc:4318/v1/traces")
    assert "CHARTER_AUDIT_SIEM_OTLP" not in env
    mounts = {m["name"]: m for m in production["containers"][0]["volumeMounts"]}
    assert mounts["siem-ca"] == {"name": "siem-ca", "mountPath": "/etc/charter/siem-ca",
                                 "readOnly": True}
    volumes = {v["name"]: v for v in production["volumes"]}
    assert volumes["siem-ca"]["configMap"]["name"] == "siem-ca"
    minimal = env_of(rendered["minimal"].one("Deployment", "-api")["spec"]["template"][
        "spec"]["containers"][0])
    assert not {"CHARTER_AUDIT_SIEM_SYSLOG", "CHARTER_AUDIT_SIEM_CA_FILE",
                "CHARTER_OTEL_ENDPOINT"} & set(minimal)


def test_tokenizers_are_mounted_read_only_where_requests_are_counted(
        rendered: dict[str, Rendered]) -> None:
    """The claim holding the versions' tokenizers reaches the API and the workers (batch
    lines are counted there), read-only, and becomes CHARTER_TOKENIZERS_DIR; without one,
    neither the mount nor the setting is there."""
    for part in ("-api", "-worker"):
        spec = rendered["production"].one("Deployment", part)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        assert env_of(container)["CHARTER_TOKENIZERS_DIR"]["value"] == (
            "/var/lib/charter/tokenizers")
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["tokenizers"] == {"name": "tokenizers", "readOnly": True,
                                        "mountPath": "/var/lib/charter/tokenizers"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["tokenizers"]["persistentVolumeClaim"] == {
            "claimName": "charter-tokenizers", "readOnly": True}
        minimal = rendered["minimal"].one("Deployment", part)["spec"]["template"]["spec"]
        assert "CHARTER_TOKENIZERS_DIR" not in env_of(minimal["containers"][0])
        assert "tokenizers" not in {v["name"] for v in minimal["volumes"]}


def test_the_capture_key_is_mounted_read_only_where_captures_are_sealed_and_read(
        rendered: dict[str, Rendered]) -> None:
    """The Secret holding the captures' key-encryption key reaches the API and the workers
    (a batch line is captured there), read-only, as CHARTER_CAPTURE_KEY_FILE, with the
    bounds; without one, no mount and no key setting (nothing can be approved)."""
    for part in ("-api", "-worker"):
        spec = rendered["production"].one("Deployment", part)["spec"]["template"]["spec"]
        container = spec["containers"][0]
        env = env_of(container)
        assert env["CHARTER_CAPTURE_KEY_FILE"]["value"] == "/etc/charter/capture-key/capture.key"
        assert (env["CHARTER_CAPTURE_MAX_HOURS"]["value"],
                env["CHARTER_CAPTURE_MAX_RETAIN_DAYS"]["value"]) == ("48", "14")
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["capture-key"] == {"name": "capture-key", "readOnly": True,
                                         "mountPath": "/etc/charter/capture-key"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["capture-key"]["secret"] == {
            "secretName": "charter-capture-key", "defaultMode": 0o440,
            "items": [{"key": "capture.key", "path": "capture.key"}]}
        minimal = rendered["minimal"].one("Deployment", part)["spec"]["template"]["spec"]
        assert "CHARTER_CAPTURE_KEY_FILE" not in env_of(minimal["containers"][0])
        assert "capture-key" not in {v["name"] for v in minimal["volumes"]}
