"""``python -m demo`` (what ``make demo`` runs): the loop in rounds on SmolLM2, simulated feedback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from demo.run import run_demo
from trainer.spec import DEFAULT_BASE_MODEL


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The whole loop on SmolLM2 with simulated support-desk feedback.",
    )
    parser.add_argument(
        "--workdir", default=".demo", help="replies cache, daemon data, report.html"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the loop (serve, feedback, refresh); with 2 or more a regression is "
        "injected after the last one. --rounds 1 is the short version",
    )
    parser.add_argument(
        "--prompts", type=int, default=300, help="round 1's simulated support conversations"
    )
    parser.add_argument(
        "--round-prompts", type=int, default=100, help="fresh conversations in each later round"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    parser.add_argument(
        "--agent",
        choices=["grounded", "inventing", "no_policy"],
        default="grounded",
        help="how agents edit: from the record (default), or sabotaged: stating specifics the "
        "record lacks, or leaving out the policy sentence (the gate should reject either)",
    )
    parser.add_argument(
        "--records",
        choices=["line", "fields"],
        default="line",
        help="how the lookup result reaches the assistant: the tool's rendered summary line "
        "(default), or shuffled 'field: value' lines with distractors (the hard mode)",
    )
    args = parser.parse_args(argv)
    return run_demo(
        Path(args.workdir),
        prompts=args.prompts,
        round_prompts=args.round_prompts,
        rounds=args.rounds,
        seed=args.seed,
        base_model=args.base_model,
        agent=args.agent,
        records=args.records,
    )


if __name__ == "__main__":
    sys.exit(main())
