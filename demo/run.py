"""``python -m demo`` (what ``make demo`` runs): the whole loop on a real SFT model.

Stages: start a local Kafka-protocol broker (unless ``ALIGND_KAFKA__BOOTSTRAP_SERVERS`` names
one) → simulate a support desk around SmolLM2-135M-Instruct and produce its feedback →
start ``alignd serve`` (SQLite store, SmolLM2 as the reference) and let it ingest → trigger a
refresh: snapshot, train, evaluate, gate, promote → print the before/after table and write
``<workdir>/report.html``. Nothing is downloaded; replies are cached in ``<workdir>/cache``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from daemon.child import start_child, stop_child
from demo import report
from demo.broker import EmbeddedBroker, free_port, produce_events
from demo.scenario import CARRIERS, POLICY_RULES, make_cases
from demo.simulate import Agent, build_events, sft_replies
from feedback.manifest import SnapshotManifest
from trainer.spec import RunResult

STAGES = (
    "broker",
    "simulate feedback",
    "ingest",
    "refresh: train",
    "refresh: evaluate + gate",
    "report",
)

# The recipe, tuned on this scenario (see README "What the demo shows" for what moved it).
DEMO_RUN_SPEC: dict[str, Any] = {
    "method": "rpo",
    "hyper": {
        "beta": 0.1,
        "learning_rate": 2e-4,
        "epochs": 2,
        "batch_size": 4,
        "warmup_ratio": 0.1,
        "rpo_alpha": 1.0,
        "max_length": 256,
    },
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
    "eval": {
        "generate_max_prompts": 50,
        "max_new_tokens": 80,
        "kl_max_examples": 48,
        "batch_size": 16,
        "grounding": {"entities": CARRIERS, "ignore": ["2FA"]},
        "policy_rules": POLICY_RULES,
    },
}


class Progress:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.stage = 0

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def begin(self, index: int, detail: str = "") -> None:
        self.stage = index
        left = ", ".join(STAGES[index + 1 :]) or "nothing"
        print(
            f"\n[{index + 1}/{len(STAGES)} {STAGES[index]}] {self.elapsed()} elapsed — {detail} (then: {left})",
            flush=True,
        )

    def note(self, text: str) -> None:
        print(f"    {self.elapsed()}  {text}", flush=True)


def _config(
    workdir: Path, bootstrap: str, port: int, base_model: str, run_spec: dict[str, Any]
) -> Path:
    method = run_spec.get("method", "dpo")
    spec = {k: v for k, v in run_spec.items() if k != "method"}
    config = {
        "kafka": {
            "bootstrap_servers": bootstrap,
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
        },
        "store": {"url": f"sqlite:///{workdir / 'data' / 'feedback.db'}"},
        "paths": {"data_dir": str(workdir / "data")},
        # A fixed salt keeps the demo's held-out split (and its numbers) the same run to run;
        # an install without one gets a secret generated on first start.
        "dataset": {"heldout_fraction": 0.25, "split_salt": "alignd-demo"},
        "schedule": {
            "cron": None,
            "min_new_pairs": None,
            "min_new_ratings": None,
            "min_interval_s": 0,
            "tick_s": 2,
            "drift_probe_cron": None,
        },
        "training": {"base_model": base_model, "pair_method": method, "run_spec": spec},
        "admin": {"port": port},
    }
    path = workdir / "alignd-demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait(predicate: Any, timeout_s: float, interval_s: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return False


def _train_progress(log: Path) -> str:
    if not log.exists():
        return "starting the trainer"
    tail = log.read_bytes()[-600:].decode(errors="ignore").replace("\r", "\n").strip().splitlines()
    return tail[-1].strip()[:110] if tail else "starting the trainer"


class Daemon:
    """``alignd serve`` as a child process, and its admin API."""

    def __init__(self, config: Path, port: int, token: str, log: Path) -> None:
        with log.open("wb") as out:
            self.process = start_child(
                ["-m", "daemon.cli", "serve", "--config", str(config)],
                output=out,
                env=os.environ | {"ALIGND_ADMIN__TOKEN": token},
                isolated=False,  # the showcase runs from the checkout (demo/ is not installed)
            )
        self.url, self.auth = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {token}"}

    def status(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = httpx.get(
                f"{self.url}/v1/status", headers=self.auth, timeout=5
            ).json()
            return data
        except httpx.HTTPError:
            return {}

    def refresh(self) -> None:
        httpx.post(f"{self.url}/v1/refresh", headers=self.auth, timeout=10).raise_for_status()

    def run(self, run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(
            f"{self.url}/v1/runs/{run_id}", headers=self.auth, timeout=10
        ).json()
        return data

    def stop(self) -> None:
        stop_child(self.process, grace_s=60)


def _start_broker(workdir: Path) -> tuple[EmbeddedBroker | None, str]:
    bootstrap = os.environ.get("ALIGND_KAFKA__BOOTSTRAP_SERVERS")
    if bootstrap is not None:
        return None, bootstrap
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    broker.create_topics("alignd.feedback", partitions=2)
    broker.create_topics("alignd.feedback.dlq")
    return broker, broker.bootstrap


def _train(daemon: Daemon, workdir: Path, progress: Progress) -> tuple[str, Path]:
    """Ask for a refresh and follow it to its end; its run id and directory."""
    daemon.refresh()
    if not _wait(lambda: daemon.status().get("refresh_running"), 60):
        raise RuntimeError("the refresh did not start")
    run_id = daemon.status()["last_run_id"]
    run_dir = workdir / "data" / "runs" / run_id
    last = ""
    while daemon.status().get("refresh_running"):
        line = _train_progress(run_dir / "train.log")
        if progress.stage == 3 and (run_dir / "train" / "adapter").exists():
            progress.begin(
                4, "held-out preference accuracy, KL, factuality, greedy replies; then the gate"
            )
        if line != last:
            progress.note(line)
            last = line
        time.sleep(5)
    return run_id, run_dir


def _report(run: dict[str, Any], result: RunResult, workdir: Path, progress: Progress) -> None:
    """The before/after table, the gate, the targets and examples; ``report.html``."""
    rows = report.before_after(result)
    print("\n" + report.text_table(rows))
    outcome = run["outcome"]
    print(f"\ngate: {'PROMOTED' if outcome == 'promoted' else outcome.upper()} — {run['reason']}")
    for check in (run.get("gate") or {}).get("checks", []):
        print(f"  {'✔' if check['passed'] else '✘'} {check['name']:<20} {check['detail']}")
    print("\ntargets:")
    for name, ok, detail in report.targets(rows):
        print(f"  {'✔' if ok else '✘'} {name}: {detail}")
    print("\nexamples (held-out prompts; ⚠ = states what the lookup result does not hold):")
    for ex in report.examples(result, n=4):
        record = ex.record.replace("\n", "; ")
        print(f"  lookup:   {record[:220]}\n  customer: {ex.customer}")
        for label, reply, claims in (
            ("before", ex.before, ex.before_unsupported),
            ("after", ex.after, ex.after_unsupported),
        ):
            flag = f"  ⚠ unsupported: {', '.join(claims)}" if claims else ""
            print(f"    {label + ':':<7} {reply[:220]}{flag}")
    wall = time.monotonic() - progress.start
    page = report.html_report(
        title="alignd demo: Harbor Support on SmolLM2-135M-Instruct",
        result=result,
        status=run,
        manifest=SnapshotManifest.load(Path(result.spec["data"])),
        wall_s=wall,
    )
    (workdir / "report.html").write_text(page)
    print(f"\nreport: {workdir / 'report.html'}   demo wall time: {wall / 60:.1f} min")


def run_demo(
    workdir: Path,
    *,
    prompts: int = 300,
    seed: int = 7,
    base_model: str = "smollm2",
    run_spec: dict[str, Any] | None = None,
    agent: Agent = "grounded",
) -> int:
    """The six stages in order; 0 when the refresh reached a gate decision."""
    progress = Progress()
    workdir = workdir.resolve()
    shutil.rmtree(workdir / "data", ignore_errors=True)  # a fresh registry and store every run
    workdir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    daemon: Daemon | None = None
    try:
        progress.begin(0, "a local Kafka-protocol broker (Tansu) on a loopback port")
        broker, bootstrap = _start_broker(workdir)
        progress.note(f"broker at {bootstrap}")

        progress.begin(
            1,
            f"{prompts} support prompts with lookup records, {base_model}'s real replies, "
            f"{agent} agent edits, thumbs, noise",
        )
        cases = make_cases(prompts, seed)
        replies = sft_replies(cases, base_model=base_model, cache_dir=workdir / "cache")
        sim = build_events(cases, replies, seed=seed, agent=agent)
        produce_events(bootstrap, "alignd.feedback", sim.messages)
        progress.note(f"produced {len(sim.messages)} messages: {sim.counts}")

        progress.begin(2, "alignd serve with a SQLite store and the SFT model as reference")
        port = free_port()
        config = _config(workdir, bootstrap, port, base_model, run_spec or DEMO_RUN_SPEC)
        daemon = Daemon(config, port, secrets.token_urlsafe(24), workdir / "daemon.log")
        if not _wait(
            lambda: daemon.status().get("store", {}).get("last_seq") == sim.valid_events, 180
        ):
            raise RuntimeError(f"ingestion did not finish; see {workdir / 'daemon.log'}")
        dead = daemon.status()["consumer"]["dead_lettered"]
        progress.note(f"stored {sim.valid_events} events, {dead} dead-lettered with reasons")

        progress.begin(3, "snapshot → train the LoRA adapter in a child process")
        run_id, run_dir = _train(daemon, workdir, progress)
        run = daemon.run(run_id)

        progress.begin(5, "before/after table and HTML report")
        result_path = run_dir / "train" / "result.json"
        if not result_path.exists():
            print(f"\nthe refresh ended as {run['outcome']}: {run['reason']} (see {run_dir})")
            return 1
        _report(run, RunResult.load(result_path), workdir, progress)
        return 0 if run["outcome"] in {"promoted", "held", "rejected"} else 1
    finally:
        if daemon is not None:
            daemon.stop()
        if broker is not None:
            broker.stop()
