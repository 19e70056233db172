# The two set-up commands are `make demo` and `make test`; both work on a fresh clone.
# Another Python: `make test PYTHON=python3.12 VENV=.venv-3.12` (what .ci/run does for each supported Python).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint fuzz test-system test-compat demo bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv

# Reinstall whenever the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e ".[test,lint]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest --ignore=tests/system

# Style and types: ruff's rules and format, mypy on the package.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m mypy airflow_provider_openai_batch

# The fuzz suite alone (tests/fuzz, also part of `make test`) at ten times its examples, from a random seed.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest tests/fuzz -p no:cacheprovider --hypothesis-show-statistics

# A real Airflow deployment (scheduler, triggerer, dag-processor, API server) against the emulator.
test-system: install
	$(BIN)/python -m pytest tests/system -p no:cacheprovider

# The unit and dag.test() suites against the built wheel on the newest patch of every Airflow 3 line.
test-compat: install
	$(BIN)/python .ci/compat_matrix.py

# Benchmarks against the official OpenAI provider; not part of `make test`.
bench: install
	$(BIN)/python bench/run_all.py

demo: install
	$(BIN)/python demo/run_demo.py

clean:
	rm -rf $(VENV) .pytest_cache .airflow-demo .compat
