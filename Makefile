# Every target sets up (or refreshes) the virtual environment first, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: env test lint demo bench experiment

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,mds,experiments]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps mosaicml-streaming
	rm -f $(VENV)/.installed-* && touch $@

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	DS_ACCELERATOR=cpu $(PY) -m pytest -q

demo: env
	DS_ACCELERATOR=cpu $(PY) launch/demo.py

# The CPU benchmark of the small DiT, the memory plans of DiT-XL/2 and SD1.5 + ControlNet on 8 x 80 GB,
# and the plan checked against the tracked peak of a real CPU training run.
bench: env
	DS_ACCELERATOR=cpu $(PY) launch/benchmark.py --out runs/bench.json
	DS_ACCELERATOR=cpu $(PY) launch/benchmark.py --plan --out runs/bench_plan.json
	DS_ACCELERATOR=cpu $(PY) launch/benchmark.py --check_plan

# The digits experiment (docs/results.md): the extra that ships the data set, then every job in one process.
experiment: env
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[experiments]'
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) launch/experiment_digits.py
