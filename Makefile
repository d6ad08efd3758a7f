# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench bench-smoke bench-peers e2e-bench fuzz soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check ipc_router tests bench examples deploy
	@if command -v luacheck >/dev/null 2>&1; then \
		luacheck --no-color --config ipc_router/lua/.luacheckrc ipc_router/lua/; \
	else \
		echo "luacheck not installed (apt-get install lua-check); Lua lint SKIPPED"; \
	fi

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q -m 'not envoy'

# bench-smoke first, so that pytest's summary stays the last line of the output.
test: lint typecheck bench-smoke $(STAMP)
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

# The benchmark suite (bench/README.md). `make bench` is the full, manual run (~10 min, installs the peers into
# their own venvs under bench/peers/); `make bench-smoke` runs every part briefly and checks it, inside `make test`.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench-peers:
	PYTHON=$(PYTHON) bash bench/peers/install.sh

bench: $(BENCH_STAMP) bench-peers
	mkdir -p bench/results
	$(BIN)/pytest -q bench --benchmark-enable --benchmark-only --benchmark-json=bench/results/micro.json
	$(BIN)/python bench/route_throughput.py --json > bench/results/sidecar.json
	$(BIN)/python -m bench.e2e.suite $(ARGS)

bench-smoke: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider bench
	$(BIN)/python bench/route_throughput.py --seconds 0.5 --latency-requests 500 --json >/dev/null
	$(BIN)/python -m bench.e2e.suite --smoke

e2e-bench: $(STAMP)
	$(BIN)/python bench/e2e_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
