"""The drift probe: the gate's drift measure, on the adapter being served.

KL(reference ‖ active adapter), exact over the vocabulary, summed per reply, on the reference's
own replies to the retain set: prompts unrelated to the feedback, where no change is intended
(``trainer.retain``; the gate's ``drift``, budgeted by ``gate.drift_budget``). Not on production
replies: those are where the feedback asks for change, and they would carry customer text into
the probe. The reference's retain replies are generated once per base and cached under
``<data_dir>/cache``, shared with the trainer's evaluation.

Computed where training runs, never in the daemon: a child process bounded in memory and time
(``schedule.drift_probe_*``), or a Kubernetes Job with the trainer's image and limits
(``training.runner: kubernetes``; sharded over the training GPUs with ``run_spec.engine:
fsdp``); stopped when the daemon drains. The result feeds ``alignd_drift_retain_nats`` and
``<data_dir>/drift.jsonl`` (the console's plot). A probe that does not finish is counted in
``alignd_drift_probe_failures_total`` by reason and changes nothing else.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, ValidationError

from daemon.config import AligndConfig
from daemon.metrics import Metrics
from daemon.records import first_error
from daemon.registry import Registry
from daemon.runners import RunExit, Runner
from trainer.probespec import ProbeResult, ProbeSpec

log = logging.getLogger("alignd.drift")

# how a probe that did not finish is counted (alignd_drift_probe_failures_total{reason})
_REASONS = {RunExit.INTERRUPTED: "stopped", RunExit.TIMED_OUT: "timed_out"}


class DriftPoint(BaseModel):
    """One probe of the served adapter, a line of ``<data_dir>/drift.jsonl``."""

    model_config = ConfigDict(extra="ignore")

    kl: float
    at: str | None = None
    version: str | None = None


class DriftProbe:
    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        stopping: threading.Event,
    ) -> None:
        self.registry, self.metrics, self.stopping = registry, metrics, stopping

    def run(self, config: AligndConfig, runner: Runner) -> float | None:
        """Probe the active adapter now, where training runs (``runner``: a child process or a
        Job); None when there is none, no retain set is configured, or it did not finish."""
        active = self.registry.active()
        if active is None:
            return None
        training = config.training
        planned = training.spec()  # the run spec a refresh would use, typed
        if planned.eval.retain_set is None:
            return None  # no retain set configured: nothing to measure drift on
        spec = ProbeSpec(
            base_model=training.base_model,
            adapter=self.registry.version_dir(active),
            dtype=planned.dtype,
            quantize=planned.lora.quantize,
            engine=planned.engine,
            retain_set=planned.eval.retain_set,
            max_new_tokens=planned.eval.retain_max_new_tokens,
            cache_dir=config.paths.data_dir / "cache",
        )
        result = self._probe(config, runner, spec)
        if result is None:
            return None
        kl = result.nats_per_reply
        self.metrics.drift_kl.set(kl)
        self.metrics.drift_probe_timestamp.set(time.time())
        with (config.paths.data_dir / "drift.jsonl").open("a") as f:  # the console's plot
            entry = DriftPoint(at=datetime.now(UTC).isoformat(), version=active, kl=kl)
            f.write(entry.model_dump_json() + "\n")
        log.info("drift probe: active %s, %.3f nats per retain reply", active, kl)
        return kl

    def _probe(self, config: AligndConfig, runner: Runner, spec: ProbeSpec) -> ProbeResult | None:
        """Its spec and result under ``paths.data_dir`` (a Job mounts it), removed afterwards."""
        probe_id = f"p{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        work = config.paths.data_dir / "probes" / probe_id
        work.mkdir(parents=True)
        try:
            spec_path, out_path = work / "probe.json", work / "out.json"
            spec_path.write_text(spec.model_dump_json())
            end = runner.probe(
                probe_id,
                spec_path,
                out_path,
                self.stopping,
                config.schedule.drift_probe_timeout_s,
                sharded=spec.engine == "fsdp",
                memory_limit_mb=config.schedule.drift_probe_memory_limit_mb,
            )
            why = end.detail if end.exit is not RunExit.SUCCEEDED else "it wrote no result"
            if end.exit is RunExit.SUCCEEDED and out_path.is_file():
                try:
                    return ProbeResult.model_validate_json(out_path.read_text())
                except ValidationError as e:
                    why = f"its result does not parse: {first_error(e)}"
            log.warning("drift probe did not finish: %s", why)
            self.metrics.drift_probe_failures.labels(reason=_REASONS.get(end.exit, "failed")).inc()
            return None
        finally:
            shutil.rmtree(work, ignore_errors=True)
