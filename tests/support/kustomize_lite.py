"""Render the kustomizations of deploy/kubernetes/ in Python, for machines without a kustomize binary.

Only the features those kustomizations use, with kustomize's semantics: ``resources`` (files and directories with a
kustomization), ``namespace``, ``labels`` (metadata only: no ``includeSelectors``/``includeTemplates``),
``configMapGenerator`` with ``files`` (the name hash suffix computed as kustomize does, or
``disableNameSuffixHash``; references to the ConfigMap from pod volumes renamed to match), ``images``
(``newName``/``newTag``) and ``patches`` with a strategic-merge patch file (maps merged, lists of maps merged by
``name``). Anything else raises, so a kustomization that outgrows this is noticed. tests/test_kubernetes.py
checks the result equals ``kubectl kustomize`` wherever kubectl is installed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

__all__ = ["UnsupportedError", "render"]

_SUPPORTED = {"apiVersion", "kind", "namespace", "labels", "resources", "configMapGenerator", "images", "patches"}


class UnsupportedError(ValueError):
    pass


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kustomize build directory`` makes (order not guaranteed)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - _SUPPORTED
    if unknown:
        raise UnsupportedError(f"{directory}: kustomization fields not supported here: {sorted(unknown)}")
    objects: list[dict[str, Any]] = []
    for res in k.get("resources") or ():
        path = directory / res
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    renames: dict[str, str] = {}
    for gen in k.get("configMapGenerator") or ():
        cm, old = _config_map(directory, gen)
        renames[old] = cm["metadata"]["name"]
        objects.append(cm)
    for patch in k.get("patches") or ():
        if set(patch) != {"path"}:
            raise UnsupportedError(f"{directory}: only strategic-merge patches from a file: {patch}")
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        target = [o for o in objects if (o["kind"], o["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"])]
        if len(target) != 1:
            raise UnsupportedError(f"{directory}: patch {patch['path']} matches {len(target)} objects")
        _merge(target[0], doc)
    for obj in objects:
        if "namespace" in k and obj["kind"] != "Namespace":
            obj["metadata"]["namespace"] = k["namespace"]
        for group in k.get("labels") or ():
            if set(group) != {"pairs"}:
                raise UnsupportedError(f"{directory}: labels options not supported: {group}")
            obj["metadata"].setdefault("labels", {}).update(group["pairs"])
        for pod in _pod_specs(obj):
            for vol in pod.get("volumes") or ():
                if "configMap" in vol and vol["configMap"]["name"] in renames:
                    vol["configMap"]["name"] = renames[vol["configMap"]["name"]]
            for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
                c["image"] = _image(c["image"], k.get("images") or ())
    return objects


def _config_map(directory: Path, gen: dict[str, Any]) -> tuple[dict[str, Any], str]:
    unknown = set(gen) - {"name", "files", "options"}
    if unknown or set(gen.get("options") or {}) - {"disableNameSuffixHash"}:
        raise UnsupportedError(f"{directory}: configMapGenerator fields not supported here: {gen}")
    data = {Path(f).name: (directory / f).read_text() for f in gen["files"]}
    name = gen["name"]
    cm: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
    if not (gen.get("options") or {}).get("disableNameSuffixHash"):
        cm["metadata"]["name"] = f"{name}-{config_map_hash(data)}"
    return cm, name


def config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix (api/hasher): sha256 of Go's json.Marshal of {kind, name, data}, 10 hex digits with
    some replaced so the suffix never spells words. The name in it is always "": kustomize looks the name up as a
    single field called "metadata/name", which no object has (checked against kubectl kustomize's output)."""
    # Go's encoding/json: keys sorted, no spaces, non-ASCII kept, <, >, & and U+2028/2029 escaped.
    doc = {"data": data, "kind": "ConfigMap", "name": ""}
    encoded = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        encoded = encoded.replace(ch, esc)
    digest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _image(image: str, images: Any) -> str:
    name, _, tag = image.partition(":")
    for entry in images:
        if entry["name"] == name:
            name = entry.get("newName", name)
            tag = entry.get("newTag", tag)
    return f"{name}:{tag}" if tag else name


def _pod_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec") or {}
    template = spec.get("template") or {}
    return [template["spec"]] if "spec" in template else []


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list) and all("name" in v for v in value):
            # Merge by name; the patch's entries come first, in the patch's order, then the others (what kustomize's
            # strategic merge does with a list of containers).
            by_name = {item.get("name"): item for item in target[key]}
            merged = []
            for item in value:
                if item["name"] in by_name:
                    _merge(by_name[item["name"]], item)
                    merged.append(by_name[item["name"]])
                else:
                    merged.append(copy.deepcopy(item))
            names = {item["name"] for item in value}
            target[key] = merged + [item for item in target[key] if item.get("name") not in names]
        else:
            target[key] = copy.deepcopy(value)
