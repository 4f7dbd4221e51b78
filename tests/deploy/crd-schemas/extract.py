"""Write the OpenAPI v3 schema of each version of a CustomResourceDefinition as JSON, without
its `description` texts (most of the bytes; validation does not read them).

    python tests/deploy/crd-schemas/extract.py CRD.yaml [CRD.yaml ...]

writes <group>_<kind>_<version>.json beside this script. SOURCES.md says which CRD files the
vendored schemas came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def strip_descriptions(node):
    if isinstance(node, dict):
        # `properties` maps field names to schemas: a field may be called "description"
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"} | (
            {"properties": {k: strip_descriptions(v) for k, v in node["properties"].items()}}
            if isinstance(node.get("properties"), dict) else {})
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def main(paths: list[str]) -> None:
    out = Path(__file__).parent
    for path in paths:
        for crd in yaml.safe_load_all(Path(path).read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = strip_descriptions(version["schema"]["openAPIV3Schema"])
                name = f"{spec['group']}_{spec['names']['kind']}_{version['name']}.json"
                (out / name).write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
                print(f"{name}: {(out / name).stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
