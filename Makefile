# make install: create .venv and install the pinned requirements (idempotent, fast when done)
# make test:    run the test suite in .venv
# make demo:    the main job on the bundled dataset (see README)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-sampling bench-fidelity bench-memory bench-training clean

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

clean:
	rm -rf checkpoint/demo
