"""The ``alignd`` command line.

Past 400 lines on purpose: every command's arguments are declared here, one parser, so
``alignd --help`` and this file say the same thing; the commands' work lives elsewhere
(``daemon.client`` for those that talk to the daemon).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from daemon.child import run_child
from daemon.client import cmd_client
from daemon.config import AligndConfig, ConfigError, load_config, with_split_salt
from trainer.methods import METHODS
from trainer.results import RunResult
from trainer.spec import (
    DEFAULT_BASE_MODEL,
    RunSpec,
    SpecError,
    apply_overrides,
    format_validation_error,
)


def build_train_spec(args: argparse.Namespace) -> dict[str, Any]:
    """A raw run spec from ``alignd train`` flags; ``--set a.b=v`` reaches any spec field."""
    raw: dict[str, Any] = {
        "data": str(Path(args.data).resolve()),
        "output_dir": str(Path(args.out).resolve()),
        "method": args.method,
        # a model directory is made absolute: the trainer child starts in a directory of its own
        "base_model": (
            str(Path(args.base_model).resolve())
            if Path(args.base_model).exists()
            else args.base_model
        ),
        "seed": args.seed,
        "device": args.device,
    }
    if args.eval_data:
        raw["eval_data"] = str(Path(args.eval_data).resolve())
    if args.init_adapter:
        raw["init_adapter"] = str(Path(args.init_adapter).resolve())
    hyper = {
        "beta": args.beta,
        "learning_rate": args.lr,
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
    }
    raw["hyper"] = {k: v for k, v in hyper.items() if v is not None}
    if args.lora_r is not None:
        raw["lora"] = {"r": args.lora_r}
    try:
        raw = apply_overrides(raw, args.set or [])
    except SpecError as e:
        raise SystemExit(str(e)) from e
    return raw


def _summarise(result: RunResult) -> str:
    lines = [f"status: {result.status}" + (f" ({result.error})" if result.error else "")]
    steps = result.steps
    if steps:
        first, last = steps[0], steps[-1]
        for key in ("loss", "reward_accuracy", "reward_margin", "logp_chosen", "kl_proxy"):
            before, after = getattr(first, key), getattr(last, key)
            if before is not None and after is not None:
                lines.append(f"  {key:<20} {before:>10.4f} -> {after:>10.4f}")
        rate = sum(s.tokens_per_s or 0.0 for s in steps) / len(steps)
        step_s = sum(s.step_s or 0.0 for s in steps) / len(steps)
        lines.append(f"  {len(steps)} steps, {step_s:.2f} s/step, {rate:.0f} tokens/s")
    fired = [name for name, finding in result.detectors.items() if finding["fired"]]
    lines.append(f"  detectors fired: {', '.join(fired) if fired else 'none'}")
    for name in ("candidate", "incumbent", "reference"):
        report = getattr(result.eval, name)
        if report is None:
            continue
        pref = report.preference
        values = {
            "reward_accuracy": pref.reward_accuracy if pref else None,
            "ranking_accuracy": pref.ranking_accuracy if pref else None,
            "kl_to_reference": report.kl_to_reference,
            "drift_nats_per_reply": report.retain_kl.nats_per_reply if report.retain_kl else None,
            "factuality": report.factuality,
        }
        bits = [f"{k}={v:.4f}" for k, v in values.items() if v is not None]
        if bits:
            lines.append(f"  eval {name:<10} " + " ".join(bits))
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from trainer.plan import PlanInput, describe, model_shape, plan

    try:
        setup = PlanInput(
            shape=model_shape(args.model),
            lora_r=args.lora_r,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
            batch=args.batch,
            seq_len=args.seq_len,
            dtype=args.dtype,
            quantize=args.quantize,
            engine=args.engine,
            gpus=args.gpus,
            gpu_memory_gib=args.gpu_memory,
            checkpointing=args.checkpointing,
            device="cpu" if args.cpu else "cuda",
        )
        result = plan(setup)
    except ValueError as e:
        print(f"alignd plan: {e}", file=sys.stderr)
        return 2
    print(describe(result))
    return 0 if result.fits else 1


def cmd_train(args: argparse.Namespace) -> int:
    raw = build_train_spec(args)
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as e:
        print(format_validation_error("training options", e), file=sys.stderr)
        return 2
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    spec_path = spec.output_dir / "run.json"
    spec_path.write_text(spec.model_dump_json(indent=1))
    # A child process, exactly as the daemon runs it: a crash or OOM stays in the child.
    code = run_child(["-m", "trainer.train", str(spec_path)])
    result_path = spec.output_dir / "result.json"
    if result_path.is_file():
        try:
            print(_summarise(RunResult.load(result_path)))
        except SpecError as e:
            print(e, file=sys.stderr)
            return code or 1
        print(f"adapter: {spec.output_dir / 'adapter'}   result: {result_path}")
    return code


def _config(args: argparse.Namespace) -> AligndConfig:
    try:
        return load_config(args.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from e


def cmd_ingest(args: argparse.Namespace) -> int:
    import signal
    import threading

    from feedback.consumer import FeedbackConsumer
    from feedback.store import FeedbackStore

    config = _config(args)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("kafka").setLevel(logging.ERROR)
    store = FeedbackStore(config.store.connect_url())
    consumer = FeedbackConsumer(config.kafka, store, config.limits)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())  # only flip state; the loop drains
    try:
        totals = consumer.run(stop, until_idle_s=args.until_idle)
    finally:
        consumer.close()
        store.close()
    print(
        json.dumps(
            {
                "consumed": totals.consumed,
                "stored": totals.stored,
                "duplicates": totals.duplicates,
                "conflicts": totals.conflicts,
                "dead_lettered": dict(totals.dead_lettered),
                "failures": totals.failures,
            }
        )
    )
    return 0


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from feedback.snapshot import build_snapshot
    from feedback.store import FeedbackStore

    config = _config(args)
    store = FeedbackStore(config.store.connect_url())
    try:
        manifest = build_snapshot(store, Path(args.out), with_split_salt(config).dataset)
    finally:
        store.close()
    print(
        manifest.model_dump_json(
            include={"sha256", "counts", "pair_sources", "filtered", "kto_balance"}, indent=1
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.logs import setup_logging
    from daemon.service import serve

    config = _config(args)
    setup_logging(json_lines=config.admin.json_logs)
    return serve(config)


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(_config(args).redacted(), indent=1, default=str))
    return 0


# One declaration per command, read top to bottom like a table: long, but splitting it would
# scatter the CLI's shape over several functions.
def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignd", description="Continuous alignment from production feedback."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a LoRA adapter on a preference dataset")
    train.add_argument(
        "--data", required=True, help="snapshot dir, or a .jsonl/.json/.parquet file or dir"
    )
    train.add_argument("--out", required=True, help="output dir: adapter/, run.json, result.json")
    train.add_argument(
        "--method",
        default="dpo",
        choices=list(METHODS),
        help="the loss (docs/reference.md: Methods)",
    )
    train.add_argument(
        "--base-model",
        default=DEFAULT_BASE_MODEL,
        help="'smollm2' (embedded), a .gguf file, or a Hugging Face model dir",
    )
    train.add_argument(
        "--eval-data", help="held-out pairs (default: the snapshot's held-out split)"
    )
    train.add_argument(
        "--init-adapter", help="warm start from this adapter (the reference stays the base)"
    )
    train.add_argument("--beta", type=float)
    train.add_argument("--lr", type=float)
    train.add_argument("--epochs", type=float)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--grad-accum", type=int)
    train.add_argument("--lora-r", type=int)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any run-spec field, e.g. --set hyper.warmup_ratio=0 --set eval.factuality_set=null",
    )
    train.set_defaults(func=cmd_train)

    config_help = "YAML config file (default: $ALIGND_CONFIG; env ALIGND_* overrides it)"
    ingest = sub.add_parser("ingest", help="consume feedback events from Kafka into the store")
    ingest.add_argument("--config", help=config_help)
    ingest.add_argument(
        "--until-idle",
        type=float,
        metavar="SECONDS",
        help="stop once the topic has been drained for this long (backfills)",
    )
    ingest.set_defaults(func=cmd_ingest)

    dataset = sub.add_parser("dataset", help="build training snapshots from stored feedback")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    build = dataset_sub.add_parser("build", help="write a snapshot (parquet + manifest.json)")
    build.add_argument("--config", help=config_help)
    build.add_argument(
        "--out", required=True, help="snapshot directory to write (replaced atomically)"
    )
    build.set_defaults(func=cmd_dataset_build)

    serve_cmd = sub.add_parser(
        "serve", help="run the daemon: ingest, refresh, gate, serve the admin API"
    )
    serve_cmd.add_argument("--config", help=config_help)
    serve_cmd.set_defaults(func=cmd_serve)

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--url",
        default=os.environ.get("ALIGND_URL", "http://127.0.0.1:8080"),
        help="admin API of the running daemon (env ALIGND_URL)",
    )
    client.add_argument(
        "--token",
        help="bearer token (env ALIGND_ADMIN__TOKEN; for reads ALIGND_ADMIN__READ_TOKEN will do)",
    )
    client.add_argument("--token-file", help="file holding the token")
    client.add_argument("--json", action="store_true", help="machine-readable output")
    status = sub.add_parser("status", parents=[client], help="what the daemon is doing")
    status.set_defaults(func=cmd_client, action="status")
    refresh = sub.add_parser("refresh", parents=[client], help="ask for a refresh now")
    refresh.add_argument(
        "--full", action="store_true", help="retrain on the whole snapshot, not incrementally"
    )
    refresh.set_defaults(func=cmd_client, action="refresh")
    runs = sub.add_parser("runs", help="refresh runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    run_show = runs_sub.add_parser("show", parents=[client], help="one run's status")
    run_show.add_argument("run_id")
    run_show.set_defaults(func=cmd_client, action="run")
    adapters = sub.add_parser("adapters", help="the adapter registry")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    adapters_sub.add_parser("list", parents=[client], help="every version").set_defaults(
        func=cmd_client, action="list"
    )
    show_cmd = adapters_sub.add_parser(
        "show", parents=[client], help="a version and its gate checks"
    )
    show_cmd.add_argument("version")
    show_cmd.set_defaults(func=cmd_client, action="show")
    promote = adapters_sub.add_parser("promote", parents=[client], help="make a version active")
    promote.add_argument("version")
    promote.add_argument("--reason", default="operator promotion")
    promote.add_argument("--force", action="store_true", help="even if the gate rejected it")
    promote.set_defaults(func=cmd_client, action="promote")
    rollback = adapters_sub.add_parser(
        "rollback", parents=[client], help="back to the previous active version"
    )
    rollback.add_argument("--to", help="a specific earlier active version")
    rollback.add_argument("--reason", default="operator rollback")
    rollback.add_argument(
        "--force", action="store_true", help="allow a version an operator rejected"
    )
    rollback.set_defaults(func=cmd_client, action="rollback")
    reject = adapters_sub.add_parser(
        "reject", parents=[client], help="mark a held candidate rejected"
    )
    reject.add_argument("version")
    reject.add_argument("--reason", default="operator rejection")
    reject.set_defaults(func=cmd_client, action="reject")

    canary = sub.add_parser("canary", help="the canary beside the stable adapter")
    canary_sub = canary.add_subparsers(dest="canary_command", required=True)
    show_canary = canary_sub.add_parser(
        "show", parents=[client], help="the canary, its last verdict, the routing document"
    )
    show_canary.set_defaults(func=cmd_client, action="canary")
    for name, what in (("start", "serve a version to a share of conversations"),
                       ("widen", "give the canary a larger share (default: the next step)"),
                       ("promote", "make the canary the stable adapter for all traffic"),
                       ("abort", "send all traffic back to the stable adapter")):  # fmt: skip
        command = canary_sub.add_parser(name, parents=[client], help=what)
        if name == "start":
            command.add_argument("version")
        if name in {"start", "widen"}:
            command.add_argument("--fraction", type=float, help="share of conversations, 0-1")
        if name in {"start", "promote"}:
            command.add_argument("--force", action="store_true", help="past the gate's tier")
        command.add_argument("--reason", default=f"operator canary {name}")
        command.set_defaults(func=cmd_client, action="canary", canary_action=name)

    plan_cmd = sub.add_parser(
        "plan",
        help="expected peak memory per GPU of a refresh, and the engine and GPU count to use",
    )
    plan_cmd.add_argument(
        "--model", default="smollm2", help="a preset (smollm2, 8b, 70b) or a model directory"
    )
    plan_cmd.add_argument("--lora-r", type=int, default=16)
    plan_cmd.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj", help="LoRA target modules"
    )
    plan_cmd.add_argument("--batch", type=int, default=4, help="pairs per micro-batch")
    plan_cmd.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    plan_cmd.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16")
    plan_cmd.add_argument("--quantize", choices=["nf4"], default=None)
    plan_cmd.add_argument("--engine", choices=["single", "ddp", "fsdp"], default="single")
    plan_cmd.add_argument("--gpus", type=int, default=1)
    plan_cmd.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    plan_cmd.add_argument("--checkpointing", action="store_true", help="activation checkpointing")
    plan_cmd.add_argument("--cpu", action="store_true", help="plan a CPU run (no CUDA context)")
    plan_cmd.set_defaults(func=cmd_plan)

    config = sub.add_parser("config", help="configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config (secrets redacted)")
    show.add_argument("--config", help=config_help)
    show.set_defaults(func=cmd_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
