# Every set-up step lives here: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every install comes from a committed lock: exact versions and hashes of every package, direct
# and transitive (`make lock` writes them; docs/CONTRIBUTING.md says when). Plain pip installs
# them, so the dev machines' local wheels (torch) still serve.
LOCK := requirements/main.txt
# Label Studio for the end-to-end test of `teacher serve`, in its own venv: its pins (Django,
# numpy < 2.3, opencv 4.12, ...) clash with ours. Without PyPI it is not installed and
# tests/serve/test_serve_label_studio.py skips, saying so.
LS_VENV := .venv-ls
LS_LOCK := requirements/label-studio.txt
LS_STAMP := $(LS_VENV)/.installed-label-studio
# Is what is installed the lock? One line naming the package if not; the stamp goes, so the
# next make reinstalls from the lock.
CHECK = $(BIN)/python -m teacher.core.environment

.PHONY: install label-studio lock test-lowest run demo test test-fast lint format bench bench-gpu params clean

install: $(STAMP)
	@$(CHECK) $(LOCK) || { rm -f $(STAMP); exit 1; }

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

label-studio: install $(LS_STAMP)
	@test ! -f $(LS_STAMP) || $(CHECK) $(LS_LOCK) --venv $(LS_VENV) || { rm -f $(LS_STAMP); exit 1; }

$(LS_STAMP): $(LS_LOCK)
	rm -f $(LS_STAMP)
	( test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV) ) && \
	$(LS_VENV)/bin/python -m pip install --quiet --require-hashes -r $(LS_LOCK) && touch $(LS_STAMP) || \
	echo "Label Studio could not be installed into $(LS_VENV) from $(LS_LOCK): the Label Studio end-to-end test will skip"

# Regenerate both locks from pyproject.toml, requirements/main.in and requirements/label-studio.in
# (newest versions inside their bounds, for every platform), with uv in a throwaway venv. Then
# `make test` on the new lock before committing it.
lock:
	test -x .venv-lock/bin/uv || ( $(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet uv==0.13.10 )
	.venv-lock/bin/uv pip compile --quiet --universal --generate-hashes --custom-compile-command "make lock" \
		pyproject.toml requirements/main.in --extra dev -o $(LOCK)
	.venv-lock/bin/uv pip compile --quiet --universal --generate-hashes --custom-compile-command "make lock" \
		--python-version 3.10 requirements/label-studio.in -o $(LS_LOCK)

# The oldest releases pyproject.toml allows (uv's lowest-direct resolution) and the fast suite on
# them: how its lower bounds are checked (docs/CONTRIBUTING.md). Not part of `make test`. The
# sample's JPEG bytes depend on the Pillow build, so that one test is left out.
test-lowest:
	test -x .venv-lock/bin/uv || ( $(PYTHON) -m venv .venv-lock && .venv-lock/bin/python -m pip install --quiet uv==0.13.10 )
	test -x .venv-lowest/bin/python || $(PYTHON) -m venv .venv-lowest
	.venv-lock/bin/uv pip compile --quiet --resolution lowest-direct --python-version 3.11 \
		pyproject.toml --extra dev -o .venv-lowest/requirements.txt
	.venv-lowest/bin/python -m pip install --quiet -r .venv-lowest/requirements.txt
	PYTHONPATH=src .venv-lowest/bin/python -m pytest -q -m "not slow" \
		--deselect tests/core/test_environment.py::test_this_environment_is_the_lock \
		--deselect tests/pipeline/test_data_stages.py::test_sample_is_deterministic_and_complete

# stage commands call `python`: the venv's bin goes first on PATH
run: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

demo: install
	$(BIN)/python scripts/demo.py

test: install label-studio
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

# what only a GPU measures (real architectures, random weights, capped at --budget 450 s): one
# table, also written to gpu_check.json. Without CUDA: the tiny CPU dry run (docs/BENCHMARKS.md)
bench-gpu: install
	$(BIN)/python scripts/gpu_check.py

# params.yaml from the defaults and comments in src/teacher/core/params.py
params: install
	$(BIN)/python -m teacher.core.params > params.yaml

clean:
	rm -rf $(VENV) $(LS_VENV) .venv-lock .venv-lowest
