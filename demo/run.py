"""``python -m demo`` (what ``make demo`` runs): the whole loop on a real SFT model, in rounds.

Start a local Kafka-protocol broker (unless ``ALIGND_KAFKA__BOOTSTRAP_SERVERS`` names one) and
``alignd serve`` (SQLite store, SmolLM2 as the reference). Then, per round: fresh customer
requests answered by the *active* adapter (the SFT model before the first promotion; its real
greedy replies, ``served_adapter`` set) → the simulated desk's feedback → ingestion → a refresh
(incremental once an adapter is active): snapshot, train, evaluate, gate against the
incumbent. The desk reviews every draft (``rollout.reviewed``), so a candidate the gate allows
goes to a canary on half of the next round's conversations first (routed by the daemon's
routing document), judged by the canary analysis against the stable adapter over the same
hours; the next refresh warm-starts from the canary and learns from agents' corrections of its
drafts. After the last round the demo injects a regression as a canary (an operator starts the
last candidate as one, forced if the gate allowed it nothing, and half of its drafts state
what the record does not hold) and waits for the analysis to judge it. It prints the before/after
table of the refresh whose adapter serves at the end (the last refresh if none was
promoted) and a table per round, and writes ``<workdir>/report.html``.
Nothing is downloaded; replies are cached in ``<workdir>/cache``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from daemon.child import start_child, stop_child
from daemon.routing import route
from demo import report
from demo.broker import EmbeddedBroker, free_port, produce_events
from demo.rounds import Production, Round, production, refresh, text_table
from demo.scenario import CARRIERS, POLICY_RULES, Case, Records, make_cases
from demo.simulate import Agent, Simulation, build_events, regressed, served_replies
from feedback.manifest import SnapshotManifest
from trainer.results import RunResult
from trainer.spec import deep_merge

# What each round does, in order (round 1 also starts the broker and the daemon first).
ROUND_STAGES = (
    "serve fresh requests + feedback",
    "ingest",
    "refresh: train",
    "refresh: evaluate + gate",
)
# The injected regression: this share of the canary's drafts state what the record does not hold.
INJECTED_INVENTED_SHARE = 0.5

# The recipe before issue #29 (bench/ablation.py's "today"), tuned on the field-line records.
LEGACY_RUN_SPEC: dict[str, Any] = {
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
        "kl_max_examples": 24,  # the requested-change KLs: reported, not gated
        "batch_size": 16,
        "grounding": {"entities": CARRIERS, "ignore": ["2FA"]},
        "policy_rules": POLICY_RULES,
    },
}
# The recipe (issue #29; bench/ablation.py's table in the README says why): five times the
# learning rate, which learns the required sentence and the record's facts in one round, and
# the retain anchor, which keeps everything else where the reference had it. At α 1 the anchor
# held drift to 0.2 nats per reply (budget 5) but also held back grounding (79%); α 0.25 keeps
# drift at 0.3 and grounds 96% of replies.
# Its retain batch is 2 replies a step (4 by default): 75 steps 379 → 337 s in
# `python -m demo --rounds 1`, and round 1 still promoted (unsupported 4%, grounded 94%, policy 100%).
DEMO_RUN_SPEC: dict[str, Any] = deep_merge(
    LEGACY_RUN_SPEC,
    {"hyper": {"learning_rate": 1e-3}, "anchor": {"weight": 0.25, "batch_size": 2}},
)


class Progress:
    def __init__(self, rounds: int) -> None:
        self.start = time.monotonic()
        self.rounds = rounds
        self.round = 0
        self.stage = ""

    def elapsed(self) -> str:
        seconds = int(time.monotonic() - self.start)
        return f"{seconds // 60:02d}:{seconds % 60:02d}"

    def begin(self, stage: str, detail: str = "") -> None:
        """A stage of the current round (``ROUND_STAGES``) or of the demo around the rounds."""
        self.stage = stage
        where = f"round {self.round}/{self.rounds}: " if self.round else ""
        then = ""
        if stage in ROUND_STAGES:
            rest = list(ROUND_STAGES[ROUND_STAGES.index(stage) + 1 :])
            rest += (
                [f"{self.rounds - self.round} more round(s)"] if self.round < self.rounds else []
            )
            then = f" (then: {', '.join(rest) or 'the injected regression, the report'})"
        print(f"\n[{where}{stage}] {self.elapsed()} elapsed — {detail}{then}", flush=True)

    def note(self, text: str) -> None:
        print(f"    {self.elapsed()}  {text}", flush=True)


def _config(
    workdir: Path,
    bootstrap: str,
    port: int,
    base_model: str,
    run_spec: dict[str, Any],
    overrides: dict[str, Any] | None = None,
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
        # The demo's days are minutes: judge every few seconds, on a round's worth of events.
        "watch": {"interval_s": 3, "min_events": 40, "window_hours": 720, "watch_hours": 720},
        # Harbor's agents read every draft before it is sent: a candidate that fails only what a
        # reviewer catches may serve a canary (never all traffic); every candidate serves one
        # first, on half of a round's conversations, judged against stable in the same hours.
        "rollout": {
            "canary": True,
            "reviewed": True,
            "steps": [0.5],
            "interval_s": 3,
            "min_events": 20,
            "min_actors": 3,
            "min_step_hours": 0,
        },
        "admin": {"port": port},
    }
    path = workdir / "alignd-demo.yaml"
    path.write_text(yaml.safe_dump(deep_merge(config, overrides or {}), sort_keys=False))
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

    def force_promote(self, version: str, reason: str) -> None:
        httpx.post(
            f"{self.url}/v1/adapters/{version}/promote",
            headers=self.auth,
            json={"force": True, "reason": reason},
            timeout=60,
        ).raise_for_status()

    def routing(self) -> dict[str, Any]:
        """The routing document a gateway reads; waits for the daemon to answer (first round)."""
        found: list[dict[str, Any]] = []

        def answered() -> bool:
            try:
                found.append(httpx.get(f"{self.url}/v1/routing", headers=self.auth,
                                       timeout=10).raise_for_status().json())  # fmt: skip
            except httpx.HTTPError:
                return False
            return True

        if not _wait(answered, 120):
            raise RuntimeError(f"alignd serve did not answer on {self.url}")
        return found[0]

    def start_canary(self, version: str, reason: str) -> None:
        body = {"action": "start", "version": version, "force": True, "reason": reason}
        httpx.post(f"{self.url}/v1/canary", headers=self.auth, json=body,
                   timeout=60).raise_for_status()  # fmt: skip

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
        if progress.stage == ROUND_STAGES[2] and (run_dir / "train" / "adapter").exists():
            progress.begin(
                ROUND_STAGES[3],
                "held-out preference accuracy, KL, factuality, greedy replies; then the gate",
            )
        if line != last:
            progress.note(line)
            last = line
        time.sleep(5)
    return run_id, run_dir


def _gate_lines(run: dict[str, Any]) -> None:
    outcome = run["outcome"]
    print(f"\ngate: {'PROMOTED' if outcome == 'promoted' else outcome.upper()} — {run['reason']}")
    for check in (run.get("gate") or {}).get("checks", []):
        print(f"  {'✔' if check['passed'] else '✘'} {check['name']:<20} {check['detail']}")


def _report(
    run: dict[str, Any],
    result: RunResult,
    last: dict[str, Any],
    workdir: Path,
    progress: Progress,
    rounds: list[Round],
    stable: bool,
) -> None:
    """The before/after table, gate, targets and examples of the refresh whose adapter is stable
    at the end (the last refresh if none is), the last refresh's gate if it is another; the
    table per round; ``report.html``."""
    rows = report.before_after(result)
    what = "the stable adapter now" if stable else "the last refresh (no adapter is stable)"
    print(f"\n{what} ({run['run_id']}, candidate {run.get('version')}):")
    print("\n" + report.text_table(rows))
    _gate_lines(run)
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
    if last is not run:
        print(f"\nthe last refresh ({last['run_id']}, candidate {last.get('version')}):", end="")
        _gate_lines(last)
    print("\nround by round (production numbers on each round's fresh requests):")
    print(text_table(rounds))
    wall = time.monotonic() - progress.start
    page = report.html_report(
        title="alignd demo: Harbor Support on SmolLM2-135M-Instruct",
        result=result,
        status=run,
        manifest=SnapshotManifest.load(Path(result.spec["data"])),
        wall_s=wall,
        rounds=rounds,
    )
    (workdir / "rounds.json").write_text(json.dumps([r.as_dict() for r in rounds], indent=1))
    (workdir / "report.html").write_text(page)
    print(f"\nreport: {workdir / 'report.html'}   demo wall time: {wall / 60:.1f} min")


@dataclass(frozen=True)
class Served:
    """One adapter's share of a batch of requests: what served, the requests, its replies and
    the desk's events on them."""

    version: str | None  # None: the SFT model
    cases: list[Case]
    replies: list[str]
    sim: Simulation

    def production(self) -> Production:
        return production(self.version, self.cases, self.replies, self.sim.messages)


def _serve(
    daemon: Daemon,
    workdir: Path,
    cases: list[Case],
    *,
    base_model: str,
    bootstrap: str,
    seed: int,
    agent: Agent,
    id_prefix: str,
    noise: bool,
    invented_share: float = 0.0,
) -> tuple[Served, Served | None]:
    """Production for one batch of requests, each conversation routed as a gateway would
    (``daemon.routing.route`` over the daemon's routing document): the stable adapter's and
    the canary's replies, the desk's feedback on each, produced to the broker in the same hours.
    ``invented_share`` (the injected regression, :func:`demo.simulate.regressed`) applies to
    the canary's drafts."""
    status = daemon.status()
    active, canary = status.get("active_adapter"), (status.get("canary") or {}).get("version")
    routing = daemon.routing()
    roles = [route(routing, f"{id_prefix}-conversation-{i}")[0] for i in range(len(cases))]
    registry = workdir / "data" / "registry"
    # what a model server loads: the registry's serving pointer, and the canary's version
    adapters = {"stable": (registry / "current").resolve() if active else None,
                "canary": registry / "adapters" / canary if canary else None}  # fmt: skip
    serving_from = datetime.now(UTC)  # after the activation: the watch counts feedback only
    picked: dict[str, tuple[list[Case], list[str]]] = {}  # on replies a version could serve
    for role in ("stable", "canary") if canary else ("stable",):
        mine = [c for c, r in zip(cases, roles, strict=True) if r == role]
        replies = served_replies(mine, base_model=base_model, cache_dir=workdir / "cache",
                                 adapter=adapters[role])  # fmt: skip
        if role == "canary" and invented_share:
            replies = regressed(mine, replies, invented_share, seed)
        picked[role] = mine, replies
    spacing = (datetime.now(UTC) - serving_from) / (len(cases) + 1)  # one request after another
    out: dict[str, Served] = {}
    for role, (mine, replies) in picked.items():
        version = active if role == "stable" else canary
        sim = build_events(
            mine, replies, seed=seed + (500 if role == "canary" else 0), agent=agent,
            served_adapter=version, id_prefix=id_prefix + ("-canary" if role == "canary" else ""),
            start=serving_from + spacing, spacing=spacing * len(cases) / max(len(mine), 1),
            noise=noise and role == "stable",
        )  # fmt: skip
        out[role] = Served(version, mine, replies, sim)
    produce_events(bootstrap, "alignd.feedback",
                   [m for served in out.values() for m in served.sim.messages])  # fmt: skip
    return out["stable"], out.get("canary")


def _canary_verdict(daemon: Daemon, workdir: Path, version: str, since: str) -> str:
    """What the canary analysis said of ``version`` on the round's evidence (served from
    ``since``): what it did (the audit log, actor alignd-canary; it may act while the round is
    still being stored), else its first verdict once everything is stored."""
    stored_at = datetime.now(UTC).isoformat()

    def judged() -> bool:
        canary = daemon.status().get("canary")
        if canary is None or canary["version"] != version:
            return True  # promoted, aborted or superseded
        return str((canary.get("last_verdict") or {}).get("at", "")) >= stored_at

    _wait(judged, 90)
    audit = workdir / "data" / "registry" / "audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    acted = [e for e in entries if e.get("actor") == "alignd-canary"
             and e.get("version") == version and e.get("at", "") >= since]  # fmt: skip
    if acted:
        return f"the canary analysis: {acted[0]['action']} {version}: {acted[0]['reason']}"
    verdict = (daemon.status().get("canary") or {}).get("last_verdict")
    if not verdict:
        return f"no canary verdict on {version} within 90 s"
    return f"the canary analysis on {version}: {verdict['reason']}"


def _ingested(daemon: Daemon, events: int, workdir: Path) -> None:
    if not _wait(lambda: daemon.status().get("store", {}).get("last_seq") == events, 180):
        status = daemon.status()
        raise RuntimeError(
            f"ingestion did not finish: {status.get('store', {}).get('last_seq')} of {events} "
            f"events stored, consumer {status.get('consumer')}; see {workdir / 'daemon.log'}"
        )


def _inject_regression(
    daemon: Daemon,
    workdir: Path,
    last: Round,
    cases: list[Case],
    stored: int,
    progress: Progress,
    **serve: Any,
) -> tuple[Round, int]:
    """The injected regression after the last round, as a canary, and what the canary analysis
    did with it."""
    candidate = last.refresh.candidate if last.refresh else None
    if candidate is None:
        raise RuntimeError("the last refresh registered no candidate to inject a regression with")
    events = []
    if (daemon.status().get("canary") or {}).get("version") != candidate:
        daemon.start_canary(candidate, "demo: an operator exposes the last candidate (injected)")
        forced = " past the gate's tier (forced)" if last.refresh and last.refresh.outcome not in {
            "promoted", "canary"} else ""  # fmt: skip
        events.append(f"an operator started {candidate} as a canary{forced}")
    progress.note(
        f"{candidate} is the canary and starts inventing: {INJECTED_INVENTED_SHARE:.0%} of its "
        "drafts state what the record does not hold"
    )
    since = datetime.now(UTC).isoformat()
    stable, canary = _serve(
        daemon, workdir, cases, invented_share=INJECTED_INVENTED_SHARE, noise=False, **serve
    )
    stored += stable.sim.valid_events + (canary.sim.valid_events if canary else 0)
    _ingested(daemon, stored, workdir)
    progress.note("stored the events on both adapters' replies; waiting for the canary analysis")
    events.append(f"injected regression on the canary {candidate}: "
                  + _canary_verdict(daemon, workdir, candidate, since))  # fmt: skip
    progress.note(events[-1])
    status = daemon.status()
    injected = Round(
        last.number, stable.production(), canary=canary.production() if canary else None
    )
    injected.active_after, injected.events = status.get("active_adapter"), events
    injected.canary_after = (status.get("canary") or {}).get("version")
    return injected, stored


def _production(
    daemon: Daemon,
    workdir: Path,
    number: int,
    cases: list[Case],
    stored: int,
    progress: Progress,
    **serve: Any,
) -> tuple[Round, int]:
    """A round's production: serve (stable and canary), ingest, and the canary analysis's word."""
    served_at = datetime.now(UTC).isoformat()
    stable, canary = _serve(daemon, workdir, cases, id_prefix="sim" if number == 1 else f"sim{number}",
                            noise=number == 1, **serve)  # fmt: skip
    for share in (stable, canary) if canary else (stable,):
        progress.note(f"{share.version or 'the SFT model'} served {len(share.cases)} requests; "
                      f"produced {share.sim.counts}")  # fmt: skip
    progress.begin(ROUND_STAGES[1], "alignd stores the round's events")
    stored += stable.sim.valid_events + (canary.sim.valid_events if canary else 0)
    _ingested(daemon, stored, workdir)
    dead = daemon.status()["consumer"]["dead_lettered"]
    progress.note(f"{stored} events stored in all, {dead} dead-lettered with reasons")
    current = Round(number, stable.production(), canary=canary.production() if canary else None)
    if canary is not None and canary.version is not None:
        current.events.append(_canary_verdict(daemon, workdir, canary.version, served_at))
        progress.note(current.events[-1])
    return current, stored


def run_demo(
    workdir: Path,
    *,
    prompts: int = 300,
    round_prompts: int = 100,
    rounds: int = 3,
    seed: int = 7,
    base_model: str = "smollm2",
    run_spec: dict[str, Any] | None = None,
    agent: Agent = "grounded",
    records: Records = "line",
    config_overrides: dict[str, Any] | None = None,
) -> int:
    """The rounds in order, then (with two rounds or more) the injected regression; 0 when
    every refresh reached a gate decision. ``config_overrides`` are merged into the daemon's
    config (the tests' tiny model needs other gate thresholds)."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    progress = Progress(rounds)
    workdir = workdir.resolve()
    # A fresh registry and store every run; the reference's caches stay (log-probs, greedy
    # replies, factuality: keyed by the base's content, so never stale), which saves a rerun
    # the reference's whole evaluation.
    for path in (workdir / "data").glob("*"):
        if path.is_dir() and path.name != "cache":
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    daemon: Daemon | None = None
    try:
        progress.begin("start", "a local Kafka-protocol broker (Tansu) and alignd serve")
        broker, bootstrap = _start_broker(workdir)
        port = free_port()
        spec = run_spec or DEMO_RUN_SPEC
        config = _config(workdir, bootstrap, port, base_model, spec, config_overrides)
        daemon = Daemon(config, port, secrets.token_urlsafe(24), workdir / "daemon.log")
        progress.note(f"broker at {bootstrap}; alignd serve on 127.0.0.1:{port}")
        serve: dict[str, Any] = {"base_model": base_model, "bootstrap": bootstrap, "agent": agent}
        history: list[Round] = []
        stored = 0
        run: dict[str, Any] = {}
        result: RunResult | None = None
        trained: dict[str, tuple[dict[str, Any], RunResult]] = {}  # each version's refresh
        for number in range(1, rounds + 1):
            progress.round = number
            n = prompts if number == 1 else round_prompts
            # round 1 keeps the one-round demo's seed (and so its cached replies)
            cases = make_cases(n, seed if number == 1 else seed + 1000 * number, records)
            progress.begin(
                ROUND_STAGES[0],
                f"{n} fresh support requests with lookup records, the stable adapter's (and a canary's) real "
                f"replies, {agent} agent edits, thumbs{', noise' if number == 1 else ''}",
            )
            current, stored = _production(daemon, workdir, number, cases, stored, progress,
                                          seed=seed + number - 1, **serve)  # fmt: skip
            progress.begin(ROUND_STAGES[2], "snapshot → train the LoRA adapter in a child process")
            run_id, run_dir = _train(daemon, workdir, progress)
            run = daemon.run(run_id)
            result_path = run_dir / "train" / "result.json"
            result = RunResult.load(result_path) if result_path.exists() else None
            current.refresh = refresh(run, result)
            if run.get("version") and result is not None:
                trained[run["version"]] = run, result
            status = daemon.status()
            current.active_after = status.get("active_adapter")
            current.canary_after = (status.get("canary") or {}).get("version")
            history.append(current)
            mode = (run.get("training_data") or {}).get("mode")
            progress.note(f"refresh {run['outcome']} ({mode}): {run['reason']}")
            if result is None:
                print(f"\nthe refresh ended as {run['outcome']}: {run['reason']} (see {run_dir})")
                return 1
        if rounds >= 2:
            progress.round = 0
            progress.begin(
                "injected regression",
                "the last candidate serves a canary (forced if the gate allowed it nothing) and "
                "its drafts start inventing; the canary analysis judges it against stable",
            )
            injected, stored = _inject_regression(
                daemon,
                workdir,
                history[-1],
                make_cases(round_prompts, seed + 1000 * (rounds + 1), records),
                stored,
                progress,
                seed=seed + rounds,
                id_prefix="sim-injected",
                **serve,
            )
            history.append(injected)
        progress.begin("report", "before/after of the serving adapter, the rounds, report.html")
        assert result is not None
        stable = daemon.status().get("active_adapter")
        shown_run, shown_result = trained.get(stable or "") or (run, result)
        _report(shown_run, shown_result, run, workdir, progress, history,
                stable=stable in trained)  # fmt: skip
        decided = {"promoted", "canary", "held", "rejected"}
        return 0 if all(r.refresh.outcome in decided for r in history if r.refresh) else 1
    finally:
        if daemon is not None:
            daemon.stop()
        if broker is not None:
            broker.stop()
