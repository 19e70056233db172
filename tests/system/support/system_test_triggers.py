"""Test-only triggers, importable by every process of the system-test deployment (it is on their PYTHONPATH)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class BlockingTrigger(BaseTrigger):
    """A badly-written trigger that blocks the triggerer's event loop with a synchronous sleep.

    The system tests use it as a positive control: it proves the triggerer's "blocked" warning does reach the
    triggerer's log file, so that not finding the warning after the provider's triggers ran means something.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {"seconds": self.seconds})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        time.sleep(self.seconds)  # noqa: ASYNC251 - deliberately blocking
        yield TriggerEvent({"blocked_for": self.seconds})
