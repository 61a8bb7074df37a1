"""`python -m kubeforge.generate` (make crds): every YAML derived from the Python sources.

The CRD comes from kubeforge/api.py, the operator's RBAC from kubeforge/operator/rbac.py, the
Grafana dashboard from kubeforge/dashboard.py; each lands where it ships (crds/, deploy/, the
Helm chart). A unit test fails when any is stale.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from kubeforge.crd import CRD_NAME, crd, crd_yaml
from kubeforge.dashboard import dashboard_json
from kubeforge.operator.rbac import chart_rules, deploy_manifest


def chart_crd() -> str:
    doc = copy.deepcopy(crd())
    doc["metadata"]["annotations"] = {"helm.sh/resource-policy": "keep"}
    body = yaml.safe_dump(doc, sort_keys=False, width=100)
    return (
        "# Generated from kubeforge/api.py by `make crds`. Do not edit.\n"
        "{{- if .Values.crds.create }}\n" + body + "{{- end }}\n"
    )


def outputs() -> dict[str, str]:
    return {
        f"crds/{CRD_NAME}.yaml": crd_yaml(),
        "charts/kubeforge/templates/crd.yaml": chart_crd(),
        "charts/kubeforge/files/operator-rules.yaml": chart_rules(),
        "deploy/operator-rbac.yaml": deploy_manifest(),
        "charts/kubeforge/files/dashboard.json": dashboard_json(),
    }


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path.cwd()
    for rel, text in outputs().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
