# The two set-up commands are `make demo` and `make test`; both work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

# Reinstall whenever the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest

demo: install
	$(BIN)/python -m airflow_provider_openai_batch.testing.demo

clean:
	rm -rf $(VENV) .pytest_cache .airflow-demo
