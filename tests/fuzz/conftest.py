"""Hypothesis profiles for the fuzz suite.

``make test`` runs the ``ci`` profile: a fixed seed (derandomised) and a bounded budget, so the run is
repeatable and about a minute long. ``make fuzz`` runs the ``fuzz`` profile, ten times the examples with a
random seed, to look for what the fixed seed does not reach.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

#: Examples per property in CI; the ``fuzz`` profile multiplies it by ten.
CI_EXAMPLES = 100

settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "fuzz",
    parent=settings.get_profile("ci"),
    max_examples=CI_EXAMPLES * 10,
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
