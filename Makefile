# Quick start: `make demo` and `make test`.  Both create .venv and install on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export QT_QPA_PLATFORM ?= offscreen

.PHONY: demo test lint typecheck importlint pytest bench soak clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,gui]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/qkdlab demo

test: lint typecheck importlint pytest

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# import-linter walks the installed package tree; with package-dir mapping the
# editable install has no such tree, so check a staged copy laid out as installed.
importlint: $(STAMP)
	@$(BIN)/python tools/stage_package.py build/importlint
	cd build/importlint && PYTHONPATH=. ../../$(BIN)/lint-imports --config ../../pyproject.toml --no-cache

pytest: $(STAMP)
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# 30 min of drifting mock bench with the loops on: QBER, memory and handles (not CI)
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache bench-results.json
