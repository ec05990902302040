# Two commands for a fresh clone:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= wikipedia
BUNDLE ?= models/$(DATA)
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test lint bundle clean

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

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
