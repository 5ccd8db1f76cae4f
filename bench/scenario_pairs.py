"""Preference pairs for the training benchmarks, from the demo's support scenario.

- ``edit``: agent-edit pairs exactly as the demo produces them — the demo's support prompts
  (Harbor's system prompt + a customer message), SmolLM2's real greedy reply as *rejected*,
  the simulated agent's edit of it as *chosen*.
- ``trim``: edits that keep the draft's opening — the agent sends the draft's first two
  sentences and deletes the rest. The demo's agent rewrites instead (its drafts open with an
  apology it removes), so its pairs share only the prompt; these show the common response
  prefix being computed once.
- ``generic``: pairs with nothing in common after the prompt — the customer message alone
  (the template's default system prompt), one reply as chosen and another prompt's reply,
  starting with a different token, as rejected: the shape of a generic preference dataset.

SmolLM2's replies come from ``demo.simulate.served_replies`` and are cached in the same place
``make demo`` caches them (``.demo/cache``), so after the demo nothing is regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from demo.scenario import make_cases
from demo.simulate import agent_edit, sentences, served_replies

DEMO_PROMPTS, DEMO_SEED = 300, 7  # daemon.demo's defaults: the same cases, the same cache key


def demo_replies(cache_dir: Path) -> tuple[list[Any], list[str]]:
    cases = make_cases(DEMO_PROMPTS, DEMO_SEED)
    return cases, served_replies(cases, base_model="smollm2", cache_dir=cache_dir)


def edit_pairs(cases: list[Any], replies: list[str]) -> list[dict[str, Any]]:
    rows = []
    for case, reply in zip(cases, replies, strict=True):
        edited = agent_edit(case, reply)
        if edited.strip() != reply.strip():
            rows.append({"prompt": case.prompt, "chosen": edited, "rejected": reply})
    return rows


def trim_pairs(cases: list[Any], replies: list[str]) -> list[dict[str, Any]]:
    rows = []
    for case, reply in zip(cases, replies, strict=True):
        parts = sentences(reply)
        if len(parts) >= 3:
            rows.append({"prompt": case.prompt, "chosen": " ".join(parts[:2]), "rejected": reply})
    return rows


def generic_pairs(cases: list[Any], replies: list[str]) -> list[dict[str, Any]]:
    rows = []
    n = len(cases)
    for i, (case, reply) in enumerate(zip(cases, replies, strict=True)):
        first = reply.lstrip()[:1]
        later = (replies[(i + k) % n] for k in range(1, n))
        other = next((r for r in later if r.lstrip()[:1] != first), None)
        if other is not None and reply.strip():
            user_only = [m for m in case.prompt if m["role"] != "system"]
            rows.append({"prompt": user_only, "chosen": reply, "rejected": other})
    return rows


def write_pairs(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path
