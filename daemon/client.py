"""The operator client: `alignd status`, `alignd adapters …`, `alignd refresh`, `alignd runs`.

Talks to a running daemon's admin API over HTTP; tables for people, ``--json`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


class ApiError(RuntimeError):
    pass


def _api(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    import httpx

    headers = {"x-alignd-actor": os.environ.get("USER", "operator")}
    # the admin token, else a read-only one (enough for status, list, show, runs)
    token = (
        args.token
        or os.environ.get("ALIGND_ADMIN__TOKEN")
        or os.environ.get("ALIGND_ADMIN__READ_TOKEN")
    )
    if not token and args.token_file:
        token = Path(args.token_file).read_text().strip()
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        response = httpx.request(
            method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as e:
        raise ApiError(f"cannot reach alignd at {args.url}: {e}") from e
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        raise ApiError(f"{method} {path}: HTTP {response.status_code}: {detail}")
    return response.json()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3f}"
        return "-" if value is None else str(value)

    widths = {
        c: max(len(c), *(len(cell(r.get(c))) for r in rows)) if rows else len(c) for c in columns
    }
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def _print(args: argparse.Namespace, data: Any, human: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else human)


def cmd_client(args: argparse.Namespace) -> int:
    try:
        return _client(args)
    except ApiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _client(args: argparse.Namespace) -> int:
    action = args.action
    if action == "status":
        data = _api(args, "GET", "/v1/status")
        last = data.get("last_run") or {}
        consumer = data["consumer"]
        ready = "ready" if consumer["ready"] else f"NOT READY: {consumer['error']}"
        human = "\n".join(
            [
                f"active adapter:   {data['active_adapter'] or 'none (serving the SFT base)'}",
                "canary:           "
                + (
                    f"{data['canary']['version']} on {data['canary']['fraction']:.0%}"
                    if data.get("canary")
                    else "none"
                ),
                f"refresh running:  {data['refresh_running']}",
                f"last run:         {last.get('run_id', '-')} {last.get('outcome', '')} "
                f"{last.get('reason', '')}",
                f"consumer:         {ready}, lag {consumer['lag']}, stored {consumer['stored']}, "
                f"dead-lettered {consumer['dead_lettered']}",
                f"store:            last seq {data['store']['last_seq']}, new since last "
                f"snapshot {data['store']['new_since_last_snapshot'] or '(not counted yet)'}"
                + (f", ERROR {data['store']['error']}" if data["store"].get("error") else ""),
            ]
        )
        _print(args, data, human)
    elif action == "list":
        rows = _api(args, "GET", "/v1/adapters")
        cols = [
            "version",
            "state",
            "method",
            "heldout_accuracy",
            "drift",
            "factuality",
            "parent",
            "created_at",
        ]
        _print(args, rows, _table(rows, cols))
    elif action == "show":
        data = _api(args, "GET", f"/v1/adapters/{args.version}")
        gate = data["manifest"].get("gate") or {}
        checks = [
            {
                "check": c["name"],
                "passed": c["passed"],
                "value": c["value"],
                "threshold": c["threshold"],
            }
            for c in gate.get("checks", [])
        ]
        human = f"{data['version']} ({data['state']})\n" + _table(
            checks, ["check", "passed", "value", "threshold"]
        )
        _print(args, data, human)
    elif action == "promote":
        data = _api(
            args,
            "POST",
            f"/v1/adapters/{args.version}/promote",
            {"reason": args.reason, "force": args.force},
        )
        _print(args, data, f"active: {data['active']}" + _hook_note(data))
    elif action == "rollback":
        data = _api(
            args,
            "POST",
            "/v1/rollback",
            {"to": args.to, "reason": args.reason, "force": args.force},
        )
        _print(args, data, f"rolled back; active: {data['active']}" + _hook_note(data))
    elif action == "reject":
        data = _api(args, "POST", f"/v1/adapters/{args.version}/reject", {"reason": args.reason})
        _print(args, data, f"rejected: {data['rejected']}")
    elif action == "refresh":
        data = _api(args, "POST", "/v1/refresh", {"full": bool(getattr(args, "full", False))})
        _print(args, data, data["message"])
    elif action == "canary":
        _canary(args)
    elif action == "run":
        data = _api(args, "GET", f"/v1/runs/{args.run_id}")
        _print(args, data, json.dumps(data, indent=1, default=str))
    return 0


def _canary(args: Any) -> None:
    """``alignd canary show|start|widen|promote|abort``."""
    change = getattr(args, "canary_action", None)
    if change is None:
        data = {"canary": _api(args, "GET", "/v1/canary"),
                "routing": _api(args, "GET", "/v1/routing")}  # fmt: skip
    else:
        body = {"action": change, "reason": args.reason, "version": getattr(args, "version", None),
                "fraction": getattr(args, "fraction", None),
                "force": bool(getattr(args, "force", False))}  # fmt: skip
        data = _api(args, "POST", "/v1/canary", body)
    canary = data["canary"]
    if canary is None:
        human = "no canary: the stable adapter answers every conversation"
    else:
        verdict = canary.get("last_verdict") or {}
        human = (f"canary {canary['version']} on {canary['fraction']:.0%} since "
                 f"{canary['changed_at']} (gate tier {canary['tier']})\n"
                 f"last verdict: {verdict.get('reason', 'none yet')}")  # fmt: skip
    stable = data["routing"]["stable"]
    human += f"\nstable: {stable['version'] or 'the SFT model'}"
    _print(args, data, human + _hook_note(data))


def _hook_note(data: dict[str, Any]) -> str:
    failures = data.get("serving_hook_failures") or []
    return "" if not failures else "\nWARNING: serving hooks failed: " + "; ".join(failures)
