# Lookalike: `make demo` and `make test` work on a fresh Debian machine (as root, as CI runs).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
POSTGRES_BIN := /usr/lib/postgresql/15/bin
DEMO_DIR ?= var/demo
CHROMEDRIVER := /usr/bin/chromedriver

.PHONY: setup test demo web bench protos lock clean check-extras

# apt-get install as root, or through sudo; the package lists are fetched first when they lack a package.
define apt_install
@if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
  ($$sudo apt-get install -y -qq $(1) || ($$sudo apt-get update -qq && $$sudo apt-get install -y -qq $(1))) >/dev/null
endef

setup: $(STAMP) $(FASHION_MNIST)/train-images-idx3-ubyte.gz $(POSTGRES_BIN)/initdb $(CHROMEDRIVER)

# What building the venv needs: venv and ensurepip, the Python headers and a C++ compiler (hnswlib is
# compiled from its sdist). Debian's python3 has neither of the first two until python3-venv and python3-dev.
BUILD_TOOLS := $(VENV)/.build-tools
HAS_BUILD_TOOLS := import ensurepip, os, sys, sysconfig; \
  sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))
$(BUILD_TOOLS):
	@$(PYTHON) -c "$(HAS_BUILD_TOOLS)" 2>/dev/null && command -v g++ >/dev/null || \
	  $(MAKE) --no-print-directory apt-build-tools
	@mkdir -p $(VENV) && touch $@

.PHONY: apt-build-tools
apt-build-tools:
	$(call apt_install,python3-venv python3-dev g++)

# The folders pyproject.toml maps onto lookalike.*: adding or removing a module changes the folder.
PACKAGE_DIRS := $(addsuffix /,protos/lookalike protos/lookalike/v1 serving quality clients embedder searcher exporter tools web)

# One install step for everything: the package with every extra plus the test tools, at the versions
# requirements.lock pins (pyproject.toml declares ranges; the lock is what we test and ship). Strict
# editable mode lays lookalike.* out as one tree of links under build/, so tools that walk a package's
# folder (lint-imports) see the whole package; it links files, so a module added or removed in a
# package folder re-runs this step.
# hnswlib is built first, from its sdist with a smaller lock table (third_party/hnswlib/build_wheel.py says why).
$(STAMP): pyproject.toml requirements.lock $(PACKAGE_DIRS) third_party/hnswlib/build_wheel.py | $(BUILD_TOOLS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	wheel=$$($(PY) third_party/hnswlib/build_wheel.py $(VENV)/wheels) && \
	  $(PY) -m pip install --quiet --constraint requirements.lock "$$wheel" -e '.[all,dev]' --config-settings editable_mode=strict
	touch $(STAMP)

# Re-resolves requirements.lock from pyproject.toml's ranges (newest versions that fit).
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links --unsafe-package lookalike \
	  --extra serving --extra embedder --extra searcher --extra exporter --extra web --extra dev -o requirements.lock pyproject.toml

# Fashion-MNIST comes from Debian, so a fresh machine has a real catalogue without downloads.
$(FASHION_MNIST)/train-images-idx3-ubyte.gz:
	$(call apt_install,dataset-fashion-mnist)

# PostgreSQL from Debian (bookworm ships 15), so tests and benchmarks can start a real throwaway server (tools/postgres.py).
# The package may also create and start a default cluster; the tests never use it.
$(POSTGRES_BIN)/initdb:
	$(call apt_install,postgresql)

# Chromium and its driver from Debian, so the web demo's browser test drives a real browser without
# downloading one (chromium-driver brings /usr/bin/chromedriver and depends on chromium).
$(CHROMEDRIVER):
	$(call apt_install,chromium chromium-driver)

# The extras check first, so pytest's summary is the run's last word.
test: setup check-extras
	$(PY) -m pytest -q -ra

demo: setup
	$(PY) -m lookalike.tools.cli demo --workdir $(DEMO_DIR) $(DEMO_ARGS)

# The web demo: starts both services on the demo's model and index (built on the first run), then the
# page, and prints its URL. WEB_ARGS passes options, e.g. WEB_ARGS="--port 8600".
web: setup
	$(PY) -m lookalike.tools.cli web --workdir $(DEMO_DIR) $(WEB_ARGS)

bench: setup
	$(PY) -m lookalike.tools.cli bench embedder --workdir $(DEMO_DIR) $(BENCH_ARGS)
	$(PY) -m lookalike.tools.cli bench searcher $(BENCH_ARGS)
	$(PY) -m lookalike.tools.cli bench photo --workdir $(DEMO_DIR) $(BENCH_ARGS)

# Regenerates the checked-in stubs (tests/test_protos.py fails when they are stale).
protos: $(STAMP)
	PATH=$(VENV)/bin:$$PATH scripts/generate_protos.sh

# Each extra alone in a fresh virtualenv, its entry point doing real work (needs network for pip).
check-extras: $(STAMP)
	PYTHON=$(PYTHON) scripts/check_extras.sh

clean:
	rm -rf $(VENV) var build *.egg-info
