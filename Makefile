# Quick start: `make run` serves serve_config.yaml on 127.0.0.1:8000; `make test` runs the suite.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on CPU machines
TORCH  ?= torch==2.13.0
export RAY_AUTH_MODE ?= disabled

.PHONY: run test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -c "import torch, ray, transformers, openai, fastapi"
	touch $(STAMP)

run: $(STAMP)
	mkdir -p data  # the store's SQLite file (store.url in serve_config.yaml)
	$(VENV)/bin/conduit run serve_config.yaml

# Each in a pytest process of its own, after the rest (known issue, not yet understood): in one session
# with the other e2e modules, earlier runs saw the metrics tests miss series in Ray's export and pytest
# killed during the multinode test; the latest one-session run (all of tests/) had only
# test_prometheus.py fail, its Prometheus never seeing both scrape targets up within 60 s.
ISOLATED := tests/e2e/test_metrics.py tests/e2e/test_prometheus.py tests/e2e/test_multinode.py

# tests/e2e/test_prometheus.py scrapes Conduit with a real Prometheus (Debian's package)
PROMETHEUS := $(shell command -v prometheus)
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# tests/pg_server.py starts a real PostgreSQL server (Debian's package) for the store's tests
POSTGRES   := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))

# --durations: the slowest tests in CI's log, to keep the suite's time in view
test: $(STAMP)
ifeq ($(PROMETHEUS),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus
endif
ifeq ($(POSTGRES),)
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends postgresql
endif
	$(PY) -m pytest -q --durations=40 tests $(ISOLATED:%=--ignore=%)
	$(foreach t,$(ISOLATED),$(PY) -m pytest -q --durations=5 $(t) &&) true

clean:
	rm -rf $(VENV) .cache
