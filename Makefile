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

# The semantic cache's trained verifier: SmolLM2-135M with a one-output head (~85 min on 2
# cores); use it with `verifier_path: ~/.cache/kvcellar/verifier` in the semantic settings
# (README, "Trained verifier"). The lighter MiniLM one (~25 min, less accurate):
#   make verifier VERIFIER_ARGS=   (the CLI defaults: all-MiniLM-L6-v2, 3 epochs)
VERIFIER_DIR ?= $(HOME)/.cache/kvcellar/verifier
VERIFIER_ARGS ?= --base SmolLM2-135M-Instruct --epochs 1 --lr 3e-5 --weight-decay 0
verifier: install
	$(PYTHON) -m kvcellar semantic train-verifier --out $(VERIFIER_DIR) $(VERIFIER_ARGS)
