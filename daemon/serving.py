"""Serving hooks called after the active adapter changes, and before a canary is recorded.

``vllm_hook`` hot-loads the new version into running vLLM servers through their runtime LoRA
API (``POST /v1/load_lora_adapter``, then ``/v1/unload_lora_adapter`` for the old one; vLLM
must run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). ``vllm_load_hook`` loads a canary
beside the stable adapter (nothing unloaded). A version already loaded (a canary promoted to
stable) counts as loaded. The adapter path must be visible to the server (a shared volume). A
failure raises; the registry records it and stays valid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx

from daemon.registry import ServingHook


def _load(base: str, name: str, path: Path, timeout_s: float) -> None:
    response = httpx.post(
        f"{base}/v1/load_lora_adapter",
        timeout=timeout_s,
        json={"lora_name": name, "lora_path": str(path)},
    )
    if response.status_code == 400 and "already been loaded" in response.text:
        return  # vLLM's answer for a name it serves already (a canary becoming stable)
    response.raise_for_status()


def vllm_load_hook(
    endpoints: list[str], prefix: str = "alignd", timeout_s: float = 60.0
) -> Callable[[str, Path], None]:
    """Load a canary version into every vLLM server, beside the stable adapter."""

    def load_canary_into_vllm(version: str, path: Path) -> None:
        errors = []
        for endpoint in endpoints:
            base = endpoint.rstrip("/")
            try:
                _load(base, f"{prefix}-{version}", path, timeout_s)
            except httpx.HTTPError as e:
                errors.append(f"{base}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    return load_canary_into_vllm


def vllm_hook(endpoints: list[str], prefix: str = "alignd", timeout_s: float = 60.0) -> ServingHook:
    def load_into_vllm(version: str, path: Path, previous: str | None) -> None:
        errors = []
        for endpoint in endpoints:
            base = endpoint.rstrip("/")
            try:
                _load(base, f"{prefix}-{version}", path, timeout_s)
                if previous and previous != version:
                    httpx.post(
                        f"{base}/v1/unload_lora_adapter",
                        timeout=timeout_s,
                        json={"lora_name": f"{prefix}-{previous}"},
                    ).raise_for_status()
            except httpx.HTTPError as e:
                errors.append(f"{base}: {e}")
        if errors:
            raise RuntimeError("; ".join(errors))

    return load_into_vllm
