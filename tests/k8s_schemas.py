"""Validation of Kubernetes manifests, shared by tests/test_k8s.py (serving/k8s/) and
tests/test_cluster_jobs.py (training/k8s/).

Built-in kinds validate against kubernetes-validate's strict schemas of the newest bundled Kubernetes
(unknown fields fail). Custom resources (KServe, Kubeflow) validate against JSON schemas of our own,
written from the projects' Go types: their Kubernetes parts are ``$ref``s into the same strict
definitions, and ``x-inline-k8s`` stands for a Go ``json:",inline"`` of a Kubernetes struct."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Tuple

import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

K8S_VERSION = kubernetes_validate.latest_version()
K8S_DEFS_URI = "https://kubernetes.io/api/_definitions.json"

__all__ = [
    "K8S_VERSION",
    "K8S_DEFS_URI",
    "k8s_definitions",
    "inline_k8s",
    "build_crd_validators",
    "crd_errors",
    "builtin_errors",
    "load_manifests",
]


def k8s_definitions() -> dict:
    """The strict definitions of every Kubernetes type, as kubernetes-validate bundles them."""
    return schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)


def inline_k8s(node, defs):
    """Expand ``x-inline-k8s`` (Go's ``json:",inline"`` of a Kubernetes struct): one $ref per property
    of the named definition, so the strict definitions validate each field and unknown ones fail."""
    if isinstance(node, dict):
        for name in node.pop("x-inline-k8s", []):
            props = node.setdefault("properties", {})
            for prop in defs["$defs"][name]["properties"]:
                props.setdefault(prop, {"$ref": f"{K8S_DEFS_URI}#/$defs/{name}/properties/{prop}"})
        for value in node.values():
            inline_k8s(value, defs)
    elif isinstance(node, list):
        for value in node:
            inline_k8s(value, defs)
    return node


def build_crd_validators(schemas: Mapping[Tuple[str, str], Path]) -> Dict[Tuple[str, str], jsonschema.Validator]:
    """{(apiVersion, kind): validator} for schema files whose Kubernetes $refs resolve against the
    bundled strict definitions."""
    defs = k8s_definitions()
    assert defs["$id"] == K8S_DEFS_URI
    registry = Resource.from_contents(defs) @ Registry()
    validators = {}
    for key, path in schemas.items():
        schema = inline_k8s(json.loads(Path(path).read_text()), defs)
        jsonschema.Draft202012Validator.check_schema(schema)
        validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return validators


def crd_errors(validators, doc) -> List[str]:
    """'path: message' for every error of a custom resource (empty when it is valid)."""
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def builtin_errors(doc) -> List[str]:
    """The first error of a built-in kind against the strict Kubernetes schema (empty when valid)."""
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def load_manifests(folder: Path) -> List[Tuple[Path, dict]]:
    """[(path, resource)] of every Kubernetes resource in the YAML files under ``folder`` (not
    kustomizations or Helm values)."""
    out = []
    for path in sorted(Path(folder).rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and doc.get("kind") != "Kustomization":
                out.append((path, doc))
    return out
