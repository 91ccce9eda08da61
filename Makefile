# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUNS ?= runs

.PHONY: install demo test

install:
	$(PIP) install -q -e ".[test]"

# Build the GloVe-50 index once, then measure recall vs QPS against faiss.
demo: install
	RUNS=$(RUNS) PYTHON=$(PYTHON) bash benchmarks/recall_glove.sh

test: install
	$(PYTHON) -m pytest -q
