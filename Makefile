# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3

.PHONY: install demo test lint bench

install:
	PYTHON=$(PYTHON) bash scripts/install.sh

demo: install
	$(PYTHON) -m kvcellar chat

test: install
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check src tests benchmarks

bench: install
	$(PYTHON) benchmarks/multi_round_qa.py
