"""Hypothesis profiles for the fuzz suite (issue 24).

``make test`` runs the ``ci`` profile: derandomised (a fixed seed, so a run is repeatable) with each property's
example budget as written, about a minute in all. ``make fuzz`` selects the ``fuzz`` profile through
``HYPOTHESIS_PROFILE``: ten times the examples (see :func:`tests.fuzz._hostile.budget`), from a random seed, to
reach what the fixed seed does not.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per property when a property does not set its own budget.
CI_EXAMPLES = 30

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    # The module's shared emulator and pytest's monkeypatch/caplog are reset by each example itself.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
    print_blob=True,
)
settings.register_profile("fuzz", parent=settings.get_profile("ci"), derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
