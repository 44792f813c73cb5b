# The two set-up commands: `make demo` and `make test`. Each creates .venv if missing and installs
# everything (the Debian Fashion-MNIST package too, where apt-get is allowed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deepfeat-installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test test-server test-all lint typecheck check data venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip

# pip -qq: errors only (with extra indexes, -q still prints a WARNING for each index that lacks a package)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -qq -e ".[dev,serve,bulk,ray]"
	touch $(STAMP)

venv: $(STAMP)

# Debian packages: Fashion-MNIST (real labelled images, offline) and Chromium + its driver (the search
# page's browser test). Skipped with a hint where apt is not allowed; the tests that need them then skip.
APT_PACKAGES := dataset-fashion-mnist chromium chromium-driver
data:
	@if [ ! -f $(FMNIST) ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES) >/dev/null) \
	      || echo "note: apt-get install $(APT_PACKAGES) failed; tests that need them will skip"; \
	  else echo "note: run 'sudo apt-get install $(APT_PACKAGES)' for the real-data demo and browser tests"; fi; \
	fi

demo: $(STAMP) data
	$(BIN)/deepfeat quickstart

test: $(STAMP) data
	$(BIN)/python -m pytest -q --timeout=900

# The server tests (-m server): a real standalone Milvus from PyPI 'milvus' (its own server binary), in a venv of
# its own so that its pins never meet deepfeat's; the test session starts and stops it (tests/connectors/test_connector_server.py).
MILVUS_VENV := .venv-milvus
MILVUS_SERVER := milvus==2.3.5
MILVUS_STAMP := $(MILVUS_VENV)/.milvus-installed

$(MILVUS_STAMP):
	$(PY) -m venv $(MILVUS_VENV)
	$(MILVUS_VENV)/bin/pip install -qq $(MILVUS_SERVER)
	touch $(MILVUS_STAMP)

test-server: $(STAMP) $(MILVUS_STAMP)
	DEEPFEAT_MILVUS_SERVER_PYTHON=$(MILVUS_VENV)/bin/python $(BIN)/python -m pytest -q -m server --timeout=900

test-all: $(STAMP) data $(MILVUS_STAMP)
	DEEPFEAT_MILVUS_SERVER_PYTHON=$(MILVUS_VENV)/bin/python $(BIN)/python -m pytest -q -m "" --timeout=3600

lint: $(STAMP)
	$(BIN)/ruff check finetune connectors recipes tests benchmarks
	$(BIN)/ruff format --check finetune connectors recipes tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy finetune connectors recipes

check: lint typecheck test

clean:
	rm -rf $(VENV) $(MILVUS_VENV) *.egg-info build dist
