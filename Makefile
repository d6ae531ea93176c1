# Each target creates the virtual environment it needs. torch 2.13.0 is installed first where
# no torch is present, so a plain `torch` requirement never pulls a multi-GB build by surprise.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint serve demo proto bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy model moderation
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true
	$(BIN)/mypy model moderation
	$(BIN)/lint-imports

# The main job: the gRPC server (demo checkpoint unless MODERATION_MODEL or ARGS=--model DIR).
serve: $(STAMP)
	$(BIN)/moderation serve $(ARGS)

demo: $(STAMP)
	$(BIN)/python -m model.demo demo-model

proto: $(STAMP)
	$(BIN)/python protos/generate.py

bench: $(STAMP)
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/classifier_bench.py
	$(BIN)/python bench/service_bench.py
	$(BIN)/python bench/batch_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
