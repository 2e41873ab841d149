# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A CPU torch wheel lies on these machines; pin it when pip can find it so an
	# unpinned torch does not pull several GB of CUDA packages. Users keep pyproject's range.
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hf_taskarith.demo --out demo_output

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) tests/bench/run_bench.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) demo_output .pytest_cache build *.egg-info
