# One entry point for people and CI. `make test` and `make demo` build the environment first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= beam,aws,dask,kfp,dev
DEMO_OUTPUT ?= demo-output
# What `make bench` runs, each printing its ratios and the CPU (gpu_check.sh is for a GPU
# machine; bench_strategies_input_term.py is an experiment over a demo output).
BENCHMARKS ?= bench_method.py bench_precision.py bench_pipeline.py bench_dask.py bench_evaluate.py bench_startup.py

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
	for b in $(BENCHMARKS); do $(BIN)/python benchmarks/$$b || exit 1; done

compile: env
	$(BIN)/fullgrad compile --output .

clean:
	rm -rf $(VENV) $(DEMO_OUTPUT) .pytest_cache .ruff_cache
