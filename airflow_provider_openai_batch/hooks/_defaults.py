"""The connection's defaults, in a module that imports nothing.

Every Airflow process reads the provider info when it starts, and the connection form there quotes these
defaults: importing them must not import httpx and the rest of the hook.
"""

from __future__ import annotations

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_MAX_RETRIES = 3
