"""Serving hooks called after the active adapter changes.

``vllm_hook`` hot-loads the new version into running vLLM servers through their runtime LoRA
API (``POST /v1/load_lora_adapter``, then ``/v1/unload_lora_adapter`` for the old one; vLLM
must run with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). The adapter path must be visible to
the server (a shared volume). A failure raises; the registry records it and stays valid.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from daemon.registry import ServingHook


def vllm_hook(endpoints: list[str], prefix: str = "alignd", timeout_s: float = 60.0) -> ServingHook:
    def load_into_vllm(version: str, path: Path, previous: str | None) -> None:
        errors = []
        for endpoint in endpoints:
            base = endpoint.rstrip("/")
            try:
                response = httpx.post(
                    f"{base}/v1/load_lora_adapter",
                    timeout=timeout_s,
                    json={"lora_name": f"{prefix}-{version}", "lora_path": str(path)},
                )
                response.raise_for_status()
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
