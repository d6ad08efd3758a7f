"""``ipc-router check-config`` and ``ipc-router route``: in process through ``main`` and, once each, as a real
``python -m ipc_router.cli`` subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ipc_router.cli import main

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

CONFIG = """\
rules:
- name: gpt
  headers: [{name: x-ai-eg-model, value: gpt-4o-mini}]
  backends: [{name: openai}, {name: azure, weight: 0}]
- name: premium
  headers: [{name: x-tenant, value: premium}]
  backends: [{name: premium-backend}]
- name: llama
  headers: [{type: RegularExpression, name: x-ai-eg-model, value: "llama-.*"}]
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "warning", *args])
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPC_ROUTER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "support"), str(REPO)])
    return subprocess.run(
        [sys.executable, "-m", "ipc_router.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


# --- check-config -------------------------------------------------------------------------------------------------


def test_check_config_ok(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, err = run(capsys, "check-config", str(config))
    assert code == 0
    assert out == f"{config}: ok (3 rules, 3 backends, 2 warnings)\n"
    # envoy-config will need endpoints; the weight-0 backend gets no cluster and needs none
    assert err == (
        f"warning: {config}: rules[0].backends[0]: backend 'openai' of rule 'gpt' has no endpoint: ipc-router "
        "envoy-config needs one to generate its cluster\n"
        f"warning: {config}: rules[1].backends[0]: backend 'premium-backend' of rule 'premium' has no endpoint: "
        "ipc-router envoy-config needs one to generate its cluster\n"
    )


TYPO = """\
rules:
- name: gpt
  header: [{name: x-ai-eg-model, value: gpt-4o-mini}]
  backends: [{name: openai, endpoint: "https://api.openai.com", wieght: 2}]
"""


def test_check_config_names_unknown_keys_with_the_closest_known_one(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(TYPO)
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (0, f"{path}: ok (1 rules, 1 backends, 2 warnings)\n")
    assert err == (
        f"warning: {path}: rules[0].header: unknown key; did you mean 'headers'?\n"
        f"warning: {path}: rules[0].backends[0].wieght: unknown key; did you mean 'weight'?\n"
    )
    code, out, err = run(capsys, "check-config", "--strict", str(path))
    assert (code, out) == (1, "")
    assert err == (
        f"error: {path}: rules[0].header: unknown key; did you mean 'headers'?\n"
        f"error: {path}: rules[0].backends[0].wieght: unknown key; did you mean 'weight'?\n"
    )


def test_check_config_loads_the_server_sections_plugins(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server: {router: 'plugins_for_tests:tenant_router', metrics: 'nosuchmodule:f'}\n")
    code, out, err = run(capsys, "check-config", str(path))
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {path}: server.metrics: plugin 'nosuchmodule:f': module 'nosuchmodule' not found")
    path.write_text("server: {router: 'plugins_for_tests:missing'}\n")
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 1
    assert "server.router: plugin 'plugins_for_tests:missing': module 'plugins_for_tests' has no attribute" in err
    path.write_text("server: {router: 'plugins_for_tests:tenant_router', "
                    "metrics: 'plugins_for_tests:raising_metrics_factory'}\n")  # fmt: skip
    assert run(capsys, "check-config", str(path))[:2] == (0, f"{path}: ok (0 rules, 0 backends, 0 warnings)\n")


def test_check_config_runs_the_router_factory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [*sys.path])
    (tmp_path / "strrouter.py").write_text(
        "class R:\n"
        "    cache_key_headers = 'x-tenant'\n"
        "    def calculate(self, h): return 'r'\n"
        "def factory(default, config): return R()\n"
    )
    path = tmp_path / "c.yaml"
    path.write_text("server: {router: 'strrouter:factory'}\n")
    code, _, err = run(capsys, "check-config", "--app-dir", str(tmp_path), str(path))
    assert code == 1
    assert "server.router: the factory raised TypeError: cache_key_headers of R must be a collection" in err
    sys.modules.pop("strrouter", None)


def test_check_config_empty_file_is_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert run(capsys, "check-config", str(path))[:2] == (0, f"{path}: ok (0 rules, 0 backends, 0 warnings)\n")


BAD_CONFIGS = [
    ("rules:\n- name: a\n  headers: [{name: x, value: y, type: Fuzzy}]\n",
     "rules[0].headers[0].type: unknown match type 'Fuzzy'"),
    ("rules:\n- name: a\n- name: b\n  headers: [{name: x}]\n", "rules[1].headers[0].value: is required"),
    ("rules:\n- name: a\n- name: a\n", "rules[1].name: duplicate rule name 'a' (also rules[0])"),
    ("rules:\n- name: a\n  backends: [{name: b, weight: -1}]\n",
     "rules[0].backends[0].weight: expected an integer >= 0"),
    ("rules:\n- name: a\n  headers: [{name: x, value: '(', type: RegularExpression}]\n",
     "rules[0].headers[0].value: invalid regular expression"),
    ("schema: {name: Gopher}\n", "schema.name: unknown schema 'Gopher'"),
    ("rules: {a: 1}\n", "rules: expected a list, got dict"),
    ("rules: [\n", "invalid YAML at line 2"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "error"), BAD_CONFIGS)
def test_check_config_error_names_the_key_path(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, error: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == 1
    assert out == ""
    assert err.startswith(f"error: {path}: {error}"), err


def test_check_config_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "check-config", str(tmp_path / "nope.yaml"))
    assert code == 1
    assert f"error: {tmp_path / 'nope.yaml'}: cannot read: No such file or directory" in err


def test_check_config_subprocess(config: Path, tmp_path: Path) -> None:
    ok = run_subprocess("check-config", str(config))
    assert (ok.returncode, ok.stdout) == (0, f"{config}: ok (3 rules, 3 backends, 2 warnings)\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n- headers: []\n")
    result = run_subprocess("check-config", str(bad))
    assert result.returncode == 1
    assert result.stderr == f"error: {bad}: rules[0].name: is required\n"


# --- route --------------------------------------------------------------------------------------------------------


def test_route_prints_rule_and_backend(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(config), "--model", "gpt-4o-mini")
    assert code == 0
    assert out == "rule: gpt\nbackend: openai\n"  # azure has weight 0


def test_route_with_headers(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(config), "--model", "nothing", "-H", "X-Tenant:  premium ")
    assert (code, out) == (0, "rule: premium\nbackend: premium-backend\n")
    code, out, _ = run(capsys, "route", "--config", str(config), "-H", "x-tenant: premium", "-H", "x-other: 1")
    assert (code, out) == (0, "rule: premium\nbackend: premium-backend\n")


def test_route_rule_without_backends(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(config), "--model", "llama-3")
    assert (code, out) == (0, "rule: llama\nbackend: -\n")


def test_route_model_header_is_overridden_by_model(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(config), "-H", "x-ai-eg-model: nothing", "--model", "llama-1")
    assert (code, out) == (0, "rule: llama\nbackend: -\n")


def test_route_no_match_exits_1(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(config), "--model", "claude", "-H", "x-tenant: basic")
    assert code == 1
    assert out == "no match: no matching rule found\n"


def test_route_bad_header_exits_2(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "route", "--config", str(config), "-H", "no-colon")
    assert code == 2
    assert "error: bad header 'no-colon'; expected 'name: value'" in err


def test_route_bad_config_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n- name: ''\n")
    code, _, err = run(capsys, "route", "--config", str(path), "--model", "m")
    assert code == 2
    assert f"error: {path}: rules[0].name: must not be empty" in err


def test_route_missing_config_is_the_default_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "route", "--config", str(tmp_path / "nope.yaml"), "--model", "m")
    assert (code, out) == (1, "no match: no matching rule found\n")


def test_route_with_a_router_plugin(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    args = ("route", "--config", str(config), "--router", "plugins_for_tests:tenant_router")
    assert run(capsys, *args, "--model", "x", "-H", "x-tenant: premium")[:2] == (
        0,
        "rule: premium\nbackend: premium-backend\n",
    )
    assert run(capsys, *args, "--model", "gpt-4o-mini")[:2] == (0, "rule: gpt\nbackend: openai\n")


def test_route_with_an_async_router_plugin(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    args = ("route", "--config", str(config), "--router", "plugins_for_tests:sleepy_router")
    assert run(capsys, *args, "--model", "llama-2", "-H", "x-sleep-ms: 5")[:2] == (0, "rule: llama\nbackend: -\n")
    assert run(capsys, *args, "--model", "nothing")[:2] == (1, "no match: no matching rule found\n")


@pytest.mark.parametrize(
    ("spec", "error"),
    [
        ("nosuchmodule:x", "module 'nosuchmodule' not found"),
        ("plugins_for_tests:missing", "module 'plugins_for_tests' has no attribute 'missing'"),
        ("plugins_for_tests:NOT_CALLABLE", "is not callable (it is a int)"),
    ],
)
def test_route_bad_router_plugin_exits_2(
    capsys: pytest.CaptureFixture[str], config: Path, spec: str, error: str
) -> None:
    code, _, err = run(capsys, "route", "--config", str(config), "--router", spec, "--model", "m")
    assert code == 2
    assert error in err


def test_route_subprocess_with_router(config: Path) -> None:
    result = run_subprocess(
        "route", "--config", str(config), "--router", "plugins_for_tests:tenant_router", "-H", "x-tenant: premium"
    )
    assert (result.returncode, result.stdout) == (0, "rule: premium\nbackend: premium-backend\n")
    result = run_subprocess("route", "--config", str(config), "--model", "nothing")
    assert (result.returncode, result.stdout) == (1, "no match: no matching rule found\n")


def test_serve_requires_a_socket(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--socket" in capsys.readouterr().err


def test_envoy_config_llm_paths_and_timeout(tmp_path: Path) -> None:
    import yaml

    config = tmp_path / "c.yaml"
    config.write_text("rules:\n- name: r\n  headers: [{name: x-ai-eg-model, value: m}]\n"
                      "  backends: [{name: b, endpoint: 'http://127.0.0.1:9'}]\n")  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "ipc_router.cli", "envoy-config", "--config", str(config), "--socket", "/tmp/x.sock",
         "--llm-path", "/v1/chat/completions", "--llm-path", "/v1/embeddings", "--route-timeout-ms", "120"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    doc = yaml.safe_load(out.stdout)
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    lua = hcm["http_filters"][0]["typed_config"]["default_source_code"]["inline_string"]
    assert 'llm_paths = {"/v1/chat/completions", "/v1/embeddings"}' in lua
    assert "timeout_ms = 120" in lua


# --- plugins from the working directory (--app-dir) ---------------------------------------------------------------

MY_ROUTER = """\
def factory(default, config):
    class Always:
        def calculate(self, headers):
            return "llama"
    return Always()
"""


def test_route_imports_the_router_from_the_working_directory(config: Path, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "my_router.py").write_text(MY_ROUTER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPC_ROUTER_") and k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "ipc_router.cli", "route", "--config", str(config), "--router", "my_router:factory"]
    ok = subprocess.run([*cmd, "--model", "m"], cwd=app, env=env, capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "rule: llama\nbackend: -\n"), ok.stderr
    elsewhere = subprocess.run([*cmd, "--app-dir", str(app), "--model", "m"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert (elsewhere.returncode, elsewhere.stdout) == (0, "rule: llama\nbackend: -\n"), elsewhere.stderr
    missing = subprocess.run([*cmd, "--model", "m"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2
    err = " ".join(missing.stderr.split())
    assert f"module 'my_router' not found; looked for my_router.py or my_router/__init__.py in {tmp_path} " in err
    assert "pass --app-dir DIR, or add the directory to PYTHONPATH" in err


def test_plugin_not_found_names_the_dotted_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ipc_router.plugins import ROUTERS_GROUP, PluginError, load_plugin

    monkeypatch.setattr(sys, "path", [*sys.path])
    with pytest.raises(PluginError) as info:
        load_plugin("pkg.sub:f", ROUTERS_GROUP, app_dir=str(tmp_path))
    assert f"looked for {os.path.join('pkg', 'sub')}.py or {os.path.join('pkg', 'sub', '__init__.py')} in " \
        f"{tmp_path} (--app-dir), then the Python path (" in str(info.value)  # fmt: skip
    assert sys.path[0] == str(tmp_path)
    load_plugin("plugins_for_tests:tenant_router", ROUTERS_GROUP, app_dir=str(tmp_path))
    assert sys.path.count(str(tmp_path)) == 1  # added once
    sys.path.append(str(tmp_path / "later"))
    load_plugin("plugins_for_tests:tenant_router", ROUTERS_GROUP, app_dir=str(tmp_path / "later"))
    assert sys.path[0] == str(tmp_path / "later") and sys.path.count(str(tmp_path / "later")) == 1  # moved first


# --- help -----------------------------------------------------------------------------------------------------------


def _help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit):
        main([*args, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_shows_the_socket_mode_in_octal(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(capsys, "serve")
    assert "--socket-mode OCTAL permissions of the socket file, octal (default: 0660)" in out
    assert "(default: 432)" not in out
    assert "--app-dir APP_DIR directory searched first for --router/--metrics modules" in out


def test_serve_help_shows_a_socket_mode_from_the_environment_in_octal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IPC_ROUTER_SOCKET_MODE", "600")
    assert "(default: 0600)" in _help(capsys, "serve")


def test_envoy_config_help_shows_its_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(capsys, "envoy-config")
    assert "--listen LISTEN HOST:PORT for client traffic (default: 127.0.0.1:10000)" in out
    assert "--admin ADMIN HOST:PORT for Envoy's admin interface (default: none, no admin interface)" in out
    assert "(default: fail_closed)" in out and "(default: 250)" in out
    assert "(default: None)" not in out


def test_check_config_counts_token_budgets_and_refuses_a_bad_cel_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "budgets.yaml"
    costs = "llmRequestCosts: [{metadataKey: t, type: TotalToken}, {metadataKey: w, type: CEL, cel: 'total_tokens*%s'}]"
    budgets = "tokenBudgets: [{name: u, cost: w, headers: [x-user-id], limit: 10}]"
    path.write_text(costs % "2" + "\n" + budgets + "\n")
    ok = f"{path}: ok (0 rules, 0 backends, 1 token budgets, 0 warnings)\n"
    assert run(capsys, "check-config", str(path))[:2] == (0, ok)
    path.write_text(costs % "2u" + "\n" + budgets + "\n")
    code, _, err = run(capsys, "check-config", str(path))
    assert code == 1 and "llmRequestCosts[1].cel" in err and "write 3, not 3u" in err
