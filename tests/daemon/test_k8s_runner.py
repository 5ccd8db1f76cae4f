"""The Kubernetes Job runner: the manifest it builds, and its state handling through the
official `kubernetes` client against recorded API-server responses (no cluster here: a
loopback HTTP server replays them)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from kubernetes import client

from daemon.config import AligndConfig
from daemon.k8s_runner import KubernetesJobConfig, KubernetesJobRunner, build_job, job_name
from daemon.runners import RunExit

RESPONSES = Path(__file__).parent / "k8s_responses"
GPU = KubernetesJobConfig(
    gpus=4,
    node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    service_account="alignd",
)


def test_job_manifest() -> None:
    job = build_job("r20261122-030000-ab12cd", Path("/data/runs/r1/run.json"), GPU, timeout_s=7200)
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert container["command"][:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    assert container["command"][-1] == "/data/runs/r1/run.json"
    assert pod["nodeSelector"] == GPU.node_selector and pod["tolerations"] == GPU.tolerations
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "alignd-data"
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] == 7200
    assert job["metadata"]["name"] == "alignd-train-r20261122-030000-ab12cd"


def test_single_gpu_and_cpu_jobs_run_plain_python() -> None:
    for gpus in (0, 1):
        job = build_job("r1", Path("/data/run.json"), KubernetesJobConfig(gpus=gpus), timeout_s=60)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][:4] == ["python", "-I", "-m", "trainer.train"]
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) is (gpus == 1)


@pytest.mark.parametrize("gpus", [0, 1, 4])
def test_job_pods_are_hardened(gpus: int) -> None:
    """No service-account token, non-root, no privilege escalation, read-only root, nothing
    on the shared volume on the import path (-I, or PYTHONSAFEPATH under torchrun), no
    secrets in the environment."""
    job = build_job("r1", Path("/data/run.json"), KubernetesJobConfig(gpus=gpus), timeout_s=60)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"]
    assert context["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PYTHONSAFEPATH"] == "1" and env["PYTHONNOUSERSITE"] == "1"
    assert not any(k.startswith("ALIGND_") and k != "ALIGND_CACHE_DIR" for k in env)
    assert not container["workingDir"].startswith("/data")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/tmp" in mounts  # writable scratch under a read-only root


def test_job_names_are_valid_dns_labels() -> None:
    name = job_name("R_2026/11/22 " + "x" * 80)
    assert len(name) <= 63 and all(c.isalnum() or c == "-" for c in name) and name == name.lower()


def test_runner_is_selectable_by_config() -> None:
    config = AligndConfig(
        training={"runner": "kubernetes", "kubernetes": {"gpus": 2, "namespace": "ml"}}
    )
    assert config.training.kubernetes.gpus == 2


class Replay:
    """Serves recorded API responses in order, and records what the client sent.
    ``on_create`` plays the Job's pod (e.g. writes the file it would write on the volume)."""

    def __init__(self, status_sequence: list[str]) -> None:
        self.status_sequence = status_sequence
        self.requests: list[tuple[str, str, Any]] = []
        self.on_create: Any = None

    def response(self, method: str, path: str) -> tuple[int, str]:
        if method == "POST" and path.endswith("/jobs"):
            return 201, "job_created.json"
        if method == "GET" and path.endswith("/status"):
            name = (
                self.status_sequence.pop(0)
                if len(self.status_sequence) > 1
                else self.status_sequence[0]
            )
            return 200, name
        if method == "DELETE":
            return 200, "job_deleted.json"
        return 404, ""


@pytest.fixture()
def api(request: pytest.FixtureRequest) -> Iterator[tuple[Replay, Any]]:
    replay = Replay(list(request.param))

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            replay.requests.append((self.command, self.path, body))
            if self.command == "POST" and replay.on_create is not None:
                replay.on_create(body)
            code, name = replay.response(self.command, self.path.split("?")[0])
            payload = (
                (RESPONSES / name).read_text().replace("JOB_NAME", "alignd-train-r1").encode()
                if name
                else b"{}"
            )
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    yield replay, client.ApiClient(configuration)
    server.shutdown()


@pytest.mark.parametrize(
    "api", [["job_active.json", "job_active.json", "job_succeeded.json"]], indirect=True
)
def test_job_success_is_watched_then_cleaned_up(api: tuple[Replay, Any]) -> None:
    replay, api_client = api
    runner = KubernetesJobRunner(KubernetesJobConfig(poll_s=0.01), api_client)
    assert (
        runner.run("r1", Path("/data/runs/r1/run.json"), threading.Event(), timeout_s=60).exit
        == RunExit.SUCCEEDED
    )
    methods = [(m, p.split("?")[0].rsplit("/", 1)[-1]) for m, p, _ in replay.requests]
    assert methods[0] == ("POST", "jobs") and methods[-1] == ("DELETE", "alignd-train-r1")
    assert [m for m in methods if m[1] == "status"] == [("GET", "status")] * 3
    created = replay.requests[0][2]
    assert created == build_job(
        "r1", Path("/data/runs/r1/run.json"), KubernetesJobConfig(poll_s=0.01), timeout_s=60
    )
    assert "propagationPolicy=Background" in replay.requests[-1][1]


@pytest.mark.parametrize("api", [["job_active.json", "job_failed.json"]], indirect=True)
def test_job_failure_is_reported(api: tuple[Replay, Any]) -> None:
    replay, api_client = api
    runner = KubernetesJobRunner(KubernetesJobConfig(poll_s=0.01), api_client)
    assert (
        runner.run("r1", Path("/data/run.json"), threading.Event(), timeout_s=60).exit
        == RunExit.FAILED
    )
    assert replay.requests[-1][0] == "DELETE"


@pytest.mark.parametrize("api", [["job_active.json"]], indirect=True)
def test_stop_deletes_the_running_job(api: tuple[Replay, Any]) -> None:
    replay, api_client = api
    stop = threading.Event()
    stop.set()
    runner = KubernetesJobRunner(KubernetesJobConfig(poll_s=0.01), api_client)
    assert runner.run("r1", Path("/data/run.json"), stop, timeout_s=60).exit == RunExit.INTERRUPTED
    assert replay.requests[-1][0] == "DELETE"


@pytest.mark.parametrize("api", [["job_active.json"]], indirect=True)
def test_timeout_deletes_the_job(api: tuple[Replay, Any]) -> None:
    replay, api_client = api
    runner = KubernetesJobRunner(KubernetesJobConfig(poll_s=0.01), api_client)
    end = runner.run("r1", Path("/data/run.json"), threading.Event(), timeout_s=0.05)
    assert end.exit == RunExit.TIMED_OUT and end.detail.startswith("timed out")
    assert replay.requests[-1][0] == "DELETE"


def test_probe_job_manifest() -> None:
    """The drift probe runs as a Job with the trainer's image, limits and placement, on one
    GPU at most, writing its result next to its spec on the shared volume."""
    spec, out = Path("/data/probes/p1/probe.json"), Path("/data/probes/p1/out.json")
    job = build_job("p1", spec, GPU, timeout_s=900, task="probe", out_path=out)
    kubernetes_validate.validate(job, "1.33.0", strict=True)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["command"] == ["python", "-I", "-m", "trainer.probe", str(spec), str(out)]
    assert container["resources"]["limits"] == {"memory": GPU.memory, "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == GPU.node_selector and pod["tolerations"] == GPU.tolerations
    assert job["metadata"]["name"] == "alignd-probe-p1"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "drift-probe"
    assert job["spec"]["activeDeadlineSeconds"] == 900
    cpu = build_job("p1", spec, KubernetesJobConfig(gpus=0), timeout_s=60, task="probe",
                    out_path=out)  # fmt: skip
    assert (
        "nvidia.com/gpu"
        not in cpu["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    )
    with pytest.raises(ValueError, match="needs the path"):
        build_job("p1", spec, GPU, timeout_s=60, task="probe")
    # where training shards the base (run_spec.engine: fsdp), the probe takes the same GPUs
    sharded = build_job("p1", spec, GPU, timeout_s=60, task="probe", out_path=out, sharded=True)
    kubernetes_validate.validate(sharded, "1.33.0", strict=True)
    [container] = sharded["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["torchrun", "--standalone", "--nproc_per_node=4", "-m",
                                    "trainer.probe", str(spec), str(out)]  # fmt: skip
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"


@pytest.fixture()
def probing_service(tmp_path: Path) -> Iterator[Any]:
    """A daemon with an active adapter."""
    from daemon_support import in_process_service
    from registry_support import make_adapter

    with in_process_service(tmp_path) as service:
        version = service.registry.register(
            make_adapter(tmp_path / "adapter"), {"gate": {"promote": True, "reasons": []}}
        )
        service.registry.promote(version, actor="test", reason="setup")
        yield service


@pytest.mark.parametrize(("engine", "reply_ok"), [("ddp", True), ("fsdp", True), ("ddp", False)])
@pytest.mark.parametrize("api", [["job_active.json", "job_succeeded.json"]], indirect=True)
def test_the_drift_probe_runs_as_a_job_where_training_does(
    api: tuple[Replay, Any], probing_service: Any, engine: str, reply_ok: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    replay, api_client = api
    service = probing_service
    training = service.config.training.model_copy(update={"run_spec": {"engine": engine}})
    service.config = service.config.model_copy(update={"training": training})
    k8s = KubernetesJobConfig(poll_s=0.01, gpus=2)
    service.refresher.runner = KubernetesJobRunner(k8s, api_client)
    seen: dict[str, Any] = {}

    def pod(job: dict[str, Any]) -> None:  # the Job's pod: reads the spec, writes its result
        spec_path, out_path = job["spec"]["template"]["spec"]["containers"][0]["command"][-2:]
        seen["spec"] = json.loads(Path(spec_path).read_text())
        result = {"nats_per_reply": 0.125, "ci95": 0.02, "nats_per_token": 0.004,
                  "num_replies": 63}  # fmt: skip
        Path(out_path).write_text(json.dumps(result if reply_ok else {"nats_per_reply": 0.125}))

    replay.on_create = pod
    if not reply_ok:  # a result that does not parse is a probe that did not finish
        assert service.drift_probe() is None
        assert service.metrics.drift_probe_failures.labels(reason="failed")._value.get() == 1
        assert "does not parse: ci95: Field required" in caplog.text
        return
    assert service.drift_probe() == 0.125
    assert seen["spec"]["retain_set"] == "default" and seen["spec"]["dtype"] == "auto"
    assert seen["spec"]["cache_dir"] == str(service.config.paths.data_dir / "cache")  # the volume
    assert seen["spec"]["engine"] == engine
    command = replay.requests[0][2]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == ("torchrun" if engine == "fsdp" else "python")  # sharded as training
    assert seen["spec"]["adapter"].startswith(str(service.config.paths.data_dir))  # the volume
    assert replay.requests[0][2]["metadata"]["name"].startswith("alignd-probe-")
    assert replay.requests[-1][0] == "DELETE"
    assert not list((service.config.paths.data_dir / "probes").iterdir())  # cleaned up
    assert service.metrics.drift_kl._value.get() == 0.125


@pytest.mark.parametrize("api", [["job_failed.json"]], indirect=True)
def test_a_failed_probe_job_is_counted_not_fatal(
    api: tuple[Replay, Any], probing_service: Any
) -> None:
    replay, api_client = api
    service = probing_service
    service.refresher.runner = KubernetesJobRunner(KubernetesJobConfig(poll_s=0.01), api_client)
    assert service.drift_probe() is None
    failures = service.metrics.drift_probe_failures.labels(reason="failed")._value.get()
    assert failures == 1 and replay.requests[-1][0] == "DELETE"
