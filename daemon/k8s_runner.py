"""Refresh training as a Kubernetes Job instead of a local child process.

The daemon writes ``run.json`` on the shared volume, creates a ``batch/v1`` Job running the
same image (``alignd``'s trainer entry point; ``torchrun`` when more than one GPU is asked
for), watches it to completion, reads ``result.json`` from the volume, and deletes the Job.
A stop request or the timeout deletes the Job (its pod gets SIGTERM, then SIGKILL after the
grace period) and the run is recorded as interrupted / timed out, like the local runner.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from daemon.config import KubernetesJobConfig
from daemon.runners import RunEnd, RunExit


def job_name(run_id: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"alignd-train-{run_id}".lower())[:63].rstrip("-")


def build_job(
    run_id: str, spec_path: Path, config: KubernetesJobConfig, *, timeout_s: float
) -> dict[str, Any]:
    """The Job manifest for one refresh run (pure: tested as data)."""
    if config.gpus > 1:
        command = [
            "torchrun",
            "--standalone",
            f"--nproc_per_node={config.gpus}",
            "-m",
            "trainer.train",
            str(spec_path),
        ]
    else:
        command = ["python", "-I", "-m", "trainer.train", str(spec_path)]
    limits: dict[str, str] = {"memory": config.memory}
    if config.gpus:
        limits["nvidia.com/gpu"] = str(config.gpus)
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
        "app.kubernetes.io/component": "trainer",
        "alignd/run-id": run_id,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": job_name(run_id), "namespace": config.namespace, "labels": labels},
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
        """The Job's end: succeeded, failed, interrupted (``stop``) or timed out."""
        manifest = build_job(run_id, spec_path, self.config, timeout_s=timeout_s)
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
