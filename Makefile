# One-command set-up: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The exact CPU wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Two workers (one thread each, tests/conftest.py) use both cores; TEST_WORKERS=0 runs in one process.
# loadgroup: each test goes to whichever worker is free (the long ones first, tests/conftest.py), except
# for the modules conftest keeps on one worker.
TEST_WORKERS ?= 2

test: venv
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadgroup --durations=15

demo: venv
	$(VENV)/bin/passion demo

bench: venv
	$(PY) benchmarks/models.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
