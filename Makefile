# The two commands of the README: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3

.PHONY: install demo test lint bench verifier

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

# The semantic cache's trained verifier (~25 min on 2 cores); use it with
# `verifier_path: ~/.cache/kvcellar/verifier` in the semantic settings.
VERIFIER_DIR ?= $(HOME)/.cache/kvcellar/verifier
verifier: install
	$(PYTHON) -m kvcellar semantic train-verifier --out $(VERIFIER_DIR)
