# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench e2e-bench fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ipc_router tests bench examples
	@if command -v luacheck >/dev/null 2>&1; then \
		luacheck --no-color --config ipc_router/lua/.luacheckrc ipc_router/lua/; \
	else \
		echo "luacheck not installed (apt-get install lua-check); Lua lint SKIPPED"; \
	fi

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m 'not envoy'

test: lint typecheck $(STAMP)
	$(BIN)/pytest -q

# Fuzzing (docs/reliability.md): the seeded mutation fuzzer (sans-IO and a real sidecar over its socket), then
# atheris (coverage-guided libFuzzer) when it installs. `make test` runs a short seeded version (tests/test_fuzz.py).
FUZZ_INPUTS        ?= 1000000
FUZZ_SOCKET_INPUTS ?= 20000
FUZZ_ATHERIS_RUNS  ?= 100000
# Ten minutes of steady traffic with reloads through a real Envoy and sidecar; prints the figures, exit 1 on a problem.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	$(BIN)/python -m tests.support.soak --seconds $(SOAK_SECONDS)

fuzz: $(STAMP)
	$(BIN)/python tests/support/fuzz_harness.py --inputs $(FUZZ_INPUTS) --socket-inputs $(FUZZ_SOCKET_INPUTS)
	@if $(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/python -m pip install -q atheris; then \
		$(BIN)/python tests/support/fuzz_harness.py --atheris -runs=$(FUZZ_ATHERIS_RUNS) -timeout=2 -max_len=8192 \
			-rss_limit_mb=2048 -artifact_prefix=/tmp/ipc-router-fuzz- -print_final_stats=1; \
	else \
		echo "atheris does not install here: seeded generator only"; \
	fi

bench: $(STAMP)
	$(BIN)/pytest -q bench --benchmark-enable --benchmark-only

e2e-bench: $(STAMP)
	$(BIN)/python bench/e2e_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
