# make install: create .venv and install the pinned requirements (idempotent, fast when done)
# make test:    run the test suite in .venv
# make demo:    the main job on the bundled dataset (see README)
# make bench-peer-env: the optional .venv-peer with scvi-tools for benchmarks/bench_peer.sh (docs/peer_baseline.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-sampling bench-fidelity bench-memory bench-training bench-peer-env clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	bash scripts/demo.sh

bench-sampling: $(STAMP)
	$(PY) benchmarks/bench_sampling.py

bench-fidelity: $(STAMP)
	PY=$(PY) bash benchmarks/bench_fidelity.sh

bench-memory: $(STAMP)
	$(PY) benchmarks/bench_memory.py --sizes 20000 200000

bench-training: $(STAMP)
	$(PY) benchmarks/bench_training.py --threads 1 --quality_steps 300

# the scVI peer baseline's own environment (not needed by test or demo): the project's pins plus scvi-tools
PEER_VENV := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

bench-peer-env: $(PEER_STAMP)

$(PEER_STAMP): requirements.txt benchmarks/requirements-peer.txt pyproject.toml
	test -x $(PEER_VENV)/bin/python || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt -r benchmarks/requirements-peer.txt
	$(PEER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(PEER_STAMP)

clean:
	rm -rf checkpoint/demo
