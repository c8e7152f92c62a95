# Every target sets up (or refreshes) the virtual environment first, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

.PHONY: env test lint slurm demo bench experiment

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,mds,experiments]'
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps mosaicml-streaming
	rm -f $(VENV)/.installed-* && touch $@

lint: env
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Debian's slurm-wlm and munge, for the tests that run the sbatch scripts on a two-node SLURM cluster started on
# this machine (tests/slurm/). Installed with apt where this runs as root; elsewhere those tests are skipped,
# saying why, except in CI (CI=true), where a missing cluster fails the run.
SLURM_TOOLS := sbatch slurmctld slurmd munged
slurm:
	@missing=; for tool in $(SLURM_TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    slurm-wlm munge >/dev/null; \
	elif [ "$$CI" = true ]; then echo "make slurm:$$missing missing; CI needs root and apt-get to install them" >&2; exit 1; \
	else echo "make slurm:$$missing missing, not root or no apt-get: the SLURM cluster tests will be skipped" >&2; fi

test: lint slurm
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
