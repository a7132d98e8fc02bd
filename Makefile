# Two commands matter: `make run` and `make test`. Each builds .venv from the pyproject files first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: venv test lint tools run demo bench bench-optim bench-concurrency bench-push bench-hot bench-client openapi clean

venv: $(STAMP)

$(STAMP): service/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e "service[test]" -e "clients/python[demo]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

run: $(STAMP)
	$(BIN)/optserve serve --host $(HOST) --port $(PORT)

# SGDM vs Adam vs RMSProp vs AdaGrad trained through the service, 4 worker processes each;
# starts its own server, writes examples/results/. make demo DEMO_ARGS="--sparse --mode sync"
DEMO_ARGS ?=
demo: $(STAMP)
	$(BIN)/python examples/compare_optimizers.py $(DEMO_ARGS)

# The JS and Go clients' tests run inside pytest against a real server; they need node and go.
# tests/test_deploy_topology.py runs docker-compose.yml's topology from processes behind Debian's
# nginx (no Docker engine here).
tools:
	@command -v node >/dev/null 2>&1 || echo "node not found: the JS client tests will be skipped"
	@command -v go >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq golang-go >/dev/null) \
		|| echo "go could not be installed: the Go client tests will be skipped"
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx \
		|| (apt-get update -qq && apt-get install -y -qq nginx >/dev/null) \
		|| echo "nginx could not be installed: the compose-topology tests will be skipped"

test: lint tools
	$(BIN)/python -m pytest

# Regenerate the committed API contract after changing a route (a test fails until you do).
openapi: $(STAMP)
	$(BIN)/optserve openapi --output clients/openapi.json

# Benchmarks are not tests: they write BENCHMARKS.md. Run them on an otherwise idle machine.
bench: bench-optim bench-concurrency bench-push bench-hot bench-client

bench-optim: $(STAMP)
	$(BIN)/python bench/optim_bench.py --write BENCHMARKS.md

bench-concurrency: $(STAMP)
	$(BIN)/python bench/concurrency_bench.py --write BENCHMARKS.md

bench-push: $(STAMP)
	$(BIN)/python bench/push_bench.py --write BENCHMARKS.md

bench-hot: $(STAMP)
	$(BIN)/python bench/hot_bench.py --write BENCHMARKS.md

bench-client: $(STAMP)
	$(BIN)/python bench/client_bench.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
