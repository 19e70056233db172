"""What a DAG file pays for this provider at every parse, as a rule on the import graph rather than a timing.

A DAG file imports ``airflow.sdk`` and the operators, and constructs operators; it never runs them. So neither
that import nor constructing an operator may load what only running one needs: the hook, the triggers, the
cleanup, results saving and storage, nor pydantic's models. Each check runs in a fresh interpreter, as a DAG
file's parse does. bench/parse_cost.py measures what the import costs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PACKAGE = "airflow_provider_openai_batch"

#: Modules that only running an operator needs.
RUN_ONLY = (
    f"{PACKAGE}.hooks.openai_batch",
    f"{PACKAGE}.hooks._connection",
    f"{PACKAGE}.triggers.openai_batch",
    f"{PACKAGE}.cleanup",
    f"{PACKAGE}.results",
    f"{PACKAGE}.storage",
    f"{PACKAGE}.cancellation",
    f"{PACKAGE}.models",
)

_LOADED_BY = r"""
import json, sys
exec(sys.argv[1])
before = set(sys.modules)
exec(sys.argv[2])
print(json.dumps(sorted(name for name in set(sys.modules) - before if name.startswith("airflow_provider"))))
"""

DAG_FILE_STEPS = {
    "import": "from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator",
    "construct": """
from datetime import timedelta
from airflow_provider_openai_batch.operators.openai_batch import (
    OpenAICancelBatchOperator,
    OpenAICancelStaleBatchesOperator,
)
OpenAICancelBatchOperator(task_id="cancel", batch_id="batch_abc", deferrable=True, save_results_to="/data/x")
OpenAICancelStaleBatchesOperator(task_id="cleanup", older_than=timedelta(days=1), statuses=["in_progress"])
""",
}


def modules_loaded_by(statement: str, *, on_top_of: str = "import airflow.sdk") -> list[str]:
    """The provider's modules that ``statement`` loads in a fresh interpreter, on top of what ``on_top_of``
    loaded (by default ``airflow.sdk``, which every DAG file imports first)."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED_BY, on_top_of, statement],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("step", sorted(DAG_FILE_STEPS))
def test_a_dag_file_loads_nothing_that_only_running_an_operator_needs(step: str) -> None:
    loaded = modules_loaded_by(DAG_FILE_STEPS[step])

    assert f"{PACKAGE}.operators.openai_batch" in loaded
    assert not set(loaded) & set(RUN_ONLY), f"{step} loads {sorted(set(loaded) & set(RUN_ONLY))}"


def test_running_an_operator_loads_what_it_needs() -> None:
    """The rule's other side: the modules it keeps out are loaded where an operator runs, not lost."""
    loaded = modules_loaded_by(
        "from airflow_provider_openai_batch.operators.openai_batch import OpenAICancelBatchOperator\n"
        "operator = OpenAICancelBatchOperator(task_id='cancel', batch_id='batch_abc')\n"
        "operator.hook\n"
    )

    assert f"{PACKAGE}.hooks.openai_batch" in loaded


def test_airflow_reads_the_provider_info_without_the_hook() -> None:
    """Every Airflow process reads the provider info at start-up: it quotes the connection's defaults, and must
    not import the hook's connection handling for them."""
    loaded = modules_loaded_by(
        "from airflow_provider_openai_batch.get_provider_info import get_provider_info\nget_provider_info()",
        on_top_of="",
    )

    assert f"{PACKAGE}.get_provider_info" in loaded
    assert f"{PACKAGE}.hooks._connection" not in loaded
