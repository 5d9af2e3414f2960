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

# The tiny model on what two CPU cores can learn in about two minutes: 8-frame 16x16 grey digits (128 tokens
# of (1, 4, 4) patches; the preset's default 32x32 RGB clips are 512 tokens of 48 values each), 700 steps of
# 32 clips at lr 2e-3, and one sample of each digit. 200 steps of 8 RGB clips at 3e-4 gave colour noise.
DEMO_FLAGS := --data.channels 1 --model.in-channels 1 --data.height 16 --data.width 16 \
              --batch-size 32 --steps 700 --optim.lr 2e-3 --num-samples 10

demo: setup
	$(VENV)/bin/dsv train --preset tiny $(DEMO_FLAGS) --run-name demo-$$(date +%Y%m%d-%H%M%S)

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
