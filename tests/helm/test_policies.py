"""The chart's policy copy matches policies/, and OPA and Charter see the same revision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from charter.policy.bundle import PolicyBundle
from tests.helm.conftest import CHART, ROOT, Rendered, load_script

COPY = CHART / "files" / "policies"
sync = load_script(ROOT / "scripts" / "helm-policies")


def test_chart_copy_matches_policies() -> None:
    wanted = sync.wanted()
    carried = {p.relative_to(COPY).as_posix(): p.read_bytes()
               for p in sorted(COPY.rglob("*")) if p.is_file()}
    assert carried == wanted, "helm/charter/files/policies is stale: run scripts/helm-policies"
    assert any(path.startswith("data/") for path in wanted)
    assert not any(path.endswith("_test.rego") for path in carried)


def materialise(out: Rendered, container: str, tmp: Path) -> Path:
    """Lay out the ConfigMap's keys where the container's subPath mounts put them."""
    configmap = out.one("ConfigMap", "-policies")
    spec = out.one("Deployment", "-api")["spec"]["template"]["spec"]
    target = next(c for c in spec["containers"] if c["name"] == container)
    root = tmp / container
    for mount in target["volumeMounts"]:
        if mount["name"] == "policies":
            assert mount["readOnly"] is True
            path = root / mount["mountPath"].lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(configmap["data"][mount["subPath"]], encoding="utf-8")
    return root


def opa_data(root: Path) -> dict[str, Any]:
    """What `opa run /policies` puts under data: each data.json at its folder's path."""
    data: dict[str, Any] = {}
    for path in sorted(root.rglob("data.json")):
        node = data
        for part in path.parent.relative_to(root).parts:
            node = node.setdefault(part, {})
        node.update(json.loads(path.read_text()))
    return data


def check_layouts(out: Rendered, tmp: Path) -> str:
    charter = PolicyBundle.load(materialise(out, "api", tmp) / "etc" / "charter" / "policies")
    opa_root = materialise(out, "opa", tmp) / "policies"
    held = opa_data(opa_root)["charter"]
    assert held["revision"] == charter.revision  # what Charter checks before deciding
    assert {k: v for k, v in held.items() if k != "revision"} == charter.data["charter"]
    assert sorted(p.relative_to(opa_root).as_posix() for p in opa_root.rglob("*.rego")) == [
        f.path for f in charter.policies]
    configmap = out.one("ConfigMap", "-policies")
    assert configmap["metadata"]["annotations"]["charter.example.org/policy-revision"] == (
        charter.revision)
    env = {e["name"]: e.get("value") for e in out.one("Deployment", "-api")["spec"]["template"][
        "spec"]["containers"][0]["env"]}
    assert env["CHARTER_POLICY_DIR"] == "/etc/charter/policies"
    assert env["CHARTER_OPA_PUSH_POLICIES"] == "false"
    return charter.revision


def test_helm_computes_charters_revision(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    revision = check_layouts(rendered["minimal"], tmp_path)
    # The same bytes as the repository's policies/: the revision `charter policy show` prints.
    assert revision == PolicyBundle.load(ROOT / "policies").revision
    assert revision in rendered["minimal"].notes


def test_overridden_data_keeps_revisions_equal(rendered: dict[str, Rendered],
                                               tmp_path: Path) -> None:
    out = rendered["airgapped"]  # replaces data.charter.organisation
    revision = check_layouts(out, tmp_path)
    assert revision != PolicyBundle.load(ROOT / "policies").revision
    configmap = out.one("ConfigMap", "-policies")
    assert json.loads(configmap["data"]["data__organisation.json"])["name"] == (
        "Ministry of Examples")
    pods = [o["spec"]["template"]["metadata"]["annotations"]["checksum/policies"]
            for o in out.kind("Deployment")]
    assert pods == [revision.removeprefix("sha256:")] * 3  # pods restart on a policy change
