"""The console's guards, in process (the browser test drives the same pages in Chromium):
nothing without a session, read-only sessions change nothing, CSRF, stale pages, a reason to
override the gate, the token never echoed, customer text escaped."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from daemon_support import in_process_service
from fastapi.testclient import TestClient
from httpx import Response
from registry_support import make_adapter

from daemon.service import Service

TOKEN, READ = "console-admin-token-1234", "console-read-token-12345"


@pytest.fixture()
def service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Service:
    monkeypatch.setenv("ALIGND_ADMIN__TOKEN", TOKEN)
    monkeypatch.setenv("ALIGND_ADMIN__READ_TOKEN", READ)
    with in_process_service(tmp_path) as svc:
        hostile = "<script>alert(1)</script>"
        for seed, passed in enumerate([True, True, False]):
            gate = {"promote": passed, "reasons": [] if passed else [f"kl_budget {hostile}"],
                    "checks": [{"name": "kl_budget", "passed": passed, "detail": hostile}]}  # fmt: skip
            svc.registry.register(make_adapter(tmp_path / f"a{seed}", seed=seed), {"gate": gate})
        svc.registry.promote("v0001", actor="setup", reason="setup")
        yield svc


def sign_in(client: TestClient, token: str) -> Response:
    """The sign-in form as a browser submits it: its CSRF token from the page and cookie."""
    nonce = re.search(r'name="login_csrf" value="([^"]*)"', client.get("/ui").text)
    assert nonce is not None, "no sign-in CSRF token on the sign-in page"
    return client.post("/ui/login", data={"token": token, "actor": "ann",
                                          "login_csrf": nonce.group(1)}, follow_redirects=False)  # fmt: skip


def signed_in(service: Service, token: str) -> TestClient:
    client = TestClient(service.app())
    response = sign_in(client, token)
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert token not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    return client


def form_of(client: TestClient, path: str) -> dict[str, str]:
    text = client.get(path).text
    found = {name: re.search(rf'name="{name}" value="([^"]*)"', text)
             for name in ("csrf", "revision")}  # fmt: skip
    return {name: match.group(1) for name, match in found.items() if match}


def test_nothing_without_a_session(service: Service) -> None:
    client = TestClient(service.app())
    for path in ("/ui", "/ui/versions/v0002", "/ui/runs", "/ui/audit"):
        page = client.get(path)
        assert "Sign in" in page.text and "v0002" not in page.text
    refused = client.post("/ui/actions/promote", data={"version": "v0002"})
    assert refused.status_code == 401 and service.registry.active() == "v0001"
    wrong = sign_in(client, "nope")
    assert wrong.status_code == 403 and "alignd_console=" not in wrong.headers.get("set-cookie", "")


def test_read_only_sessions_change_nothing(service: Service) -> None:
    admin = signed_in(service, TOKEN)
    fields = form_of(admin, "/ui/versions/v0002")
    reader = signed_in(service, READ)
    assert "Promote" not in reader.get("/ui/versions/v0002").text
    own = form_of(reader, "/ui/versions/v0002")  # its own CSRF token (the sign-out form's)
    assert own["csrf"] != fields["csrf"]
    page = reader.post("/ui/actions/promote",
                       data={**fields, **own, "version": "v0002", "reason": "x"})  # fmt: skip
    assert page.status_code == 403 and service.registry.active() == "v0001"


def test_csrf_stale_pages_and_reasons(service: Service) -> None:
    client = signed_in(service, TOKEN)
    fields = form_of(client, "/ui/versions/v0003")
    forged = client.post("/ui/actions/promote", data={**fields, "csrf": "x", "version": "v0002"})
    assert forged.status_code == 403 and service.registry.active() == "v0001"
    no_reason = client.post("/ui/actions/promote",
                            data={**fields, "version": "v0003", "force": "1"})  # fmt: skip
    assert no_reason.status_code == 400 and service.registry.active() == "v0001"
    service.registry.reject("v0002", actor="someone", reason="meanwhile")
    stale = client.post("/ui/actions/promote",
                        data={**fields, "version": "v0003", "force": "1", "reason": "ok"})  # fmt: skip
    assert stale.status_code == 409 and "changed since you looked" in stale.text
    assert service.registry.active() == "v0001"
    fresh = form_of(client, "/ui/versions/v0003")
    done = client.post("/ui/actions/promote",
                       data={**fresh, "version": "v0003", "force": "1", "reason": "ok"})  # fmt: skip
    assert done.status_code == 200 and service.registry.active() == "v0003"
    entry = json.loads(html.unescape(re.search(r"<pre>(.*?)</pre>", done.text, re.S).group(1)))  # type: ignore[union-attr]
    assert (entry["action"], entry["actor"], entry["version"]) == ("promote", "ann", "v0003")


def test_text_is_escaped(service: Service) -> None:
    client = signed_in(service, TOKEN)
    page = client.get("/ui/versions/v0003").text
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "content-security-policy" in client.get("/ui").headers


def test_training_charts_draw_a_real_runs_step_metrics(
    service: Service, tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
) -> None:
    """The charts read what the trainer writes (they once read names it never wrote)."""
    from daemon.records import RunStatus
    from daemon.states import Outcome, RefreshTrigger
    from trainer.spec import RunSpec
    from trainer.train import run

    run_dir = service.refresher.runs_dir / "r-real"
    spec = RunSpec.model_validate({
        "data": str(pairs_file), "output_dir": str(run_dir / "train"),
        "base_model": str(tiny_model_dir), "method": "dpo",
        "hyper": {"max_steps": 3, "learning_rate": 1e-2, "batch_size": 4},
        "eval": {"factuality_set": None, "retain_set": None, "generate_max_prompts": 0},
    })  # fmt: skip
    assert run(spec).status == "succeeded"  # run() writes result.json as the child does
    status = RunStatus(run_id="r-real", trigger=RefreshTrigger.SCHEDULE, outcome=Outcome.HELD,
                       reason="passed the gate", started_at="2026-12-06T08:00:00+00:00")  # fmt: skip
    (run_dir / "status.json").write_text(status.model_dump_json())
    service.registry.register(make_adapter(tmp_path / "real", seed=9), {"run_id": "r-real"})
    page = signed_in(service, TOKEN).get("/ui/versions/v0004").text
    rewards = re.search(r'aria-label="rewards">(.*?)</svg>', page, re.S)
    assert rewards is not None, "no rewards chart on the version page"
    drawn = re.findall(r'<polyline [^>]*points="([^"]*)"', rewards.group(1))
    assert len(drawn) == 2 and all(points.count(",") == 3 for points in drawn), drawn
    assert "reward accuracy" in rewards.group(1) and "reward margin" in rewards.group(1)


def test_sign_in_and_out_need_their_forms(service: Service) -> None:
    """Issue #31, finding 6: no CSRF on the sign-in form; sign-out worked without a token."""
    forged = TestClient(service.app())  # a cross-site form: the right token, no form token
    login = forged.post("/ui/login", data={"token": TOKEN}, follow_redirects=False)
    assert login.status_code == 403 and "alignd_console=" not in login.headers.get("set-cookie", "")
    client = signed_in(service, TOKEN)
    out = client.post("/ui/logout", data={"csrf": "forged"}, follow_redirects=False)
    assert out.status_code == 403 and "Sign out" in client.get("/ui").text  # still signed in
    fields = form_of(client, "/ui")
    assert client.post("/ui/logout", data=fields, follow_redirects=False).status_code == 303
    assert "Sign in" in client.get("/ui").text


def test_failed_sign_ins_are_counted_and_rate_limited(service: Service) -> None:
    client = TestClient(service.app())
    codes = [sign_in(client, f"guess-{i}").status_code for i in range(12)]
    assert codes == [403] * 10 + [429] * 2
    assert sign_in(client, TOKEN).status_code == 429  # the right token waits out the window
    assert service.metrics.auth_failures.labels(surface="console")._value.get() == 10


def test_the_console_refuses_the_daemons_own_names(service: Service) -> None:
    """Issue #31, finding 8: the audit actor of a console session cannot be "alignd-watch"."""
    client = TestClient(service.app())
    nonce = re.search(r'name="login_csrf" value="([^"]*)"', client.get("/ui").text)
    assert nonce is not None
    page = client.post("/ui/login", data={"token": TOKEN, "actor": "alignd-watch",
                                          "login_csrf": nonce.group(1)}, follow_redirects=False)  # fmt: skip
    assert page.status_code == 400 and "alignd_console=" not in page.headers.get("set-cookie", "")


def test_the_canary_from_the_console_and_the_api(service: Service, tmp_path: Path) -> None:
    """A version the gate allows a reviewed canary: started from its page, shown on the
    overview with its share, widened by the API, aborted from the overview; each audited under
    the operator's name. A version the gate allows nothing offers no canary form."""
    gate = {"promote": False, "tier": "canary", "tier_reason": "only unsupported_claims failed",
            "reasons": ["unsupported_claims: 0.14 > 0.05"]}  # fmt: skip
    version = service.registry.register(make_adapter(tmp_path / "c", seed=9), {"gate": gate})
    client = signed_in(service, TOKEN)
    assert 'name="change" value="start"' not in client.get("/ui/versions/v0003").text
    fields = form_of(client, f"/ui/versions/{version}")
    started = client.post("/ui/actions/canary", data={**fields, "change": "start",
                          "version": version, "fraction": "0.1", "reason": "collect fixes"})  # fmt: skip
    assert started.status_code == 200, started.text
    overview = client.get("/ui").text
    assert f"/ui/versions/{version}" in overview and "10%" in overview and "Abort" in overview
    api = {"authorization": f"Bearer {TOKEN}", "x-alignd-actor": "bob"}
    widened = client.post("/v1/canary", json={"action": "widen"}, headers=api)
    assert widened.status_code == 200 and widened.json()["canary"]["fraction"] == 0.25
    assert client.get("/v1/routing", headers=api).json()["canary"]["adapter"] == f"alignd-{version}"
    refused = client.post("/v1/canary", json={"action": "promote"}, headers=api)
    assert refused.status_code == 409 and "needs every gate check" in refused.text
    fields = form_of(client, "/ui")
    aborted = client.post("/ui/actions/canary", data={**fields, "change": "abort",
                          "version": version, "reason": "enough"})  # fmt: skip
    assert aborted.status_code == 200 and service.registry.canary() is None
    assert "No canary" in client.get("/ui").text
    audit = [
        (e["action"], e["actor"]) for e in service.registry.audit() if e.get("version") == version
    ]
    assert audit[1:] == [("canary_start", "ann"), ("canary_widen", "bob"), ("canary_abort", "ann")]
