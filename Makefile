# Every set-up step lives here: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch and torchvision pinned to the releases pip finds on local disk on the dev machines;
# elsewhere pip downloads the same versions from PyPI.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install run demo test test-fast lint format bench params clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# stage commands call `python`: the venv's bin goes first on PATH
run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# the same three checks CI runs: lint rules, formatting, types (src/)
LINTED := src stages tests benchmarks scripts
lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy src

# rewrite the code in the house format (what `make lint` checks)
format: install
	$(BIN)/ruff check --fix $(LINTED)
	$(BIN)/ruff format $(LINTED)

# every benchmark at its default (CPU-sized) settings; each prints its own table
bench: install
	for script in benchmarks/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

# params.yaml from the defaults and comments in src/teacher/params.py
params: install
	$(BIN)/python -m teacher.params > params.yaml

clean:
	rm -rf $(VENV)
