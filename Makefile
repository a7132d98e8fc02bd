# Two commands matter: `make run` and `make test`. Each builds .venv from the pyproject files first.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: venv test lint run bench bench-optim bench-concurrency clean

venv: $(STAMP)

$(STAMP): service/pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e "service[test]" -e "clients/python"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

run: $(STAMP)
	$(BIN)/optserve serve --host $(HOST) --port $(PORT)

test: lint
	$(BIN)/python -m pytest

# Benchmarks are not tests: they write BENCHMARKS.md. Run them on an otherwise idle machine.
bench: bench-optim bench-concurrency

bench-optim: $(STAMP)
	$(BIN)/python bench/optim_bench.py --write BENCHMARKS.md

bench-concurrency: $(STAMP)
	$(BIN)/python bench/concurrency_bench.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
