# The two commands of the README: `make train` and `make test`. Each sets up .venv first if needed:
# `make train` with what the tools need at run time (requirements.txt), `make test` with the test
# tools too (requirements-dev.txt) and Debian's Chromium for the playground test.
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed
DEV := $(VENV)/.installed-dev

.PHONY: setup setup-dev chromium train test test-slow clean

setup: $(RUNTIME)

$(RUNTIME): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup-dev: $(DEV)

$(DEV): $(RUNTIME) requirements-dev.txt requirements-eval.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# The playground test drives a headless Chromium: Debian's package, installed as root.
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	  else echo "error: the playground test needs Chromium: run 'sudo apt-get install -y chromium', then make test again" >&2; exit 2; fi; }

# Writes everything into runs/<date>/<time>/; options go in ARGS, e.g. make train ARGS="attention=mla"
train: setup
	$(PY) train.py $(ARGS)

# The suite without the tests marked slow; CI (.ci/run) runs both targets.
test: setup-dev chromium
	$(PY) -m pytest -q -m "not slow" $(ARGS)

# The slow tests: compiled decoding, multi-process signals, the GPU-check smoke run, ...
test-slow: setup-dev chromium
	$(PY) -m pytest -q -m slow $(ARGS)

clean:
	rm -rf outputs runs multirun wandb .cache .pytest_cache
