"""Wrap deploy/prometheus/alignd-rules.yml into the PrometheusRule of the kustomize base.

    python deploy/render_rules.py      (make deploy-rules)

The plain rule file stays the source of truth; tests/deploy checks the two agree.
"""

from pathlib import Path

import yaml

HERE = Path(__file__).parent
HEADER = (
    "# GENERATED from deploy/prometheus/alignd-rules.yml (the source of truth); a test checks\n"
    "# they match. To regenerate: make deploy-rules\n"
)


def main() -> None:
    rules = yaml.safe_load((HERE / "prometheus" / "alignd-rules.yml").read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "alignd", "labels": {"prometheus": "k8s", "role": "alert-rules"}},
        "spec": rules,
    }
    out = HERE / "kubernetes" / "base" / "prometheusrule.yaml"
    out.write_text(HEADER + yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True))


if __name__ == "__main__":
    main()
