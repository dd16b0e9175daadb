# The two commands of the README: `make train` and `make test`. Both set up .venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup train test test-fast bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

# Writes everything into runs/<date>/<time>/ (or ARGS="out_dir=..."); see README, Training.
train: setup
	$(PY) train.py $(ARGS)

# The whole suite, slow tests included (what CI runs).
test: setup
	$(PY) -m pytest -q $(ARGS)

# The fast suite only (about 8 minutes on 2 cores).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean:
	rm -rf outputs multirun wandb .cache .pytest_cache
