#!/usr/bin/env bash
# Usage: bench/setup_official.sh  -- create .bench-venv with the official OpenAI provider 2.2.0 and this package.
#
# The official `apache-airflow-providers-openai` is never a dependency of this package: it lives only in the
# bench-only virtualenv `.bench-venv`, next to the same Airflow version as `.venv` and this package (editable),
# so both triggers run in the same interpreter build. Idempotent: does nothing if the venv is already complete.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MAIN_PY="$ROOT/.venv/bin/python"
BENCH_VENV="$ROOT/.bench-venv"
OFFICIAL_VERSION="2.2.0"
STAMP="$BENCH_VENV/.bench-installed-$OFFICIAL_VERSION"

if [[ -f "$STAMP" ]]; then
    exit 0
fi
# Same interpreter as .venv, so the import-time and RSS comparisons are not skewed by the Python build.
BASE_PY="$("$MAIN_PY" -c 'import sys, os; print(os.path.join(sys.base_prefix, "bin", "python3"))')"
AIRFLOW_VERSION="$("$MAIN_PY" -c 'from importlib.metadata import version; print(version("apache-airflow"))')"

"$BASE_PY" -m venv "$BENCH_VENV"
"$BENCH_VENV/bin/python" -m pip install --quiet --upgrade pip uv
"$BENCH_VENV/bin/uv" pip install --quiet --python "$BENCH_VENV/bin/python" \
    "apache-airflow==$AIRFLOW_VERSION" \
    "apache-airflow-providers-openai==$OFFICIAL_VERSION" \
    -e "$ROOT"
touch "$STAMP"
