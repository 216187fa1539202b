# The two commands of the README, and their parts.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= cpu,test

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	bash scripts/install.sh $(EXTRAS)
	touch $@

install: $(VENV)/.installed

## The main job: set up, then run the demo on embedded defaults.
demo: install
	$(VENV)/bin/eraser demo --workdir ./demo-run

## Set up, then run the whole test suite (unit + integration with real Ray, vLLM, SeaweedFS).
test: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q --durations=30 tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
