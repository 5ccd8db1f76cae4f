"""Refresh training as a Kubernetes Job instead of a local child process.

The daemon writes ``run.json`` on the shared volume, creates a ``batch/v1`` Job running the
same image (``alignd``'s trainer entry point; ``torchrun`` when more than one GPU is asked
for), watches it to completion, reads ``result.json`` from the volume, and deletes the Job.
A stop request or the timeout deletes the Job (its pod gets SIGTERM, then SIGKILL after the
grace period) and the run is recorded as interrupted / timed out, like the local runner.

The KL drift probe runs the same way (:meth:`KubernetesJobRunner.probe`): a Job with the
trainer's image, memory limit, node selector and tolerations, so the base is never loaded into
the daemon's pod. It uses one GPU (two forwards per reply) unless training shards the base
(``run_spec.engine: fsdp``): then it takes the same GPUs and shards it the same way.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

from daemon.config import KubernetesJobConfig
from daemon.runners import RunEnd, RunExit

Task = Literal["train", "probe"]


def job_name(run_id: str, task: Task = "train") -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"alignd-{task}-{run_id}".lower())[:63].rstrip("-")


# One Job manifest as Kubernetes reads it, field by field (~100 lines): a helper per block would
# hide which fields the Job sets.
def build_job(
    run_id: str,
    spec_path: Path,
    config: KubernetesJobConfig,
    *,
    timeout_s: float,
    task: Task = "train",
    out_path: Path | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """The Job manifest for one refresh run, or (``task="probe"``) one drift probe writing
    ``out_path``, sharded over the training GPUs when ``sharded`` (pure: tested as data)."""
    gpus = config.gpus if task == "train" or sharded else min(config.gpus, 1)
    module, args = "trainer.train", [str(spec_path)]
    if task == "probe":
        if out_path is None:
            raise ValueError("a probe Job needs the path it writes its result to")
        module, args = "trainer.probe", [str(spec_path), str(out_path)]
    if gpus > 1:
        command = ["torchrun", "--standalone", f"--nproc_per_node={gpus}", "-m", module, *args]
    else:
        command = ["python", "-I", "-m", module, *args]
    limits: dict[str, str] = {"memory": config.memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # the trainer never talks to the Kubernetes API: no token in its pod
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trainer",
                "image": config.image,
                "command": command,
                # a read-only directory that is not the shared volume; with PYTHONSAFEPATH and
                # PYTHONNOUSERSITE (torchrun's workers are not started with -I) nothing on the
                # volume is ever on the import path
                "workingDir": "/opt/alignd",
                "env": [
                    {"name": "ALIGND_CACHE_DIR", "value": f"{config.data_mount}/cache"},
                    {"name": "PYTHONSAFEPATH", "value": "1"},
                    {"name": "PYTHONNOUSERSITE", "value": "1"},
                ],
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "resources": {
                    "requests": {"cpu": config.cpu, "memory": config.memory},
                    "limits": limits,
                },
                "volumeMounts": [
                    {"name": "data", "mountPath": config.data_mount},
                    {"name": "shm", "mountPath": "/dev/shm"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": config.pvc_name}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if config.service_account:
        pod_spec["serviceAccountName"] = config.service_account
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        pod_spec["tolerations"] = list(config.tolerations)
    labels = {
        "app.kubernetes.io/name": "alignd",
        "app.kubernetes.io/component": "trainer" if task == "train" else "drift-probe",
        "alignd/run-id": run_id,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(run_id, task),
            "namespace": config.namespace,
            "labels": labels,
        },
        "spec": {
            "backoffLimit": 0,  # a failed run is reported, not retried behind the daemon's back
            "activeDeadlineSeconds": int(timeout_s),
            "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": labels}, "spec": pod_spec},
        },
    }


class KubernetesJobRunner:
    """Runs one training Job at a time through the official ``kubernetes`` client."""

    def __init__(self, config: KubernetesJobConfig, api_client: Any | None = None) -> None:
        from kubernetes import client
        from kubernetes import config as kube_config

        if api_client is None:
            try:
                kube_config.load_incluster_config()  # type: ignore[no-untyped-call]
            except kube_config.ConfigException:
                kube_config.load_kube_config()  # type: ignore[no-untyped-call]
            api_client = client.ApiClient()
        self.config = config
        # Any: the client accepts plain manifests (dicts) as well as its generated models.
        self.batch: Any = client.BatchV1Api(api_client)

    def run(self, run_id: str, spec_path: Path, stop: threading.Event, timeout_s: float) -> RunEnd:
        """The training Job's end: succeeded, failed, interrupted (``stop``) or timed out."""
        manifest = build_job(run_id, spec_path, self.config, timeout_s=timeout_s)
        return self._watch(manifest, stop, timeout_s)

    def probe(
        self,
        probe_id: str,
        spec_path: Path,
        out_path: Path,
        stop: threading.Event,
        timeout_s: float,
        *,
        sharded: bool = False,
        memory_limit_mb: int | None = None,
    ) -> RunEnd:
        """A drift probe Job's end (it writes ``out_path`` on the shared volume). Its memory
        is the Job's: ``memory_limit_mb`` (a local child's bound) does not apply."""
        manifest = build_job(
            probe_id,
            spec_path,
            self.config,
            timeout_s=timeout_s,
            task="probe",
            out_path=out_path,
            sharded=sharded,
        )
        return self._watch(manifest, stop, timeout_s)

    def _watch(self, manifest: dict[str, Any], stop: threading.Event, timeout_s: float) -> RunEnd:
        name, namespace = manifest["metadata"]["name"], self.config.namespace
        self.batch.create_namespaced_job(namespace, manifest)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                status = self.batch.read_namespaced_job_status(name, namespace).status
                if status is not None and status.succeeded:
                    return RunEnd(RunExit.SUCCEEDED, f"Job {name} succeeded")
                if status is not None and status.failed:
                    return RunEnd(RunExit.FAILED, f"Job {name} failed")
                if stop.wait(self.config.poll_s):
                    return RunEnd(RunExit.INTERRUPTED, "stopped during shutdown")
                if time.monotonic() > deadline:
                    return RunEnd(RunExit.TIMED_OUT, f"timed out after {timeout_s:.0f}s")
        finally:
            self._delete(name, namespace)

    def _delete(self, name: str, namespace: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise
