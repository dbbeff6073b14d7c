# The README's two commands: `make demo` and `make test`. Both create .venv and install fastdiff first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

install:
	PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=test,train,bench bash scripts/bootstrap.sh

# `fastdiff demo`: `fastdiff sample` with its defaults (samples.png from the bundled digits model, images/s), then
# the quick GroupNorm benchmark table for the device at hand.
demo: install
	$(VENV)/bin/fastdiff demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m fastdiff.cli bench

clean:
	rm -rf build *.egg-info fastdiff/_C*.so
