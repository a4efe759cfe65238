# The verbs a newcomer needs. Every target honours the environment names in README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; on a GPU box: make install TORCH_SPEC="torch" (the CUDA build).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo up down status test unit lint format bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# CLIP's BPE vocabulary ships inside this wheel; only the data file is used.
	$(PY) -m pip install -q --no-deps "open-clip-torch==3.3.0"
	touch $(STAMP)

demo: install
	$(PY) -m services.demo

up: install
	$(PY) -m services.stack up

down:
	$(PY) -m services.stack down

status:
	$(PY) -m services.stack status

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest

# The fast loop: tests that start no whole stack and nothing slow (see pytest markers).
unit: install
	$(PY) -m pytest tests/unit -q -m "not stack and not slow"

# Speed figures beside their baselines, one run (see BENCHMARKS.md); BENCH_ARGS=--full for
# the full sizes.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# Kill workers, Redis and Milvus under load, then check nothing was lost (see RELIABILITY.md);
# CHAOS_ARGS="--duration 300 --seed 7 --worker-kills 4" and so on (python -m tests.chaos -h).
chaos: install
	$(PY) -m tests.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
