# The two commands of the README: `make train` and `make test`. Both set up .venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-slow clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Writes everything into runs/<date>/<time>/ (or ARGS="out_dir=..."); see README, Training.
train: setup
	$(PY) train.py $(ARGS)

# The suite without the tests marked slow (timed in the README, Tests). CI (.ci/run) runs both targets.
test: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The slow tests: compiled decoding, multi-process signals, the GPU-check smoke run, ...
test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

clean:
	rm -rf outputs runs multirun wandb .cache .pytest_cache
