# Two commands do all the set-up on a fresh machine (see README):
#   make demo   create the environment if missing, train and evaluate the tiny model on the digits data
#   make test   create the environment if missing, run the test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled ops (DeepSpeed's CPU Adam, our Bi-WKV extension) are cached here between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1
# The environment's tools first (ninja above all: the compiled-op cache is only reused by the same ninja).
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: env sysdeps demo test lock clean

env: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision first: the pinned CUDA 13 builds come from local disk on CI machines.
	$(PY) -m pip install --quiet --no-compile -c constraints.txt torch torchvision
	$(PY) -m pip install --quiet --no-compile -c constraints.txt -e '.[dev]'
	# Byte-compiled here, on every core (pip compiles on one), never on first import: these machines set
	# PYTHONDONTWRITEBYTECODE=1, so each process would compile its imports again (a fresh-clone run 50%
	# slower). Left out: the OCI SDK, ~18,000 of the ~39,000 files, which Streaming imports only for oci://.
	# Its status is not checked: a few files are written for newer Pythons (torch's py312 test helpers),
	# which pip's own compile skips the same way.
	$(PY) -m compileall -q -j 0 -x '/site-packages/oci/' $(VENV)/lib > /dev/null || true
	touch $@

demo: env
	$(PY) -m rwkvclip_dist.demo

# Debian packages the tests use: a real single-node Slurm (slurm-wlm, munge) and shellcheck for slurm/.
SYSDEPS := slurm-wlm munge shellcheck
sysdeps:
	@if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v shellcheck >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS) >/dev/null; \
	else echo "note: install $(SYSDEPS) (Debian) to run the Slurm tests; they are skipped without them"; fi

# Two pytest-xdist workers, one per core, as CI runs it (tests/scheduling.py says which tests share a
# worker and in what order); PYTEST_ARGS= runs the suite in one process.
PYTEST_ARGS ?= -n 2 --dist loadgroup --no-loadscope-reorder
test: env sysdeps
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Re-pin after an intentional dependency change.
lock: env
	( sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sort -f ) > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .cache build *.egg-info
