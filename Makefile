# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slmops-installed
# torch comes in through olive-ai; pin the CPU build first, or pip pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml devkit/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The demo and test kit: beside the package in this environment, never inside its wheel.
	$(BIN)/pip install -q --no-deps -e devkit
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/slmops-demo

# Two workers; --dist loadfile keeps each test file (and its module fixtures) on one worker.
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .slmops mlflow.db mlruns mlartifacts
