"""Smoke DAGs proving the deployment itself: scheduler -> worker -> deferred -> triggerer -> worker again.

They use only Airflow's own standard provider (and a test-only trigger), so a failure here points at the
deployment, not at the OpenAI Batch provider.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import DAG, BaseOperator, task
from system_test_triggers import BlockingTrigger

with DAG("system_smoke_deferrable", schedule=None, catchup=False, tags=["system-test"]):
    wait = DateTimeSensorAsync(
        task_id="wait",
        target_time="{{ macros.datetime.utcnow() + macros.timedelta(seconds=5) }}",
        poke_interval=1,
    )

    @task
    def after() -> str:
        return "resumed"

    wait >> after()


class BlockTheTriggerer(BaseOperator):
    """Defers to a trigger that blocks the triggerer's event loop for ``seconds``."""

    def __init__(self, *, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context: Any) -> None:
        self.defer(trigger=BlockingTrigger(self.seconds), method_name="execute_complete")

    def execute_complete(self, context: Any, event: Any = None) -> Any:
        return event


with DAG("system_smoke_blocking_trigger", schedule=None, catchup=False, tags=["system-test"]):
    BlockTheTriggerer(task_id="block", seconds=1.0)
