"""Where each serve setting comes from: flag > environment > the config file's server: section > default."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ipc_router import cli, settings
from ipc_router.config import ServerSettings
from ipc_router.settings import FROM_CONFIG, Settings, resolve


def serve(argv: list[str]) -> Settings:
    args = cli.build_parser().parse_args(["serve", "--socket", "/tmp/s.sock", *argv])
    resolved, _ = cli.serve_settings(args)
    return resolved


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for f in dataclasses.fields(Settings):
        monkeypatch.delenv(settings.env_var(f.name), raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("server: {router: 'conf:r', metrics: 'conf:m', metricsRequestHeaderAttributes: 'x-c:c'}\n")
    return path


def test_flag_over_environment_over_config_over_default(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve([]).router is None  # default
    assert serve(["--config", str(config)]).router == "conf:r"  # the config's server: section
    monkeypatch.setenv("IPC_ROUTER_ROUTER", "env:r")
    assert serve(["--config", str(config)]).router == "env:r"  # the environment over the config
    assert serve(["--config", str(config), "--router", "flag:r"]).router == "flag:r"  # the flag over both
    monkeypatch.delenv("IPC_ROUTER_ROUTER")
    assert serve(["--config", str(config), "--router", "flag:r"]).router == "flag:r"  # the flag over the config


def test_every_field_the_config_may_give(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = serve(["--config", str(config)])
    assert (got.router, got.metrics, got.metrics_request_header_attributes) == ("conf:r", "conf:m", "x-c:c")
    monkeypatch.setenv("IPC_ROUTER_METRICS_REQUEST_HEADER_ATTRIBUTES", "x-e:e")
    got = serve(["--config", str(config), "--metrics", "flag:m"])
    assert (got.router, got.metrics, got.metrics_request_header_attributes) == ("conf:r", "flag:m", "x-e:e")
    assert set(FROM_CONFIG) == {"router", "metrics", "metrics_request_header_attributes"}


def test_the_config_file_is_named_by_flag_or_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPC_ROUTER_CONFIG", str(config))
    assert serve([]).router == "conf:r"  # the environment names the config, whose section applies
    assert serve(["--config", str(config.parent / "missing.yaml")]).router is None  # the flag names another


def test_settings_the_config_cannot_give(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve([]).cache_size == Settings.cache_size == 4096
    monkeypatch.setenv("IPC_ROUTER_CACHE_SIZE", "7")
    assert serve([]).cache_size == 7
    assert serve(["--cache-size", "9"]).cache_size == 9
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")
    assert serve([]).otlp_endpoint == "http://otel:4318"
    monkeypatch.setenv("IPC_ROUTER_OTLP_ENDPOINT", "http://ours:4318")
    assert serve([]).otlp_endpoint == "http://ours:4318"
    monkeypatch.setenv("IPC_ROUTER_SHM", "off")
    assert serve([]).shm is False
    assert serve(["--shm"]).shm is True


def test_resolve_fills_only_what_is_unset() -> None:
    server = ServerSettings(router="conf:r", metrics="conf:m")
    got = resolve({"socket": "s", "router": "", "metrics": "flag:m"}, server)
    assert (got.router, got.metrics, got.metrics_request_header_attributes) == ("conf:r", "flag:m", None)


def test_the_config_file_is_read_once(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str | None] = []
    real = cli.read_config

    def counting(path: str | None):  # type: ignore[no-untyped-def]
        reads.append(path)
        return real(path)

    monkeypatch.setattr(cli, "read_config", counting)
    _, cfg = cli.serve_settings(cli.build_parser().parse_args(["serve", "--socket", "s", "--config", str(config)]))
    assert reads == [str(config)] and cfg.server.router == "conf:r"
