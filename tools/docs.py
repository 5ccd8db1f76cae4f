"""Generated sections of docs/reference.md, so they never drift from the code.

    python -m tools.docs          rewrite the generated sections in docs/reference.md
    python -m tools.docs --check  exit 1 if docs/reference.md is out of date (a test runs this)

A section lives between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from daemon.config import AligndConfig
from trainer.methods import method_list
from trainer.spec import RunSpec

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "reference.md"


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value, default=str)}`"


def _rows(model: type[BaseModel], prefix: str, env: bool) -> Iterator[str]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _rows(annotation, f"{key}.", env)
            continue
        description = (field.description or "").replace("|", "\\|")
        env_name = f" `ALIGND_{key.upper().replace('.', '__')}`" if env else ""
        yield f"| `{key}`{env_name} | {_default(field)} | {description} |"


def config_table() -> str:
    header = "| key / environment variable | default | meaning |\n|---|---|---|"
    return header + "\n" + "\n".join(_rows(AligndConfig, "", env=True))


def run_spec_table() -> str:
    header = "| run-spec key | default | meaning |\n|---|---|---|"
    return header + "\n" + "\n".join(_rows(RunSpec, "", env=False))


def metrics_table() -> str:
    from prometheus_client import CollectorRegistry

    from daemon.metrics import Metrics

    registry = CollectorRegistry()
    metrics = Metrics(registry)
    rows = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for attribute in vars(metrics).values():
        describe = getattr(attribute, "describe", None)
        if describe is None:
            continue
        for family in describe():
            labels = ", ".join(getattr(attribute, "_labelnames", ())) or "-"
            name = family.name + ("_total" if family.type == "counter" else "")
            name += "_info" if family.type == "info" else ""
            rows.append(f"| `{name}` | {family.type} | {labels} | {family.documentation} |")
    return "\n".join(rows)


def methods_list() -> str:
    return (
        f"Methods for `--method` (`trainer/methods.py`): {method_list()}. "
        "`--set hyper.length_normalize=true` gives length-normalised DPO."
    )


SECTIONS: dict[str, Callable[[], str]] = {
    "methods": methods_list,
    "config": config_table,
    "run-spec": run_spec_table,
    "metrics": metrics_table,
}


def _replace(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN GENERATED: {name} -->\n", f"<!-- END GENERATED: {name} -->"
    if begin not in text or end not in text:
        raise ValueError(f"docs/reference.md has no generated section {name!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + body + "\n" + end + tail


def render(text: str) -> str:
    for name, make in SECTIONS.items():
        text = _replace(text, name, make())
    return text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    current = REFERENCE.read_text()
    wanted = render(current)
    if "--check" in args:
        if current != wanted:
            print("docs/reference.md is out of date: run `python -m tools.docs`", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
