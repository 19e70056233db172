"""Pytest plugin providing the ``openai_batch_emulator`` fixture.

Enable it in your top-level ``conftest.py``::

    pytest_plugins = ["airflow_provider_openai_batch.testing.pytest_plugin"]

It is not registered automatically, so installing the provider never adds fixtures to unrelated test suites.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from airflow_provider_openai_batch.testing.emulator import BatchAPIEmulator


@pytest.fixture
def openai_batch_emulator() -> Iterator[BatchAPIEmulator]:
    """A running emulator on a free loopback port, fresh for each test and stopped after it."""
    with BatchAPIEmulator() as emulator:
        yield emulator
