# Everything runs inside .venv (created when missing). `make help` lists the targets.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PYTHONPATH := $(CURDIR)
export WANDB_SILENT := true

.PHONY: help demo test lint format benchmark reproduce clean

help:  ## list targets
	@grep -E '^[a-z]+:.*##' Makefile | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/pip install -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -r requirements-dev.txt
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed  ## run every topic on the embedded data -> runs/demo/REPORT.md
	$(BIN)/python scripts/demo.py

test: $(VENV)/.installed-dev  ## lint + the test suite (what CI runs)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not slow"
	timeout 600 $(BIN)/python -m pytest -q -m slow

lint: $(VENV)/.installed-dev  ## ruff check
	$(BIN)/ruff check .

format: $(VENV)/.installed-dev  ## ruff format + import sorting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

benchmark: $(VENV)/.installed  ## speed ratios for every module (scripts/benchmark.py)
	$(BIN)/python scripts/benchmark.py

reproduce: $(VENV)/.installed  ## quick versions of every paper table
	$(BIN)/python scripts/reproduce.py all --quick

clean:  ## remove runs (not the venv)
	rm -rf runs lightning_logs
