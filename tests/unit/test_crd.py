"""The CRD is generated from api.py, structural, and the checked-in copy is current."""

from pathlib import Path
from typing import Any

import yaml

from kubeforge.crd import crd, crd_yaml

CHECKED_IN = Path(__file__).resolve().parents[2] / "crds" / "services.kubeforge.dev.yaml"


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield path, key, value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_checked_in_crd_matches_the_models() -> None:
    assert CHECKED_IN.read_text() == crd_yaml(), "run `make crds` and commit crds/"


def test_every_generated_file_is_current() -> None:
    from kubeforge.generate import outputs

    root = CHECKED_IN.parents[1]
    stale = [rel for rel, text in outputs().items() if (root / rel).read_text() != text]
    assert not stale, f"run `make crds` and commit: {stale}"


def test_schema_is_structural() -> None:
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, key, value in _walk(schema):
        assert key not in ("$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"), path
        if key == "additionalProperties":
            assert value is not False, path
        if key == "properties" or key == "items":
            for sub in value.values() if key == "properties" else [value]:
                assert "type" in sub or sub.get("x-kubernetes-preserve-unknown-fields"), path


def test_names_subresources_and_columns() -> None:
    spec = crd()["spec"]
    assert spec["names"]["shortNames"] == ["fsvc"]
    assert spec["names"]["categories"] == ["kubeforge"]
    version = spec["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:6] == ["Desired", "Ready", "Healthy", "GPUs", "Req/s", "Sessions"]
    assert columns[-1] == "Age"


def test_only_visible_defaults_are_kept() -> None:
    props = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    assert props["replicas"]["default"] == 1
    assert props["healthPollRate"]["default"] == "200ms"
    assert "default" not in props["args"] and "default" not in props["image"]
    assert yaml.safe_load(CHECKED_IN.read_text())["kind"] == "CustomResourceDefinition"
