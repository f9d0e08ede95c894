# aigateway: the two commands a new user needs are `make run` and `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: run test lint typecheck check bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so twistd finds the
	# twisted/plugins drop-in of an editable install.
	$(BIN)/pip install --quiet -e '.[test,dev]' --config-settings editable_mode=compat
	# Rebuild Twisted's plugin cache now, so the first twistd run lists aigateway.
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

## run: start the gateway (proxy on :8000, Admin API on 127.0.0.1:8001, SQLite in ./aigateway.db)
run: $(STAMP)
	$(BIN)/twistd -n aigateway $(ARGS)

## test: the whole suite
test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check aigateway tests bench twisted examples
	$(BIN)/ruff format --check aigateway tests bench twisted examples

typecheck: $(STAMP)
	$(BIN)/mypy aigateway

check: lint typecheck test

## bench: the load benchmark (installs wrk, nginx and hey from Debian's packages)
bench: $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
