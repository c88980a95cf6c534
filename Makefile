# Two commands on a fresh machine with Python 3 and pip: `make demo` and `make test`.
# Each creates .venv if missing and installs what it needs (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint test-long docs bench sanitize mutate compile-check install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cuda,test,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mamba_cache.demo

# Every test file, three workers; the cases marked `slow` (long only on the CUDA simulator, or long runs) are
# left to `make test-long`. Three workers on two cores: a simulated kernel's threads spend much of their time
# waiting on each other (and the docs tests on subprocesses), so two workers left the cores idle about 30% of
# the time (5 min 2 s with two, 3 min 51 s with three on an idle 2-core machine; docs/development.md).
test: $(STAMP)
	$(PY) -m pytest -n 3 -m "not slow"

lint: $(STAMP)  # ruff with the settings in pyproject.toml: lint rules and formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-long: $(STAMP)  # what `make test` leaves out: the `slow` cases, then the property tests (both backends; the prefix store's model) with 2000 examples
	$(PY) -m pytest -n 3 -m slow
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_properties.py tests/test_prefix_properties.py --hypothesis-show-statistics

sanitize: $(STAMP)  # GPU only: kernel tests under compute-sanitizer memcheck
	.ci/sanitize $(PY)

docs: $(STAMP)  # strict build (tutorials executed), then serve on http://127.0.0.1:8000
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve --dev-addr 127.0.0.1:8000

bench: $(STAMP)  # needs a GPU and PyTorch
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache site .cache

mutate: $(STAMP)  # the mutation run of .ci/mutate.py (about ten minutes on two cores, simulator)
	nice $(PY) .ci/mutate.py

compile-check: $(STAMP)  # no GPU needed: compile for sm_90 every kernel the simulator ran in the kernel tests (about five minutes)
	nice $(PY) .ci/compile_check.py
