# Each target creates the virtual environment it needs: .venv (the project with its server
# extra and dev tools) for tests, lint and benchmarks; .venv-serve (the project with its server
# extra, no dev tools) for `make serve`. The base distribution alone is the light client. torch
# $(TORCH_VERSION) is installed first where no torch is present (scripts/install-torch.sh): the
# CPU build on a machine without an NVIDIA GPU, so a plain `torch` requirement never pulls the
# multi-GB CUDA build by surprise.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SERVE_VENV ?= .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed

.PHONY: venv serve-venv test lint serve demo proto settings-doc bench clean gpu-bundle

venv: $(STAMP)

serve-venv: $(SERVE_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	sh scripts/install-torch.sh $(BIN)/python $(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e ".[server,dev]"
	touch $(STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --upgrade pip
	sh scripts/install-torch.sh $(SERVE_VENV)/bin/python $(TORCH_VERSION)
	$(SERVE_VENV)/bin/python -m pip install --quiet -e ".[server]"
	touch $(SERVE_STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model moderation
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy model moderation
	$(BIN)/lint-imports

# The main job: the gRPC server (demo checkpoint unless MODERATION_MODEL or ARGS=--model DIR).
serve: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/moderation serve $(ARGS)

demo: $(SERVE_STAMP)
	$(SERVE_VENV)/bin/python -m model.demo demo-model

# Wheels bench/gpu_check.sh brings to a GPU image that has only torch and cannot download
# (CPython 3.12, manylinux x86-64; under 64 MiB; git-ignored): see bench/gpu_bundle.py.
gpu-bundle: $(STAMP)
	$(BIN)/python bench/gpu_bundle.py build gpu-bundle

proto: $(STAMP)
	$(BIN)/python protos/generate.py

# The README's settings reference, from the declarations (tests/test_settings_doc.py checks it).
settings-doc: $(STAMP)
	$(BIN)/python -m moderation.serving.settings_doc README.md

bench: $(STAMP)
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/classifier_bench.py
	$(BIN)/python bench/service_bench.py
	$(BIN)/python bench/batch_bench.py
	$(BIN)/python bench/flex_bench.py --models 60m

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
