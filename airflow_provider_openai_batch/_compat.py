"""Fallbacks for Airflow APIs newer than Airflow 3.0 that ``apache-airflow-providers-common-compat`` does not shim.

Everything else newer than 3.0 is imported through ``airflow.providers.common.compat``. Each fallback here
names the Airflow version that makes it obsolete: delete it when that version becomes the provider's minimum.
"""

from __future__ import annotations

from airflow import __version__ as airflow_version
from airflow.providers.common.compat.sdk import mask_secret
from asgiref.sync import sync_to_async

try:  # Airflow >= 3.3. Remove the fallback when 3.3 is the minimum.
    from airflow.sdk.log import amask_secret
except ImportError:

    async def amask_secret(secret: str, name: str | None = None) -> None:  # type: ignore[misc]
        """Mask ``secret`` from the event loop without blocking it.

        Before 3.3 only the synchronous ``mask_secret`` exists. Besides masking in this process it sends the
        secret to the supervisor, synchronously: on the loop's thread that raises (3.0) or is skipped (3.1), so
        it runs in asgiref's worker thread, from which the triggerer's comms accept it (``asyncio.to_thread``
        would not do on 3.0: its comms then target the wrong loop).
        """
        await sync_to_async(mask_secret)(secret, name)


def deadline_async_callback() -> type:
    """Airflow's ``AsyncCallback``: what a deadline alert runs in the triggerer. Deadline alerts came in 3.1.

    Imported only when asked for, so that the provider still imports on Airflow 3.0, where this raises an
    ``ImportError`` that says which Airflow is needed.
    """
    try:  # Airflow >= 3.2
        from airflow.sdk import AsyncCallback  # type: ignore[attr-defined]
    except ImportError:
        try:  # Airflow 3.1, where this is its documented home. Remove the fallback when 3.2 is the minimum.
            from airflow.sdk.definitions.deadline import AsyncCallback
        except ImportError:
            message = f"Deadline alerts need Airflow 3.1 or later; this is Airflow {airflow_version}."
            raise ImportError(message) from None
    return AsyncCallback


__all__ = ["amask_secret", "deadline_async_callback"]
