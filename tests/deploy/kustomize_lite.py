"""A small kustomize renderer: exactly the features deploy/ uses, and an error for anything else.

The deploy tests must run without the kustomize binary, so this renders an overlay the way `kustomize build`
does for the subset of kustomization fields the manifests use:

* ``resources``: YAML files (one or more documents) and directories holding a kustomization (rendered first);
* ``patches``: ``path`` to a strategic-merge patch (matched by apiVersion, kind and name, no ``target``), or
  ``path`` + ``target`` to a JSON 6902 patch (ops ``add``, ``replace``, ``remove``);
* ``namespace``: set on every (namespaced) resource;
* ``labels``: added to ``metadata.labels`` only (``includeSelectors`` and ``includeTemplates`` false);
* ``images``: ``newName`` / ``newTag`` / ``digest`` on every ``containers``/``initContainers`` image.

Transformers run in kustomize's order (patches, namespace, labels, images), each kustomization on the
output of the ones it includes. Any other field, option, patch directive (``$patch``…) or list whose
strategic-merge behaviour is not modelled raises ``Unsupported``, so the renderer can never silently
disagree with kustomize. When a real kustomize is available the tests also compare both renderings.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}

# Strategic-merge lists of objects: field name -> merge key, as in the Kubernetes API (patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}
# Lists that the Kubernetes API replaces wholesale in a strategic merge (no patchStrategy).
REPLACED_LISTS = {"args", "command"}
# Kinds this renderer knows to be cluster-scoped (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "IngressClass",
    "PriorityClass",
}
# Kinds whose references the namespace transformer would also rewrite: not modelled.
NAMESPACE_REFERENCES = {
    "RoleBinding",
    "ClusterRoleBinding",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "APIService",
}

Resource = dict[str, Any]


class Unsupported(Exception):
    """The kustomization uses something this renderer does not model (use real kustomize, or extend this)."""


def render(directory: Path | str) -> list[Resource]:
    """Render the kustomization in ``directory``, like ``kustomize build directory``."""
    directory = Path(directory)
    kustomization = _load_kustomization(directory)
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            resources.extend(render(path))
        elif path.is_file():
            resources.extend(_load_documents(path))
        else:
            raise FileNotFoundError(f"{directory}: resource {entry!r} does not exist")
    _check_unique(resources, directory)

    for patch in kustomization.get("patches", []):
        _apply_patch_entry(resources, patch, directory)
    if "namespace" in kustomization:
        _set_namespace(resources, kustomization["namespace"])
    for entry in kustomization.get("labels", []):
        _add_labels(resources, entry)
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    return resources


def load_yaml_file(path: Path) -> Any:
    """One YAML document (a patch file)."""
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _load_documents(path: Path) -> list[Resource]:
    with path.open(encoding="utf-8") as handle:
        documents = [doc for doc in yaml.safe_load_all(handle) if doc is not None]
    for doc in documents:
        if not isinstance(doc, dict) or not {"apiVersion", "kind", "metadata"} <= doc.keys():
            raise ValueError(f"{path}: every document must be a Kubernetes object")
        if doc["kind"] == "List":
            raise Unsupported(f"{path}: kind List")
    return documents


def _load_kustomization(directory: Path) -> dict[str, Any]:
    for name in KUSTOMIZATION_FILES:
        candidate = directory / name
        if candidate.is_file():
            data = load_yaml_file(candidate) or {}
            unknown = set(data) - SUPPORTED_FIELDS
            if unknown:
                raise Unsupported(f"{candidate}: fields {sorted(unknown)}")
            if data.get("kind", "Kustomization") != "Kustomization":
                raise Unsupported(f"{candidate}: kind {data['kind']}")
            return data
    raise FileNotFoundError(f"no kustomization in {directory}")


def resource_id(resource: Resource) -> tuple[str, str, str, str]:
    """(apiVersion, kind, namespace, name): what kustomize uses to tell resources apart."""
    meta = resource["metadata"]
    return (resource["apiVersion"], resource["kind"], meta.get("namespace", ""), meta["name"])


def _check_unique(resources: list[Resource], directory: Path) -> None:
    seen: set[tuple[str, str, str, str]] = set()
    for resource in resources:
        key = resource_id(resource)
        if key in seen:
            raise ValueError(f"{directory}: duplicate resource {key}")
        seen.add(key)


# ---- patches -------------------------------------------------------------------------------------


def _apply_patch_entry(resources: list[Resource], entry: dict[str, Any], directory: Path) -> None:
    unknown = set(entry) - {"path", "target"}
    if unknown or "path" not in entry:
        raise Unsupported(f"{directory}: patch entry {entry} (only path, with an optional target)")
    patch = load_yaml_file(directory / entry["path"])
    target = entry.get("target")
    if target is None:
        if not isinstance(patch, dict):
            raise Unsupported(f"{entry['path']}: a JSON 6902 patch needs a target")
        matches = [r for r in resources if _smp_matches(r, patch)]
        if not matches:
            raise ValueError(f"{entry['path']}: the patch matches no resource")
        for resource in matches:
            strategic_merge(resource, patch)
        return
    if not isinstance(patch, list):
        raise Unsupported(f"{entry['path']}: strategic-merge patch with a target")
    matches = [r for r in resources if _target_matches(r, target)]
    if not matches:
        raise ValueError(f"{entry['path']}: target {target} matches no resource")
    for resource in matches:
        json6902(resource, patch)


def _smp_matches(resource: Resource, patch: Resource) -> bool:
    meta = patch.get("metadata", {})
    return (
        resource["apiVersion"] == patch.get("apiVersion")
        and resource["kind"] == patch.get("kind")
        and resource["metadata"]["name"] == meta.get("name")
        and ("namespace" not in meta or resource["metadata"].get("namespace") == meta["namespace"])
    )


def _target_matches(resource: Resource, target: dict[str, Any]) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise Unsupported(f"patch target fields {sorted(unknown)}")
    for field in ("kind", "name", "namespace"):
        value = target.get(field)
        if value is not None and re.escape(value) != value:
            raise Unsupported(f"regular expression in patch target {field}: {value!r}")
    group, _, version = resource["apiVersion"].rpartition("/")
    actual = {
        "group": group,
        "version": version,
        "kind": resource["kind"],
        "name": resource["metadata"]["name"],
        "namespace": resource["metadata"].get("namespace", ""),
    }
    return all(actual[field] == value for field, value in target.items())


def strategic_merge(base: dict[str, Any], patch: dict[str, Any], path: str = "") -> None:
    """Merge ``patch`` into ``base`` in place (Kubernetes strategic merge, for the modelled lists)."""
    for key, value in patch.items():
        where = f"{path}/{key}"
        if key.startswith("$"):
            raise Unsupported(f"patch directive {where}")
        if value is None:
            base.pop(key, None)
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            strategic_merge(base[key], value, where)
        elif isinstance(value, list) and key in base:
            base[key] = _merge_list(key, base[key], value, where)
        else:
            base[key] = copy.deepcopy(value)


def _merge_list(key: str, base: list[Any], patch: list[Any], where: str) -> list[Any]:
    if key in REPLACED_LISTS:
        return copy.deepcopy(patch)
    merge_key = MERGE_KEYS.get(key)
    if merge_key is None:
        raise Unsupported(f"strategic merge of the list {where}")
    merged = copy.deepcopy(base)
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise Unsupported(f"{where}: item without its merge key {merge_key!r}")
        existing = next((m for m in merged if m.get(merge_key) == item[merge_key]), None)
        if existing is None:
            merged.append(copy.deepcopy(item))
        else:
            strategic_merge(existing, item, f"{where}[{merge_key}={item[merge_key]}]")
    return merged


def json6902(document: Any, operations: list[dict[str, Any]]) -> None:
    """Apply RFC 6902 ``add`` / ``replace`` / ``remove`` operations in place."""
    for operation in operations:
        op = operation.get("op")
        if op not in {"add", "replace", "remove"}:
            raise Unsupported(f"JSON 6902 op {op!r}")
        tokens = _pointer(operation["path"])
        parent = document
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if isinstance(parent, list):
            if op == "add":
                index = len(parent) if last == "-" else int(last)
                if not 0 <= index <= len(parent):
                    raise IndexError(f"{operation['path']}: index out of range")
                parent.insert(index, copy.deepcopy(operation["value"]))
            else:
                index = int(last)
                if not 0 <= index < len(parent):
                    raise IndexError(f"{operation['path']}: index out of range")
                if op == "replace":
                    parent[index] = copy.deepcopy(operation["value"])
                else:
                    del parent[index]
        else:
            if op != "add" and last not in parent:
                raise KeyError(f"{operation['path']}: no such member to {op}")
            if op == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(operation["value"])


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


# ---- namespace, labels, images -------------------------------------------------------------------


def _set_namespace(resources: list[Resource], namespace: str) -> None:
    for resource in resources:
        if resource["kind"] in NAMESPACE_REFERENCES:
            raise Unsupported(f"namespace transformer on {resource['kind']}")
        if resource["kind"] not in CLUSTER_SCOPED:
            resource["metadata"]["namespace"] = namespace


def _add_labels(resources: list[Resource], entry: dict[str, Any]) -> None:
    unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
    if unknown:
        raise Unsupported(f"labels fields {sorted(unknown)}")
    if entry.get("includeSelectors") or entry.get("includeTemplates"):
        raise Unsupported("labels with includeSelectors or includeTemplates")
    for resource in resources:
        labels = resource["metadata"].setdefault("labels", {})
        labels.update({str(k): str(v) for k, v in entry["pairs"].items()})


IMAGE_RE = re.compile(r"^(?P<name>[^@]+?)(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>[^@]+))?$")


def _set_image(resources: list[Resource], image: dict[str, Any]) -> None:
    unknown = set(image) - {"name", "newName", "newTag", "digest"}
    if unknown:
        raise Unsupported(f"images fields {sorted(unknown)}")
    for container in _containers(resources):
        match = IMAGE_RE.match(container["image"])
        if match is None:
            raise ValueError(f"unparsable image {container['image']!r}")
        if match["name"] != image["name"]:
            continue
        name = image.get("newName", match["name"])
        tag = str(image["newTag"]) if "newTag" in image else match["tag"]
        digest = image.get("digest", match["digest"])
        if "digest" in image:
            tag = None  # kustomize drops the tag when it sets a digest
        reference = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
        container["image"] = reference


def _containers(node: Any) -> Iterator[dict[str, Any]]:
    """Every container object, wherever it sits (Pod, Deployment, Job, CronJob…), as kustomize finds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in {"containers", "initContainers"} and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict) and "image" in c)
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)
