# One entry point for people and CI. `make test` and `make demo` build the environment first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= beam,aws,dask,kfp,dev
DEMO_OUTPUT ?= demo-output

.PHONY: env test lint demo bench compile clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

env: $(BIN)/.installed

lint: env
	$(BIN)/ruff check .

test: env lint
	$(BIN)/python -m pytest -m "not applications"

demo: env
	$(BIN)/fullgrad demo --output $(DEMO_OUTPUT)

bench: env
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

compile: env
	$(BIN)/fullgrad compile --output .

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT) .pytest_cache .ruff_cache
