"""The admin API against a small in-memory backend: routes, status codes and the mapping of
registry error kinds to HTTP codes, without a daemon behind it. (The real service behind the
same API is tested in test_api.py, test_operator_cli.py and the end-to-end tests.)"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from daemon.api import make_app
from daemon.auth import Tokens
from daemon.operations import AdapterSummary, ConsumerStatus, ServiceStatus, StoreStatus
from daemon.records import AdapterDetail, RunStatus, VersionManifest
from daemon.registry import InvalidAdapter, RegistryConflict, VersionNotFound
from daemon.states import Outcome, RefreshTrigger

TOKEN = "in-memory-token"
AUTH = {"authorization": f"Bearer {TOKEN}", "x-alignd-actor": "carol"}


class InMemoryBackend:
    """Versions v0001..v0003, v0002 active after v0001; v0003 has a corrupted adapter."""

    def __init__(self) -> None:
        self.history = ["v0001", "v0002"]
        self.versions = {"v0001", "v0002", "v0003"}
        self.refreshing = False
        self.problems: list[str] = []
        self.calls: list[tuple[str, str]] = []

    def readiness_problems(self) -> list[str]:
        return self.problems

    def metrics_exposition(self) -> bytes:
        return b"# TYPE alignd_up gauge\nalignd_up 1\n"

    def status(self) -> ServiceStatus:
        return ServiceStatus(
            active_adapter=self.history[-1], refresh_running=self.refreshing, last_run_id=None,
            last_success_at=None, last_run=None, watch=None, uptime_s=1.0, pid=1,
            consumer=ConsumerStatus(ready=True, error=None, lag={"0": 3}, consumed=3, stored=3,
                                    dead_lettered=0),
            store=StoreStatus(last_seq=3, new_since_last_snapshot=None, error=None),
        )  # fmt: skip

    def adapters(self) -> list[AdapterSummary]:
        return [self._summary(v) for v in sorted(self.versions)]

    def _summary(self, version: str) -> AdapterSummary:
        return AdapterSummary(
            version=version, state="active" if version == self.history[-1] else "candidate",
            created_at="2026-12-06T08:00:00+00:00", method="dpo", parent=None, run_id=None,
            dataset_sha256=None, heldout_accuracy=0.9, kl_to_reference=None, drift=0.3,
            factuality=None, gate_passed=True,
        )  # fmt: skip

    def _known(self, version: str) -> None:
        if version not in self.versions:
            raise VersionNotFound(f"no such version: {version}")

    def adapter(self, version: str) -> AdapterDetail:
        self._known(version)
        state = "active" if version == self.history[-1] else "x"
        return AdapterDetail(version=version, state=state, manifest=VersionManifest())

    def run(self, run_id: str) -> RunStatus | None:
        if run_id != "r1":
            return None
        return RunStatus(
            run_id=run_id,
            trigger=RefreshTrigger.SCHEDULE,
            outcome=Outcome.PROMOTED,
            reason="v0002 passed the gate",
            started_at="2026-12-06T08:00:00+00:00",
        )

    def promote(self, version: str, *, actor: str, reason: str, force: bool) -> list[str]:
        self._known(version)
        if version == self.history[-1]:
            raise RegistryConflict(f"{version} is already active")
        if version == "v0003":
            raise InvalidAdapter("adapter_model.safetensors: truncated (no header)")
        self.history.append(version)
        self.calls.append(("promote", actor))
        return []

    def rollback(
        self, *, actor: str, reason: str, to: str | None, force: bool = False
    ) -> tuple[str, list[str]]:
        if len(self.history) < 2:
            raise RegistryConflict("nothing to roll back to: no earlier active version")
        self.history.pop()
        self.calls.append(("rollback", actor))
        return self.history[-1], ["vllm: connection refused"]

    def reject(self, version: str, *, actor: str, reason: str) -> None:
        self._known(version)
        self.calls.append(("reject", actor))

    def request_refresh(self, actor: str, *, full: bool = False) -> tuple[bool, str]:
        if self.refreshing:
            return False, "a refresh is already running"
        self.refreshing = True
        self.calls.append(("refresh-full" if full else "refresh", actor))
        return True, f"refresh requested by {actor}"


@pytest.fixture()
def backend() -> InMemoryBackend:
    return InMemoryBackend()


@pytest.fixture()
def client(backend: InMemoryBackend) -> TestClient:
    return TestClient(make_app(backend, tokens=Tokens(TOKEN, None), max_body_bytes=1024))


def test_registry_error_kinds_map_to_status_codes(client: TestClient) -> None:
    assert client.get("/v1/adapters/v0042", headers=AUTH).status_code == 404
    assert client.post("/v1/adapters/v0042/promote", headers=AUTH).status_code == 404
    assert client.post("/v1/adapters/v0042/reject", headers=AUTH).status_code == 404
    conflict = client.post("/v1/adapters/v0002/promote", headers=AUTH)
    assert conflict.status_code == 409 and "already active" in conflict.json()["detail"]
    invalid = client.post("/v1/adapters/v0003/promote", headers=AUTH)
    assert invalid.status_code == 409 and "truncated" in invalid.json()["detail"]


def test_operator_actions_reach_the_backend_with_the_actor(
    client: TestClient, backend: InMemoryBackend
) -> None:
    promoted = client.post("/v1/adapters/v0001/promote", headers=AUTH, json={"reason": "r"})
    assert promoted.status_code == 200 and promoted.json()["active"] == "v0001"
    rolled = client.post("/v1/rollback", headers=AUTH).json()
    assert rolled == {"active": "v0002", "serving_hook_failures": ["vllm: connection refused"]}
    assert client.post("/v1/rollback", headers=AUTH).status_code == 200
    assert client.post("/v1/rollback", headers=AUTH).status_code == 409  # nothing left
    assert backend.calls == [("promote", "carol"), ("rollback", "carol"), ("rollback", "carol")]


def test_refresh_is_accepted_once(client: TestClient, backend: InMemoryBackend) -> None:
    assert client.post("/v1/refresh", headers=AUTH).status_code == 202
    busy = client.post("/v1/refresh", headers=AUTH)
    assert busy.status_code == 409 and "already running" in busy.json()["detail"]
    backend.refreshing = False
    assert client.post("/v1/refresh", headers=AUTH, json={"full": True}).status_code == 202
    assert [call for call, _ in backend.calls] == ["refresh", "refresh-full"]
    assert client.post("/v1/refresh", headers=AUTH, json={"fulll": True}).status_code == 422


def test_reads_readiness_and_metrics(client: TestClient, backend: InMemoryBackend) -> None:
    assert client.get("/v1/runs/r1", headers=AUTH).json()["outcome"] == "promoted"
    assert client.get("/v1/runs/r2", headers=AUTH).status_code == 404
    listed = client.get("/v1/adapters", headers=AUTH).json()
    assert [a["version"] for a in listed] == ["v0001", "v0002", "v0003"]
    status = client.get("/v1/status", headers=AUTH).json()
    assert status["active_adapter"] == "v0002" and status["consumer"]["lag"] == {"0": 3}
    described = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"ServiceStatus", "AdapterSummary", "Activated", "RunStatus"} <= set(described)
    assert client.get("/readyz").status_code == 200
    backend.problems = ["consumer: not connected yet"]
    not_ready = client.get("/readyz")
    assert not_ready.status_code == 503 and not_ready.json()["problems"] == backend.problems
    assert "alignd_up 1" in client.get("/metrics").text


def test_without_a_token_every_mutation_is_refused(backend: InMemoryBackend) -> None:
    client = TestClient(make_app(backend, tokens=Tokens(None, None), max_body_bytes=1024))
    assert client.post("/v1/refresh", headers=AUTH).status_code == 403
    assert client.post("/v1/rollback").status_code == 401
    assert client.get("/v1/adapters", headers=AUTH).status_code == 403  # reads too
    assert backend.calls == [] and not backend.refreshing


def test_wrong_tokens_are_counted_logged_without_the_token_and_rate_limited(
    backend: InMemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #31, finding 7: 300 wrong tokens at ~1,000/s, then the right one worked."""
    now = [0.0]
    failures: list[str] = []
    tokens = Tokens(TOKEN, None, on_failure=failures.append, clock=lambda: now[0])
    client = TestClient(make_app(backend, tokens=tokens, max_body_bytes=1024))
    codes = [
        client.get("/v1/adapters", headers={"authorization": f"Bearer guess-{i:04d}"}).status_code
        for i in range(300)
    ]
    assert codes[:10] == [403] * 10 and set(codes[10:]) == {429}
    locked = client.get("/v1/adapters", headers=AUTH)  # the right token, from the same client
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) > 0
    assert failures == ["api"] * 10  # counted while they were checked
    assert "wrong token from testclient" in caplog.text and "guess-" not in caplog.text
    now[0] += 61  # the window has passed
    assert client.get("/v1/adapters", headers=AUTH).status_code == 200


def test_the_daemons_own_names_are_refused_to_operators(
    client: TestClient, backend: InMemoryBackend
) -> None:
    """Issue #31, finding 8: anyone with the admin token could write "alignd-watch"."""
    for name in ("alignd-watch", "alignd-gate", "ALIGND-startup"):
        forged = client.post("/v1/rollback", headers={**AUTH, "x-alignd-actor": name})
        assert forged.status_code == 400 and "daemon's own" in forged.json()["detail"]
    assert backend.calls == []
    kept = client.post("/v1/rollback", headers={**AUTH, "x-alignd-actor": "ann\nalignd-watch"})
    assert kept.status_code == 200 and backend.calls == [("rollback", "annalignd-watch")]


def test_an_operators_own_token_names_them_in_the_audit(backend: InMemoryBackend) -> None:
    """Issue #31, finding 8: the audit actor comes from the token used, not a free-text field."""
    own = "dana-own-admin-token-0123456789"
    client = TestClient(make_app(backend, tokens=Tokens(TOKEN, None, operators={"dana": own}),
                                 max_body_bytes=1024))  # fmt: skip
    for path, typed in (("/v1/adapters/v0001/promote", "alignd-watch"), ("/v1/rollback", "carol")):
        headers = {"authorization": f"Bearer {own}", "x-alignd-actor": typed}
        assert client.post(path, headers=headers).status_code == 200
    assert backend.calls == [("promote", "dana"), ("rollback", "dana")]
    assert client.get("/v1/adapters", headers={"authorization": f"Bearer {own}"}).status_code == 200
