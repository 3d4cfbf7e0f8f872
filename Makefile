# The two commands of the README's quick start. Both install what they need first.
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup:
	bash tools/setup.sh

demo: setup
	bash tools/demo.sh

test: setup lint
	$(PYTHON) -m pytest -q -ra --durations=15 tests

lint:
	$(PYTHON) -m ruff check vdisk tools tests
	$(PYTHON) -m ruff format --check vdisk tools tests
	$(PYTHON) -m mypy

bench: setup
	$(PYTHON) tools/bench
