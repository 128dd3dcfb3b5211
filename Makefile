# Lookalike: `make demo` and `make test` work on a fresh Debian machine (as root, as CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATASETS ?= ../shared/datasets
FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= var/demo

.PHONY: setup test demo bench protos clean

setup: $(STAMP) $(FASHION_MNIST)/train-images-idx3-ubyte.gz

# One install step for everything: the package with every extra plus the test tools.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian, so a fresh machine has a real catalogue without downloads.
$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null; \
	else \
	  sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi

test: setup
	$(PY) -m pytest -q -ra

demo: setup
	$(PY) -m clients.cli demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

bench: setup
	$(PY) -m clients.cli bench embedder --workdir $(DEMO_DIR) $(BENCH_ARGS)
	$(PY) -m clients.cli bench searcher $(BENCH_ARGS)

# Regenerates the checked-in stubs (tests/test_protos.py fails when they are stale).
protos: $(STAMP)
	PATH=$(VENV)/bin:$$PATH scripts/generate_protos.sh

clean:
	rm -rf $(VENV) var build *.egg-info
