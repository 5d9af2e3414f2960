# Two entry points that work on a fresh machine with only Python 3.11+:
#   make demo   -- set up .venv and train the tiny preset (CPU is fine), ending with samples
#   make test   -- set up .venv and run the CPU test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test setup clean

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip -q
	$(PY) -m pip install -q -r requirements-ci.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dsv train --preset tiny --run-name demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
