# The two set-up commands: `make demo` and `make test`. Each creates .venv if missing and installs
# everything (the Debian Fashion-MNIST package too, where apt-get is allowed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepfeat-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test test-all lint typecheck check data venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,serve]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST from Debian (real labelled images, offline). Skipped with a hint where apt is not allowed.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) \
	      || echo "note: apt-get install dataset-fashion-mnist failed; tests that need it will skip"; \
	  else echo "note: run 'sudo apt-get install dataset-fashion-mnist' for the real-data demo"; fi; \
	fi

demo: $(STAMP) data
	$(BIN)/deepfeat quickstart

test: $(STAMP) data
	$(BIN)/python -m pytest -q -x --timeout=900

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q -m "" --timeout=3600

lint: $(STAMP)
	$(BIN)/ruff check finetune connectors recipes tests benchmarks
	$(BIN)/ruff format --check finetune connectors recipes tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy finetune connectors recipes

check: lint typecheck test

clean:
	rm -rf $(VENV) *.egg-info build dist
