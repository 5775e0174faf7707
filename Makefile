# Every target creates .venv when it is missing and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/subledger demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench

# mypy resolves `subledger.core` and the rest through a tree of symlinks that mirrors the installed layout.
lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf .typecheck && mkdir -p .typecheck/subledger
	for d in core store outbox scheduler app migrations; do ln -s ../../$$d .typecheck/subledger/$$d; done
	MYPYPATH=.typecheck $(BIN)/mypy --strict --namespace-packages --explicit-package-bases \
		-p subledger.core -p subledger.store -p subledger.outbox -p subledger.scheduler -p subledger.app \
		-p subledger.migrations

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .typecheck
