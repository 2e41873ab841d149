# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

MK_VENV := .venv-mergekit
MK_STAMP := $(MK_VENV)/.installed

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

# mergekit in its own virtualenv: the second implementation our mergekit-config outputs are
# compared against (tests skip if it cannot be installed).
$(MK_STAMP):
	$(PYTHON) -m venv $(MK_VENV)
	($(MK_VENV)/bin/python -m pip install -q torch==2.13.0 || $(MK_VENV)/bin/python -m pip install -q torch) && \
	  $(MK_VENV)/bin/python -m pip install -q mergekit==0.1.5 && touch $(MK_STAMP) || \
	  echo "mergekit could not be installed: its comparison tests will skip"

test: $(STAMP) $(MK_STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP) $(MK_STAMP)
	$(PY) tests/bench/run_bench.py --out BENCHMARKS.md

clean:
	rm -rf $(VENV) $(MK_VENV) demo_output .pytest_cache build *.egg-info
