"""deploy/kubernetes: every kustomization renders; every object passes the Kubernetes OpenAPI schemas
(kubernetes-validate, strict: unknown fields refused) or KServe's CRD schemas (tests/data/kserve); and the
manifests agree with the code: real commands and flags (click's own parser), real config keys (the
programs' own config loaders), probe paths the servers route, ports the configs listen on, and names that
exist (rendered, or listed here as user-supplied and documented in docs/kubernetes.md).

Rendering is done here, so no kustomize binary is needed, for the subset of kustomize the manifests use,
and nothing else (anything outside it fails the test, so the subset cannot drift silently):

- ``resources``: files (YAML streams) and directories holding a kustomization.yaml;
- ``configMapGenerator`` with ``files`` (``KEY=PATH`` or ``PATH``) and ``literals``, ``behavior`` create,
  replace or merge, an optional ``namespace``; only with ``generatorOptions.disableNameSuffixHash: true``
  (names are kept as written, so no reference needs rewriting);
- ``patches`` with a ``path`` only: strategic-merge patches matched on kind, name and (when given)
  namespace. Maps merge, ``null`` deletes a key; the lists Kubernetes merges by key (containers and
  initContainers by ``name``, volumes by ``name``, volumeMounts by ``mountPath``, env by ``name``,
  container ports by ``containerPort``) merge item by item, new items going first as kustomize puts them,
  and an item holding ``$patch: delete`` removes its match; every other list is replaced;
- ``namespace`` (set on every namespaced object), ``labels`` with ``pairs`` only (added to
  ``metadata.labels``; no selectors, no templates), ``images`` (``name``, ``newName``, ``newTag``) on
  ``spec[.template.spec].{containers,initContainers}[].image``.

The order is kustomize's: resources, generators, patches, namespace, labels, images. Where ``kubectl`` is
on PATH, ``kubectl kustomize`` renders every directory too and must give exactly the same objects.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
DOC = ROOT / "docs" / "kubernetes.md"
KSERVE_SCHEMAS = Path(__file__).parent / "data" / "kserve"
K8S_VERSION = "1.37.0"  # the newest schema set kubernetes-validate 1.37 ships
DIRS = sorted(p.parent.relative_to(DEPLOY).as_posix() for p in DEPLOY.rglob("kustomization.yaml"))
OVERLAYS = [d for d in DIRS if d.startswith("overlays/")]
Obj = dict[str, Any]

# Objects the manifests name but do not create: the operator makes them (docs/kubernetes.md lists each,
# with these keys). kind, namespace, name -> the keys the manifests read from it.
USER_SUPPLIED: dict[tuple[str, str, str], set[str]] = {
    ("Secret", "modelseal-keys", "modelseal-keyserver-tls"): {"tls.crt", "tls.key"},
    ("Secret", "modelseal-keys", "modelseal-keyserver-master-key"): {"master.key"},
    ("Secret", "modelseal-keys", "modelseal-keyserver-signing"): {"lease-signing.key"},
    ("Secret", "modelseal-keys", "modelseal-keyserver-db"): {"password", "ca.crt"},
    ("Secret", "modelseal-keys", "modelseal-keyserver-openbao"): {"token", "ca.crt"},
    ("ConfigMap", "modelseal-keys", "modelseal-keyserver-client-ca"): {"ca.crt"},
    ("Secret", "modelseal-host", "modelseal-agent-identity"): {"tls.crt", "tls.key"},
    ("ConfigMap", "modelseal-host", "modelseal-keyserver-ca"): {"ca.crt"},
    ("Secret", "modelseal-serve", "modelseal-serve-tls"): {"tls.crt", "tls.key"},
    ("Secret", "modelseal-serve", "modelseal-serve-probe-tls"): {"ca.crt", "tls.crt", "tls.key"},
    ("ConfigMap", "modelseal-serve", "modelseal-serve-client-ca"): {"ca.crt"},
    ("ServiceAccount", "modelseal-serve", "modelseal-kserve-storage"): set(),
}
# Paths that exist in a pod without a volume of ours: KServe's storage initializer fills /mnt/models.
PROVIDED_PATHS = {"/mnt/models"}
# Commands other than `modelseal`: the stdlib probe and the socket directory's chown (python3 from the
# modelseal image), and the database example's own tool.
OTHER_COMMANDS = {"python3", "pg_isready"}
CLUSTER_SCOPED = {"Namespace", "ClusterServingRuntime", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
WORKLOADS = {"Deployment", "DaemonSet", "StatefulSet", "Job"}
MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "volumeMounts": "mountPath",
              "env": "name"}  # fmt: skip
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches",
                      "configMapGenerator", "generatorOptions"}  # fmt: skip


# --- the renderer --------------------------------------------------------------------------------------


class RenderError(Exception):
    """A kustomization outside the subset this renderer implements (see the module docstring)."""


def load_yaml_stream(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@functools.cache
def render(directory: str, root: Path = DEPLOY) -> tuple[Obj, ...]:
    """The objects ``ROOT/DIRECTORY`` renders to, as kustomize would (the subset above)."""
    base = root / directory
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    if unknown := set(k) - KUSTOMIZATION_KEYS:
        raise RenderError(f"{directory}: kustomization fields outside the subset: {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in k.get("resources", []):
        target = (base / entry).resolve()
        if target.is_dir():
            objects += copy.deepcopy(list(render(target.relative_to(root).as_posix(), root)))
        else:
            objects += load_yaml_stream(target)
    generate_configmaps(base, k, objects)
    for patch in k.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{directory}: only patches with a path are supported, not {sorted(patch)}")
        for doc in load_yaml_stream(base / patch["path"]):
            strategic_merge(one_match(objects, doc, directory), doc)
    if "namespace" in k:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = k["namespace"]
    for label in k.get("labels", []):
        if set(label) != {"pairs"}:
            raise RenderError(f"{directory}: labels support only pairs, not {sorted(label)}")
        for obj in objects:
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
    for image in k.get("images", []):
        if not set(image) <= {"name", "newName", "newTag"}:
            raise RenderError(f"{directory}: images support name, newName and newTag, not {sorted(image)}")
        for obj in objects:
            for container in pod_containers(obj):
                set_image(container, image)
    return tuple(objects)


def generate_configmaps(base: Path, k: Obj, objects: list[Obj]) -> None:
    generators = k.get("configMapGenerator", [])
    if generators and k.get("generatorOptions") != {"disableNameSuffixHash": True}:
        raise RenderError(f"{base}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true only")
    for gen in generators:
        if not set(gen) <= {"name", "namespace", "behavior", "files", "literals"}:
            raise RenderError(f"{base}: configMapGenerator fields outside the subset: {sorted(gen)}")
        data: dict[str, str] = {}
        for entry in gen.get("files", []):
            key, _, path = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
            data[key] = (base / path).read_text()
        for entry in gen.get("literals", []):
            key, _, value = entry.partition("=")
            data[key] = value
        meta: Obj = {"name": gen["name"]}
        if "namespace" in gen:
            meta["namespace"] = gen["namespace"]
        behavior = gen.get("behavior", "create")
        if behavior == "create":
            objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
            continue
        existing = one_match(objects, {"kind": "ConfigMap", "metadata": meta}, str(base))
        if behavior == "replace":
            existing["data"] = data
        elif behavior == "merge":
            existing.setdefault("data", {}).update(data)
        else:
            raise RenderError(f"{base}: configMapGenerator behavior {behavior!r}")


def one_match(objects: list[Obj], doc: Obj, where: str) -> Obj:
    meta = doc["metadata"]
    found = [
        o for o in objects
        if o["kind"] == doc["kind"] and o["metadata"]["name"] == meta["name"]
        and ("namespace" not in meta or o["metadata"].get("namespace") == meta["namespace"])
    ]  # fmt: skip
    if len(found) != 1:
        raise RenderError(f"{where}: {len(found)} objects match {doc['kind']} {meta.get('namespace')}/{meta['name']}")
    return found[0]


def strategic_merge(target: Obj, patch: Obj) -> None:
    for key, value in patch.items():
        if key == "$patch":
            raise RenderError(f"$patch: {value} on a map is outside the subset")
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            strategic_merge(target[key], value)
        elif isinstance(value, list) and isinstance(target.get(key), list) and merge_key(key, value) is not None:
            target[key] = merge_list(target[key], value, merge_key(key, value) or "")
        else:
            target[key] = copy.deepcopy(value)


def merge_key(field: str, items: list[Any]) -> str | None:
    if field == "ports" and all(isinstance(i, dict) and "containerPort" in i for i in items):
        return "containerPort"
    return MERGE_KEYS.get(field)


def merge_list(current: list[Obj], patch: list[Obj], key: str) -> list[Obj]:
    result = copy.deepcopy(current)
    added = []
    for item in patch:
        match = [i for i, old in enumerate(result) if old.get(key) == item[key]]
        if item.get("$patch") == "delete":
            result = [old for old in result if old.get(key) != item[key]]
        elif match:
            strategic_merge(result[match[0]], item)
        else:
            added.append(copy.deepcopy(item))
    return added + result


def set_image(container: Obj, image: Obj) -> None:
    match = re.fullmatch(r"(.+?)(?::([\w][\w.-]*))?", container["image"])
    assert match is not None, container["image"]
    name, tag = match.group(1), match.group(2)
    if name != image["name"]:
        return
    new_tag = image.get("newTag", tag)
    container["image"] = str(image.get("newName", name)) + (f":{new_tag}" if new_tag else "")


# --- helpers over rendered objects -----------------------------------------------------------------------


def pod_spec(obj: Obj) -> Obj | None:
    if obj["kind"] in WORKLOADS:
        spec: Obj = obj["spec"]["template"]["spec"]
        return spec
    if obj["kind"] in {"ServingRuntime", "ClusterServingRuntime"}:
        runtime: Obj = obj["spec"]
        return runtime
    return None


def pod_containers(obj: Obj) -> Iterator[Obj]:
    spec = pod_spec(obj)
    if spec is not None:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def all_objects() -> Iterator[tuple[str, Obj]]:
    for directory in DIRS:
        for obj in render(directory):
            yield directory, obj


def by_key(objects: tuple[Obj, ...]) -> dict[tuple[str, str, str], Obj]:
    return {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objects}


def namespace_of(obj: Obj) -> str:
    return str(obj["metadata"].get("namespace", ""))


def kserve_pods(objects: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    """(runtime, predictor) pairs: KServe builds one pod from both (runtime containers and volumes,
    predictor's pod-level fields)."""
    runtimes = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServingRuntime"}
    for isvc in (o for o in objects if o["kind"] == "InferenceService"):
        predictor = isvc["spec"]["predictor"]
        yield runtimes[predictor["model"]["runtime"]], predictor


def key_exists(objects: tuple[Obj, ...], kind: str, namespace: str, name: str, key: str | None) -> str | None:
    """None when ``key`` of ``kind`` ``name`` exists (rendered or user-supplied); else why not."""
    rendered = by_key(objects).get((kind, namespace, name))
    if rendered is not None:
        keys = set(rendered.get("data", {})) | set(rendered.get("stringData", {}))
        return None if key is None or key in keys else f"{kind} {namespace}/{name} has no key {key!r}"
    supplied = USER_SUPPLIED.get((kind, namespace, name))
    if supplied is None:
        return f"{kind} {namespace}/{name} is neither rendered nor user-supplied"
    return None if key is None or key in supplied else f"user-supplied {kind} {name} has no key {key!r}"


def resolve_file(objects: tuple[Obj, ...], namespace: str, pod: Obj, container: Obj, path: str) -> str | None:
    """None when ``path`` names a file of a volume ``container`` mounts (a Secret's or ConfigMap's key,
    or anything under a host path, PVC or emptyDir); else why not."""
    if any(path == p or path.startswith(p + "/") for p in PROVIDED_PATHS):
        return None
    mounts = [m for m in container.get("volumeMounts", []) if path == m["mountPath"] or
              path.startswith(m["mountPath"].rstrip("/") + "/")]  # fmt: skip
    if not mounts:
        return f"{path}: no volume is mounted there in container {container['name']}"
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod.get("volumes", []) if v["name"] == mount["name"]]
    rel = path[len(mount["mountPath"]) :].strip("/")
    for kind, field, name_field in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
        if field in volume:
            source = volume[field]
            items = {i["path"]: i["key"] for i in source.get("items", [])}
            if items and rel not in items:
                return f"{path}: volume {volume['name']} projects only {sorted(items)}"
            return key_exists(objects, kind, namespace, source[name_field], items.get(rel, rel) or None)
    return None


def command_of(container: Obj) -> list[str]:
    return list(container.get("command", [])) + list(container.get("args", []))


def cli_command(argv: list[str]) -> tuple[click.Command, list[str]]:
    """The click command ``modelseal ARGV`` runs, and the arguments left for it."""
    from modelseal.cli.main import main

    command: click.Command = main
    rest = list(argv)
    while isinstance(command, click.Group):
        assert rest, f"modelseal {' '.join(argv)}: no subcommand"
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"modelseal {' '.join(argv)}: {rest[0]!r} is not a modelseal command"
        command, rest = sub, rest[1:]
    return command, rest


def parse_cli(argv: list[str]) -> tuple[click.Command, dict[str, Any]]:
    """Parse ``modelseal ARGV`` with click's own parser (unknown options and missing values are errors),
    without converting values: their files do not exist on this machine."""
    command, rest = cli_command(argv)
    ctx = click.Context(command, info_name=command.name)
    values, leftover, _ = command.make_parser(ctx).parse_args(rest)
    assert not leftover or any(isinstance(p, click.Argument) for p in command.params), leftover
    for param in command.params:
        if param.required and values.get(param.name) is None:
            raise AssertionError(f"modelseal {' '.join(argv)}: {param.opts} is required")
    return command, values


def path_params(command: click.Command, values: dict[str, Any]) -> Iterator[str]:
    for param in command.params:
        value = values.get(param.name)
        if isinstance(param.type, click.Path) and value is not None:
            yield from value if isinstance(value, list) else [value]


# --- rendering -----------------------------------------------------------------------------------------


def test_every_directory_renders() -> None:
    assert {"base/keyserver", "base/agent", "base/serve", "kserve", "overlays/dev", "overlays/production",
            "overlays/production-host"} <= set(DIRS)  # fmt: skip
    for directory in DIRS:
        objects = render(directory)
        assert objects, directory
        keys = [(o["kind"], namespace_of(o), o["metadata"]["name"]) for o in objects]
        assert len(keys) == len(set(keys)), f"{directory}: an object is rendered twice"
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                assert namespace_of(obj), f"{directory}: {obj['kind']} {obj['metadata']['name']} has no namespace"


@pytest.mark.slow  # about 3 s: seven kubectl processes
def test_render_matches_kubectl_kustomize() -> None:
    """The renderer above is kustomize's behaviour for what the manifests use (where kubectl exists: every
    directory is rendered by `kubectl kustomize` too, all at once, and must give the same objects)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the Python renderer alone is used")
    runs = {d: subprocess.Popen([kubectl, "kustomize", str(DEPLOY / d)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for d in DIRS}  # fmt: skip
    for directory, run in runs.items():
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, stderr
        theirs = by_key(tuple(d for d in yaml.safe_load_all(stdout) if d))
        ours = by_key(render(directory))
        assert sorted(theirs) == sorted(ours), directory
        for key, obj in ours.items():
            assert obj == theirs[key], f"{directory}: {key} differs from kubectl kustomize"


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    """A patch list item merges by its key, `$patch: delete` removes, null deletes a map key, other lists
    are replaced; and a feature outside the subset is an error, not silently ignored."""
    pod = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["x", "y"]}],
           "volumes": [{"name": "v", "emptyDir": {}}, {"name": "w", "emptyDir": {}}],
           "dnsPolicy": "Default"}  # fmt: skip
    strategic_merge(pod, {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["z"]}],
                          "volumes": [{"name": "v", "$patch": "delete"}], "dnsPolicy": None})  # fmt: skip
    assert pod == {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}],
                                   "args": ["z"]}], "volumes": [{"name": "w", "emptyDir": {}}]}  # fmt: skip
    with pytest.raises(RenderError, match=r"\$patch"):
        strategic_merge({"a": {}}, {"a": {"$patch": "replace"}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "kustomization.yaml").write_text("resources: []\ncommonLabels: {a: b}\n")
    with pytest.raises(RenderError, match="commonLabels"):
        render("bad", tmp_path)
    (tmp_path / "bad" / "kustomization.yaml").write_text("patches: [{patch: 'x', target: {kind: Pod}}]\n")
    with pytest.raises(RenderError, match="only patches with a path"):
        render("bad", tmp_path)


# --- schemas -------------------------------------------------------------------------------------------


def unique_objects() -> dict[str, Obj]:
    """Every rendered object once (bases repeat in overlays, with other image names), keyed by its JSON."""
    unique = {}
    for _, obj in all_objects():
        key = copy.deepcopy(obj)
        for container in pod_containers(key):
            container["image"] = "-"
        unique[json.dumps(key, sort_keys=True)] = obj
    return unique


@functools.cache
def k8s_definitions() -> Any:
    from kubernetes_validate.utils import schema_contents

    return schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json", K8S_VERSION)


@functools.cache
def k8s_validator(kind: str, api_version: str) -> Any:
    """kubernetes_validate.validate(..., strict=True) builds this validator for every object it checks,
    reading the 5 MB definitions file each time (4 s for these manifests); built once per kind here, from
    the same files in the same way (test_schema_checks_refuse_unknown_fields compares the two)."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    name = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/{kind.lower()}-{group}.json"
    schema = schema_contents(name, K8S_VERSION)
    registry = Resource.from_contents(k8s_definitions()) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def test_objects_validate_against_kubernetes_schemas() -> None:
    checked = 0
    for obj in unique_objects().values():
        if obj["apiVersion"].startswith("serving.kserve.io/"):
            continue
        errors = sorted(k8s_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: {errors[0].message} at {list(errors[0].path)}"
        checked += 1
    assert checked >= 20


def strict(schema: Any) -> Any:
    """Refuse unknown fields where the CRD lists the fields of an object (as the API server's strict field
    validation does), except where it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


@functools.cache
def kserve_validator(kind: str, version: str) -> Any:
    import jsonschema

    name = {"ServingRuntime": "servingruntime", "InferenceService": "inferenceservice"}[kind]
    schema = strict(json.loads((KSERVE_SCHEMAS / f"{name}-{version}.json").read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked by the API server itself
    return jsonschema.Draft7Validator(schema)


def test_kserve_objects_validate_against_the_vendored_crds() -> None:
    kinds = set()
    for obj in unique_objects().values():
        group, _, version = obj["apiVersion"].partition("/")
        if group != "serving.kserve.io":
            continue
        errors = sorted(kserve_validator(obj["kind"], version).iter_errors(obj), key=str)
        assert not errors, f"{obj['kind']} {obj['metadata']['name']}: {errors[0].message} at {list(errors[0].path)}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        kinds.add(obj["kind"])
    assert kinds == {"ServingRuntime", "InferenceService"}
    predictor = next(o for o in render("kserve") if o["kind"] == "InferenceService")["spec"]["predictor"]
    assert predictor["model"]["protocolVersion"] == "v2"


def test_schema_checks_refuse_unknown_fields() -> None:
    """The checks above can fail: a misspelt field is refused by both."""
    import kubernetes_validate

    deployment = copy.deepcopy(next(o for o in render("base/serve") if o["kind"] == "Deployment"))
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)  # the library itself agrees
    assert not list(k8s_validator("Deployment", "apps/v1").iter_errors(deployment))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    assert list(k8s_validator("Deployment", "apps/v1").iter_errors(deployment))
    runtime = copy.deepcopy(next(o for o in render("kserve") if o["kind"] == "ServingRuntime"))
    runtime["spec"]["containers"][0]["readinessprobe"] = {}
    assert list(kserve_validator("ServingRuntime", "v1alpha1").iter_errors(runtime))


# --- names, commands, configs, probes ------------------------------------------------------------------


def pods(objects: tuple[Obj, ...]) -> Iterator[tuple[Obj, Obj]]:
    """(pod spec, the object it belongs to) for workloads, and KServe runtime+predictor pairs merged."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is not None and obj["kind"] in WORKLOADS:
            yield spec, obj
    for runtime, predictor in kserve_pods(objects):
        merged = {**runtime["spec"], **{k: v for k, v in predictor.items() if k not in {"model"}}}
        yield merged, runtime


@pytest.mark.parametrize("directory", DIRS)
def test_every_named_object_exists_or_is_user_supplied(directory: str) -> None:
    objects = render(directory)
    problems = []
    for pod, owner in pods(objects):
        ns = namespace_of(owner)
        refs: list[tuple[str, str, str | None]] = []
        for volume in pod.get("volumes", []):
            for kind, field, name_field in (("Secret", "secret", "secretName"), ("ConfigMap", "configMap", "name")):
                if field in volume:
                    name = volume[field][name_field]
                    refs += [(kind, name, i["key"]) for i in volume[field].get("items", [])]
                    refs.append((kind, name, None))
            if "persistentVolumeClaim" in volume:
                refs.append(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None))
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            for env in container.get("env", []):
                source = env.get("valueFrom", {})
                for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    if field in source:
                        refs.append((kind, source[field]["name"], source[field]["key"]))
            names = {m["name"] for m in container.get("volumeMounts", [])}
            claims = {t["metadata"]["name"] for t in owner["spec"].get("volumeClaimTemplates", [])}
            missing = names - {v["name"] for v in pod.get("volumes", [])} - claims
            problems += [f"{owner['metadata']['name']}: mount of unknown volume {n}" for n in missing]
        if "serviceAccountName" in pod:
            refs.append(("ServiceAccount", pod["serviceAccountName"], None))
        for kind, name, key in refs:
            if (why := key_exists(objects, kind, ns, name, key)) is not None:
                problems.append(f"{owner['kind']} {owner['metadata']['name']}: {why}")
    assert not problems, problems


def test_user_supplied_objects_are_documented() -> None:
    """Every object the operator must create is named in the walk-through, with every key it needs."""
    doc = DOC.read_text()
    for (kind, namespace, name), keys in USER_SUPPLIED.items():
        rows = [line for line in doc.splitlines() if f"`{name}`" in line and line.startswith("|")]
        assert rows, f"docs/kubernetes.md does not list the {kind} {name} in a table"
        for key in keys:
            assert any(f"`{key}`" in row for row in rows), f"docs/kubernetes.md: {name}'s key {key} is not listed"
        assert namespace in doc
    every_rendered = {k for d in DIRS for k in by_key(render(d))}
    assert not set(USER_SUPPLIED) & every_rendered, "an object listed as user-supplied is rendered"


def test_commands_are_real_modelseal_commands_and_flags() -> None:
    """Every `modelseal ...` a container or probe runs parses with click's own parser; every path-typed
    option names a file the pod mounts; every $(VAR) is an env var of the container."""
    seen = set()
    for directory in DIRS:
        objects = render(directory)
        for pod, owner in pods(objects):
            for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                commands = [command_of(container)]
                commands += [p["exec"]["command"] for p in probes(container) if "exec" in p]
                env = {e["name"] for e in container.get("env", [])}
                if not commands[0]:  # the image's own entrypoint: only for images other than modelseal's
                    assert not container["image"].startswith(("modelseal", "localhost:5000/modelseal",
                                                              "registry.example.com/modelseal"))
                    commands = commands[1:]
                for argv in commands:
                    for ref in re.findall(r"\$\((\w+)\)", " ".join(argv)):
                        assert ref in env, f"{owner['metadata']['name']}: $({ref}) is not in the container's env"
                    if argv[0] != "modelseal":
                        assert argv[0] in OTHER_COMMANDS, f"{owner['metadata']['name']} runs {argv[0]}"
                        continue
                    command, values = parse_cli(argv[1:])
                    seen.add(command.name)
                    for path in path_params(command, values):
                        why = resolve_file(objects, namespace_of(owner), pod, container, path)
                        assert why is None, f"{directory} {owner['metadata']['name']}: {why}"
    assert {"run", "migrate", "status", "serve"} <= seen
    with pytest.raises(click.NoSuchOption):
        parse_cli(["serve", "--repository", "/models", "--key-chek", "5"])


def probes(container: Obj) -> list[Obj]:
    return [container[p] for p in ("startupProbe", "readinessProbe", "livenessProbe") if p in container]


def rendered_toml(objects: tuple[Obj, ...], key: str) -> Iterator[tuple[Obj, str]]:
    for obj in objects:
        if obj["kind"] == "ConfigMap" and key in obj.get("data", {}):
            yield obj, obj["data"][key]


def container_named(objects: tuple[Obj, ...], workload: str, container: str) -> tuple[Obj, Obj, Obj]:
    owner = next(o for o in objects if o["kind"] in WORKLOADS and o["metadata"]["name"] == workload)
    pod = owner["spec"]["template"]["spec"]
    return owner, pod, next(c for c in [*pod.get("initContainers", []), *pod["containers"]] if c["name"] == container)


@pytest.mark.parametrize("directory", ["base/keyserver", "overlays/dev", "overlays/production"])
def test_keyserver_config_loads_and_matches_the_deployment(directory: str, tmp_path: Path) -> None:
    """keyserver.toml loads with the key service's own loader; its listen port is the container's and the
    Service's; every file it names is a key of a mounted Secret or ConfigMap; /v1/health is the route the
    key service serves."""
    from modelseal.keyserver.config import KeyServerConfig

    objects = render(directory)
    ((_, text),) = rendered_toml(objects, "keyserver.toml")
    (tmp_path / "keyserver.toml").write_text(text)
    cfg = KeyServerConfig.load(tmp_path / "keyserver.toml")
    owner, pod, container = container_named(objects, "modelseal-keyserver", "keyserver")
    assert cfg.host == "0.0.0.0" and cfg.database.startswith("postgresql://")
    assert ":" not in cfg.database.split("//", 1)[1].split("@")[0], "a password in the database URL"
    (port,) = [p for p in container["ports"] if p["name"] == "https"]
    assert port["containerPort"] == cfg.port
    service = by_key(objects)[("Service", namespace_of(owner), "modelseal-keyserver")]
    assert service["spec"]["ports"][0]["port"] == cfg.port and service["spec"]["ports"][0]["targetPort"] == "https"
    files = [cfg.tls_cert, cfg.tls_key, cfg.client_ca, cfg.signing_key]
    if cfg.master.get("backend", "local") == "local":
        files.append(Path(cfg.master["path"]))
    else:
        env = {e["name"] for e in container["env"]}
        assert cfg.master["token_env"] in env, "the transit token variable is not set"
        assert cfg.master["url"].startswith("https://")
    for value in [e["value"] for e in container["env"] if e.get("value", "").startswith("/")]:
        files.append(Path(value))  # VAULT_CACERT, PGSSLROOTCERT, HOME
    for path in files:
        assert path is not None and path.is_absolute()
        assert resolve_file(objects, namespace_of(owner), pod, container, str(path)) is None, path
    health = [p["httpGet"] for p in probes(container)]
    assert health and all(h["port"] == "https" and h["scheme"] == "HTTPS" for h in health)
    assert {h["path"] for h in health} <= keyserver_get_routes()


def test_database_password_reaches_libpq_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`[database] url` can only come from keyserver.toml, which is a ConfigMap: the manifests keep the
    password out of it and set $PGPASSWORD from a Secret. The key service's own connect (psycopg on libpq)
    uses it: the connection reports the password libpq sent."""
    import sqlalchemy

    from modelseal.devstack import postgres_url
    from modelseal.keyserver.sqlstore import db

    base = sqlalchemy.engine.make_url(postgres_url())
    if base.password:
        pytest.skip("the test database's URL carries a password of its own")
    monkeypatch.setenv("PGPASSWORD", "from-the-secret")
    engine = db.connect(base.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            used = conn.connection.dbapi_connection.info.password  # type: ignore[union-attr]
    except sqlalchemy.exc.OperationalError as exc:
        pytest.skip(f"no PostgreSQL to connect to: {str(exc).splitlines()[0]}")
    finally:
        engine.dispose()
    assert used == "from-the-secret"


@functools.cache
def keyserver_get_routes() -> set[str]:
    """The GET routes of the key service's real aiohttp app (on an in-memory store)."""
    import tempfile

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from modelseal.keyserver.app import build_app
    from modelseal.keyserver.masterkey import LocalMasterKey
    from modelseal.keyserver.memstore import MemoryStore
    from modelseal.keyserver.service import KeyService, ServiceSettings

    with tempfile.TemporaryDirectory() as tmp:
        master = LocalMasterKey.create(Path(tmp) / "master.key")
    service = KeyService(MemoryStore(), master, ed25519.Ed25519PrivateKey.generate(), ServiceSettings(), {})
    app = build_app(service, "")
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource is not None}


@functools.cache
def serve_routes() -> set[tuple[str, str]]:
    """(method, path pattern) of `modelseal serve`'s real HTTP app (an empty repository)."""
    import tempfile

    from modelseal.serve.rest import build_app
    from modelseal.serve.server import ServeConfig, Server

    async def build() -> set[tuple[str, str]]:
        with tempfile.TemporaryDirectory() as tmp:
            app = build_app(Server(ServeConfig(repository=Path(tmp))), 1024)
            return {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}

    return asyncio.run(build())


def route_of(path: str) -> str:
    """A concrete probe path as the app's pattern: model names become {model}."""
    return re.sub(r"^/v2/models/[^/]+/ready$", "/v2/models/{model}/ready", path)


def test_agent_config_matches_the_daemonset_and_the_servers(tmp_path: Path) -> None:
    """agent.toml loads with the agent's own loader; its socket is on the host path the DaemonSet mounts and
    the servers' `agent:` identity names; the servers' uid is in its ACL and their groups open the socket's
    mode; its certificate files are keys of mounted objects; the lease-key placeholder stops the agent."""
    from modelseal.agent.config import AgentConfig
    from modelseal.errors import ModelsealError
    from modelseal.release.protocol import load_service_public_key

    for directory in DIRS:
        objects = render(directory)
        for _, text in rendered_toml(objects, "agent.toml"):
            path = tmp_path / "agent.toml"
            path.write_text(text)
            cfg = AgentConfig.load(path)
            owner, pod, container = container_named(objects, "modelseal-agent", "agent")
            socket_dir = str(Path(cfg.socket).parent)
            (host,) = [v for v in pod["volumes"] if v.get("hostPath", {}).get("path") == socket_dir]
            assert any(m["name"] == host["name"] and m["mountPath"] == socket_dir for m in container["volumeMounts"])
            for file in (cfg.ca, cfg.cert, cfg.key):
                assert resolve_file(objects, namespace_of(owner), pod, container, str(file)) is None, file
            assert cfg.socket_mode & 0o060 == 0o060 and cfg.socket_mode & 0o007 == 0
            group = pod["securityContext"]["runAsGroup"]
            init = next(c for c in pod["initContainers"] if c["name"] == "socket-dir")
            assert f"os.chown(d, {pod['securityContext']['runAsUser']}, {group})" in init["command"][-1]
            assert f"d = '{socket_dir}'" in init["command"][-1]
            assert cfg.lease_public_key is not None
            with pytest.raises(ModelsealError):
                load_service_public_key(cfg.lease_public_key)  # the placeholder: the agent will not start
            servers = list(pods(render("base/serve"))) + list(pods(render("kserve")))
            for server_pod, _ in servers:
                (serve,) = [c for c in server_pod["containers"] if c.get("command") == ["modelseal"]]
                _, values = parse_cli(serve["args"])
                assert values["identity"] == f"agent:{cfg.socket}"
                uid = serve["securityContext"].get("runAsUser", server_pod["securityContext"].get("runAsUser"))
                assert cfg.acl.allows(uid, "any-model") and uid != 0
                # the server's key watch asks `status`: the agent shows a uid the keys of the models its ACL
                # allows, so the server needs no admin_user (which would show it every key and the reserve)
                assert cfg.limits.admin_uid != uid
                assert group in server_pod["securityContext"]["supplementalGroups"]
                mounts = [m for m in serve["volumeMounts"] if m["mountPath"] == socket_dir]
                (volume,) = [v for v in server_pod["volumes"] if v["name"] == mounts[0]["name"]]
                assert volume["hostPath"] == {"path": socket_dir, "type": "Directory"}


@pytest.mark.parametrize("directory", ["base/serve", "kserve", "overlays/dev", "overlays/production-host"])
def test_serve_ports_and_probes_match_the_server(directory: str) -> None:
    """The container's ports are the ones --http/--grpc listen on; the probes ask routes the server has
    (the exec probe's paths are read from probe.py itself); readiness is per model, not the server's."""
    objects = render(directory)
    servers = [
        (pod, owner, c) for pod, owner in pods(objects) for c in pod["containers"] if c.get("args", [""])[0] == "serve"
    ]
    assert servers
    for pod, owner, serve in servers:
        _, values = parse_cli(serve["args"])
        ports = {p["containerPort"] for p in serve["ports"]}
        listen = {int(values[k].rpartition(":")[2]) for k in ("http", "grpc") if values.get(k) not in (None, "off")}
        assert ports == listen
        routes = serve_routes()
        readiness = serve["readinessProbe"]
        if "httpGet" in readiness:  # KServe: plain HTTP inside the pod, the model's own readiness
            assert readiness["httpGet"]["path"] == "/v2/models/{{.Name}}/ready" and "--model" in serve["args"]
            for probe in probes(serve):
                assert probe["httpGet"]["port"] in ports
                assert ("GET", route_of(probe["httpGet"]["path"].replace("{{.Name}}", "m"))) in routes
            continue
        assert values.get("client_ca"), "the plain-HTTP probe path is only for the KServe runtime"
        script = next(o for o in objects if o["kind"] == "ConfigMap" and "probe.py" in o.get("data", {}))
        source = script["data"]["probe.py"]
        called = set(re.findall(r'(?:check|call)\(f?"(/v2/[^"]+)"', source))
        called = {re.sub(r"\{urllib[^}]*\}", "m", c) for c in called}
        assert called == {"/v2/health/live", "/v2/health/ready", "/v2/models/m/ready", "/v2/repository/index"}
        assert ("POST", "/v2/repository/index") in routes
        assert all(("GET", route_of(c)) in routes for c in called - {"/v2/repository/index"})
        env = {e["name"]: e for e in serve["env"]}
        assert env["MODELSEAL_PROBE_URL"]["value"].endswith(f":{values['http'].rpartition(':')[2]}")
        for name in ("MODELSEAL_PROBE_CA", "MODELSEAL_PROBE_CERT", "MODELSEAL_PROBE_KEY"):
            assert resolve_file(objects, namespace_of(owner), pod, serve, env[name]["value"]) is None
        assert readiness["exec"]["command"][-1] == "ready"
        for probe in probes(serve):
            script_path = probe["exec"]["command"][1]
            assert resolve_file(objects, namespace_of(owner), pod, serve, script_path) is None


def test_workloads_are_locked_down() -> None:
    """Non-root, no privilege escalation, read-only root, no capabilities (the agent's chown step is the one
    exception, and only CHOWN), RuntimeDefault seccomp, memory-backed scratch space, limits everywhere;
    services and disruption budgets select pods that exist; the serving pods get no egress but DNS."""
    for directory in DIRS:
        objects = render(directory)
        templates = [(o, pod_spec(o)) for o in objects if o["kind"] in WORKLOADS]
        for owner, pod in templates:
            assert pod is not None
            name = owner["metadata"]["name"]
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod.get("automountServiceAccountToken") is False, name
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
                assert sc["capabilities"]["drop"] == ["ALL"], name
                if container["name"] == "socket-dir":
                    assert sc["capabilities"]["add"] == ["CHOWN"] and sc["runAsUser"] == 0
                else:
                    assert "add" not in sc["capabilities"] and sc.get("runAsNonRoot", True), name
                assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
            if owner["metadata"]["name"] != "modelseal-postgres":
                for volume in pod.get("volumes", []):
                    if "emptyDir" in volume:
                        assert volume["emptyDir"]["medium"] == "Memory", f"{name}: {volume['name']} on disk"
            if name in {"modelseal-serve", "modelseal-agent"}:  # Guaranteed QoS: never given swap
                for container in [*pod.get("initContainers", []), *pod["containers"]]:
                    assert container["resources"]["requests"] == container["resources"]["limits"], name
            labels = pod_labels(owner)
            if owner["kind"] != "Job":
                assert owner["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for obj in objects:
            selector = None
            if obj["kind"] == "Service":
                selector = obj["spec"]["selector"]
            elif obj["kind"] in {"PodDisruptionBudget", "NetworkPolicy"}:
                selector = obj["spec"].get("selector", obj["spec"].get("podSelector", {})).get("matchLabels")
            if selector:
                assert any(selector.items() <= pod_labels(o).items() for o, _ in templates), obj["metadata"]["name"]
        for runtime, predictor in kserve_pods(objects):
            assert predictor["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            assert predictor["securityContext"]["runAsNonRoot"] is True
            for container in runtime["spec"]["containers"]:
                sc = container["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
                assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
            assert all(v["emptyDir"]["medium"] == "Memory" for v in runtime["spec"]["volumes"] if "emptyDir" in v)
        policies = [o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "modelseal-serve"]
        for policy in policies:
            egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
            assert egress_ports == {53}


def pod_labels(owner: Obj) -> dict[str, str]:
    labels: dict[str, str] = owner["spec"]["template"]["metadata"]["labels"]
    return labels


def test_production_overlay_runs_replicas_on_transit() -> None:
    objects = by_key(render("overlays/production"))
    deployment = objects[("Deployment", "modelseal-keys", "modelseal-keyserver")]
    assert deployment["spec"]["replicas"] == 3
    assert objects[("PodDisruptionBudget", "modelseal-keys", "modelseal-keyserver")]["spec"]["minAvailable"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert not any("master-key" in v["name"] for v in pod["volumes"]), "a master key file in production"
    config_map = objects[("ConfigMap", "modelseal-keys", "modelseal-keyserver-config")]
    config = tomllib.loads(config_map["data"]["keyserver.toml"])
    assert config["master_key"]["backend"] == "transit"
    dev = by_key(render("overlays/dev"))
    assert dev[("Deployment", "modelseal-keys", "modelseal-keyserver")]["spec"]["replicas"] == 1
    assert ("StatefulSet", "modelseal-keys", "modelseal-postgres") in dev


def test_overlay_images_follow_the_package_version() -> None:
    from modelseal.version import __version__

    for directory in OVERLAYS:
        k = yaml.safe_load((DEPLOY / directory / "kustomization.yaml").read_text())
        (image,) = [i for i in k["images"] if i["name"] == "modelseal"]
        assert image["newTag"] == __version__, f"{directory}: image tag {image['newTag']} is not {__version__}"
        for obj in render(directory):
            for container in pod_containers(obj):
                assert container["image"] != "modelseal", f"{directory}: {obj['metadata']['name']} keeps the bare name"


# --- the probe script against a real server --------------------------------------------------------------


@pytest.mark.slow
def test_probe_script_follows_model_readiness(tmp_path: Path) -> None:
    """probe.py, run as the kubelet runs it, against a real `modelseal serve` with mTLS: live and ready
    while the model is loaded; not ready, naming the model, once it is unloaded; and refused without a
    client certificate (the reason httpGet probes cannot be used)."""
    from tests.serving import ServeProcess, Tls, add_model, export_onnx, small_cnn

    tls = Tls(tmp_path / "tls")
    repo = tmp_path / "models"
    add_model(repo, "tiny", "onnxruntime_onnx", export_onnx(small_cnn(), (3, 16, 16)), (3, 16, 16), 10,
              recipients=None)
    probe_cert, probe_key = tls.client("probe")
    script = DEPLOY / "base" / "serve" / "probe.py"
    server = ServeProcess(repo, tmp_path / "serve.log", tls=tls)  # started at once
    try:
        env = {"MODELSEAL_PROBE_URL": server.base_url, "MODELSEAL_PROBE_CA": tls.ca,
               "MODELSEAL_PROBE_CERT": probe_cert, "MODELSEAL_PROBE_KEY": probe_key}  # fmt: skip

        def probe(what: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(script), what], env={**env, **extra}, capture_output=True,
                                  text=True, timeout=30)  # fmt: skip

        assert probe("live").returncode == 0
        assert probe("ready").returncode == 0, probe("ready").stdout
        assert probe("ready", MODELSEAL_PROBE_MODELS="tiny").returncode == 0
        missing = probe("ready", MODELSEAL_PROBE_MODELS="tiny other")
        assert missing.returncode == 1 and "/v2/models/other/ready: 404" in missing.stdout
        no_cert = probe("live", MODELSEAL_PROBE_CERT="", MODELSEAL_PROBE_KEY="")
        assert no_cert.returncode == 1 and "no answer" in no_cert.stdout
        client = server.http_client(cert=(probe_cert, probe_key))
        client.unload_model("tiny")
        unloaded = probe("ready")
        assert unloaded.returncode == 1 and "model tiny is UNAVAILABLE" in unloaded.stdout, unloaded.stdout
        assert probe("ready", MODELSEAL_PROBE_MODELS="tiny").returncode == 1
        assert probe("live").returncode == 0  # the server itself is fine: liveness does not restart it
    finally:
        server.stop()


@pytest.mark.slow
def test_keyserver_health_answers_a_probe_without_a_client_certificate(tmp_path: Path) -> None:
    """The kubelet's HTTPS probe presents no certificate and checks none: the key service, which asks for
    client certificates without requiring them, answers it (its host API still refuses such a client)."""
    import ssl
    import urllib.error
    import urllib.request

    from modelseal.devstack import KeyServer

    (deployment,) = [o for o in render("base/keyserver") if o["kind"] == "Deployment"]
    path = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"]
    kubelet = ssl.create_default_context()
    kubelet.check_hostname, kubelet.verify_mode = False, ssl.CERT_NONE
    with KeyServer(tmp_path / "ks") as keyserver:
        with urllib.request.urlopen(keyserver.url + path, context=kubelet, timeout=10) as answer:
            assert answer.status == 200 and json.loads(answer.read()) == {"status": "ready"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(keyserver.url + "/v1/keys", context=kubelet, timeout=10)
        assert 400 <= refused.value.code < 500
