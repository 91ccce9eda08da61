# The two commands of the README: `make demo` (the main job) and `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUNS ?= runs
GLOVE_INDEX := $(RUNS)/glove-50

.PHONY: install demo test

install:
	$(PIP) install -q -e ".[test]"

# Build the GloVe-50 index once, then measure recall vs QPS against faiss.
demo: install
	test -f $(GLOVE_INDEX)/manifest.json || $(PYTHON) -m chameleon index build --dataset glove-50 \
		--out $(GLOVE_INDEX) --nlist 1024 --m 25
	$(PYTHON) -m chameleon bench recall --dataset glove-50 --index $(GLOVE_INDEX) \
		--engines numba,faiss-ivfpq,faiss-fastscan --nprobe 1,2,4,8,16,32,64 --threads 1,2 \
		--json $(RUNS)/glove-50-recall.json --plot $(RUNS)/glove-50-recall.png

test: install
	$(PYTHON) -m pytest -q
