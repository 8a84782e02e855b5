# vlscale — set-up, demo, tests. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.vlscale-installed

.PHONY: setup demo test test-fast lint bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

## The main job: build a small real image–caption dataset into Arrow shards, train a dual
## encoder through the deepspeed launcher (2 CPU processes, ZeRO-2, gradient cache, fused loss),
## evaluate retrieval and print a memory report.
demo: $(STAMP)
	$(PY) -m vlscale.demo

## The test suite (what CI runs): lint, then pytest on CPU (Triton kernels via the interpreter).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not dist"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check . || true

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
