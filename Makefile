# The two commands of the README:
#   make demo   installs the package with its demo extra into .venv and runs `weightwatch demo`
#   make test   installs everything the tests need (PyTorch CPU, JAX, Chromium) and runs them
#               on every core (pytest-xdist, two workers per core; the tests of one file stay
#               on one worker)
#   make check  ruff, mypy and the unit tests alone: the quick check while editing
#   make docs   the documentation site into site/ (MkDocs, warnings are errors); make test builds it too
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
LOGDIR ?= weightwatch-demo
# make test: two pytest workers per core. Many tests wait on a server, a browser or a
# subprocess; a second worker per core fills those waits (on 2 cores: 181% CPU and 5:08 of
# pytest, against 158% and 5:22 with one worker per core).
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(2 * len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2 * (os.cpu_count() or 1))')

.PHONY: demo test check venv lint browser docs docs-build

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)

demo: $(PY)
	$(PIP) install -e '.[demo]'
	$(VENV)/bin/weightwatch demo --logdir $(LOGDIR)

# Debian's Chromium for the end-to-end TensorBoard checks (skipped where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core) >/dev/null 2>&1 \
	      || echo "note: could not install chromium; browser tests will be skipped"; \
	  else echo "note: chromium not found and not root; browser tests will be skipped"; fi; }

# The documentation site: every page of docs/, the CLI reference rendered from the argument
# parser and the API reference from the docstrings; a warning (a broken link, a missing
# reference, a public name without a docstring) fails the build.
docs: $(PY)
	$(PIP) install -e '.[docs]'
	$(MAKE) docs-build

docs-build:
	NO_MKDOCS_2_WARNING=1 TF_CPP_MIN_LOG_LEVEL=3 $(VENV)/bin/mkdocs build --strict --site-dir site

test: $(PY) browser
	$(PIP) install -e '.[test]'
	$(PIP) install 'torch==2.13.0' jax jaxlib
	$(MAKE) docs-build
	$(VENV)/bin/ruff check keras_weightwatch tests examples benchmarks docs
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -n $(WORKERS) --dist loadfile

# The quick check for the edit-test loop: ruff, mypy and the unit tests that need no browser,
# no server and no second backend (tests/integration and the slow and browser marks left out).
check: $(PY)
	$(PIP) install -e '.[test]'
	$(VENV)/bin/ruff check keras_weightwatch tests examples benchmarks docs
	$(PY) -m mypy
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile -m "not slow and not browser" \
	  --ignore=tests/integration tests
