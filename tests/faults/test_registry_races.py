"""The registry and the daemon under concurrency and crashes, with real processes: operators'
promote and rollback racing each other across processes and threads, a crash between
recording an activation and serving it, and two daemons started on one data directory (or,
with PostgreSQL, on one store)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import yaml
from services import stop_process as stop
from services import wait_until

from daemon.registry import Registry, current_pointer_hook
from demo.broker import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "daemon"))
from registry_support import make_adapter

PASSED = {"gate": {"promote": True, "reasons": []}}

# One operator process: two threads (an API call and the automatic promotion, say) acting at
# once on a shared registry, each change served by the `current` pointer and a slow "model
# server" (a file written after 30 ms, as a vLLM load takes time).
OPERATOR = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from daemon.registry import Registry, RegistryError, current_pointer_hook

    root, go, ops = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]

    def model_server(version, path, previous):
        time.sleep(0.03)
        (root / "served.txt").write_text(version)

    registry = Registry(root, [current_pointer_hook(root), model_server])

    def act(op):
        try:
            if op == "rollback":
                registry.rollback(actor="op", reason="race")
            else:
                registry.promote(op, actor="op", reason="race", force=True)
        except RegistryError:
            pass  # a refusal is a fine answer to a race; an inconsistent registry is not

    while not go.exists():
        time.sleep(0.001)
    threads = [threading.Thread(target=act, args=(op,)) for op in ops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
""")


def consistent(root: Path) -> tuple[bool, str]:
    registry = Registry(root)
    active, history = registry.active(), registry.history()
    current = os.readlink(root / "current").rsplit("/", 1)[-1]
    served = (root / "served.txt").read_text()
    last_activation = [
        e["version"] for e in registry.audit() if e["action"] in {"promote", "rollback"}
    ][-1]
    checks = {
        "current": current == active,
        "served": served == active,
        "serving_done": registry.serving_state() == "done",
        "history_ends_active": bool(history) and history[-1] == active,
        "history_unique": len(set(history)) == len(history),
        "audit_last": last_activation == active,
    }
    bad = [name for name, ok in checks.items() if not ok]
    return not bad, f"active={active} current={current} served={served} {history} bad={bad}"


def test_concurrent_promote_and_rollback_leave_one_consistent_state(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    trials, good, failures = 20, 0, []
    adapters = [make_adapter(tmp_path / f"src{i}", seed=i) for i in range(4)]
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    for trial in range(trials):
        root = tmp_path / f"reg{trial}"
        registry = Registry(root, [current_pointer_hook(root)])
        versions = [registry.register(a, PASSED) for a in adapters]
        for v in versions[:3]:
            registry.promote(v, actor="setup", reason="history")
        (root / "served.txt").write_text(versions[2])
        go = tmp_path / f"go{trial}"
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), str(root), str(go), *ops],
                stderr=subprocess.PIPE,
            )
            for ops in (["v0004", "rollback"], ["rollback", "v0002"])
        ]
        time.sleep(1.0)  # both imported and waiting
        go.touch()
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()[-2000:]
        ok, detail = consistent(root)
        good += ok
        if not ok:
            failures.append(detail)
    fault_figures(
        "promote/rollback racing (2 procs × 2 threads)",
        trials=trials,
        consistent=good,
    )
    assert good == trials, failures


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from daemon.registry import Registry, current_pointer_hook

    root = Path(sys.argv[1])

    def vllm_load(version, path, previous):
        os.kill(os.getpid(), signal.SIGKILL)  # the pod dies before serving anything

    Registry(root, [vllm_load, current_pointer_hook(root)]).promote(
        sys.argv[2], actor="op", reason="crash test"
    )
""")


def serve_config(tmp_path: Path, data_dir: Path, port: int, store_url: str) -> Path:
    path = tmp_path / f"alignd-{port}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": "127.0.0.1:9", "retry_backoff_max_s": 2},
                "store": {"url": store_url},
                "paths": {"data_dir": str(data_dir)},
                "schedule": {
                    "cron": None,
                    "min_new_pairs": None,
                    "min_new_ratings": None,
                    "drift_probe_cron": None,
                    "tick_s": 1,
                },
                "admin": {"port": port, "drain_s": 3},
            }
        )
    )
    return path


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_crash_between_activation_and_serving_is_repaired_at_restart(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    data = tmp_path / "data"
    root = data / "registry"
    registry = Registry(root, [current_pointer_hook(root)])
    v1, v2 = (registry.register(make_adapter(tmp_path / f"a{i}", seed=i), PASSED) for i in (0, 1))
    registry.promote(v1, actor="op", reason="first")
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    crashed = subprocess.run([sys.executable, str(script), str(root), v2], timeout=60)
    assert crashed.returncode == -9  # really killed mid-activation
    assert Registry(root).active() == v2 and Registry(root).serving_state() == "pending"
    assert os.readlink(root / "current") == f"adapters/{v1}"  # serving disagrees

    port = free_port()
    config = serve_config(tmp_path, data, port, f"sqlite:///{tmp_path / 'f.db'}")
    daemon = start_daemon(config, tmp_path / "daemon.log")
    try:
        assert wait_until(lambda: healthy(port), 60), (tmp_path / "daemon.log").read_text()
        assert wait_until(lambda: Registry(root).serving_state() == "done", 30)
        repaired = os.readlink(root / "current") == f"adapters/{v2}"
        fault_figures(
            "crash between activation and serving hooks",
            active=Registry(root).active() or "-",
            serving_after_restart=os.readlink(root / "current").rsplit("/", 1)[-1],
            repaired="yes" if repaired else "no",
        )
        assert repaired
        audit = [e["action"] for e in Registry(root).audit()]
        assert audit[-1] == "serving_replayed"
    finally:
        stop(daemon)


def two_daemons(tmp_path: Path, first_dir: Path, second_dir: Path, store_url: str) -> str:
    """Start A, then B; B must refuse at once and leave A's in-progress work alone."""
    port_a, port_b = free_port(), free_port()
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_daemon(serve_config(tmp_path, first_dir, port_a, store_url), log_a)
    b = None
    try:
        assert wait_until(lambda: healthy(port_a), 60), log_a.read_text()
        # A registering a version right now: a starting daemon would clean this up as a leftover
        inflight = second_dir / "registry" / "adapters" / ".staging-inflight"
        inflight.mkdir(parents=True, exist_ok=True)
        b = start_daemon(serve_config(tmp_path, second_dir, port_b, store_url), log_b)
        b.wait(60)
        assert b.returncode == 3, log_b.read_text()
        assert "another alignd" in log_b.read_text()
        assert a.poll() is None and healthy(port_a)  # the first one is untouched
        assert inflight.is_dir()
        return log_b.read_text()
    finally:
        for proc in (b, a):
            if proc is not None:
                stop(proc)


def test_a_second_daemon_on_the_same_data_directory_refuses_to_start(
    child_processes: None, tmp_path: Path, fault_figures
) -> None:
    data = tmp_path / "data"
    log = two_daemons(tmp_path, data, data, f"sqlite:///{tmp_path / 'f.db'}")
    fault_figures(
        "two daemons started on one data directory",
        started=2,
        running=1,
        refused=1,
        holder_named="yes" if "pid" in log else "no",
    )


def test_two_daemons_on_one_postgresql_store_refuse_even_with_separate_directories(
    child_processes: None, tmp_path: Path, postgres_url: str
) -> None:
    log = two_daemons(tmp_path, tmp_path / "node-a", tmp_path / "node-b", postgres_url)
    assert "advisory lock" in log
