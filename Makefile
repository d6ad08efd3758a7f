# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench e2e-bench clean

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

bench: $(STAMP)
	$(BIN)/pytest -q bench --benchmark-enable --benchmark-only

e2e-bench: $(STAMP)
	$(BIN)/python bench/e2e_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
