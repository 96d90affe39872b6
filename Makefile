# The two commands: `make demo` (the main job: train, register, evaluate, promote) and `make test` (lint + the test suite).
# Each sets itself up: creates .venv and installs the project with pinned versions the first time,
# and does nothing more while pyproject.toml and constraints.txt are unchanged.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint format docs install clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	# torch first and alone: 2.13.0 resolves to the CPU build on these machines (no CUDA download).
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

data/digits/metadata.json: $(STAMP)
	$(BIN)/advtrain data prepare digits --out data/digits

# DEMO_SET: extra overrides for the demo's training, e.g. a deliberately weaker run that promotion
# should refuse: make demo DEMO_SET="--set run.epochs=8"
DEMO_SET ?=

demo: $(STAMP) data/digits/metadata.json
	$(BIN)/advtrain train --config jobs/configs/digits_demo.toml $(DEMO_SET)
	$(BIN)/advtrain evaluate --model models:/digits-linf@challenger --protocol standard
	@# A refused promotion (exit 1, every failed gate printed) is a normal outcome of the demo; bad input
	@# (2) or a bug (3) is not, and fails the demo.
	$(BIN)/advtrain promote --name digits-linf --version challenger --policy jobs/configs/promotion.toml; \
		code=$$?; if [ $$code -eq 1 ]; then echo "(the new version was not promoted: see the failed gates above)"; \
		elif [ $$code -ne 0 ]; then exit $$code; fi
	$(BIN)/advtrain models list digits-linf

# The GPU path end to end on one CUDA device, under 8 minutes: environment, every method and attack on the
# device, 2 DDP ranks on one GPU, Ray Train + evaluation, throughput, the gpu tests (docs/gpu.md). Figures
# go to benchmarks/results/gpu/. GPU_CHECK_ARGS=--cpu runs the parts that need no CUDA here and writes to
# benchmarks/results/gpu/cpu/; --skip-ray leaves out the Ray part.
GPU_CHECK_ARGS ?=

gpu-check: $(STAMP) data/digits/metadata.json
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

# The inner loop: in-process tests only (no Ray, no MLflow server).
test-unit: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

# docs/configuration.md, generated from the config models' field descriptions (tests/unit/test_config_docs.py
# fails while it is stale).
docs: $(STAMP)
	$(BIN)/python -m pipeline.config_docs

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) data runs mlruns
