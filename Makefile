# Two commands for a fresh clone:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= wikipedia
BUNDLE ?= models/$(DATA)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test lint bundle clean compose-check

# The stamp re-installs when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev,cluster]'
	touch $@

install: $(VENV)/.installed

$(BUNDLE)/manifest.json: | install
	$(BIN)/cdpae train --data $(DATA) --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

run: install bundle
	$(BIN)/cdpae serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT) --print-example

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# Not part of `make test` (it builds images and trains: minutes): builds and runs
# docker-compose.yml for real against podman, then tears everything down. See README "Deploy".
# COMPOSE_CHECK_ARGS=--cold builds without the layer cache; --purge deletes the images after.
# It installs .venv first: the check compares the container's search with `make run`'s.
compose-check: install
	$(PYTHON) -m scripts.compose_check --cdpae $(BIN)/cdpae $(COMPOSE_CHECK_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
