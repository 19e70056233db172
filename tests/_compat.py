"""Airflow internals the suites drive (not the provider), imported where each supported line keeps them."""

from __future__ import annotations

try:  # Airflow >= 3.2
    from airflow.dag_processing.dagbag import DagBag
except ImportError:  # Airflow 3.0 and 3.1
    from airflow.models.dagbag import DagBag  # type: ignore[no-redef]

__all__ = ["DagBag"]
