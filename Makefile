# The README's two commands: `make demo` and `make test`. Both create .venv and install fastdiff first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench install clean

install:
	PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=test,train,bench bash scripts/bootstrap.sh

demo: install
	$(PY) -m fastdiff.cli demo

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m fastdiff.cli bench

clean:
	rm -rf build *.egg-info fastdiff/_C*.so
