"""docs/ARCHITECTURE.md's rules, enforced: import edges between the product packages, the
showcase and tooling above the product, no import cycle, no torch in the daemon, only
documents that exist cited, and a wheel that holds the product alone."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = {"daemon", "feedback", "trainer"}
ABOVE_THE_PRODUCT = {"demo", "tools", "bench", "tests"}  # they import the product, never back
INTERNAL = PRODUCT | ABOVE_THE_PRODUCT
ALLOWED = {"feedback": set(), "trainer": {"feedback"}, "daemon": {"feedback", "trainer"}}
# The daemon may use the trainer's contract and pure helpers, never its loop or model code.
BUILD_IGNORED = (".git", ".venv", ".demo", "build", "*.egg-info", "__pycache__", ".*_cache")
DAEMON_FORBIDDEN_TRAINER_MODULES = {
    "trainer.train",
    "trainer.model",
    "trainer.logprobs",
    "trainer.packing",
    "trainer.evaluate",
    "trainer.generation",
    "trainer.objectives",
}


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever the import stands (functions and
    ``TYPE_CHECKING`` blocks included: a cycle through them is still a cycle to a reader)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from trainer import losses`` imports the module trainer.losses
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def product_modules() -> dict[str, Path]:
    modules = {}
    for package in sorted(PRODUCT):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_edges(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in INTERNAL and top != package:
                assert top in ALLOWED[package], f"{path.relative_to(ROOT)} imports {name}"
            if package == "daemon":
                assert name not in DAEMON_FORBIDDEN_TRAINER_MODULES, (
                    f"{path.relative_to(ROOT)} imports {name}"
                )


def test_no_import_cycle_among_product_modules() -> None:
    modules = product_modules()
    graph = {
        name: sorted(
            {i for i in imports_of(path) if i in modules and i != name and i != name + ".__init__"}
        )
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = [*stack[stack.index(name) :], name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, [*stack, name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_the_daemon_process_never_imports_torch_or_the_showcase(child_processes: None) -> None:
    # The daemon must stay small: models live in its child processes, never in its memory.
    code = (
        "import sys, daemon.cli, daemon.service, daemon.refresh;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'transformers', 'peft', 'matplotlib', 'demo', 'tools', 'bench'});"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_code_cites_only_documents_in_the_repository(child_processes: None) -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout.split()
    names = {Path(f).name for f in tracked} | set(tracked)
    cited = re.compile(r"\b(?:[\w./-]+/)?[A-Z][A-Za-z_]+\.md\b")
    missing = []
    for package in sorted(PRODUCT | ABOVE_THE_PRODUCT):
        for path in sorted((ROOT / package).rglob("*.py")):
            for doc in cited.findall(path.read_text()):
                if doc not in names and Path(doc).name not in names:
                    missing.append(f"{path.relative_to(ROOT)} cites {doc}")
    assert not missing, missing


def test_the_wheel_holds_the_product_alone(child_processes: None, tmp_path: Path) -> None:
    # pip's own build of the project, as a user's `pip install alignd` would get it, from a
    # copy of the checkout (showcase and tooling included) so no build/ lands in the checkout.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_IGNORED))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("alignd-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        metadata = archive.read(next(f for f in files if f.endswith(".dist-info/METADATA")))
    tops = {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")}
    assert tops == PRODUCT, tops
    assert not [f for f in files if "simulate" in f or "report" in f or f.endswith("docs.py")]
    # the console renders from package data: its style sheet and every template
    shipped = {Path(f).name for f in files if f.startswith("daemon/console/")}
    templates = {p.name for p in (ROOT / "daemon" / "console" / "templates").iterdir()}
    assert {"console.css", *templates} <= shipped, shipped
    requires = [line for line in metadata.decode().splitlines() if line.startswith("Requires-Dist")]
    plotting = [r for r in requires if "matplotlib" in r]
    assert plotting and all("extra ==" in r for r in plotting), plotting  # optional extra only


def test_the_production_image_copies_the_product_alone() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    copied = {line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")}
    copied.discard("--from=build")
    assert {c for c in copied if c in INTERNAL} == PRODUCT, copied
    assert "[demo]" not in dockerfile and "matplotlib" not in dockerfile
