"""DESIGN.md's import edges: feedback imports nothing internal; trainer only feedback;
daemon never the training loop in-process."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
INTERNAL = {"daemon", "feedback", "trainer"}
ALLOWED = {"feedback": set(), "trainer": {"feedback"}, "daemon": {"feedback", "trainer"}}
# The daemon may use the trainer's contract and pure helpers, never its loop or model code.
DAEMON_FORBIDDEN_TRAINER_MODULES = {
    "trainer.train",
    "trainer.model",
    "trainer.logprobs",
    "trainer.packing",
    "trainer.evaluate",
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


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
