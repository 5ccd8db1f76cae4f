"""schemathesis against the admin API's own OpenAPI spec: no request, authorised or not,
makes the API answer with a 5xx."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from daemon.config import AligndConfig
from daemon.service import Service

TOKEN = "fuzz-admin-token-0123456789"


def build_app(base: Path) -> object:
    config = AligndConfig(
        paths={"data_dir": base / "data"},
        store={"url": f"sqlite:///{base / 'f.db'}"},
        admin={"token": TOKEN},
    )
    return Service(config).app()


_BASE = Path(__import__("tempfile").mkdtemp(prefix="alignd-fuzz-"))
schema = schemathesis.openapi.from_asgi("/openapi.json", build_app(_BASE))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.parametrize("authorised", [True, False])
def test_no_5xx(case: schemathesis.Case, authorised: bool) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"} if authorised else {}
    response = case.call(headers=headers)
    documented_503 = (
        case.formatted_path == "/readyz"
    )  # "not ready" is the endpoint's answer, not a crash
    assert response.status_code < 500 or (documented_503 and response.status_code == 503), (
        case.method,
        case.formatted_path,
        response.status_code,
        response.text,
    )
