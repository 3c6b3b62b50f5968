# Two entry points for users: `make search` and `make test`. Each creates .venv and installs
# what it needs first (torch is pinned to the CPU build that pip finds locally).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STUDY ?= studies/minilm-sentiment.yaml

.PHONY: setup search search-lm test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev,lm,onnx,lmeval]"
	@touch $(STAMP)

search: setup
	$(BIN)/slimsearch run $(STUDY)

search-lm: setup
	$(BIN)/slimsearch run studies/smollm2-perplexity.yaml

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
