"""deploy/: every kustomize overlay renders and validates against the Kubernetes schemas; the
Deployment keeps its invariants; the PrometheusRule wraps the rule file; the Dockerfile and
the Grafana dashboard are sane."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from daemon.config import AligndConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "kubernetes" / "overlays").iterdir())
K8S_VERSION = "1.33.0"
CUSTOM = {"PrometheusRule", "ServiceMonitor"}  # CRDs of the Prometheus operator: no upstream schema
Rendered = dict[str, list[dict[str, Any]]]  # overlay -> its documents


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> Rendered:
    """Every overlay as `kubectl kustomize` renders it: once per module, read by every test."""

    def render(overlay: str) -> list[dict[str, Any]]:
        out = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    return {overlay: render(overlay) for overlay in OVERLAYS}


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def test_overlays_exist() -> None:
    assert {"cpu-demo", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(rendered: Rendered, overlay: str) -> None:
    docs = rendered[overlay]
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    assert "Secret" not in kinds  # referenced, never committed
    for doc in docs:
        if doc["kind"] not in CUSTOM:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_invariants(rendered: Rendered, overlay: str) -> None:
    docs = rendered[overlay]
    deployment = by_kind(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    # The config the pod gets is valid, and the grace period outlasts its drain bound.
    config_map = by_kind(docs, "ConfigMap")
    config = AligndConfig(**yaml.safe_load(config_map["data"]["alignd.yaml"]))
    assert (
        pod["terminationGracePeriodSeconds"] > config.admin.drain_s + config.training.stop_grace_s
    )
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == config_map["metadata"]["name"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    mounted = {
        v["persistentVolumeClaim"]["claimName"]
        for v in volumes.values()
        if "persistentVolumeClaim" in v
    }
    assert mounted == claims


def test_prometheus_rule_wraps_the_rule_file(rendered: Rendered) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alignd-rules.yml").read_text())
    wrapped = by_kind(rendered["gpu"], "PrometheusRule")
    assert wrapped["spec"] == rules, "run: make deploy-rules"


def test_dockerfile_invariants() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    external = [f for f in froms if not f.startswith("runtime-")]
    assert external and all(":" in f and not f.endswith(":latest") for f in external), (
        froms
    )  # pinned tags
    assert (
        re.search(r"^ARG VARIANT=cpu", text, re.M) and "runtime-cuda" in text
    )  # CPU and CUDA images
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))  # non-root
    assert re.search(r'^ENTRYPOINT \["alignd"\]', text, re.M)
    assert not re.search(r"\.(safetensors|gguf|bin)\b", text)  # no weights baked in
    assert len(froms) >= 3  # multi-stage


def test_grafana_dashboard_is_sane() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "alignd-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "alignd_events_stored_total",
        "alignd_events_dead_lettered_total",
        "alignd_consumer_lag_records",
        "alignd_refresh_runs_total",
        "alignd_last_training_loss",
        "alignd_gate_decisions_total",
        "alignd_active_adapter_info",
        "alignd_drift_retain_nats",
    ):
        assert metric in exprs, metric
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and panel["targets"]
    drift = next(p for p in dashboard["panels"] if "drift" in p["title"].lower())
    steps = drift["fieldConfig"]["defaults"]["thresholds"]["steps"]
    rules = (DEPLOY / "prometheus" / "alignd-rules.yml").read_text()
    assert any(
        f"alignd_drift_retain_nats > {s['value']}" in rules for s in steps if s["value"] is not None
    )


def effective_config(docs: list[dict[str, Any]]) -> AligndConfig:
    return AligndConfig(**yaml.safe_load(by_kind(docs, "ConfigMap")["data"]["alignd.yaml"]))


def test_gpu_overlay_trains_in_jobs_and_never_loads_the_base_in_the_daemon(
    rendered: Rendered,
) -> None:
    config = effective_config(rendered["gpu"])
    assert config.training.runner == "kubernetes"
    assert config.training.kubernetes.gpus >= 1 and config.training.kubernetes.memory
    assert config.store.url.startswith("postgresql") and "@" in config.store.url
    assert ":" not in config.store.url.split("//", 1)[1].split("@", 1)[0]  # no inline password
    assert config.schedule.drift_probe_cron is None  # until the probe runs as a Job


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_drift_probe_is_bounded_where_it_runs(rendered: Rendered, overlay: str) -> None:
    config = effective_config(rendered[overlay])
    if config.schedule.drift_probe_cron is not None:
        limit = config.schedule.drift_probe_memory_limit_mb or config.training.memory_limit_mb
        assert limit is not None and config.schedule.drift_probe_timeout_s <= 3600


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_sqlite_is_never_on_a_shared_volume(rendered: Rendered, overlay: str) -> None:
    docs = rendered[overlay]
    config = effective_config(docs)
    if not config.store.url.startswith("sqlite"):
        return
    db = Path(config.store.url.removeprefix("sqlite:///")).parent
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mount = max(
        (m for m in container["volumeMounts"] if db.is_relative_to(m["mountPath"])),
        key=lambda m: len(m["mountPath"]),
    )
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claims = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
    claim = claims[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"], (overlay, mount)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_operators_reach_the_admin_api_while_the_daemon_is_not_ready(
    rendered: Rendered, overlay: str
) -> None:
    docs = rendered[overlay]
    pod_labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    [admin] = [
        d for d in docs if d["kind"] == "Service" and d["spec"].get("publishNotReadyAddresses")
    ]
    assert admin["spec"]["selector"].items() <= pod_labels.items()
    assert {p["targetPort"] for p in admin["spec"]["ports"]} == {"http"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_disruption_budget_covers_the_daemon(rendered: Rendered, overlay: str) -> None:
    docs = rendered[overlay]
    pod_labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = by_kind(docs, "PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["minAvailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_name_their_peers(rendered: Rendered, overlay: str) -> None:
    from daemon.k8s_runner import build_job

    docs = rendered[overlay]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    daemon = policies["alignd"]
    pod_labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert daemon["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert daemon["ingress"] and all(rule.get("from") for rule in daemon["ingress"])
    assert daemon["egress"] and all(rule.get("to") for rule in daemon["egress"])
    for rule in daemon["egress"]:
        for peer in rule["to"]:
            assert peer.get("ipBlock", {}).get("cidr") not in {"0.0.0.0/0", "::/0"}
    trainer = policies["alignd-trainer"]
    job = build_job("r1", Path("/data/run.json"), effective_config(docs).training.kubernetes,
                    timeout_s=60)  # fmt: skip
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    selector = trainer["podSelector"]["matchLabels"]
    # kustomize adds its common labels to selectors; the Job's pods carry the ones that matter
    assert selector["app.kubernetes.io/component"] == job_labels["app.kubernetes.io/component"]
    assert set(trainer["policyTypes"]) == {"Ingress", "Egress"}
    assert not trainer.get("ingress") and not trainer.get("egress")  # deny all


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_reach_the_daemon_as_files_only(rendered: Rendered, overlay: str) -> None:
    [container] = by_kind(rendered[overlay], "Deployment")["spec"]["template"]["spec"]["containers"]
    for env in container.get("env", []):
        assert "valueFrom" not in env, env  # a secret in the environment would reach children
        assert not any(w in env["name"] for w in ("TOKEN", "PASSWORD")) or env["name"].endswith(
            "_FILE"
        )


def test_image_keeps_the_shared_volume_off_the_import_path() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert "PYTHONSAFEPATH=1" in text and "PYTHONNOUSERSITE=1" in text
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    assert not workdir.startswith("/data")
